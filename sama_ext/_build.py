"""Finding a toolchain and JIT-building the compiled extension.

The build is content-addressed: the cache folder's name hashes the sources, the flags, the
torch/Python versions and the CUDA setup, so a second import loads the built module
directly (no compiler, no ninja), and a change to any of these builds afresh beside it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES = ("ops_cpu.cpp", "bindings.cpp")
CUDA_SOURCES = ("ops_cuda.cpp", "cuda/multi_tensor.cu")


class BuildError(RuntimeError):
    """The compiled backend was wanted but could not be built or loaded."""


def source_dir() -> Path:
    """The C++/CUDA sources: shipped inside the package (pip install .) or next to it
    (a source checkout or an editable install)."""
    for cand in (PACKAGE_DIR / "_csrc", PACKAGE_DIR.parent / "csrc"):
        if (cand / "ops_impl.h").is_file():
            return cand
    raise BuildError(
        f"sama_ext: cannot find the C++ sources (looked in {PACKAGE_DIR / '_csrc'} and "
        f"{PACKAGE_DIR.parent / 'csrc'}); reinstall the package with `pip install .`")


# ----------------------------------------------------------------------------- CUDA toolkit
def _toolkit_ok(root: Path) -> bool:
    """A usable toolkit has nvcc, the runtime headers and libcudart to link against
    (a bare nvcc wrapper script's folder does not)."""
    if not (root / "bin" / "nvcc").is_file():
        return False
    headers = [root / "include" / "cuda_runtime.h", *root.glob("targets/*/include/cuda_runtime.h")]
    libs = [*root.glob("lib64/libcudart.so*"), *root.glob("lib/libcudart.so*"),
            *root.glob("targets/*/lib/libcudart.so*")]
    return any(h.is_file() for h in headers) and bool(libs)


def _toolkit_version(root: Path) -> str | None:
    vfile = root / "version.json"
    if vfile.is_file():
        m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"(\d+\.\d+)', vfile.read_text())
        if m:
            return m.group(1)
    m = re.search(r"cuda-(\d+\.\d+)", str(root.resolve()))
    return m.group(1) if m else None


def _system_toolkits() -> list[Path]:
    return [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True), Path("/opt/cuda")]


def find_cuda_home(torch_cuda: str | None = None) -> tuple[Path | None, str]:
    """(toolkit root or None, how it was found / why none was).

    CUDA_HOME / CUDA_PATH are respected and must point at a real toolkit. Otherwise the
    candidates are: the folder above the real nvcc on PATH, /usr/local/cuda, /usr/local/cuda-*,
    /opt/cuda; a toolkit whose version matches torch's CUDA wins. (torch's own guess takes the
    folder above `nvcc` on PATH, which is wrong when that nvcc is a wrapper script.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if val:
            root = Path(val)
            if _toolkit_ok(root):
                return root, f"${var}"
            raise BuildError(
                f"sama_ext: ${var}={val} is not a CUDA toolkit (need bin/nvcc, include/cuda_runtime.h and "
                f"libcudart); fix or unset it")
    cands: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent)
    cands += _system_toolkits()
    seen, valid = set(), []
    for c in cands:
        key = str(c.resolve()) if c.exists() else str(c)
        if key in seen:
            continue
        seen.add(key)
        if _toolkit_ok(c):
            valid.append(c)
    if not valid:
        return None, "no CUDA toolkit found (set CUDA_HOME to one that matches torch's CUDA version)"
    if torch_cuda:
        want = ".".join(torch_cuda.split(".")[:2])
        for c in valid:
            if _toolkit_version(c) == want:
                return c, f"found at {c} (CUDA {want}, as torch)"
    return valid[0], f"found at {valid[0]}"


# ----------------------------------------------------------------------------- build config
@dataclass
class BuildConfig:
    with_cuda: bool
    cuda_home: Path | None
    why_no_cuda: str
    cflags: list[str] = field(default_factory=list)
    cuda_cflags: list[str] = field(default_factory=list)
    ldflags: list[str] = field(default_factory=list)


def _cpu_tag() -> str:
    """-march=native code must not be loaded on another CPU sharing the cache."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + hashlib.sha1(flags.encode()).hexdigest()[:8]


def build_config(torch, aot: bool = False) -> BuildConfig:
    """What to build. The JIT build (aot=False) targets this machine; the ahead-of-time build
    compiles CUDA whenever it can and avoids -march=native."""
    mode = os.environ.get("SAMA_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise BuildError(f"sama_ext: SAMA_EXT_CUDA must be auto, 0 or 1, not {mode!r}")
    cuda_home, why = None, ""
    if mode == "0":
        why = "SAMA_EXT_CUDA=0"
    elif torch.version.cuda is None:
        why = "this torch build has no CUDA"
    else:
        cuda_home, why = find_cuda_home(torch.version.cuda)
        if cuda_home is not None and mode == "auto" and not aot and not torch.cuda.is_available() \
                and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # No GPU to run on and no target named: building for every architecture torch
            # supports would take many minutes for code nobody can run here.
            why = "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (set it, or SAMA_EXT_CUDA=1, to build anyway)"
            cuda_home = None
    if mode == "1" and cuda_home is None:
        raise BuildError(f"sama_ext: SAMA_EXT_CUDA=1 but the CUDA kernels cannot be built: {why}")
    with_cuda = cuda_home is not None
    cfg = BuildConfig(with_cuda=with_cuda, cuda_home=cuda_home, why_no_cuda="" if with_cuda else why)
    # -fno-math-errno / -fno-trapping-math change no result (no errno reads, no FP traps) but
    # let the compiler vectorise the CPU loops (sqrt without an errno branch; selects instead
    # of branches around divisions).
    cfg.cflags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"] + ([] if aot else ["-march=native"])
    cfg.ldflags = ["-fopenmp"]
    if with_cuda:
        cfg.cflags.append("-DSAMA_EXT_WITH_CUDA")
        cfg.cuda_cflags = ["-O3", "-lineinfo"]
    return cfg


def _fingerprint(torch, cfg: BuildConfig, src: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_file() and f.suffix in (".h", ".cuh", ".cpp", ".cu") and rel.parts[0] != "tests":
            h.update(str(rel).encode())
            h.update(f.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), sys.version, _cpu_tag(), str(cfg.with_cuda),
                 str(cfg.cuda_home), os.environ.get("TORCH_CUDA_ARCH_LIST", ""), " ".join(cfg.cflags),
                 " ".join(cfg.cuda_cflags)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    return Path(base) / "sama_ext"


def _import_from(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Loaded:
    module: object
    with_cuda: bool
    why_no_cuda: str
    origin: str  # "aot" or the build folder


def load() -> Loaded:
    """Load the ahead-of-time build if there is one, else JIT-build (once) and load."""
    import torch

    if importlib.util.find_spec("sama_ext._C") is not None:
        mod = importlib.import_module("sama_ext._C")
        return Loaded(mod, mod.with_cuda(), "" if mod.with_cuda() else "built ahead of time without CUDA", "aot")

    src = source_dir()
    cfg = build_config(torch)
    tag = _fingerprint(torch, cfg, src)
    name = f"sama_ext_C_{tag}"
    build_dir = cache_root() / tag
    so = build_dir / f"{name}{_ext_suffix()}"
    marker = build_dir / "BUILD_OK"
    if marker.is_file() and so.is_file():
        try:
            mod = _import_from(name, so)
        except ImportError as e:
            raise BuildError(
                f"sama_ext: the built extension {so} does not load ({e}); delete {build_dir} and retry") from e
    else:
        build_dir.mkdir(parents=True, exist_ok=True)
        what = "C++ and CUDA" if cfg.with_cuda else "C++"
        print(f"sama_ext: building the {what} kernels into {build_dir} (first use only; about 1-3 minutes)...",
              file=sys.stderr, flush=True)
        mod = _jit_build(torch, cfg, src, name, build_dir)
        marker.write_text("ok\n")  # written last: a half-finished build is never loaded
    return Loaded(mod, cfg.with_cuda, cfg.why_no_cuda, str(build_dir))


def _ext_suffix() -> str:
    import sysconfig

    return ".so" if os.name != "nt" else sysconfig.get_config_var("EXT_SUFFIX")


def _jit_build(torch, cfg: BuildConfig, src: Path, name: str, build_dir: Path):
    # Before torch.utils.cpp_extension guesses (wrongly, with a warning) from the nvcc on PATH.
    if cfg.with_cuda:
        os.environ["CUDA_HOME"] = str(cfg.cuda_home)
    elif not os.environ.get("CUDA_HOME") and torch.version.cuda:
        home, _ = find_cuda_home(torch.version.cuda)
        if home is not None:
            os.environ["CUDA_HOME"] = str(home)
    import torch.utils.cpp_extension as cpp_ext

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise BuildError(
            "sama_ext: no C++ compiler found (looked for $CXX or `c++`): install one (e.g. `apt-get install g++`), "
            "or set SAMA_EXT_BACKEND=torch to use the pure-PyTorch reference on purpose")
    sources = [str(src / s) for s in SOURCES]
    if cfg.with_cuda:
        sources += [str(src / s) for s in CUDA_SOURCES]
        cpp_ext.CUDA_HOME = str(cfg.cuda_home)  # in case it was imported before with its own guess
    try:
        return cpp_ext.load(
            name=name,
            sources=sources,
            extra_cflags=cfg.cflags,
            extra_cuda_cflags=cfg.cuda_cflags,
            extra_ldflags=cfg.ldflags,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=cfg.with_cuda,
            is_python_module=True,
            verbose=False,
        )
    except Exception as e:  # torch raises RuntimeError / CalledProcessError with the compiler output
        raise BuildError(
            f"sama_ext: building the compiled kernels failed in {build_dir}.\n"
            f"{e}\n"
            "Fix the toolchain (see the README's troubleshooting section), or set SAMA_EXT_BACKEND=torch "
            "to use the pure-PyTorch reference on purpose.") from e
