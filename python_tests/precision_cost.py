"""What the fused measurement and stochastic rounding cost (docs/precision.md, "Cost"): side by side
in one process, interleaved, medians.

1. meta_step on tiny_lm's 14.7M model (bfloat16, and float32): the default (stochastic rounding and
   the measurement, fused into the perturbation kernels), rounding="nearest" (round-to-nearest, still
   measured), and the kernels without any measurement (ops.perturb_save_ / perturb_from_, divisor ε:
   the path before issue 18).
2. The kernels alone on N elements: perturb_save_ vs perturb_save_measured_ (round-to-nearest, and
   stochastic).

    PYTHONPATH=$PWD:$PWD/python_tests OMP_NUM_THREADS=1 python python_tests/precision_cost.py
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from sama_ext import ops, precision
from tiny_lm import meta_grad, setup


@contextlib.contextmanager
def unmeasured():
    """The pre-issue-18 path: the unmeasured kernels, round-to-nearest, divisor ε."""
    save, frm, real = precision.perturb_save_, precision.perturb_from_, precision.realized_eps

    def zeros(t):
        return (torch.zeros((), dtype=torch.float64, device=t[0].device),
                torch.zeros((), dtype=torch.int64, device=t[0].device))

    def perturb_save_(params, vectors, backups, scale):
        ops.perturb_save_(params, vectors, backups, scale)
        return zeros(params)

    def perturb_from_(params, sources, vectors, scale):
        ops.perturb_from_(params, sources, vectors, scale)
        return zeros(params)

    precision.perturb_save_, precision.perturb_from_ = perturb_save_, perturb_from_
    precision.realized_eps = lambda dp, dm, s, mp, mm, eps: (eps, torch.zeros((), dtype=torch.bool))
    try:
        yield
    finally:
        precision.perturb_save_, precision.perturb_from_, precision.realized_eps = save, frm, real


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def meta_step_times(dtype, reps: int) -> None:
    run = setup("15M", dtype, seed=0, steps=2, batch=16)

    def variant(name):
        if name == "default":
            return contextlib.nullcontext()
        if name == "nearest":
            @contextlib.contextmanager
            def near():
                precision.rounding = "nearest"
                try:
                    yield
                finally:
                    precision.rounding = "auto"
            return near()
        return unmeasured()

    names = ["default", "nearest", "unmeasured"]
    times = {n: [] for n in names}
    meta_grad(run)  # warm-up
    for r in range(reps):
        for n in names[r % 3:] + names[:r % 3]:  # interleaved, rotating the order
            with variant(n):
                times[n].append(timed(lambda: meta_grad(run)))
    base = statistics.median(times["unmeasured"])
    for n in names:
        m = statistics.median(times[n])
        print(f"meta_step 14.7M {str(dtype).removeprefix('torch.')}\t{n}\tmedian {m:.3f} s\t"
              f"{m / base:.3f}x unmeasured\t({reps} reps)", flush=True)


def kernel_times(n: int, dtype, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    theta = [torch.randn(n, generator=g).to(dtype)]
    v = [(torch.randn(n, generator=g) * 1e-3).to(dtype)]
    backup = [torch.empty_like(theta[0])]
    scale = torch.tensor(0.5, dtype=torch.float64)
    fns = {
        "perturb_save_": lambda: ops.perturb_save_(theta, v, backup, scale),
        "measured, nearest": lambda: ops.perturb_save_measured_(theta, v, backup, scale),
        "measured, stochastic": lambda: ops.perturb_save_measured_(theta, v, backup, scale, stochastic=True, seed=1),
    }
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    names = list(fns)
    for r in range(reps):
        for k in names[r % 3:] + names[:r % 3]:
            times[k].append(timed(fns[k]))
    base = statistics.median(times["perturb_save_"])
    for k in names:
        m = statistics.median(times[k])
        print(f"kernel {n} {str(dtype).removeprefix('torch.')}\t{k}\tmedian {m * 1e3:.1f} ms\t{m / base:.3f}x "
              f"perturb_save_\t({reps} reps, {torch.get_num_threads()} threads)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernel-reps", type=int, default=15)
    ap.add_argument("--n", type=int, default=32 * 2**20)
    ap.add_argument("--skip-meta", action="store_true")
    a = ap.parse_args()
    for dt in (torch.bfloat16, torch.float32):
        kernel_times(a.n, dt, a.kernel_reps)
    if not a.skip_meta:
        for dt in (torch.bfloat16, torch.float32):
            meta_step_times(dt, a.reps)


if __name__ == "__main__":
    main()
