"""The loader: finding the real CUDA toolkit, the build cache, clear failures, backend choice,
and a real compile of the CUDA kernels where a CUDA torch and nvcc exist."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sama_ext import _build
from sama_ext._build import BuildError, find_cuda_home

REPO = Path(__file__).resolve().parents[1]


def _fake_toolkit(root: Path, version: str | None = None, complete: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    if complete:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("")
    if version:
        (root / "version.json").write_text('{"cuda" : {"name" : "CUDA SDK", "version" : "%s.0"}}' % version)
    return root


def _isolate(monkeypatch, path_dirs: list[Path]):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join(str(p) for p in path_dirs))


def test_wrapper_script_nvcc_is_not_taken_for_a_toolkit(tmp_path, monkeypatch):
    """nvcc on PATH is a wrapper in a folder with no headers or libcudart (as /usr/local/bin
    here): its parent is not a toolkit, whatever torch guesses."""
    wrapper_root = _fake_toolkit(tmp_path / "wrapper", complete=False)
    _isolate(monkeypatch, [wrapper_root / "bin"])
    assert not _build._toolkit_ok(wrapper_root)
    home, _ = find_cuda_home()
    assert home is None or home != wrapper_root


def test_real_nvcc_on_path_is_found(tmp_path, monkeypatch):
    root = _fake_toolkit(tmp_path / "cuda-77.1", version="77.1")
    _isolate(monkeypatch, [root / "bin"])
    home, how = find_cuda_home("77.1")
    assert home == root and "77.1" in how


def test_cuda_home_is_respected_and_checked(tmp_path, monkeypatch):
    root = _fake_toolkit(tmp_path / "tk")
    _isolate(monkeypatch, [])
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert find_cuda_home()[0] == root
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(BuildError, match="CUDA_HOME=.*is not a CUDA toolkit"):
        find_cuda_home()


def test_matching_version_is_preferred(tmp_path, monkeypatch):
    on_path = _fake_toolkit(tmp_path / "a", version="11.8")
    system = _fake_toolkit(tmp_path / "b", version="13.0")
    _isolate(monkeypatch, [on_path / "bin"])
    monkeypatch.setattr(_build, "_system_toolkits", lambda: [system])
    assert find_cuda_home("13.0")[0] == system
    assert find_cuda_home("11.8")[0] == on_path
    assert find_cuda_home("12.4")[0] == on_path  # no match: the first valid one


def test_this_machine_toolkit_is_found_when_present():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    home, how = find_cuda_home(torch.version.cuda)
    assert home is not None, how
    assert (home / "bin" / "nvcc").is_file() and _build._toolkit_ok(home)


def test_bad_backend_value_is_an_error(monkeypatch):
    from sama_ext import _backend

    monkeypatch.setenv("SAMA_EXT_BACKEND", "fast")
    with pytest.raises(ValueError, match="SAMA_EXT_BACKEND must be one of"):
        _backend.requested()


def _run(code: str, env_extra: dict, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def test_torch_backend_is_chosen_on_purpose():
    r = _run("""
        import torch, sama_ext
        from sama_ext import ops
        assert sama_ext.backend() == "torch"
        p = [torch.zeros(3)]
        ops.perturb_(p, [torch.ones(3)], 2.0)
        assert p[0].tolist() == [2.0, 2.0, 2.0]
        print("ok")
    """, {"SAMA_EXT_BACKEND": "torch"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_second_import_does_not_rebuild(tmp_path):
    """Builds once into a fresh cache (one-line message), then loads without compiling."""
    code = """
        import time, sama_ext
        t = time.time()
        assert sama_ext.backend() == "compiled"
        print("load_s", time.time() - t)
    """
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "SAMA_EXT_CUDA": "0"}
    first = _run(code, env)
    assert first.returncode == 0, first.stderr
    assert "sama_ext: building the C++ kernels" in first.stderr
    second = _run(code, env)
    assert second.returncode == 0, second.stderr
    assert "building" not in second.stderr
    assert float(second.stdout.split()[-1]) < 5.0


def test_build_failure_raises_with_compiler_output(tmp_path):
    """A broken source is a BuildError carrying the compiler's message — never a silent
    fallback to the reference."""
    src = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", src)
    with open(src / "ops_cpu.cpp", "a") as f:
        f.write("\nthis_is_not_cpp_42;\n")
    r = _run(f"""
        import pathlib, sama_ext
        from sama_ext import _build
        _build.source_dir = lambda: pathlib.Path({str(src)!r})
        try:
            sama_ext.backend()
        except _build.BuildError as e:
            print("BUILD_ERROR", e)
        else:
            print("NO_ERROR", sama_ext.backend())
    """, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "SAMA_EXT_CUDA": "0", "SAMA_EXT_BACKEND": "auto"})
    assert "BUILD_ERROR" in r.stdout, r.stdout + r.stderr
    assert "this_is_not_cpp_42" in r.stdout  # the compiler's own words reach the user
    assert "SAMA_EXT_BACKEND=torch" in r.stdout


def test_cuda_requested_without_toolkit_is_an_error(tmp_path):
    r = _run("""
        import sama_ext
        from sama_ext import _build
        _build.find_cuda_home = lambda *a: (None, "no CUDA toolkit found (test)")
        try:
            sama_ext.backend()
        except _build.BuildError as e:
            print("BUILD_ERROR", e)
    """, {"SAMA_EXT_CUDA": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")})
    assert "BUILD_ERROR" in r.stdout and "SAMA_EXT_CUDA=1" in r.stdout, r.stdout + r.stderr


def _cuda_compile_possible() -> str | None:
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    home, why = find_cuda_home(torch.version.cuda)
    if home is None:
        return why
    return None


@pytest.mark.skipif(_cuda_compile_possible() is not None, reason=str(_cuda_compile_possible()))
def test_cuda_extension_really_compiles():
    """With a CUDA torch and a toolkit, the CUDA kernels compile and link (for sm_90 unless
    TORCH_CUDA_ARCH_LIST says otherwise) — even with no GPU to run them on."""
    r = _run("""
        import sama_ext
        from sama_ext import _backend
        assert sama_ext.backend() == "compiled"
        loaded = _backend.compiled()
        assert loaded.with_cuda and loaded.module.with_cuda(), loaded
        import torch
        assert torch.ops.sama_ext.perturb_.default is not None
        print("CUDA_BUILD_OK", loaded.origin)
    """, {"SAMA_EXT_CUDA": "1", "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}, timeout=1500)
    assert r.returncode == 0 and "CUDA_BUILD_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def test_cuda_tensors_without_cuda_kernels_say_why(monkeypatch):
    from sama_ext import _backend

    if _backend.backend() != "compiled" or _backend.compiled().with_cuda:
        pytest.skip("needs a CPU-only compiled build")
    with pytest.raises(BuildError, match="built without CUDA kernels"):
        _backend.check_device(torch.device("cuda"))


def test_launch_plan_covers_every_chunk_once():
    from sama_ext import _backend

    mod = _backend.compiled().module
    numel = [0, 1, 5, 10, 0, 25, 7, 1]
    launches = mod.make_plan(numel, 4, 3, 5)
    seen = {}
    for slots, items in launches:
        assert 0 < len(slots) <= 3 and 0 < len(items) <= 5
        for slot, chunk in items:
            key = (slots[slot], chunk)
            seen[key] = seen.get(key, 0) + 1
    want = {(t, c) for t, n in enumerate(numel) for c in range((n + 3) // 4)}
    assert set(seen) == want and all(k == 1 for k in seen.values())
    assert 0 not in {slots[s] for slots, items in launches for s, _ in items}  # empty tensors get no work


def test_launch_plan_indexes_past_2_to_the_31():
    from sama_ext import _backend

    mod = _backend.compiled().module
    n = 3_000_000_000
    launches = mod.make_plan([n], 1 << 16, 8, 1 << 20)
    chunks = [c for _, items in launches for _, c in items]
    assert chunks == list(range((n + (1 << 16) - 1) >> 16))
    assert chunks[-1] * (1 << 16) > 2**31  # int64 start offsets
    assert mod.cuda_max_slots(7) >= 256  # hundreds of tensors per launch even for Adam's 7 lists


# ----------------------------------------------------------------------------- CUDA gating
# build_config with faked inputs (torch's CUDA version, the visible GPUs, nvcc's answers): each
# case a real machine can present, without a multi-minute build.
def _fake_torch(cuda: str | None = "13.0", caps=()):
    from types import SimpleNamespace

    caps = list(caps)
    return SimpleNamespace(
        __version__="2.14.1", version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(is_available=lambda: bool(caps), device_count=lambda: len(caps),
                             get_device_capability=lambda i: caps[i]))


NVCC_13_ARCHES = [(7, 5), (8, 0), (8, 6), (8, 7), (8, 8), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0), (12, 1)]


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """A toolkit that is found, and an nvcc whose version and architectures the test sets."""
    for var in ("SAMA_EXT_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_build, "find_cuda_home", lambda *a: (tmp_path / "cuda", "test"))
    facts = {"version": (13, 0), "arches": NVCC_13_ARCHES}
    monkeypatch.setattr(_build, "nvcc_facts", lambda root: (facts["version"], facts["arches"]))
    return facts


def test_old_toolkit_keeps_the_cpu_kernels_and_says_why(fake_cuda, monkeypatch):
    fake_cuda["version"] = (11, 8)
    cfg = _build.build_config(_fake_torch("11.8", caps=[(8, 0)]))
    assert not cfg.with_cuda and "-fopenmp" in cfg.cflags and "-DSAMA_EXT_WITH_CUDA" not in cfg.cflags
    assert "CUDA 11.8" in cfg.why_no_cuda and "12.1" in cfg.why_no_cuda and "R530" in cfg.why_no_cuda
    monkeypatch.setenv("SAMA_EXT_CUDA", "1")
    with pytest.raises(BuildError, match=r"SAMA_EXT_CUDA=1 but the CUDA kernels cannot be built: nvcc is CUDA 11\.8"):
        _build.build_config(_fake_torch("11.8", caps=[(8, 0)]))


def test_torch_built_for_old_cuda_is_refused_too(fake_cuda):
    fake_cuda["version"] = (12, 4)
    cfg = _build.build_config(_fake_torch("11.8", caps=[(8, 0)]))
    assert not cfg.with_cuda and "torch's CUDA is CUDA 11.8" in cfg.why_no_cuda
    assert _build.build_config(_fake_torch("12.1", caps=[(8, 0)])).with_cuda


def test_empty_arch_list_is_a_clear_error(fake_cuda, monkeypatch):
    monkeypatch.setenv("SAMA_EXT_CUDA", "1")
    for empty in ("", " ; "):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", empty)
        with pytest.raises(BuildError, match="TORCH_CUDA_ARCH_LIST=.* names no GPU architecture"):
            _build.build_config(_fake_torch(caps=()))


def test_no_gpu_with_cuda_forced_builds_a_default_arch_list(fake_cuda, monkeypatch):
    monkeypatch.setenv("SAMA_EXT_CUDA", "1")
    cfg = _build.build_config(_fake_torch(caps=()))
    assert cfg.with_cuda
    # 7.0 is in the defaults but CUDA 13's nvcc cannot build it: left out, not an error
    assert [str(a) for a in cfg.cuda_archs] == ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0+PTX"]
    assert "-gencode=arch=compute_75,code=sm_75" in cfg.cuda_cflags
    assert "-gencode=arch=compute_120,code=compute_120" in cfg.cuda_cflags  # PTX of the newest
    assert "TORCH_CUDA_ARCH_LIST is unset" in cfg.arch_source
    # the same for the ahead-of-time build (setup.py), whatever SAMA_EXT_CUDA says
    monkeypatch.delenv("SAMA_EXT_CUDA")
    assert _build.build_config(_fake_torch(caps=()), aot=True).cuda_archs == cfg.cuda_archs
    # with CUDA 12.4's nvcc, 7.0 is built as well
    fake_cuda["arches"] = [(5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0)]
    assert [str(a) for a in _build.build_config(_fake_torch(caps=()), aot=True).cuda_archs] == \
        ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0+PTX"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows torch's own failure without a GPU")
def test_explicit_gencode_flags_keep_torch_from_guessing(fake_cuda, monkeypatch):
    """Without a GPU and TORCH_CUDA_ARCH_LIST, torch's arch guess dies with an IndexError (the
    bug this gating avoids); given our explicit -gencode flags it adds nothing."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("SAMA_EXT_CUDA", "1")
    cfg = _build.build_config(_fake_torch(caps=()))
    with pytest.raises(IndexError):
        cpp_extension._get_cuda_arch_flags([])
    assert cpp_extension._get_cuda_arch_flags(cfg.cuda_cflags) == []


def test_architectures_below_sm70_are_refused(fake_cuda, monkeypatch):
    fake_cuda["arches"] = [(6, 1), (7, 0), (8, 0)]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.1;8.0")
    cfg = _build.build_config(_fake_torch(caps=[(8, 0)]))
    assert not cfg.with_cuda and "6.1" in cfg.why_no_cuda and "7.0+" in cfg.why_no_cuda
    monkeypatch.setenv("SAMA_EXT_CUDA", "1")
    with pytest.raises(BuildError, match=r"TORCH_CUDA_ARCH_LIST='6.1;8.0' includes 6.1"):
        _build.build_config(_fake_torch(caps=[(8, 0)]))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setenv("SAMA_EXT_CUDA", "auto")
    cfg = _build.build_config(_fake_torch(caps=[(6, 1)]))  # a Pascal card alone
    assert not cfg.with_cuda and "compute capability 6.1" in cfg.why_no_cuda


def test_visible_gpus_choose_the_architectures(fake_cuda, monkeypatch):
    cfg = _build.build_config(_fake_torch(caps=[(9, 0), (8, 0)]))
    assert [str(a) for a in cfg.cuda_archs] == ["8.0", "9.0+PTX"] and cfg.arch_source == "the visible GPUs"
    assert cfg.cuda_cflags[-3:] == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                                    "-gencode=arch=compute_90,code=compute_90"]
    # a GPU newer than nvcc: its newest older architecture, with PTX for the driver to compile
    fake_cuda["arches"] = [(8, 0), (9, 0)]
    assert [str(a) for a in _build.build_config(_fake_torch(caps=[(12, 0)])).cuda_archs] == ["9.0+PTX"]
    # TORCH_CUDA_ARCH_LIST wins, named architectures and sm_90a included
    fake_cuda["arches"] = NVCC_13_ARCHES
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Ampere 9.0a")
    assert [str(a) for a in _build.build_config(_fake_torch(caps=[(9, 0)])).cuda_archs] == ["8.0", "8.6", "9.0a+PTX"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "sm_90")
    with pytest.raises(BuildError, match="'sm_90' is not an architecture"):
        monkeypatch.setenv("SAMA_EXT_CUDA", "1")
        _build.build_config(_fake_torch(caps=[(9, 0)]))


def test_cache_key_includes_the_gpus_and_nvcc(fake_cuda, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.cpp").write_text("int x;\n")

    def key(caps, nvcc):
        fake_cuda["version"] = nvcc
        t = _fake_torch(caps=caps)
        return _build._fingerprint(t, _build.build_config(t), src)

    base = key([(9, 0)], (13, 0))
    assert base == key([(9, 0)], (13, 0))
    assert base != key([(8, 0)], (13, 0))          # an A100 node must not load an H100 node's build
    assert base == key([(9, 0), (9, 0)], (13, 0))  # two GPUs of one kind: the same build
    assert base != key([(9, 0)], (12, 8))          # another nvcc


def test_driver_too_old_turns_cuda_kernels_off_at_load(monkeypatch):
    assert _build.check_driver(None) == "" and _build.check_driver(12010) == "" and _build.check_driver(13000) == ""
    why = _build.check_driver(11080)
    assert "CUDA 11.8" in why and "R530" in why
    monkeypatch.setattr(_build, "driver_version", lambda: 12000)
    loaded = _build._checked(_build.Loaded(object(), True, "", "x"), _fake_torch(caps=[(9, 0)]))
    assert not loaded.with_cuda and "CUDA 12.0" in loaded.why_no_cuda
    monkeypatch.setattr(_build, "driver_version", lambda: 12080)
    assert _build._checked(_build.Loaded(object(), True, "", "x"), _fake_torch(caps=[(9, 0)])).with_cuda


def test_nvcc_version_and_arch_parsing():
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.1, V12.1.105\n"
    assert _build.parse_nvcc_version(text) == (12, 1)
    assert _build.parse_nvcc_version("garbage") is None
    assert [str(a) for a in _build.parse_arch_list("7.5;8.6+PTX 10.0")] == ["7.5", "8.6+PTX", "10.0"]
    with pytest.raises(_build.NoCuda):
        _build.parse_arch_list("8.0;ninety")


@pytest.mark.skipif(_cuda_compile_possible() is not None, reason=str(_cuda_compile_possible()))
def test_this_machines_nvcc_is_read():
    home, _ = find_cuda_home(torch.version.cuda)
    version, arches = _build.nvcc_facts(home)
    assert version is not None and version >= _build.MIN_CUDA
    assert arches is not None and (9, 0) in arches
