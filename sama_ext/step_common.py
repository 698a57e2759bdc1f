"""What the SAMA step (sama_step.py), its FSDP2 engine (fsdp.py) and the implicit baselines
(baselines.py) share: the result type of a meta step, the check of a closure's loss, accumulation
into `.grad`, the RNG states replayed in every evaluation, and the end of the step for θ."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops, precision

__all__ = ["MetaStepInfo", "scalar_loss", "accumulate", "rng_states", "set_rng_states", "finish_theta"]


@dataclass
class MetaStepInfo:
    """Device tensors (reading them synchronises; the step itself does not)."""
    meta_loss: Tensor   # L_meta at θ (detached)
    eps: Tensor         # ε = α/‖v‖ (0 when skipped)
    v_norm: Tensor      # ‖v‖
    skipped: Tensor     # bool: ‖v‖ was zero, or ‖v‖, g⁺, g⁻ or dL_meta/dλ not finite, or the perturbation lost
    # what θ± = θ ± εv really moved after rounding to θ's dtype (docs/precision.md); None from the baselines
    eps_realized: Tensor | None = None  # the ε divided by: ⟨θ⁺−θ⁻, v⟩/(2‖v‖²) for 16-bit θ, else ε (0 when skipped)
    moved: Tensor | None = None         # int64: elements of θ⁺ that differ from θ (measured for 16-bit θ only: None)
    lost: Tensor | None = None          # bool: nothing moved, or g⁺ == g⁻ bitwise (then skipped)


def scalar_loss(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"sama_ext.meta_step: {what}() must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"sama_ext.meta_step: {what}() must return a scalar (one-element) tensor, got shape "
                         f"{tuple(value.shape)}; reduce it (e.g. .mean())")
    if not value.requires_grad:
        raise ValueError(f"sama_ext.meta_step: {what}() returned a tensor that does not require grad; it must "
                         "depend on the parameters (is it computed under torch.no_grad()?)")
    return value.reshape(())


def meta_grads(base_loss, lam: list[Tensor]) -> tuple:
    """∂L_base/∂λ at the current θ (g⁺ or g⁻), with an error where L_base ignores every meta param."""
    with torch.enable_grad():
        lb = scalar_loss(base_loss(), "base_loss")
        g = torch.autograd.grad(lb, lam, allow_unused=True)
    if all(x is None for x in g):
        raise ValueError(
            "sama_ext.meta_step: base_loss() does not depend on any meta param, so the meta-gradient would be 0. "
            "Does the loss use the meta params (e.g. a weight net) outside sama_ext.frozen / .detach()?")
    return g


def accumulate(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)


def rng_states(devices) -> tuple:
    cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    return torch.get_rng_state(), cuda


def set_rng_states(states) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    for d, s in cuda.items():
        torch.cuda.set_rng_state(s, d)


def finish_theta(theta: list[Tensor], backup: list[Tensor], v: list[Tensor], eps: Tensor, base_update: str) -> None:
    """θ back to the backup ("restore"), or θ − εv with one rounding from it ("descend"; eps = 0
    for a step that turned out invalid leaves θ as it was). 16-bit θ⁻ was rounded stochastically:
    it is kept where valid (recomputing it would draw new roundings), the backup taken otherwise."""
    with torch.no_grad():
        if base_update == "restore":
            torch._foreach_copy_(theta, backup)
            return
        plain = [i for i, p in enumerate(theta) if p.dtype not in precision.STOCHASTIC_DTYPES]
        if plain:
            ops.perturb_from_([theta[i] for i in plain], [backup[i] for i in plain], [v[i] for i in plain], -eps)
        for i, p in enumerate(theta):
            if p.dtype in precision.STOCHASTIC_DTYPES:
                p.copy_(torch.where(eps != 0, p, backup[i]))
