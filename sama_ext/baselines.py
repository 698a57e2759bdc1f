"""Implicit-differentiation baselines for `meta_step(method="neumann" | "cg")`.

Both estimate dL_meta/dλ = ∂L_meta/∂λ − (∂²L_base/∂λ∂θ)·H⁻¹·∇θL_meta, H = ∂²L_base/∂θ²,
solving H x = ∇θL_meta approximately with `iterations` Hessian-vector products (double
backward through L_base): a truncated Neumann series x = η Σ_k (I − ηH)^k d, or conjugate
gradients. They exist to be compared with SAMA (accuracy, time, memory); they keep the
whole second-order graph of L_base alive, which is what SAMA avoids.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .step_common import MetaStepInfo, accumulate, scalar_loss

__all__ = ["implicit_meta_step"]


def _double_backward_attention():
    """Fused attention kernels have no double backward: use the math path for the baselines."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        from contextlib import nullcontext

        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def implicit_meta_step(theta: list[Tensor], optimizer, lam: list[Tensor], base_loss: Callable[[], Tensor],
                       meta_loss: Callable[[], Tensor], *, method: str, iterations: int,
                       neumann_lr: float | None):
    if not (isinstance(iterations, int) and iterations >= 0):
        raise ValueError(f"sama_ext.meta_step: iterations must be a non-negative int, got {iterations!r}")
    if method == "neumann":
        eta = neumann_lr if neumann_lr is not None else optimizer.param_groups[0]["lr"]
        if isinstance(eta, Tensor):
            eta = float(eta)  # a hyperparameter of the baseline: read once, on purpose
        if not eta > 0:
            raise ValueError(f"sama_ext.meta_step: neumann_lr must be positive, got {eta!r}")
    with torch.enable_grad(), _double_backward_attention():
        lm = scalar_loss(meta_loss(), "meta_loss")
        grads = torch.autograd.grad(lm, theta + lam, allow_unused=True)
        d = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(grads[:len(theta)], theta)]
        lb = scalar_loss(base_loss(), "base_loss")
        g_theta = torch.autograd.grad(lb, theta, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(g_theta) if g is not None and g.requires_grad]
        g_live = [g_theta[i] for i in live]
        th_live = [theta[i] for i in live]

        def hvp(vec: list[Tensor]) -> list[Tensor]:
            out = [torch.zeros_like(p) for p in theta]
            if g_live:
                hv = torch.autograd.grad(g_live, th_live, [vec[i] for i in live], retain_graph=True,
                                         allow_unused=True)
                for i, h in zip(live, hv):
                    if h is not None:
                        out[i] = h
            return out

        if method == "neumann":
            term = [x.clone() for x in d]
            acc = [x.clone() for x in d]
            for _ in range(iterations):
                h = hvp(term)
                term = [t - eta * hh for t, hh in zip(term, h)]
                acc = [a + t for a, t in zip(acc, term)]
            x = [eta * a for a in acc]
        else:  # conjugate gradients on H x = d from x = 0
            x = [torch.zeros_like(t) for t in d]
            r = [t.clone() for t in d]
            p = [t.clone() for t in d]
            rr = _dot(r, r)
            for _ in range(iterations):
                hp = hvp(p)
                php = _dot(p, hp)
                a = torch.where(php != 0, rr / torch.where(php != 0, php, torch.ones_like(php)),
                                torch.zeros_like(php))
                x = [xi + a.to(xi.dtype) * pi for xi, pi in zip(x, p)]
                r = [ri - a.to(ri.dtype) * hi for ri, hi in zip(r, hp)]
                rr_new = _dot(r, r)
                b = torch.where(rr != 0, rr_new / torch.where(rr != 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
                p = [ri + b.to(ri.dtype) * pi for ri, pi in zip(r, p)]
                rr = rr_new
        if g_live:
            mixed = torch.autograd.grad(g_live, lam, [x[i] for i in live], allow_unused=True)
        else:
            mixed = [None] * len(lam)
    if all(m is None for m in mixed):
        raise ValueError("sama_ext.meta_step: base_loss() does not depend on any meta param through θ's gradient; "
                         "the meta-gradient would be 0")
    for q, g in zip(lam, grads[len(theta):]):
        if g is not None:
            accumulate(q, g)
    for q, m in zip(lam, mixed):
        if m is not None:
            accumulate(q, -m)
    dev = theta[0].device
    norm = _dot(x, x).sqrt().to(dev)
    return MetaStepInfo(meta_loss=lm.detach(), eps=torch.zeros((), dtype=torch.float64, device=dev), v_norm=norm,
                        skipped=torch.zeros((), dtype=torch.bool, device=dev))
