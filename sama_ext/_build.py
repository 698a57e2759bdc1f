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
import subprocess
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


# The kernels pass ~30 KB of metadata in the kernel argument (csrc/core/kernel_body.h), which
# needs CUDA >= 12.1 at build and run time (driver R530+) and a GPU of compute capability 7.0+.
MIN_CUDA = (12, 1)
MIN_ARCH = (7, 0)
# Built when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (the ahead-of-time build, or
# SAMA_EXT_CUDA=1 on a GPU-less node): V100, T4, A100, A10/3090, L4/4090, H100/H200, B200,
# RTX 50xx — those this nvcc supports — and PTX of the newest for later GPUs.
DEFAULT_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
_NAMED_ARCHS = {"volta": "7.0", "turing": "7.5", "ampere": "8.0;8.6", "ada": "8.9", "hopper": "9.0",
                "blackwell": "10.0;12.0"}


class NoCuda(Exception):
    """Why the CUDA kernels are not built (a BuildError under SAMA_EXT_CUDA=1, a note under auto)."""


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _run_nvcc(root: Path, *args: str) -> str:
    try:
        r = subprocess.run([str(root / "bin" / "nvcc"), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout if r.returncode == 0 else ""


def nvcc_facts(root: Path) -> tuple[tuple[int, int] | None, list[tuple[int, int]] | None]:
    """(nvcc's version, the compute capabilities it can build for, or None if it cannot say)."""
    version = parse_nvcc_version(_run_nvcc(root, "--version"))
    arches = re.findall(r"compute_(\d+)(\d)\b", _run_nvcc(root, "--list-gpu-arch"))
    return version, (sorted({(int(a), int(b)) for a, b in arches}) or None)


def _version_str(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


@dataclass(frozen=True)
class Arch:
    major: int
    minor: int
    suffix: str = ""   # "a": architecture-specific features (sm_90a)
    ptx: bool = False  # also embed PTX, which the driver compiles for newer GPUs

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}" + ("+PTX" if self.ptx else "")

    def gencode(self) -> list[str]:
        cc = f"{self.major}{self.minor}{self.suffix}"
        flags = [f"-gencode=arch=compute_{cc},code=sm_{cc}"]
        if self.ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
        return flags


def parse_arch_list(text: str) -> list[Arch]:
    """TORCH_CUDA_ARCH_LIST's syntax: "8.0;9.0+PTX", "8.6 9.0a", or names ("Ampere;Hopper")."""
    out: list[Arch] = []
    for item in re.split(r"[;\s,]+", text.strip()):
        if not item:
            continue
        base, plus, rest = item.partition("+")
        if plus and rest.upper() != "PTX":
            raise NoCuda(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not an architecture (like 8.0, 9.0a or 9.0+PTX)")
        if base.lower() in _NAMED_ARCHS:
            named = parse_arch_list(_NAMED_ARCHS[base.lower()])
            if plus:
                named[-1] = Arch(named[-1].major, named[-1].minor, named[-1].suffix, True)
            out += named
            continue
        m = re.fullmatch(r"(\d+)\.(\d)(a?)", base)
        if not m:
            raise NoCuda(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not an architecture (like 8.0, 9.0a or 9.0+PTX)")
        out.append(Arch(int(m.group(1)), int(m.group(2)), m.group(3), bool(plus)))
    return out


def _with_ptx_on_newest(archs: list[Arch]) -> list[Arch]:
    archs = sorted(set(archs), key=lambda a: (a.major, a.minor, a.suffix))
    if archs and not any(a.ptx for a in archs):
        last = archs[-1]
        archs[-1] = Arch(last.major, last.minor, last.suffix, True)
    return archs


def select_archs(arch_list: str | None, device_caps: list[tuple[int, int]],
                 supported: list[tuple[int, int]] | None) -> tuple[list[Arch], str]:
    """The architectures to build for, and a sentence saying where they came from. In order:
    TORCH_CUDA_ARCH_LIST if set, else the visible GPUs, else DEFAULT_ARCHS. Raises NoCuda with
    the reason when none can be built."""
    def check_supported(archs: list[Arch], source: str) -> None:
        if supported is None:
            return
        bad = [str(a) for a in archs if (a.major, a.minor) not in supported]
        if bad:
            raise NoCuda(f"{source} asks for {', '.join(bad)}, which this nvcc cannot build (it supports "
                         f"{', '.join(_version_str(c) for c in supported)}); fix TORCH_CUDA_ARCH_LIST")

    if arch_list is not None and arch_list.strip().lower() != "native":
        archs = parse_arch_list(arch_list)
        if not archs:
            raise NoCuda(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no GPU architecture: set it to the compute "
                         f"capabilities to build for (e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0\"), or unset it")
        old = [str(a) for a in archs if (a.major, a.minor) < MIN_ARCH]
        if old:
            raise NoCuda(f"TORCH_CUDA_ARCH_LIST={arch_list!r} includes {', '.join(old)}: the kernels' ~30 KB "
                         f"arguments need compute capability {_version_str(MIN_ARCH)}+; remove those entries")
        check_supported(archs, f"TORCH_CUDA_ARCH_LIST={arch_list!r}")
        return _with_ptx_on_newest(archs), f"TORCH_CUDA_ARCH_LIST={arch_list!r}"
    if device_caps:
        usable = [c for c in device_caps if c >= MIN_ARCH]
        if not usable:
            raise NoCuda(f"the visible GPUs have compute capability {', '.join(_version_str(c) for c in device_caps)}; "
                         f"the kernels need {_version_str(MIN_ARCH)}+")
        archs = []
        for c in usable:
            if supported is not None and c not in supported:
                # newer than this nvcc: its newest older architecture, whose PTX the driver compiles
                older = [s for s in supported if s <= c]
                if not older:
                    raise NoCuda(f"this nvcc cannot build for the visible GPU (compute capability {_version_str(c)})")
                c = older[-1]
            archs.append(Arch(*c))
        return _with_ptx_on_newest(archs), "the visible GPUs"
    if arch_list is not None:  # "native" with no GPU
        raise NoCuda("TORCH_CUDA_ARCH_LIST=native but no GPU is visible: name the architectures to build for "
                     "(e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0\")")
    archs = [Arch(*map(int, a.split("."))) for a in DEFAULT_ARCHS]
    if supported is not None:
        archs = [a for a in archs if (a.major, a.minor) in supported]
    if not archs:
        raise NoCuda("no GPU is visible, TORCH_CUDA_ARCH_LIST is unset and this nvcc supports none of the default "
                     f"architectures ({';'.join(DEFAULT_ARCHS)}): set TORCH_CUDA_ARCH_LIST")
    archs = _with_ptx_on_newest(archs)
    return archs, ("no GPU is visible and TORCH_CUDA_ARCH_LIST is unset, so the default architectures "
                   f"{';'.join(str(a) for a in archs)} (set TORCH_CUDA_ARCH_LIST to build for fewer or others)")


def check_cuda_version(nvcc_version: tuple[int, int] | None, torch_cuda: str | None) -> None:
    """NoCuda unless both nvcc and torch's CUDA are at least MIN_CUDA."""
    if nvcc_version is None:
        raise NoCuda("cannot run `nvcc --version` in the CUDA toolkit")
    for what, v in (("nvcc", nvcc_version), ("torch's CUDA", parse_nvcc_version(f"release {torch_cuda}"))):
        if v is not None and v < MIN_CUDA:
            raise NoCuda(f"{what} is CUDA {_version_str(v)}, older than {_version_str(MIN_CUDA)}: the kernels pass "
                         f"~30 KB kernel arguments, which need CUDA {_version_str(MIN_CUDA)}+, compute capability "
                         f"{_version_str(MIN_ARCH)}+ and an NVIDIA driver R530+")


def check_driver(version: int | None) -> str:
    """'' if the driver can run the kernels, else why not. version: cuDriverGetVersion's
    number (12010 = CUDA 12.1), None when there is no driver to ask."""
    if version is None or version >= MIN_CUDA[0] * 1000 + MIN_CUDA[1] * 10:
        return ""
    return (f"the NVIDIA driver supports CUDA {version // 1000}.{version % 1000 // 10}, but the kernels need "
            f"{_version_str(MIN_CUDA)}+ (driver R530 or newer): update the driver")


def driver_version() -> int | None:
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
        return v.value
    except (OSError, AttributeError):
        return None


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
    cuda_archs: list[Arch] = field(default_factory=list)
    arch_source: str = ""      # where the architectures came from (said when building)
    nvcc_version: str = ""
    device_caps: list[str] = field(default_factory=list)  # of the visible GPUs, part of the cache key


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


def _device_caps(torch) -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return sorted({tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})


def build_config(torch, aot: bool = False) -> BuildConfig:
    """What to build. The JIT build (aot=False) targets this machine; the ahead-of-time build
    compiles CUDA whenever it can and avoids -march=native. Under SAMA_EXT_CUDA=auto a CUDA
    setup that cannot build the kernels (old toolkit, unusable architectures) leaves the CPU
    kernels, with the reason in why_no_cuda; under SAMA_EXT_CUDA=1 it is a BuildError."""
    mode = os.environ.get("SAMA_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise BuildError(f"sama_ext: SAMA_EXT_CUDA must be auto, 0 or 1, not {mode!r}")
    cuda_home, why = None, ""
    archs: list[Arch] = []
    arch_source, nvcc_version, caps = "", None, []
    if mode == "0":
        why = "SAMA_EXT_CUDA=0"
    elif torch.version.cuda is None:
        why = "this torch build has no CUDA"
    else:
        cuda_home, why = find_cuda_home(torch.version.cuda)
        if cuda_home is not None and mode == "auto" and not aot and not torch.cuda.is_available() \
                and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # No GPU to run on and no target named: building for every architecture
            # would take many minutes for code nobody can run here.
            why = "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (set it, or SAMA_EXT_CUDA=1, to build anyway)"
            cuda_home = None
        if cuda_home is not None:
            try:
                nvcc_version, supported = nvcc_facts(cuda_home)
                check_cuda_version(nvcc_version, torch.version.cuda)
                caps = _device_caps(torch)
                archs, arch_source = select_archs(os.environ.get("TORCH_CUDA_ARCH_LIST"), caps, supported)
            except NoCuda as e:
                why, cuda_home = f"{e} (toolkit at {cuda_home})", None
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
        # Explicit -gencode flags: torch then adds no arch flags of its own (its guess fails
        # with an IndexError when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset).
        cfg.cuda_cflags = ["-O3", "-lineinfo"] + [f for a in archs for f in a.gencode()]
        cfg.cuda_archs, cfg.arch_source = archs, arch_source
        cfg.nvcc_version = _version_str(nvcc_version)
        cfg.device_caps = [_version_str(c) for c in caps]
    return cfg


def _fingerprint(torch, cfg: BuildConfig, src: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_file() and f.suffix in (".h", ".cuh", ".cpp", ".cu") and rel.parts[0] != "tests":
            h.update(str(rel).encode())
            h.update(f.read_bytes())
    # The GPU side: nvcc's version, the visible GPUs and the architectures (a cache shared by
    # nodes with different GPUs must not hand one node's build to another).
    for part in (torch.__version__, str(torch.version.cuda), sys.version, _cpu_tag(), str(cfg.with_cuda),
                 str(cfg.cuda_home), cfg.nvcc_version, ",".join(cfg.device_caps),
                 ";".join(str(a) for a in cfg.cuda_archs), os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                 " ".join(cfg.cflags), " ".join(cfg.cuda_cflags)):
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
        return _checked(Loaded(mod, mod.with_cuda(), "" if mod.with_cuda() else "built ahead of time without CUDA",
                               "aot"), torch)

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
        what = (f"C++ and CUDA (for {';'.join(str(a) for a in cfg.cuda_archs)}: {cfg.arch_source})"
                if cfg.with_cuda else "C++")
        print(f"sama_ext: building the {what} kernels into {build_dir} (first use only; about 1-3 minutes)...",
              file=sys.stderr, flush=True)
        mod = _jit_build(torch, cfg, src, name, build_dir)
        marker.write_text("ok\n")  # written last: a half-finished build is never loaded
    return _checked(Loaded(mod, cfg.with_cuda, cfg.why_no_cuda, str(build_dir)), torch)


def _checked(loaded: Loaded, torch) -> Loaded:
    """Once at load: a driver too old for the kernels' large arguments turns the CUDA kernels
    off with the reason (CUDA tensors then raise it, see _backend.check_device), instead of a
    launch error deep inside a meta step."""
    if loaded.with_cuda and torch.cuda.is_available():
        why = check_driver(driver_version())
        if why:
            return Loaded(loaded.module, False, why, loaded.origin)
    return loaded


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
