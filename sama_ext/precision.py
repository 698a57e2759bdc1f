"""What the central difference really perturbed (issue 18, docs/precision.md).

θ± = θ ± εv are rounded to θ's dtype. In bfloat16 (8 significant bits) an element whose |εvᵢ| is
below half an ulp of θᵢ does not move at all, so θ⁺ − θ⁻ is not 2εv: dividing g⁻ − g⁺ by 2ε
then mis-scales the estimate, and when nothing the base loss depends on moved, g⁺ == g⁻ and the
"meta-gradient" is an exact, silent 0.

This module measures the realized perturbation from the tensors meta_step already holds (θ±, the
backup of θ, v) and derives

- ε_r = ⟨θ⁺ − θ⁻, v⟩ / (2‖v‖²) in float64: the step along v that θ⁺ − θ⁻ actually took (its
  least-squares projection onto v). meta_step divides by 2ε_r instead of 2ε; ε_r == ε wherever
  the rounding of θ± is negligible (float64, or float32 with the perturbation well above an ulp).
- `lost`: nothing moved (no element of θ⁺ nor of θ⁻ differs from θ, or ε_r is not positive and
  finite), or g⁺ == g⁻ bit for bit. Such a step is reported as skipped, never a silent 0.

and, for bfloat16 and float16 params, rounds θ± = θ ± εv *stochastically* (up with probability
equal to the fraction of the ulp covered, so that E[θ±] = θ ± εv exactly): an element whose |εvᵢ|
is below half an ulp still moves in expectation, where round-to-nearest drops it every time. That
was the better of the measured candidates (docs/precision.md). `rounding = "nearest"` restores
round-to-nearest everywhere; float32/float64 params always round to nearest.

Both the rounding and the measurement happen inside the fused perturbation kernels
(`ops.perturb_save_measured_` / `ops.perturb_from_measured_`): the pass that writes θ± also
returns Σ(θ± − θ)·v and the number of elements that changed, so measuring costs no extra pass.
The random bits come from a counter-based generator (Philox4x32-10) keyed by this module's seed
(`manual_seed`), a private call counter, the tensor's index and the element's index: never the
user's RNG, and the same bits on CPU, CUDA and the reference backend.

Everything stays on the device (no host synchronisation): the results are 0-dim tensors combined
with torch.where.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor

from . import ops

__all__ = ["moved", "realized_eps", "unchanged_grads", "perturb_save_", "perturb_from_", "manual_seed", "rounding"]

# "auto": stochastic rounding of θ± for bfloat16/float16 params, round-to-nearest otherwise;
# "nearest": round-to-nearest for every dtype.
rounding = "auto"
STOCHASTIC_DTYPES = (torch.bfloat16, torch.float16)
_SEED = 0x5A3A
_calls = itertools.count()  # the generator's offset: one fresh stream of draws per perturbation


def manual_seed(seed: int) -> None:
    """Reseed the stochastic rounding (its own counter-based generator; the user's RNG is never
    used) and restart its call counter, so that a run repeats its roundings."""
    global _SEED, _calls
    _SEED = int(seed)
    _calls = itertools.count()


def _stochastic() -> bool:
    if rounding not in ("auto", "nearest"):
        raise ValueError(f"sama_ext.precision.rounding must be 'auto' or 'nearest', not {rounding!r}")
    return rounding == "auto"  # the kernels round only bfloat16/float16 tensors stochastically


def perturb_save_(params: Sequence[Tensor], vectors: Sequence[Tensor], backups: Sequence[Tensor],
                  scale: Tensor) -> tuple[Tensor, Tensor]:
    """backup = θ, then θ = θ + scale·v in one fused pass (stochastic rounding for 16-bit params
    unless `rounding == "nearest"`); returns (Σ (θ − backup)·v in float64, #(θ ≠ backup) as int64),
    as `moved` would. Checked before it writes: all of θ is written, or none."""
    return ops.perturb_save_measured_(params, vectors, backups, scale, stochastic=_stochastic(), seed=_SEED,
                                      offset=next(_calls))


def perturb_from_(params: Sequence[Tensor], sources: Sequence[Tensor], vectors: Sequence[Tensor],
                  scale: Tensor) -> tuple[Tensor, Tensor]:
    """θ = source + scale·v, rounded as in `perturb_save_`; returns (Σ (θ − source)·v, #(θ ≠ source))."""
    return ops.perturb_from_measured_(params, sources, vectors, scale, stochastic=_stochastic(), seed=_SEED,
                                      offset=next(_calls))


@torch.no_grad()
def moved(params: Sequence[Tensor], backups: Sequence[Tensor], vectors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(Σ (θᵢ − backupᵢ)·vᵢ in float64, number of elements with θᵢ ≠ backupᵢ as int64), on the
    params' device. Elements that did not move contribute exactly 0 (also where v is not finite).
    A separate read pass: `perturb_save_` / `perturb_from_` return the same from their own pass."""
    dev = params[0].device
    dot = torch.zeros((), dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.int64, device=dev)
    for p, b, v in zip(params, backups, vectors):
        diff = p.double() - b.double()  # exact: the difference of two float32/16-bit numbers fits in float64
        changed = diff != 0
        dot += torch.where(changed, diff * v.double(), 0.0).sum()
        count += changed.sum()
    return dot, count


def realized_eps(dot_plus: Tensor, dot_minus: Tensor, sumsq: Tensor, count_plus: Tensor,
                 count_minus: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(ε_r, lost) from the two `moved` results (θ⁺ against θ, θ against θ⁻: the caller passes
    −dot of θ⁻ − θ) and Σv². ε_r is 0 where `lost` or where ε is 0 (a step skipped already, for
    a zero or non-finite ‖v‖: that is not reported as lost)."""
    er = (dot_plus + dot_minus) / (2 * sumsq.to(torch.float64))
    lost = ((count_plus + count_minus == 0) | ~torch.isfinite(er) | (er <= 0)) & (eps != 0)
    er = torch.where(lost | (eps == 0), torch.zeros_like(er), er)
    return er, lost


@torch.no_grad()
def unchanged_grads(g_plus: Sequence[Tensor | None], g_minus: Sequence[Tensor | None]) -> Tensor:
    """True (0-dim bool tensor) when every λ-gradient is bitwise the same at θ⁺ and θ⁻: the
    perturbation did not reach the base loss, so the difference carries no information."""
    same = None
    for a, b in zip(g_plus, g_minus):
        if a is None and b is None:
            continue
        if a is None or b is None:
            eq = torch.zeros((), dtype=torch.bool, device=(a if a is not None else b).device)
        else:
            eq = _bits(a).eq(_bits(b)).all()  # bitwise (-0.0 and 0.0 differ)
        same = eq if same is None else same & eq
    if same is None:
        raise ValueError("sama_ext.precision: no λ-gradient to compare")
    return same


def _bits(t: Tensor) -> Tensor:
    t = t.contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])
