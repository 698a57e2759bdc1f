"""Simple baselines for learning with noisy labels and a small clean set (used by the demo and the
examples): what a skeptical reader would try before meta learning.

* `finetune_last_layer`: take a trained classifier and fit its last linear layer on the clean set,
  features frozen. Its configuration is fixed here once, before any test result was looked at,
  and not tuned: start from the trained weights, Adam lr 1e-2, 100 full-batch steps on the clean
  set, no weight decay.
* `small_loss_fraction` / `small_loss_mean`: the small-loss trick (single-network Co-teaching, Han
  et al. 2018): train only on the (1 − τ·min(epoch/T_k, 1)) share of each batch with the smallest
  loss, τ the *assumed* noise rate (the demo gives it the true one — an advantage meta learning
  does not get), T_k = 10 epochs.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FINETUNE", "finetune_last_layer", "small_loss_fraction", "small_loss_mean", "SMALL_LOSS_RAMP_EPOCHS"]

FINETUNE = {"lr": 1e-2, "steps": 100}   # fixed in advance (see the module docstring)
SMALL_LOSS_RAMP_EPOCHS = 10              # Co-teaching's T_k


def finetune_last_layer(model: nn.Sequential, x_clean: Tensor, y_clean: Tensor,
                        lr: float = FINETUNE["lr"], steps: int = FINETUNE["steps"]) -> nn.Module:
    """A copy of the model whose last layer (an nn.Linear) was fitted to the clean set by full-batch
    Adam, everything before it frozen. The model itself is not changed."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise TypeError("finetune_last_layer: expects an nn.Sequential ending in an nn.Linear")
    tuned = copy.deepcopy(model)
    tuned.eval()
    with torch.no_grad():
        feats = tuned[:-1](x_clean)
    head = tuned[-1]
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(feats), y_clean).backward()
            opt.step()
    return tuned


def small_loss_fraction(epoch: int, assumed_noise: float, ramp_epochs: int = SMALL_LOSS_RAMP_EPOCHS) -> float:
    """Share of each batch kept in (0-based) epoch `epoch`: 1 − τ·min(epoch/T_k, 1)."""
    if not 0.0 <= assumed_noise < 1.0:
        raise ValueError(f"small-loss selection: the assumed noise rate must be in [0, 1), got {assumed_noise}")
    return 1.0 - assumed_noise * min(epoch / ramp_epochs, 1.0)


def small_loss_mean(losses: Tensor, keep: float) -> Tensor:
    """Mean of the ceil(keep·n) smallest per-sample losses (at least one)."""
    k = max(1, min(losses.numel(), math.ceil(keep * losses.numel() - 1e-9)))
    return losses.topk(k, largest=False).values.mean()
