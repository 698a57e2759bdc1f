"""`meta_step`: one SAMA meta-gradient step (DESIGN §2) — to the meta level what
`loss.backward()` is to the base level.

    1. d = dL_meta/dθ (and any direct dL_meta/dλ, added to λ.grad with the result)
    2. v = diag(du/dg) ⊙ d        (fused kernel, in place in d; "sama_na": v = d)
    3. ε = α/‖v‖                  (on the device; zero or non-finite ‖v‖ skips the step)
    4. g± = dL_base(θ ± εv, λ)/dλ (θ perturbed in place; frozen() inputs held at their value at θ)
    5. λ.grad += (g⁻ − g⁺)/(2ε_r) (fused combine; for 16-bit θ, ε_r = ⟨θ⁺−θ⁻, v⟩/(2‖v‖²) is the
                                  step θ± really took after rounding, docs/precision.md; else ε)
    6. θ restored bit for bit, or left at θ − εv ("descend")

Memory beyond the three passes: v (one θ-sized buffer, reusing d's storage) and one backup
of θ for the exact restore, plus two λ-sized gradients. No host-device synchronisation.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import ops, precision, step_record
from .adaptation import SAFEGUARDS, adapt_sumsq
from .frozen_inputs import current_recorder, recording, reset_recorder
from .step_common import MetaStepInfo, accumulate, meta_grads, scalar_loss
from .step_common import finish_theta as _finish_theta, rng_states as _rng_states, set_rng_states as _set_rng_states
from .state_guard import BufferGuard, check_disjoint, signals_deferred

__all__ = ["meta_step", "MetaStepInfo", "METHODS"]

METHODS = ("sama", "sama_na", "neumann", "cg")
BASE_UPDATES = ("restore", "descend")
FROZEN_AT = ("theta", "theta_plus")


def _trainable(params, what: str) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    params = list(params)
    out = [p for p in params if p.requires_grad]
    if not out:
        raise ValueError(f"sama_ext.meta_step: no {what} with requires_grad=True")
    cplx = [i for i, p in enumerate(out) if p.is_complex()]
    if cplx:
        raise TypeError(f"sama_ext.meta_step: {what} {cplx[:5]} are complex ({out[cplx[0]].dtype}); complex parameters "
                        "are not supported (split them into real and imaginary parts, e.g. torch.view_as_real)")
    seen = set()
    for p in out:
        if id(p) in seen:
            raise ValueError(f"sama_ext.meta_step: a tensor appears twice in {what}")
        seen.add(id(p))
    return out


def _in_layout_of(g: Tensor, like: Tensor) -> Tensor:
    """The fused kernels treat tensors as flat memory, so a gradient must share its param's
    layout. autograd may return another one (an expanded stride-0 tensor from a sum, a
    channels_last gradient for a contiguous weight): copy those into the param's layout."""
    if g.stride() == like.stride() and g.dtype == like.dtype:  # same sizes and strides: same layout
        return g
    return torch.empty_like(like).copy_(g)


def meta_step(base_params: Sequence[Tensor], base_optimizer: torch.optim.Optimizer, meta_params: Sequence[Tensor],
              base_loss: Callable[[], Tensor], meta_loss: Callable[[], Tensor], *, alpha: float = 1.0,
              method: str = "sama", last_grads: Sequence[Tensor] | None = None, base_update: str = "restore",
              base_module=None, meta_module=None, safeguard: str = "zero_unseen", frozen_at: str = "theta",
              iterations: int = 5, neumann_lr: float | None = None, restore_buffers: bool = True) -> MetaStepInfo:
    """Accumulate an estimate of dL_meta/dλ into `meta_params`' `.grad` (like `backward()`).

    Call it after the base optimiser's `step()`, while the base params' `.grad` still hold the
    gradient that step consumed (or pass `last_grads`); an LR scheduler may have stepped in
    between (the diagonal uses the hyperparameters of the step that produced θ). `base_loss()`
    must compute L_base at the current θ and λ (it is evaluated at θ ± εv); wrap stop-gradient
    inputs that depend on θ in `sama_ext.frozen`. `meta_loss()` computes L_meta at the current θ.

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
    exactly its trainable parameters. base_module may instead be an FSDP2 (`fully_shard`) module:
    θ sharded, see sama_ext.fsdp and docs/distributed.md.
    safeguard: Adam/AdamW, RMSprop, Adagrad — "zero_unseen" (default: the diagonal is 0 where the
    second moment is exactly 0) or "none" (the exact diagonal everywhere). Such never-seen coordinates have a
    huge exact diagonal but, as long as their input is still 0 in the base batch, no effect on the
    meta-gradient; they only inflate ‖v‖, shrinking ε for every other coordinate until float32
    cancellation ruins g⁻ − g⁺ (measured: docs/safeguard.md).
    restore_buffers: put every module buffer (BatchNorm running statistics, ...) that the closures'
    forwards touch back as it was (default); False lets the extra forwards update them.

    Guarantees (README "What meta_step guarantees"): θ bit-identical afterwards with "restore" —
    also after an exception or a KeyboardInterrupt at any moment; module buffers as before; on an
    error λ.grad as before; a zero ‖v‖ adds only the direct dL_meta/dλ; a non-finite ‖v‖, g⁺, g⁻
    or dL_meta/dλ changes nothing (λ.grad's values as before, θ as before even with "descend").
    `info.skipped` says so in both cases, all without a host-device synchronisation.
    """
    if method not in METHODS:
        raise ValueError(f"sama_ext.meta_step: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if frozen_at not in FROZEN_AT:
        raise ValueError(f"sama_ext.meta_step: frozen_at must be 'theta' or 'theta_plus', not {frozen_at!r}")
    if base_update not in BASE_UPDATES:
        raise ValueError(f"sama_ext.meta_step: base_update must be 'restore' or 'descend', not {base_update!r}")
    if safeguard not in SAFEGUARDS:
        raise ValueError(f"sama_ext.meta_step: safeguard must be one of {sorted(SAFEGUARDS)}, not {safeguard!r}")
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"sama_ext.meta_step: alpha must be a positive finite float, got {alpha!r}")
    distributed = base_module is not None or meta_module is not None
    if distributed:
        from . import distributed as ddp
        from . import fsdp

        sharded = fsdp.is_fsdp(base_module)  # θ sharded by FSDP2: its own engine and checks (sama_ext/fsdp.py)
        if not sharded:
            ddp.check_modules(base_module, meta_module)
    theta = _trainable(base_params, "base_params")
    lam = _trainable(meta_params, "meta_params")
    if meta_module is not None:
        if not sharded:
            ddp.check_coverage(meta_module, lam)
        if method not in ("sama", "sama_na"):
            raise NotImplementedError(f"sama_ext.meta_step: method={method!r} is single-process only")
    if {id(p) for p in theta} & {id(q) for q in lam}:
        raise ValueError("sama_ext.meta_step: base_params and meta_params overlap")
    check_disjoint(theta + lam, [f"base_params[{i}]" for i in range(len(theta))]
                   + [f"meta_params[{i}]" for i in range(len(lam))])
    managed = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
    stray = [i for i, p in enumerate(theta) if id(p) not in managed]
    if stray:
        raise ValueError(f"sama_ext.meta_step: base_params {stray[:5]} are not managed by the given "
                         f"{type(base_optimizer).__name__}; pass the optimiser that trains them")
    stepped = list(range(len(theta)))  # params the last step updated (the others have v = 0)
    if last_grads is None:
        if method == "sama":  # only the adaptation diagonal needs the consumed gradient
            last_grads, stepped = _consumed_gradients(base_optimizer, theta)
    else:
        last_grads = list(last_grads)
        if len(last_grads) != len(theta):
            raise ValueError(f"sama_ext.meta_step: {len(last_grads)} last_grads for {len(theta)} trainable base params")
    if last_grads is not None:
        sparse = [i for i in stepped if last_grads[i] is not None and last_grads[i].layout != torch.strided]
        if sparse:
            raise NotImplementedError(
                f"sama_ext.meta_step: the gradient of base_params {sparse[:5]} is sparse ({last_grads[sparse[0]].layout}); "
                "sparse gradients are not supported by the adaptation diagonal (use a dense embedding "
                "gradient, or method='sama_na')")
        # the kernels read a gradient as flat memory in its param's layout
        last_grads = [_in_layout_of(g, p) if isinstance(g, Tensor) and g.layout == torch.strided
                      and (g.shape, g.dtype, g.device) == (p.shape, p.dtype, p.device) else g
                      for g, p in zip(last_grads, theta)]

    if distributed and sharded:
        return fsdp.meta_step(theta, base_optimizer, lam, base_loss, meta_loss, alpha=alpha, method=method,
                              last_grads=last_grads, stepped=stepped, base_update=base_update, base_module=base_module,
                              meta_module=meta_module, safeguard=safeguard, frozen_at=frozen_at,
                              restore_buffers=restore_buffers)

    if method in ("neumann", "cg"):
        from .baselines import implicit_meta_step

        return implicit_meta_step(theta, base_optimizer, lam, base_loss, meta_loss, method=method,
                                  iterations=iterations, neumann_lr=neumann_lr)

    def local():  # passes that must not communicate (no DDP reducer armed)
        return ddp.local_passes(base_module, meta_module) if distributed else nullcontext()

    buffers = BufferGuard() if restore_buffers else None
    grad_mode, recorder = torch.is_grad_enabled(), current_recorder()  # put back on every exit
    backup: list[Tensor] = []
    saved = False   # θ was perturbed: the backup holds θ and must be copied back on any exit
    done = False
    interrupted: list[BaseException] = []  # raised during the final clean-up (re-raised after it)
    try:
        with buffers.watch() if buffers is not None else nullcontext():
            # 1. meta gradient at θ (and λ's direct gradient, if L_meta depends on λ)
            with torch.enable_grad(), local():
                lm = scalar_loss(meta_loss(), "meta_loss")
                grads = torch.autograd.grad(lm, theta + lam, allow_unused=True)
            d = [_in_layout_of(_dense(g), p) if g is not None else torch.zeros_like(p)
                 for g, p in zip(grads[:len(theta)], theta)]
            direct = grads[len(theta):]

            # 2-3. v (in place in d) and ε
            if method == "sama":
                if stepped:
                    _, sumsq = adapt_sumsq(base_optimizer, [theta[i] for i in stepped], [d[i] for i in stepped],
                                           grads=[last_grads[i] for i in stepped], out=[d[i] for i in stepped],
                                           safeguard=safeguard)
                else:
                    sumsq = torch.zeros((), dtype=torch.float64, device=theta[0].device)
                if len(stepped) < len(theta):
                    torch._foreach_zero_([d[i] for i in set(range(len(theta))) - set(stepped)])
                v = d
            else:
                v = d
                sumsq = ops.const_adapt(d, d, lr=1.0, factor=1.0)  # Σd², one pass
            dev = theta[0].device
            norm = sumsq.to(dev).sqrt()
            ok = torch.isfinite(norm) & (norm > 0)
            eps = torch.where(ok, alpha / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))

            # 4-5. central difference; θ is restored on every exit (below)
            backup = [torch.empty_like(p) for p in theta]
            measure = any(p.dtype in precision.STOCHASTIC_DTYPES for p in theta)
            rng = _rng_states({p.device for p in theta + lam})
            with recording() as rec:
                if frozen_at == "theta":  # record frozen() inputs at θ itself (no graph needed)
                    with torch.no_grad(), local():
                        base_loss()
                    rec.replay()
                    _set_rng_states(rng)  # same dropout masks etc. in every evaluation
                with signals_deferred():  # "θ perturbed" and "backup valid" become true together
                    # θ⁺ = θ + εv, backup = θ; the same pass measures what rounding left of εv
                    dot_p, moved_p = precision.perturb_save_(theta, v, backup, eps)
                    saved = True
                with local():
                    g_plus = meta_grads(base_loss, lam)
                rec.replay()
                _set_rng_states(rng)
                dot_m, moved_m = precision.perturb_from_(theta, backup, v, -eps)  # θ⁻ = θ − εv, one rounding
                if measure:
                    eps_r, lost = precision.realized_eps(dot_p, -dot_m, sumsq, moved_p, moved_m, eps)
                else:  # float32/float64: the perturbation is εv to working precision
                    eps_r, lost, moved_p = eps, torch.zeros_like(ok), None
                if meta_module is None:
                    with local():
                        g_minus = meta_grads(base_loss, lam)
                else:
                    # Pass 3 communicates: an ordinary backward through the DDP meta module, whose
                    # hook adds λ.grad's old value, λ's direct gradient and (g⁻ − g⁺)/(2ε) per bucket
                    # and all-reduces that. λ.grad is untouched unless the whole pass succeeds.
                    with ddp.communicating_pass(base_module, meta_module, g_plus, lam, eps_r, direct) as pass3:
                        with torch.enable_grad():
                            scalar_loss(base_loss(), "base_loss").backward(inputs=lam)
                        rec.check_consumed()  # inside: its error must also leave λ.grad as it was
                rec.check_consumed()

        if meta_module is not None:  # (g⁻ exists only inside the hook: no g⁺ == g⁻ test)
            valid = pass3.finite & ~lost  # not finite anywhere: λ.grad was given its old values back
            with signals_deferred():
                _finish_theta(theta, backup, v, torch.where(valid, eps, torch.zeros_like(eps)), base_update)
                if buffers is not None:
                    buffers.restore()
                done = True
            if base_update == "descend":
                # each rank descended along its own v: rank 0's θ is broadcast so ranks stay identical
                ddp.sync_params(theta, (base_module or meta_module).process_group)
            return MetaStepInfo(meta_loss=lm.detach(), eps=torch.where(valid, eps, torch.zeros_like(eps)), v_norm=norm,
                                skipped=~(ok & valid), eps_realized=torch.where(valid, eps_r, torch.zeros_like(eps_r)),
                                moved=moved_p, lost=lost)

        # A non-finite g±, or dL_meta/dλ, makes the whole step a no-op (decided on the device).
        finite = _all_finite([*g_plus, *g_minus, *direct], dev)
        # a perturbation that did not reach the base loss (g⁺ == g⁻ bit for bit) carries no information
        lost = lost | (ok & precision.unchanged_grads(g_plus, g_minus))
        used = [i for i, (a, b) in enumerate(zip(g_plus, g_minus)) if a is not None or b is not None]
        valid = finite & ~lost
        eps_used = torch.where(valid, eps, torch.zeros_like(eps))      # θ under "descend"
        eps_div = torch.where(valid, eps_r, torch.zeros_like(eps_r))   # the divisor of the difference
        with signals_deferred():  # θ, buffers and λ.grad are settled together
            _finish_theta(theta, backup, v, eps_used, base_update)
            if buffers is not None:
                buffers.restore()
            for q, g in zip(lam, direct):
                if g is not None:
                    accumulate(q, torch.where(finite, g, torch.zeros_like(g)))
            for q in (lam[i] for i in used):
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
            out = [lam[i].grad for i in used]
            ops.combine_(out,
                         [_in_layout_of(g_minus[i], o) if g_minus[i] is not None else torch.zeros_like(o)
                          for i, o in zip(used, out)],
                         [_in_layout_of(g_plus[i], o) if g_plus[i] is not None else torch.zeros_like(o)
                          for i, o in zip(used, out)],
                         eps_div, 1.0, True)
            done = True
        return MetaStepInfo(meta_loss=lm.detach(), eps=eps_used, v_norm=norm, skipped=~(ok & valid),
                            eps_realized=eps_div, moved=moved_p, lost=lost)
    finally:
        # Idempotent clean-up, retried until it completes: an interrupt landing here (after a
        # closure's error, say) must not skip it, and is raised once it is done. (No statement
        # before the `try`: an interrupt there would skip the whole clean-up. CPython runs signal
        # handlers only at calls and backward jumps, none of which the two lines below contain.)
        while True:  # no-signal-check
            try:  # no-signal-check
                with signals_deferred():
                    # an interrupt inside a context manager's exit (no_grad, recording) could skip its reset
                    torch.set_grad_enabled(grad_mode)
                    reset_recorder(recorder)
                    if buffers is not None:
                        buffers.close()
                    if not done:
                        if saved:
                            with torch.no_grad():
                                torch._foreach_copy_(theta, backup)
                        if buffers is not None:
                            buffers.restore()
                break
            except BaseException as e:  # noqa: BLE001 - re-raised below
                interrupted.append(e)
        if interrupted:
            raise interrupted[0]


def _all_finite(tensors, device) -> Tensor:
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([f.to(device) for f in flags]).all()


def _dense(g: Tensor) -> Tensor:
    return g.to_dense() if g.layout != torch.strided else g


def _consumed_gradients(opt: torch.optim.Optimizer, theta: list[Tensor]) -> tuple[list, list[int]]:
    """The gradients the last step() consumed, and the indices of the params it updated."""
    grads, stepped, gone, changed = [], [], [], []
    for i, p in enumerate(theta):
        got = step_record.consumed_gradient(opt, p)
        if got is step_record.NOT_STEPPED:  # no gradient at the step: θ_i did not move, v_i = 0
            grads.append(None)
            continue
        if got is step_record.UNKNOWN:  # no step seen since import: trust .grad
            got = p.grad
            if got is None:
                gone.append(i)
        elif got is step_record.GONE:
            gone.append(i)
        elif got is step_record.CHANGED:
            changed.append(i)
        grads.append(got)
        stepped.append(i)
    if gone:
        raise RuntimeError(
            f"sama_ext.meta_step: base_params {gone[:5]} have no .grad; call meta_step right after "
            "base_optimizer.step() and before zero_grad(), or pass last_grads=")
    if changed:
        raise RuntimeError(
            f"sama_ext.meta_step: the .grad of base_params {changed[:5]} is not the gradient the last "
            f"{type(opt).__name__}.step() consumed (it was zeroed — zero_grad(set_to_none=False) — recomputed by "
            "another backward, or edited in place after the step; or the step was skipped, e.g. by "
            "torch.amp.GradScaler on inf/NaN). Call meta_step right after step() and skip it when the base step "
            "was skipped, or pass last_grads= (the gradient the step consumed).")
    return grads, stepped


