"""What the base optimiser's last `step()` actually used, recorded by global step hooks.

The adaptation diagonal is the derivative of the update that produced θ, so it needs that
step's hyperparameters and the gradient it consumed — not whatever the param groups and
`.grad` hold when `meta_step` runs:

* an LR scheduler (or warm-up, OneCycle's cycled betas/momentum) stepped between `opt.step()`
  and `meta_step` changes the param groups: each group's hyperparameters are snapshotted just
  before the step (`hyperparameters`);
* `zero_grad(set_to_none=False)`, a new backward, or an AMP-skipped step replace or modify the
  consumed gradient: the gradient tensor and its version counter are recorded just after the
  step (`consumed_gradient`), so a changed gradient is detected without reading it;
* SGD with dampening treats a param's first momentum step (buffer = g, undamped) differently:
  whether the step was a param's first is read from the state before the step
  (`sgd_first_step`), so it survives `load_state_dict` into a fresh optimiser.

Everything is held weakly (per optimiser / per param) and costs a few dictionary operations per
param and step. Only steps taken after `import sama_ext` are seen.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["hyperparameters", "consumed_gradient", "sgd_first_step", "GONE", "CHANGED", "NOT_STEPPED",
           "UNKNOWN"]


def _frozen_value(x):
    """A copy of a hyperparameter that later in-place edits of the group cannot reach."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(_frozen_value(y) for y in x)
    if isinstance(x, list):
        return [_frozen_value(y) for y in x]
    return x


@dataclass
class _StepRecord:
    groups: dict          # id(param group dict) -> {hyperparameter: value used by the step}
    grads: dict           # id(param) -> (weakref to the consumed .grad, its _version) or None (not stepped)


_records: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _StepRecord]" = weakref.WeakKeyDictionary()
_sgd_first = WeakIdKeyDictionary()  # param -> was its last SGD momentum step the first one


def _before_step(opt, args, kwargs) -> None:
    groups = {id(g): {k: _frozen_value(v) for k, v in g.items() if k != "params"} for g in opt.param_groups}
    _records[opt] = _StepRecord(groups=groups, grads={})
    if isinstance(opt, torch.optim.SGD):
        for g in opt.param_groups:
            if g["momentum"] == 0 or g["dampening"] == 0:  # only dampening makes the first step special
                continue
            for p in g["params"]:
                if p.grad is not None:
                    _sgd_first[p] = opt.state.get(p, {}).get("momentum_buffer") is None


def _after_step(opt, args, kwargs) -> None:
    rec = _records.get(opt)
    if rec is None:
        return
    for g in opt.param_groups:
        for p in g["params"]:
            gr = p.grad
            rec.grads[id(p)] = None if gr is None else (weakref.ref(gr), gr._version)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)


def hyperparameters(opt: torch.optim.Optimizer, group: dict) -> dict:
    """`group` with the hyperparameters its last step() used (the group itself if no step was seen)."""
    rec = _records.get(opt)
    snap = rec.groups.get(id(group)) if rec is not None else None
    if snap is None:
        return group
    return {**group, **snap, "params": group["params"]}


# consumed_gradient() verdicts besides a tensor
UNKNOWN = "unknown"          # no step of this optimiser seen since import
NOT_STEPPED = "not stepped"  # the param had no gradient at the last step: step() left it alone
GONE = "gone"                # .grad is None now
CHANGED = "changed"          # .grad was replaced or modified in place since the step


def consumed_gradient(opt: torch.optim.Optimizer, p: Tensor):
    """The gradient `p`'s last step consumed if `p.grad` still is exactly it, else a verdict."""
    rec = _records.get(opt)
    if rec is None or id(p) not in rec.grads:
        return UNKNOWN
    entry = rec.grads[id(p)]
    if entry is None:
        return NOT_STEPPED
    if p.grad is None:
        return GONE
    ref, version = entry
    if ref() is not p.grad or p.grad._version != version:
        return CHANGED
    return p.grad


def sgd_first_step(p: Tensor):
    """True/False: whether p's last SGD momentum step was its first; None if not seen."""
    return _sgd_first.get(p)
