"""Everything that needs a GPU, in one command, for the day one is lent (under 10 minutes on one
H100/H200):

    PYTHONPATH=. python -m cuda_bench.gpu_check --out gpu_check_results

Steps, in order (each with its own time limit; a step that would start after --budget-s is
skipped and says so):
  env        torch, the GPU, driver, nvcc, compute-sanitizer, cmake
  build      the extension, JIT-built fresh with SAMA_EXT_CUDA=1 (CPU kernels only without a GPU)
  ctest      CMake build of the C++ tests (CUDA arch: the GPU's own) and ctest: test_core,
             test_kernel_host and, on a GPU, test_cuda (the launcher against cpu_apply)
  sanitizer  compute-sanitizer memcheck, racecheck and synccheck on test_cuda (its quick mode)
  pytest     the CUDA cases of the Python suite (`-k cuda`)
  graph      python_tests/test_cuda_graph.py: a whole meta_step captured in a CUDA graph and
             replayed, against eager
  kernels    bench_kernels.py --device cuda (key sizes, fp32 and bf16; torch.compile with
             --with-compile)
  meta_step  bench_meta_step.py --device cuda (params and bert models)

Without a GPU (a dry run) every CPU-side part still runs — the build, cmake/ctest, the pytest
selection, the benchmarks in --quick CPU mode and the report — and each GPU step prints that it
was skipped and why. Results under --out: gpu_check.md (a summary table with the card's name,
then the benchmarks' tables, ready for docs/benchmarks.md), gpu_check.json, logs/<step>.log,
bench/, and gpu_check_all.tar.gz holding all of it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "build", "ctest", "sanitizer", "pytest", "graph", "kernels", "meta_step")


@dataclass
class Result:
    step: str
    status: str = "skipped"  # ok | FAILED | skipped
    seconds: float = 0.0
    note: str = ""
    log: str = ""


@dataclass
class Ctx:
    out: Path
    gpu: bool
    why_no_gpu: str
    jobs: int
    with_compile: bool
    deadline: float
    env: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)


def _env(ctx: Ctx, **extra) -> dict:
    env = {**os.environ, **ctx.env, **extra}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(ctx: Ctx, name: str, cmd: list[str], timeout: float, **env_extra) -> tuple[int, str]:
    """Runs cmd, its output to logs/<name>.log; (exit code, last lines). 124 on timeout."""
    log = ctx.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout = max(1.0, min(timeout, ctx.deadline - time.monotonic()))
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), env=_env(ctx, **env_extra),
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_check: stopped after {timeout:.0f} s]\n")
            rc = 124
    lines = log.read_text(errors="replace").splitlines()
    return rc, "\n".join(lines[-15:])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.machine()


# ----------------------------------------------------------------------------- steps
def step_env(ctx: Ctx, r: Result) -> None:
    import torch

    from sama_ext import _build

    f = ctx.facts
    f["torch"] = torch.__version__
    f["torch_cuda"] = torch.version.cuda
    f["python"] = platform.python_version()
    f["cpu"] = _cpu_name()
    f["gpu"] = torch.cuda.get_device_name(0) if ctx.gpu else None
    if ctx.gpu:
        p = torch.cuda.get_device_properties(0)
        f["capability"] = f"{p.major}.{p.minor}"
        f["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        f["sm_count"] = p.multi_processor_count
    drv = _build.driver_version()
    f["driver_cuda"] = f"{drv // 1000}.{drv % 1000 // 10}" if drv else None
    home, how = _build.find_cuda_home(torch.version.cuda) if torch.version.cuda else (None, "torch has no CUDA")
    f["cuda_home"] = str(home) if home else None
    if home:
        ver, _ = _build.nvcc_facts(home)
        f["nvcc"] = f"{ver[0]}.{ver[1]}" if ver else None
        san = home / "bin" / "compute-sanitizer"
        f["compute_sanitizer"] = str(san) if san.is_file() else shutil.which("compute-sanitizer")
    f["cmake"] = shutil.which("cmake")
    r.status, r.note = "ok", ", ".join(f"{k}={v}" for k, v in f.items() if v is not None)


def step_build(ctx: Ctx, r: Result) -> None:
    code = ("import sama_ext\nfrom sama_ext import _backend\nassert sama_ext.backend() == 'compiled'\n"
            "l = _backend.compiled()\nprint('WITH_CUDA', l.with_cuda, repr(l.why_no_cuda), l.origin)\n")
    extra = {"SAMA_EXT_CUDA": "1"} if ctx.gpu else {}
    rc, tail = _run(ctx, "build", [sys.executable, "-c", code], 900, **extra)
    if rc != 0:
        r.status, r.note = "FAILED", tail.splitlines()[-1] if tail else f"exit {rc}"
        return
    line = next((ln for ln in tail.splitlines() if ln.startswith("WITH_CUDA")), "")
    with_cuda = line.split()[1:2] == ["True"]
    r.status = "ok" if with_cuda or not ctx.gpu else "FAILED"
    r.note = "CUDA and CPU kernels" if with_cuda else f"CPU kernels only ({line[len('WITH_CUDA False'):].strip()})"


def step_ctest(ctx: Ctx, r: Result) -> None:
    if not ctx.facts.get("cmake"):
        r.note = "cmake not found"
        return
    b = ctx.out / "cmake"
    cfg = ["cmake", "-S", str(REPO), "-B", str(b), "-DSAMA_BUILD_BENCHMARKS=OFF"]
    for cmd, limit in ((cfg, 300), (["cmake", "--build", str(b), f"-j{ctx.jobs}"], 900),
                       (["ctest", "--test-dir", str(b), "--output-on-failure"], 600)):
        rc, tail = _run(ctx, "ctest", cmd, limit)
        if rc != 0:
            r.status, r.note = "FAILED", f"`{' '.join(cmd[:2])}` exit {rc}: {tail.splitlines()[-1] if tail else ''}"
            return
    log = (ctx.out / "logs" / "ctest.log").read_text(errors="replace")
    ran_cuda = "cuda" in log and "Not Run" not in log and "***Skipped" not in log and (b / "sama_test_cuda").exists()
    r.status = "ok"
    passed = [ln.strip() for ln in log.splitlines() if "tests passed" in ln]
    skipped = [ln.split("-", 1)[1].strip() for ln in log.splitlines() if ln.strip().endswith("(Skipped)")]
    r.note = (passed[-1] if passed else "") + (f"; skipped (exit 77: no GPU): {', '.join(skipped)}" if skipped else "")
    if ctx.gpu and not ran_cuda:
        r.status, r.note = "FAILED", "the CUDA test did not run on the GPU: " + r.note


def step_sanitizer(ctx: Ctx, r: Result) -> None:
    exe = ctx.out / "cmake" / "sama_test_cuda"
    san = ctx.facts.get("compute_sanitizer")
    if not ctx.gpu:
        r.note = f"skipped: {ctx.why_no_gpu}"
        return
    if not san or not exe.exists():
        r.note = "skipped: " + ("compute-sanitizer not found" if not san else f"{exe} was not built (ctest step)")
        return
    notes, failed = [], False
    for tool in ("memcheck", "racecheck", "synccheck"):
        rc, tail = _run(ctx, f"sanitizer_{tool}", [san, "--tool", tool, "--error-exitcode", "99", str(exe), "quick"],
                        240)
        if "Device not supported" in tail:
            notes.append(f"{tool}: the tool does not support this device/runtime")
            continue
        failed |= rc != 0
        errs = next((ln for ln in tail.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln), f"exit {rc}")
        notes.append(f"{tool}: {errs.replace('=========', '').strip()}")
    r.status = "FAILED" if failed else ("ok" if not all("does not support" in n for n in notes) else "skipped")
    r.note = "; ".join(notes)


def _pytest(ctx: Ctx, r: Result, name: str, args: list[str]) -> None:
    rc, tail = _run(ctx, name, [sys.executable, "-m", "pytest", "-q", "-rs", *args], 480)
    last = tail.splitlines()[-1] if tail else ""
    if rc == 5 or (rc == 0 and " passed" not in last):  # nothing collected, or all skipped
        r.status, r.note = "skipped", (f"{ctx.why_no_gpu}; " if not ctx.gpu else "") + last
    else:
        r.status, r.note = ("ok" if rc == 0 else "FAILED"), last


def step_pytest(ctx: Ctx, r: Result) -> None:
    # test_build.py builds the extension again in fresh caches: the build step covers it
    _pytest(ctx, r, "pytest", ["python_tests", "-k", "cuda", "--ignore=python_tests/test_build.py",
                               "--ignore=python_tests/test_cuda_graph.py"])


def step_graph(ctx: Ctx, r: Result) -> None:
    _pytest(ctx, r, "graph", ["python_tests/test_cuda_graph.py"])


def step_kernels(ctx: Ctx, r: Result) -> None:
    dev = ["--device", "cuda", "--sizes", "bert:32M,gpt2:32M,bert:full", "--dtypes", "fp32,bf16"] if ctx.gpu \
        else ["--device", "cpu", "--quick"]
    comp = ["--compile"] if ctx.with_compile else ["--no-compile"]
    rc, tail = _run(ctx, "kernels", [sys.executable, "-m", "cuda_bench.bench_kernels", *dev, *comp,
                                     "--out", str(ctx.out / "bench")], 420)
    r.status = "ok" if rc == 0 else "FAILED"
    r.note = ("" if ctx.gpu else f"CPU --quick instead ({ctx.why_no_gpu}); ") + (f"exit {rc}" if rc else "kernels.md")


def step_meta_step(ctx: Ctx, r: Result) -> None:
    dev = ["--device", "cuda", "--models", "params", "bert", "--methods", "sama", "sama_na", "neumann", "cg"] \
        if ctx.gpu else ["--device", "cpu", "--quick", "--models", "params", "--methods", "sama", "neumann"]
    rc, tail = _run(ctx, "meta_step", [sys.executable, "-m", "cuda_bench.bench_meta_step", *dev,
                                       "--out", str(ctx.out / "bench")], 420)
    r.status = "ok" if rc == 0 else "FAILED"
    r.note = ("" if ctx.gpu else f"CPU --quick instead ({ctx.why_no_gpu}); ") + (f"exit {rc}" if rc else "meta_step.md")


FUNCS = {"env": step_env, "build": step_build, "ctest": step_ctest, "sanitizer": step_sanitizer,
         "pytest": step_pytest, "graph": step_graph, "kernels": step_kernels, "meta_step": step_meta_step}


# ----------------------------------------------------------------------------- report
def report(ctx: Ctx, results: list[Result]) -> str:
    f = ctx.facts
    if ctx.gpu:
        title = (f"# GPU check: {f.get('gpu')} (sm_{str(f.get('capability', '')).replace('.', '')}, "
                 f"{f.get('gpu_memory_gib')} GiB)")
    else:
        title = f"# GPU check, dry run on {f.get('cpu')}: no GPU ({ctx.why_no_gpu}); the GPU steps were skipped"
    lines = [title, "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), "
             f"driver CUDA {f.get('driver_cuda')}, nvcc {f.get('nvcc')}, Python {f.get('python')}.", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    for x in results:
        note = x.note.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {x.step} | {x.status} | {x.seconds:.0f} | {note} |")
    for name in ("kernels.md", "meta_step.md"):
        p = ctx.out / "bench" / name
        if p.is_file():
            lines += ["", f"## {name} ({f.get('gpu') or 'CPU, dry run'})", "", p.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_results", help="results folder")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps ({', '.join(STEPS)})")
    p.add_argument("--budget-s", type=float, default=570.0, help="no step starts after this many seconds")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    p.add_argument("--with-compile", action="store_true", help="also time torch.compile in the kernel benchmark")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in FUNCS:
            p.error(f"unknown step {n!r} (choose from {', '.join(STEPS)})")
    if "env" not in names:
        names.insert(0, "env")  # the others read its facts

    import torch

    gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    why = "" if gpu else ("torch has no CUDA" if torch.version.cuda is None
                          else "torch.cuda.is_available() is False: no CUDA GPU visible")
    out = Path(args.out).resolve()
    if (out / "logs").exists():
        shutil.rmtree(out / "logs")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    ctx = Ctx(out=out, gpu=gpu, why_no_gpu=why, jobs=args.jobs, with_compile=args.with_compile,
              deadline=t_start + args.budget_s,
              env={"TORCH_EXTENSIONS_DIR": str(out / "torch_extensions")})
    print(f"gpu_check: {'GPU: ' + torch.cuda.get_device_name(0) if gpu else 'dry run (' + why + ')'}; "
          f"results in {out}", flush=True)
    results = []
    for name in names:
        r = Result(name)
        if time.monotonic() > ctx.deadline:
            r.note = f"skipped: the {args.budget_s:.0f} s budget was spent"
        else:
            t0 = time.monotonic()
            try:
                FUNCS[name](ctx, r)
            except Exception as e:  # one broken step must not hide the others
                r.status, r.note = "FAILED", f"{type(e).__name__}: {e}"
            r.seconds = time.monotonic() - t0
        r.log = f"logs/{name}.log" if (out / "logs" / f"{name}.log").exists() else ""
        results.append(r)
        print(f"[{r.status:>7}] {name:<10} {r.seconds:6.0f} s  {r.note}", flush=True)
    md = report(ctx, results)
    (out / "gpu_check.md").write_text(md)
    (out / "gpu_check.json").write_text(json.dumps({"facts": ctx.facts, "gpu": gpu, "why_no_gpu": why,
                                                    "steps": [asdict(r) for r in results]}, indent=2))
    with tarfile.open(out / "gpu_check_all.tar.gz", "w:gz") as tar:
        for rel in ("gpu_check.md", "gpu_check.json", "logs", "bench"):
            if (out / rel).exists():
                tar.add(out / rel, arcname=rel)
    failed = [r.step for r in results if r.status == "FAILED"]
    print(f"gpu_check: {time.monotonic() - t_start:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "no failures")
          + f"; report: {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
