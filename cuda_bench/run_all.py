"""Runs the whole benchmark suite with one command and writes every result under --out.

    PYTHONPATH=. python cuda_bench/run_all.py --quick          # smoke test (CI): about a minute on 2 CPU cores
    PYTHONPATH=. python -m cuda_bench --device cuda            # the same, as a module

Each suite is a module with `main(argv)` (returning its results, or an exit code) that accepts
the common flags (--quick, --device, --out); flags after `--` go to every selected suite, so pair
them with --only (e.g. `run_all.py --only kernels -- --sizes bert:32M`). Suites: `kernels`
(bench_kernels.py), `meta_step` (bench_meta_step.py), `ddp` (bench_ddp.py), `fsdp` (bench_fsdp.py), `guard` (bench_guard.py:
the few ratios that must hold anywhere, e.g. fused Adam adapt ≥ 3× eager; it fails the run on a
gross regression — the other suites only record).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuda_bench import common

# name -> (module, what it measures)
SUITES: dict[str, tuple[str, str]] = {
    "kernels": ("cuda_bench.bench_kernels", "fused kernels vs eager / foreach / torch.compile, and copy bandwidth"),
    "meta_step": ("cuda_bench.bench_meta_step", "one meta step per method vs its floor: time and peak memory"),
    "ddp": ("cuda_bench.bench_ddp", "when each bucket's all-reduce starts in the communicating pass; bytes"),
    "fsdp": ("cuda_bench.bench_fsdp", "FSDP2: bytes per meta step vs an ordinary step, SAMA's buffers per rank"),
    "guard": ("cuda_bench.bench_guard", "gross-regression guard: fused vs eager, meta step vs floor (fails the run)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description="Run the sama_ext benchmark suites.")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke test)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="bench_results", help="results folder")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated suites ({', '.join(SUITES)})")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in SUITES:
            p.error(f"unknown suite {n!r} (choose from {', '.join(SUITES)})")

    common_flags = ["--device", args.device, "--out", args.out] + (["--quick"] if args.quick else [])
    summary, failed = {}, []
    for name in names:
        module, what = SUITES[name]
        print(f"== {name}: {what}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = importlib.import_module(module).main(common_flags + extra)
            ok = not (isinstance(rc, int) and not isinstance(rc, bool) and rc != 0)  # main may return a dict or an exit code
            summary[name] = {"ok": ok, "wall_s": time.perf_counter() - t0}
            if not ok:
                failed.append(name)
                summary[name]["error"] = f"exit {rc}"
        except SystemExit as e:  # argparse errors and explicit exits
            if e.code not in (0, None):
                failed.append(name)
                summary[name] = {"ok": False, "wall_s": time.perf_counter() - t0, "error": f"exit {e.code}"}
        except Exception as e:  # keep going: one broken suite must not hide the others
            traceback.print_exc()
            failed.append(name)
            summary[name] = {"ok": False, "wall_s": time.perf_counter() - t0, "error": repr(e)}
    common.write_json(Path(args.out) / "run_all.json", {"quick": args.quick, "device": args.device, "suites": summary})
    print(f"== done: {len(names) - len(failed)}/{len(names)} suites ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
