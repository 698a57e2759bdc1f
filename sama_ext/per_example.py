"""Per-example weights as meta parameters: λ = one logit per training example.

The simplest data-weighting λ there is, and the alternative to a loss→weight net: example i's weight
is sigmoid(λ_i), looked up by its index in the training set. Nothing it computes depends on θ, so
no `sama_ext.frozen` is needed, and meta_step's λ.grad is non-zero only at the batch's indices.

    weights = sama_ext.PerExampleWeights(len(train_set))      # λ: n logits, all 0 (weight 1/2)
    meta_opt = torch.optim.Adam(weights.parameters(), lr=1e-2)
    ...
    def base_loss():
        per = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        w = weights(idx)
        return (w * per).sum() / w.sum()
    ... sama_ext.meta_step(params, opt, list(weights.parameters()), base_loss, meta_loss)

An optimiser with per-coordinate state (Adam) keeps moving coordinates that were not in the batch by
their momentum; that is a property of the optimiser, not of this module.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PerExampleWeights"]


class PerExampleWeights(nn.Module):
    """n learnable logits λ; ``forward(index)`` returns sigmoid(λ[index]) ∈ (0, 1).

    ``index`` must be an integer tensor of example indices in [0, n) (a negative index would wrap
    around silently in plain indexing, so it is refused: eagerly on the CPU, by a device-side
    assertion elsewhere, which does not synchronise)."""

    def __init__(self, n: int, init: float = 0.0, device=None, dtype=None):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"PerExampleWeights: n must be a positive int (the training-set size), got {n!r}")
        init = float(init)
        if init != init or init in (float("inf"), float("-inf")):
            raise ValueError(f"PerExampleWeights: init must be a finite logit, got {init!r}")
        self.logits = nn.Parameter(torch.full((n,), init, device=device, dtype=dtype or torch.float32))

    def forward(self, index: Tensor) -> Tensor:
        if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                 torch.int8, torch.uint8):
            raise TypeError("PerExampleWeights: index must be an integer tensor of example indices, "
                            f"got {type(index).__name__}{'' if not isinstance(index, Tensor) else ' ' + str(index.dtype)}")
        n = self.logits.numel()
        if index.numel():
            if index.device.type == "cpu":
                lo, hi = int(index.min()), int(index.max())
                if lo < 0 or hi >= n:
                    raise IndexError(f"PerExampleWeights: indices must lie in [0, {n}), got [{lo}, {hi}]")
            else:
                torch._assert_async((index.min() >= 0) & (index.max() < n),
                                     f"PerExampleWeights: an index outside [0, {n})")
        return torch.sigmoid(self.logits[index.to(self.logits.device)])

    @torch.no_grad()
    def weights(self) -> Tensor:
        """All n weights (a detached copy): e.g. to prune the examples with the lowest ones."""
        return torch.sigmoid(self.logits).clone()

    def extra_repr(self) -> str:
        return f"n={self.logits.numel()}"
