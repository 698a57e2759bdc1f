"""`python -m sama_ext.demo` — PLACEHOLDER until the demo issue lands.

For now it builds the kernels (first use) and runs one real fused op, the central-difference
perturbation θ ± εv with the exact restore, on a few parameter-shaped tensors, and checks the
result against the pure-PyTorch reference. The meta-learning demo (noisy-label reweighting on
scikit-learn's digits) replaces this.
"""
from __future__ import annotations

import argparse
import time

import torch

import sama_ext
from sama_ext import ops, reference


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print("sama_ext demo (placeholder: the meta-learning demo is not written yet)")
    t0 = time.time()
    print(f"backend: {sama_ext.backend()}  (ready in {time.time() - t0:.1f}s)")
    gen = torch.Generator().manual_seed(0)
    shapes = [(1024, 512), (512,), (512, 2048), (2048,), (10,)]
    theta = [torch.randn(s, generator=gen).to(args.device) for s in shapes]
    v = [torch.randn(s, generator=gen).to(args.device) for s in shapes]
    theta0 = [t.clone() for t in theta]
    eps = torch.tensor(1e-2, dtype=torch.float64, device=args.device)
    backup = [torch.empty_like(t) for t in theta]
    ops.perturb_save_(theta, v, backup, eps)          # θ⁺ = θ + εv, keeping θ
    want = [t.clone() for t in theta0]
    reference.perturb_(want, v, eps)
    err = max(float((a - b).abs().max()) for a, b in zip(theta, want))
    ops.perturb_from_(theta, backup, v, -eps)         # θ⁻ = θ − εv, one rounding from θ
    torch._foreach_copy_(theta, backup)               # exact restore
    exact = all(torch.equal(a, b) for a, b in zip(theta, theta0))
    n = sum(t.numel() for t in theta)
    print(f"perturbed {n:,} parameters in {len(shapes)} tensors: max |fused − reference| = {err:.2e}, "
          f"restored bit-exactly: {exact}")
    return 0 if exact and err < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
