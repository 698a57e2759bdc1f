"""A CPU stand-in for "this call never synchronises with the GPU" (README, DESIGN §4).

On a GPU a host read of a device tensor (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, a
boolean mask, `nonzero`, …) blocks until the device catches up; `torch.cuda.set_sync_debug_mode`
turns those into errors. On a CPU every tensor is a host tensor, so nothing would ever fail. This
guard models the GPU's split instead:

* host tensors are the ones that really live on the host in a GPU run: the optimisers' step
  counters (torch keeps `state["step"]` on the CPU unless capturable/fused) and tensor-valued
  hyperparameters in the param groups (a CPU `lr`), plus whatever the caller names; a tensor
  computed only from host tensors is a host tensor too (a CPU op on CPU inputs);
* every other tensor — the user's θ, λ, data and optimiser buffers, and everything the call
  computes from them or creates (factories run on θ's device) — counts as a device tensor;
* reading a device tensor's value on the host raises `HostSyncError`.

Reads are caught at the dispatcher (`aten._local_scalar_dense`, behind item/bool/float/int/
index/format/comparisons; ops whose output size depends on the data: nonzero, masked_select,
boolean indexing, unique, …; `equal`/`allclose`/`is_nonzero`) by a TorchDispatchMode that also
sees the backward passes and the reference backend's every op, and at the Python level for the
reads that bypass the dispatcher (`tolist`, `numpy`, `__array__`, `repr`). A copy to the host
(`.cpu()`) cannot be told from a no-op on a CPU-only machine; on a GPU the guard also sets
`torch.cuda.set_sync_debug_mode("error")`, which catches it there.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch

from sama_ext import step_record
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostSyncError", "no_host_reads", "host_tensors_of", "guarded"]


class HostSyncError(AssertionError):
    """A device→host read inside a region that promises none."""


_aten = torch.ops.aten
# ops that read a tensor's values on the host, or whose output size depends on them
_SYNCING = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default, _aten.nonzero_static.default, _aten.masked_select.default,
    _aten.equal.default, _aten.allclose.default, _aten.is_nonzero.default,
    _aten.unique_dim.default, _aten._unique2.default, _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor, _aten._assert_async.default, _aten._assert_async.msg,
}


def _is_bool_index(func, args) -> bool:
    # x[mask]: aten.index with a bool/uint8 index has a data-dependent output size
    if func not in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Guard(TorchDispatchMode):
    def __init__(self, host: Iterable[torch.Tensor], what: str):
        super().__init__()
        self.what = what
        self.keep: list[torch.Tensor] = []   # strong refs, so that ids are not reused while active
        self.host: set[int] = set()
        for t in host:
            self._mark_host(t)

    def _mark_host(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.keep.append(t)
            self.host.add(id(t))

    def is_host(self, t: torch.Tensor) -> bool:
        return id(t) in self.host

    def fail(self, how: str, t: torch.Tensor | None = None) -> None:
        shape = "" if t is None else f" (a {tuple(t.shape)} {t.dtype} tensor)"
        raise HostSyncError(f"{self.what}: device->host read via {how}{shape}; on a GPU this synchronises")

    def _all_host(self, args, kwargs) -> tuple[bool, torch.Tensor | None]:
        """(every tensor argument is a host tensor and there is one, the first tensor argument);
        arguments are tensors, or lists/tuples of them (foreach ops, indices)."""
        first, seen = None, False
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    first = t if first is None else first
                    seen = True
                    if id(t) not in self.host:
                        return False, first
        return seen, first

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        all_host, first = self._all_host(args, kwargs)
        if (func in _SYNCING or _is_bool_index(func, args)) and not all_host:
            self.fail(str(func), first)
        out = func(*args, **kwargs)
        if all_host:  # a CPU op on host tensors stays on the host
            for o in tree_flatten(out)[0]:
                self._mark_host(o)
        return out


_active: list[_Guard] = []
_PY_READS = ("tolist", "numpy", "__array__", "__repr__")


def _patched(name: str, orig):
    def read(self, *args, **kwargs):
        if _active and not _active[-1].is_host(self):
            _active[-1].fail(f"Tensor.{name}", self)
        return orig(self, *args, **kwargs)
    read.__name__ = name
    return read


@contextmanager
def no_host_reads(host: Iterable[torch.Tensor] = (), what: str = "guarded region"):
    """Inside: any host read of a tensor not in `host` (or computed only from `host`) raises
    HostSyncError. On a machine with CUDA, also torch.cuda.set_sync_debug_mode("error")."""
    guard = _Guard(host, what)
    originals = {n: getattr(torch.Tensor, n) for n in _PY_READS}
    cuda = torch.cuda.is_available()
    prev_mode = torch.cuda.get_sync_debug_mode() if cuda else None
    for n, f in originals.items():
        setattr(torch.Tensor, n, _patched(n, f))
    _active.append(guard)
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with guard:
            yield guard
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(prev_mode)
        _active.pop()
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def host_tensors_of(*optimizers: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What lives on the host in a GPU run of these optimisers: CPU step counters and CPU
    tensor hyperparameters (e.g. a tensor lr). On a CPU-only machine every tensor is a CPU tensor,
    so this names exactly the state `torch.optim` keeps on the host by default."""
    out = []
    for opt in optimizers:
        for group in opt.param_groups:
            for k, val in group.items():
                if k == "params":
                    continue
                for t in tree_flatten(val)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        out.append(t)
        # the hyperparameters of the last step as sama_ext.step_record copied them (same devices)
        rec = step_record._records.get(opt)
        for snap in (rec.groups.values() if rec is not None else ()):
            for t in tree_flatten(list(snap.values()))[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    out.append(t)
        for st in opt.state.values():
            s = st.get("step") if isinstance(st, dict) else None
            if isinstance(s, torch.Tensor) and s.device.type == "cpu":
                out.append(s)
    return out


def guarded(fn, optimizer_arg: tuple[int, str] | None, what: str):
    """fn wrapped so that every call runs under no_host_reads, with the host tensors of the
    optimiser passed at optimizer_arg = (position, keyword) (None: no host tensors at all)."""
    def call(*args, **kwargs):
        host = []
        if optimizer_arg is not None:
            pos, name = optimizer_arg
            opt = args[pos] if len(args) > pos else kwargs.get(name)
            host = host_tensors_of(opt) if isinstance(opt, torch.optim.Optimizer) else []
        with no_host_reads(host, what):
            return fn(*args, **kwargs)
    call.__wrapped__ = fn
    return call
