"""The measurement behind docs/precision.md (issue 18): λ.grad of one meta step on the small
decoder LMs of tiny_lm.py, with params and AdamW state in a 16-bit dtype (or float32), against
float64 oracles on the same values, for θ± rounded to nearest (the kernels' rounding, the old
behaviour) and at the default (stochastic rounding for 16-bit params).

    cd <repo> && PYTHONPATH=$PWD:$PWD/python_tests OMP_NUM_THREADS=1 \\
        python python_tests/precision_sweep.py --size 1M --dtype bfloat16 --seeds 0,1,2 --alphas 1,0.1

One line per (config, α, rounding), tab-separated: cos_exact (the exact SAMA quantity by double
backward in float64), cos_f64 (the same meta step in float64 at the same α), norm ratios to the
exact quantity with the realized and with the nominal divisor, the fraction of elements θ⁺ moved.
"""
from __future__ import annotations

import argparse
import time

import torch

from sama_ext import precision
from tiny_lm import as_float64, cosine, exact, meta_grad, setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1M")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", default="5")
    ap.add_argument("--alphas", default="1")
    ap.add_argument("--roundings", default="nearest,auto")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    for steps in (int(s) for s in a.steps.split(",")):
        for seed in (int(s) for s in a.seeds.split(",")):
            t0 = time.perf_counter()
            run = setup(a.size, dtype, seed=seed, steps=steps, batch=a.batch)
            n = sum(p.numel() for p in run.theta)
            truth = exact(as_float64(run))
            for alpha in (float(x) for x in a.alphas.split(",")):
                same64, _ = meta_grad(as_float64(run), alpha=alpha)
                for rounding in a.roundings.split(","):
                    precision.rounding = rounding
                    precision.manual_seed(seed)
                    run = setup(a.size, dtype, seed=seed, steps=steps, batch=a.batch)
                    got, info = meta_grad(run, alpha=alpha)
                    ratio = float(got.norm() / truth.norm())
                    nominal = ratio * float(info.eps_realized / info.eps) if float(info.eps) > 0 else float("nan")
                    print(f"{a.size}\t{n}\t{a.dtype}\tbatch={a.batch}\tseed={seed}\tsteps={steps}\talpha={alpha:g}\t{rounding}\t"
                          f"cos_exact={cosine(got, truth):+.4f}\tcos_f64={cosine(got, same64):+.4f}\t"
                          f"ratio={ratio:.3f}\tratio_nominal={nominal:.3f}\tmoved={int(info.moved) / n:.4f}\t"
                          f"skipped={bool(info.skipped)}\tf64_cos_exact={cosine(same64, truth):+.4f}\t"
                          f"{time.perf_counter() - t0:.0f}s", flush=True)
            precision.rounding = "auto"


if __name__ == "__main__":
    main()
