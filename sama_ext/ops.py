"""The fused kernels as Python functions: thin wrappers over `torch.ops.sama_ext.*`
(compiled backend) or `sama_ext.reference` (torch backend), same arguments either way.

Scalars such as lr, steps and ε may be Python floats or tensors; tensors are read on the
device (never `.item()`), so nothing here synchronises with the GPU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import reference
from ._backend import backend, check_device

__all__ = ["adam_adapt", "const_adapt", "rmsprop_adapt", "adagrad_adapt", "perturb_", "perturb_from_",
           "perturb_save_", "combine_"]


def _compiled() -> bool:
    return backend() == "compiled"


def _split(x, device) -> tuple[float, Tensor | None]:
    """(host factor, optional device tensor) for a float-or-tensor scalar."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"sama_ext: a scalar must be a float or a one-element tensor, got shape {tuple(x.shape)}")
        return 1.0, x.to(device) if x.device != device else x
    return float(x), None


def _steps(step, n: int, device) -> tuple[float, Tensor | None]:
    """Adam/Adagrad steps: one float, or per-tensor values (floats or 0-dim tensors)."""
    if not isinstance(step, (list, tuple)):
        return _split(step, device)
    if all(not isinstance(s, Tensor) for s in step):
        if len(set(float(s) for s in step)) == 1:
            return float(step[0]), None
        return 1.0, torch.tensor([float(s) for s in step], dtype=torch.float64, device=device)
    if len(step) != n:
        raise ValueError(f"got {len(step)} steps for {n} tensors")
    return 1.0, torch.stack([torch.as_tensor(s).reshape(()).to(device, torch.float64) for s in step])


def _device(tensors: Sequence[Tensor]) -> torch.device:
    if len(tensors) == 0:
        raise ValueError("sama_ext: empty tensor list")
    dev = tensors[0].device
    check_device(dev)
    return dev


def adam_adapt(d, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, params, out, *, lr, step, beta1, beta2, eps,
               weight_decay=0.0, maximize=False, safeguard=0) -> Tensor:
    """out = s·du/dg·d for Adam/AdamW (post-step state); returns Σ out² as a float64 device scalar.
    `max_exp_avg_sq` is empty unless AMSGrad; `params` is needed only for coupled weight decay."""
    if not _compiled():
        return reference.adam_adapt(d, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, params, out, lr=lr, step=step,
                                    beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                    maximize=maximize, safeguard=safeguard)
    dev = _device(d)
    lr_v, lr_t = _split(lr, dev)
    st_v, st_t = _steps(step, len(d), dev)
    return torch.ops.sama_ext.adam_adapt(list(d), list(grads), list(exp_avg), list(exp_avg_sq),
                                         list(max_exp_avg_sq), list(params), list(out), lr_v, lr_t, st_v, st_t,
                                         float(beta1), float(beta2), float(eps), float(weight_decay),
                                         bool(maximize), int(safeguard))


def const_adapt(d, out, *, lr, factor) -> Tensor:
    """out = lr·factor·d; returns Σ out²."""
    if not _compiled():
        return reference.const_adapt(d, out, lr=lr, factor=factor)
    dev = _device(d)
    lr_v, lr_t = _split(lr, dev)
    return torch.ops.sama_ext.const_adapt(list(d), list(out), lr_v, lr_t, float(factor))


def rmsprop_adapt(d, grads, square_avg, grad_avg, params, momentum_buffer, out, *, lr, alpha, eps,
                  weight_decay=0.0, maximize=False, safeguard=0) -> Tensor:
    """out = s·du/dg·d for RMSprop (`grad_avg` empty unless centered; `params` and, with momentum,
    `momentum_buffer` needed only for coupled weight decay); returns Σ out²."""
    if not _compiled():
        return reference.rmsprop_adapt(d, grads, square_avg, grad_avg, params, momentum_buffer, out, lr=lr,
                                       alpha=alpha, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                       safeguard=safeguard)
    dev = _device(d)
    lr_v, lr_t = _split(lr, dev)
    return torch.ops.sama_ext.rmsprop_adapt(list(d), list(grads), list(square_avg), list(grad_avg), list(params),
                                            list(momentum_buffer), list(out), lr_v, lr_t, float(alpha), float(eps),
                                            float(weight_decay), bool(maximize), int(safeguard))


def adagrad_adapt(d, grads, state_sum, params, out, *, lr, step, lr_decay, eps, weight_decay=0.0,
                  maximize=False, safeguard=0) -> Tensor:
    """out = s·du/dg·d for Adagrad; returns Σ out²."""
    if not _compiled():
        return reference.adagrad_adapt(d, grads, state_sum, params, out, lr=lr, step=step, lr_decay=lr_decay,
                                       eps=eps, weight_decay=weight_decay, maximize=maximize, safeguard=safeguard)
    dev = _device(d)
    lr_v, lr_t = _split(lr, dev)
    st_v, st_t = _steps(step, len(d), dev)
    return torch.ops.sama_ext.adagrad_adapt(list(d), list(grads), list(state_sum), list(params), list(out), lr_v,
                                            lr_t, st_v, st_t, float(lr_decay), float(eps), float(weight_decay),
                                            bool(maximize), int(safeguard))


def perturb_(params: Sequence[Tensor], vectors: Sequence[Tensor], scale) -> None:
    """θ += scale·v in place, one rounding; `scale` a float or a one-element tensor (read on the
    device). A zero scale leaves θ exactly as it was, even where v is not finite."""
    if len(params) == 0:
        return
    if not _compiled():
        return reference.perturb_(params, vectors, scale)
    dev = _device(params)
    s_v, s_t = _split(scale, dev)
    torch.ops.sama_ext.perturb_(list(params), list(vectors), s_v, s_t)


def perturb_from_(params, sources, vectors, scale) -> None:
    """θ = source + scale·v (one rounding from the source)."""
    if len(params) == 0:
        return
    if not _compiled():
        return reference.perturb_from_(params, sources, vectors, scale)
    dev = _device(params)
    s_v, s_t = _split(scale, dev)
    torch.ops.sama_ext.perturb_from_(list(params), list(sources), list(vectors), s_v, s_t)


def perturb_save_(params, vectors, backups, scale) -> None:
    """backup = θ, then θ += scale·v, in one pass."""
    if len(params) == 0:
        return
    if not _compiled():
        return reference.perturb_save_(params, vectors, backups, scale)
    dev = _device(params)
    s_v, s_t = _split(scale, dev)
    torch.ops.sama_ext.perturb_save_(list(params), list(vectors), list(backups), s_v, s_t)


def combine_(out, g_minus, g_plus, eps: Tensor, scale: float = 1.0, accumulate: bool = False) -> None:
    """out (+)= scale·(g⁻ − g⁺)/(2ε); a zero or non-finite ε (a skipped step) contributes nothing."""
    if len(out) == 0:
        return
    if not _compiled():
        return reference.combine_(out, g_minus, g_plus, eps, scale, accumulate)
    dev = _device(out)
    eps = eps.to(dev) if eps.device != dev else eps
    torch.ops.sama_ext.combine_(list(out), list(g_minus), list(g_plus), eps, float(scale), bool(accumulate))
