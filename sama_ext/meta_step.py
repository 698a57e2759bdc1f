"""`meta_step`: one SAMA meta-gradient step (DESIGN §2) — to the meta level what
`loss.backward()` is to the base level.

    1. d = dL_meta/dθ (and any direct dL_meta/dλ into λ.grad)
    2. v = diag(du/dg) ⊙ d        (fused kernel, in place in d; "sama_na": v = d)
    3. ε = α/‖v‖                  (on the device; zero or non-finite ‖v‖ skips the step)
    4. g± = dL_base(θ ± εv, λ)/dλ (θ perturbed in place; frozen() inputs held at their value at θ)
    5. λ.grad += (g⁻ − g⁺)/(2ε)   (fused combine)
    6. θ restored bit for bit, or left at θ − εv ("descend")

Memory beyond the three passes: v (one θ-sized buffer, reusing d's storage) and one backup
of θ for the exact restore, plus two λ-sized gradients. No host-device synchronisation.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import ops
from .adaptation import adapt_sumsq
from .frozen import recording

__all__ = ["meta_step", "MetaStepInfo", "METHODS"]

METHODS = ("sama", "sama_na", "neumann", "cg")
BASE_UPDATES = ("restore", "descend")
FROZEN_AT = ("theta", "theta_plus")


@dataclass
class MetaStepInfo:
    """Device tensors (reading them synchronises; the step itself does not)."""
    meta_loss: Tensor   # L_meta at θ (detached)
    eps: Tensor         # ε = α/‖v‖ (0 when skipped)
    v_norm: Tensor      # ‖v‖
    skipped: Tensor     # bool: ‖v‖ was zero or not finite, nothing was changed


def _scalar_loss(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"sama_ext.meta_step: {what}() must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"sama_ext.meta_step: {what}() must return a scalar (one-element) tensor, got shape "
                         f"{tuple(value.shape)}; reduce it (e.g. .mean())")
    if not value.requires_grad:
        raise ValueError(f"sama_ext.meta_step: {what}() returned a tensor that does not require grad; it must "
                         "depend on the parameters (is it computed under torch.no_grad()?)")
    return value.reshape(())


def _trainable(params, what: str) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    params = list(params)
    out = [p for p in params if p.requires_grad]
    if not out:
        raise ValueError(f"sama_ext.meta_step: no {what} with requires_grad=True")
    seen = set()
    for p in out:
        if id(p) in seen:
            raise ValueError(f"sama_ext.meta_step: a tensor appears twice in {what}")
        seen.add(id(p))
    return out


def _accumulate(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)


def _in_layout_of(g: Tensor, like: Tensor) -> Tensor:
    """The fused kernels treat tensors as flat memory, so a gradient must share its param's
    layout. autograd may return another one (an expanded stride-0 tensor from a sum, a
    channels_last gradient for a contiguous weight): copy those into the param's layout."""
    if g.stride() == like.stride() and g.dtype == like.dtype:  # same sizes and strides: same layout
        return g
    return torch.empty_like(like).copy_(g)


def _rng_states(devices) -> tuple:
    cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    return torch.get_rng_state(), cuda


def _set_rng_states(states) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    for d, s in cuda.items():
        torch.cuda.set_rng_state(s, d)


def meta_step(base_params: Sequence[Tensor], base_optimizer: torch.optim.Optimizer, meta_params: Sequence[Tensor],
              base_loss: Callable[[], Tensor], meta_loss: Callable[[], Tensor], *, alpha: float = 1.0,
              method: str = "sama", last_grads: Sequence[Tensor] | None = None, base_update: str = "restore",
              base_module=None, meta_module=None, safeguard: str = "zero_unseen", frozen_at: str = "theta",
              iterations: int = 5, neumann_lr: float | None = None) -> MetaStepInfo:
    """Accumulate an estimate of dL_meta/dλ into `meta_params`' `.grad` (like `backward()`).

    Call it after the base optimiser's `step()`, while the base params' `.grad` still hold the
    gradient that step consumed (or pass `last_grads`). `base_loss()` must compute L_base at the
    current θ and λ (it is evaluated at θ ± εv); wrap stop-gradient inputs that depend on θ in
    `sama_ext.frozen`. `meta_loss()` computes L_meta at the current θ.

    method: "sama" (the optimiser's exact adaptation diagonal), "sama_na" (no adaptation, v = d),
    "neumann" / "cg" (implicit-differentiation baselines with `iterations` Hessian-vector
    products; Neumann's step size `neumann_lr` defaults to the base optimiser's lr).
    base_update: "restore" (θ bit-identical afterwards) or "descend" (θ ← θ − εv, one rounding;
    under DDP each rank's v differs, so rank 0's result is broadcast to keep ranks identical).
    frozen_at: where `sama_ext.frozen` inputs are recorded — "theta" (default: one extra forward of
    base_loss at the unperturbed θ without autograd; exact) or "theta_plus" (at θ+εv, saving that
    forward; biased by O(α): measured cosine 0.61 instead of 1.000 at α = 1 on a reweighting task).
    base_module / meta_module: the DDP wrappers when distributed (see sama_ext.distributed);
    the meta module needs `sama_ext.distributed.register_comm_hook` once, and meta_params must be
    exactly its trainable parameters.
    safeguard: Adam/AdamW, RMSprop, Adagrad — "zero_unseen" (default: the diagonal is 0 where the
    second moment is exactly 0) or "none" (the exact diagonal everywhere). Such never-seen coordinates have a
    huge exact diagonal but, as long as their input is still 0 in the base batch, no effect on the
    meta-gradient; they only inflate ‖v‖, shrinking ε for every other coordinate until float32
    cancellation ruins g⁻ − g⁺ (measured: docs/safeguard.md).
    """
    if method not in METHODS:
        raise ValueError(f"sama_ext.meta_step: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if frozen_at not in FROZEN_AT:
        raise ValueError(f"sama_ext.meta_step: frozen_at must be 'theta' or 'theta_plus', not {frozen_at!r}")
    if base_update not in BASE_UPDATES:
        raise ValueError(f"sama_ext.meta_step: base_update must be 'restore' or 'descend', not {base_update!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"sama_ext.meta_step: alpha must be a positive float, got {alpha!r}")
    distributed = base_module is not None or meta_module is not None
    if distributed:
        from . import distributed as ddp

        ddp.check_modules(base_module, meta_module)
    theta = _trainable(base_params, "base_params")
    lam = _trainable(meta_params, "meta_params")
    if meta_module is not None:
        ddp.check_coverage(meta_module, lam)
        if method not in ("sama", "sama_na"):
            raise NotImplementedError(f"sama_ext.meta_step: method={method!r} is single-process only")
    if {id(p) for p in theta} & {id(q) for q in lam}:
        raise ValueError("sama_ext.meta_step: base_params and meta_params overlap")
    managed = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
    stray = [i for i, p in enumerate(theta) if id(p) not in managed]
    if stray:
        raise ValueError(f"sama_ext.meta_step: base_params {stray[:5]} are not managed by the given "
                         f"{type(base_optimizer).__name__}; pass the optimiser that trains them")
    if last_grads is None:
        missing = [i for i, p in enumerate(theta) if p.grad is None]
        if missing and method == "sama":  # only the adaptation diagonal needs the last gradient
            raise RuntimeError(
                f"sama_ext.meta_step: base_params {missing[:5]} have no .grad; call meta_step right after "
                "base_optimizer.step() and before zero_grad(), or pass last_grads=")
    else:
        last_grads = list(last_grads)
        if len(last_grads) != len(theta):
            raise ValueError(f"sama_ext.meta_step: {len(last_grads)} last_grads for {len(theta)} trainable base params")

    if method in ("neumann", "cg"):
        from .baselines import implicit_meta_step

        return implicit_meta_step(theta, base_optimizer, lam, base_loss, meta_loss, method=method,
                                  iterations=iterations, neumann_lr=neumann_lr)

    def local():  # passes that must not communicate (no DDP reducer armed)
        return ddp.local_passes(base_module, meta_module) if distributed else nullcontext()

    # 1. meta gradient at θ (and λ's direct gradient, if L_meta depends on λ)
    with torch.enable_grad(), local():
        lm = _scalar_loss(meta_loss(), "meta_loss")
        grads = torch.autograd.grad(lm, theta + lam, allow_unused=True)
    d = [_in_layout_of(g, p) if g is not None else torch.zeros_like(p) for g, p in zip(grads[:len(theta)], theta)]
    direct = grads[len(theta):]

    # 2-3. v (in place in d) and ε
    if method == "sama":
        v, sumsq = adapt_sumsq(base_optimizer, theta, d, grads=last_grads, out=d, safeguard=safeguard)
    else:
        v = d
        sumsq = ops.const_adapt(d, d, lr=1.0, factor=1.0)  # Σd², one pass
    dev = theta[0].device
    norm = sumsq.to(dev).sqrt()
    ok = torch.isfinite(norm) & (norm > 0)
    eps = torch.where(ok, alpha / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))

    # 4-6. central difference with an exact restore
    backup = [torch.empty_like(p) for p in theta]
    saved = False
    rng = _rng_states({p.device for p in theta + lam})
    try:
        with recording() as rec:
            if frozen_at == "theta":  # record frozen() inputs at θ itself (no graph needed)
                with torch.no_grad(), local():
                    base_loss()
                rec.replay()
                _set_rng_states(rng)  # same dropout masks etc. in every evaluation
            ops.perturb_save_(theta, v, backup, eps)  # θ⁺ = θ + εv, backup = θ
            saved = True
            with local():
                g_plus = _meta_grads(base_loss, lam)
            rec.replay()
            _set_rng_states(rng)
            ops.perturb_from_(theta, backup, v, -eps)  # θ⁻ = θ − εv, one rounding from θ
            if meta_module is None:
                with local():
                    g_minus = _meta_grads(base_loss, lam)
            else:
                # Pass 3 communicates: an ordinary backward through the DDP meta module, whose
                # hook adds λ.grad's old value, λ's direct gradient and (g⁻ − g⁺)/(2ε) per bucket
                # and all-reduces that. λ.grad is untouched unless the whole pass succeeds.
                with ddp.communicating_pass(base_module, meta_module, g_plus, lam, eps, direct):
                    with torch.enable_grad():
                        _scalar_loss(base_loss(), "base_loss").backward(inputs=lam)
                    rec.check_consumed()  # inside: its error must also leave λ.grad as it was
            rec.check_consumed()
    except BaseException:
        if saved:
            with torch.no_grad():
                torch._foreach_copy_(theta, backup)
        raise
    if base_update == "restore":
        with torch.no_grad():
            torch._foreach_copy_(theta, backup)
    elif distributed:
        # each rank descended along its own v: rank 0's θ is broadcast so ranks stay identical
        ddp.sync_params(theta, (base_module or meta_module).process_group)
    # "descend": θ is already θ − εv (θ itself when the step was skipped)
    if meta_module is not None:
        return MetaStepInfo(meta_loss=lm.detach(), eps=eps, v_norm=norm, skipped=~ok)

    for q, g in zip(lam, direct):
        if g is not None:
            _accumulate(q, g)
    used = [i for i, (a, b) in enumerate(zip(g_plus, g_minus)) if a is not None or b is not None]
    for q in (lam[i] for i in used):
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    out = [lam[i].grad for i in used]
    ops.combine_(out,
                 [_in_layout_of(g_minus[i], o) if g_minus[i] is not None else torch.zeros_like(o)
                  for i, o in zip(used, out)],
                 [_in_layout_of(g_plus[i], o) if g_plus[i] is not None else torch.zeros_like(o)
                  for i, o in zip(used, out)],
                 eps, 1.0, True)
    return MetaStepInfo(meta_loss=lm.detach(), eps=eps, v_norm=norm, skipped=~ok)


def _meta_grads(base_loss: Callable[[], Tensor], lam: list[Tensor]) -> tuple:
    with torch.enable_grad():
        lb = _scalar_loss(base_loss(), "base_loss")
        g = torch.autograd.grad(lb, lam, allow_unused=True)
    if all(x is None for x in g):
        raise ValueError(
            "sama_ext.meta_step: base_loss() does not depend on any meta param, so the meta-gradient would be 0. "
            "Does the loss use the meta params (e.g. a weight net) outside sama_ext.frozen / .detach()?")
    return g
