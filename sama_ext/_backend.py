"""Which implementation runs the kernels: the compiled extension or the pure-PyTorch reference.

SAMA_EXT_BACKEND=compiled|torch|auto (default auto). `auto` and `compiled` both build and
use the extension and raise BuildError when that fails — the reference is never used
silently. The one exception: under `auto` on a machine with no C++ compiler at all, the
reference is used with a loud warning naming the fix. `torch` selects the reference on purpose.
"""
from __future__ import annotations

import os
import shutil
import threading
import warnings

from ._build import BuildError, Loaded, load

_VALID = ("auto", "compiled", "torch")
_lock = threading.Lock()
_loaded: Loaded | None = None
_choice: str | None = None


def requested() -> str:
    val = os.environ.get("SAMA_EXT_BACKEND", "auto").strip().lower()
    if val not in _VALID:
        raise ValueError(f"SAMA_EXT_BACKEND must be one of {', '.join(_VALID)}, not {val!r}")
    return val


def backend() -> str:
    """"compiled" (the built extension: CPU kernels, and CUDA kernels when built) or "torch"."""
    global _choice, _loaded
    if _choice is not None:
        return _choice
    with _lock:
        if _choice is not None:
            return _choice
        want = requested()
        if want == "torch":
            _choice = "torch"
            return _choice
        if want == "auto" and shutil.which(os.environ.get("CXX", "c++")) is None \
                and not _has_aot_build():
            warnings.warn(
                "sama_ext: no C++ compiler found, so the compiled kernels cannot be built; using the slower "
                "pure-PyTorch reference. Install g++ (or set CXX) for the fused kernels, or set "
                "SAMA_EXT_BACKEND=torch to silence this.", RuntimeWarning, stacklevel=2)
            _choice = "torch"
            return _choice
        _loaded = load()
        _register_fakes()
        _choice = "compiled"
        return _choice


def _has_aot_build() -> bool:
    import importlib.util

    return importlib.util.find_spec("sama_ext._C") is not None


def compiled() -> Loaded:
    """The loaded extension (building it on first use)."""
    if backend() != "compiled":
        raise BuildError("sama_ext: the compiled backend is not in use (SAMA_EXT_BACKEND=torch)")
    assert _loaded is not None
    return _loaded


def check_device(device) -> None:
    """CUDA tensors need the CUDA kernels; say why they are missing instead of a dispatcher error."""
    if device.type == "cuda" and not compiled().with_cuda:
        raise BuildError(
            f"sama_ext: got CUDA tensors, but the extension was built without CUDA kernels: "
            f"{compiled().why_no_cuda}. Install a CUDA toolkit matching torch (CUDA {_torch_cuda()}) or set "
            f"CUDA_HOME, then restart; or set SAMA_EXT_BACKEND=torch.")
    if device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"sama_ext: no kernels for device type {device.type!r} (cpu and cuda only)")


def _torch_cuda():
    import torch

    return torch.version.cuda


_fakes_done = False


def _register_fakes() -> None:
    """Fake (meta) kernels: shapes only, so the ops trace under torch.compile and pass opcheck."""
    global _fakes_done
    if _fakes_done:
        return
    import torch

    def reducing(*args, **kwargs):
        d = args[0]
        return d[0].new_empty((), dtype=torch.float64)

    def in_place(*args, **kwargs):
        return None

    for name in ("adam_adapt", "const_adapt", "rmsprop_adapt", "adagrad_adapt"):
        torch.library.register_fake(f"sama_ext::{name}")(reducing)
    def measured(*args, **kwargs):  # [Σ (θ_new − θ_src)·v, #moved]
        return args[0][0].new_empty((2,), dtype=torch.float64)

    for name in ("perturb_", "perturb_from_", "perturb_save_", "combine_"):
        torch.library.register_fake(f"sama_ext::{name}")(in_place)
    for name in ("perturb_from_measured_", "perturb_save_measured_"):
        torch.library.register_fake(f"sama_ext::{name}")(measured)
    _fakes_done = True
