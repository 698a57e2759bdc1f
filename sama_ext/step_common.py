"""What the SAMA step (sama_step.py) and the implicit baselines (baselines.py) share: the result
type of a meta step, the check of a closure's loss, and accumulation into `.grad`."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["MetaStepInfo", "scalar_loss", "accumulate"]


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


def accumulate(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)
