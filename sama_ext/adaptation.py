"""Step 2 of SAMA: v = diag(du/dg) ⊙ d for the user's own optimiser, and ‖v‖₂.

The diagonal is the exact element-wise derivative of the optimiser's real update rule with
respect to the gradient it consumed in its last step() (DESIGN §2), read from each param
group's hyperparameters and each param's post-step state. Built in: Adam, AdamW, SGD,
RMSprop, Adagrad. Others: `register_diagonal`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from . import ops, step_record

__all__ = ["adapt", "register_diagonal", "require_diagonal", "AdaptCall", "SAFEGUARDS"]

# How coordinates whose second moment is exactly 0 are treated (DESIGN §2): "none" keeps the
# exact diagonal; "zero_unseen" sets it to 0 there (Adam/AdamW, RMSprop, Adagrad; SGD has none).
SAFEGUARDS = {"none": 0, "zero_unseen": 1}


@dataclass
class AdaptCall:
    """One param group's share of an adapt() call, handed to a diagonal function."""
    optimizer: torch.optim.Optimizer
    group: dict               # the param group's hyperparameters as its last step() used them (a copy)
    params: list[Tensor]
    vectors: list[Tensor]     # d
    grads: list[Tensor]       # the gradient the last step() consumed
    out: list[Tensor]         # where v goes (may alias vectors)
    states: list[dict]        # optimizer.state[p] for each param
    safeguard: int

    def state_list(self, key: str) -> list[Tensor]:
        """The state entry `key` of every param, with a clear error where it is missing."""
        out = []
        for p, s in zip(self.params, self.states):
            if key not in s or s[key] is None:
                what = "has no optimiser state" if not s else f"has no {key!r} in its optimiser state"
                raise RuntimeError(
                    f"sama_ext.adapt: a param of shape {tuple(p.shape)} {what}; call "
                    f"{type(self.optimizer).__name__}.step() (with these options) before adapting")
            x = s[key]
            if isinstance(x, Tensor) and x.shape == p.shape and x.stride() != p.stride():
                # state loaded from a model of another layout (e.g. contiguous → channels_last):
                # the kernels read it as flat memory in the param's layout
                x = torch.empty_like(p, dtype=x.dtype).copy_(x)
            out.append(x)
        return out


DiagonalFn = Callable[[AdaptCall], Tensor]
_REGISTRY: dict[type, DiagonalFn] = {}


def register_diagonal(optimizer_cls: type, fn: DiagonalFn | None = None):
    """Register the adaptation diagonal of an optimiser class (usable as a decorator).

    `fn(call: AdaptCall) -> Tensor` must write v = du/dg ⊙ d into `call.out` for the group's
    params and return Σv² as a float64 0-dim tensor on their device. The diagonal must be the
    derivative of the real update w.r.t. the gradient (test it against torch.func)."""
    def deco(f: DiagonalFn) -> DiagonalFn:
        _REGISTRY[optimizer_cls] = f
        return f
    return deco(fn) if fn is not None else deco


def _lookup(opt: torch.optim.Optimizer) -> DiagonalFn:
    cls = type(opt)
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    for base in cls.__mro__[1:]:
        # A subclass inherits its base's diagonal only if it keeps the base's update rule.
        if base in _REGISTRY and cls.step is base.step:
            return _REGISTRY[base]
    names = ", ".join(sorted(c.__name__ for c in _REGISTRY))
    raise NotImplementedError(
        f"sama_ext.adapt: no adaptation diagonal for {cls.__module__}.{cls.__name__} (built in: {names}). "
        "Register one with sama_ext.register_diagonal(YourOptimizer, fn), or use method='sama_na'.")


def require_diagonal(optimizer: torch.optim.Optimizer) -> None:
    """Raise the NotImplementedError `adapt` would if `optimizer` has no registered diagonal (to
    refuse an optimiser for method="sama" before any step is taken)."""
    _lookup(optimizer)


def _host_float(x, what: str) -> float:
    """Hyperparameters that only enter per-tensor constants must be host values."""
    if isinstance(x, Tensor):
        if x.device.type != "cpu":
            raise NotImplementedError(f"sama_ext.adapt: {what} as a {x.device} tensor is not supported "
                                      "(it would need a host sync); use a float or a CPU tensor")
        return float(x)
    return float(x)


def _lr(group: dict):
    lr = group["lr"]
    return lr if isinstance(lr, Tensor) and lr.device.type != "cpu" else _host_float(lr, "lr")


def _steps(call: AdaptCall) -> list:
    """Per-param step counts: floats for CPU step tensors (no sync), device tensors as they are.
    A zero step on the host means the optimiser created its state but never stepped (Adagrad
    does so in __init__)."""
    steps = []
    for p, s in zip(call.params, call.state_list("step")):
        if isinstance(s, Tensor) and s.device.type != "cpu":
            steps.append(s)
            continue
        if float(s) == 0:
            raise RuntimeError(f"sama_ext.adapt: a param of shape {tuple(p.shape)} has step 0 in its optimiser state; "
                               f"call {type(call.optimizer).__name__}.step() before adapting")
        steps.append(float(s))
    return steps


# ----------------------------------------------------------------------------- built-ins
@register_diagonal(torch.optim.Adam)
def _adam(call: AdaptCall) -> Tensor:
    g = call.group
    decoupled = g.get("decoupled_weight_decay", isinstance(call.optimizer, torch.optim.AdamW))
    wd = 0.0 if decoupled else float(g["weight_decay"])  # decoupled decay does not depend on g
    beta1, beta2 = (_host_float(b, "betas") for b in g["betas"])
    return ops.adam_adapt(
        call.vectors, call.grads, call.state_list("exp_avg"), call.state_list("exp_avg_sq"),
        call.state_list("max_exp_avg_sq") if g["amsgrad"] else [], call.params if wd else [], call.out,
        lr=_lr(g), step=_steps(call), beta1=beta1, beta2=beta2, eps=float(g["eps"]), weight_decay=wd,
        maximize=bool(g["maximize"]), safeguard=call.safeguard)


register_diagonal(torch.optim.AdamW, _adam)

@register_diagonal(torch.optim.SGD)
def _sgd(call: AdaptCall) -> Tensor:
    g = call.group
    mu, tau, nesterov = float(g["momentum"]), float(g["dampening"]), bool(g["nesterov"])
    if mu == 0:
        k = 1.0
    else:
        call.state_list("momentum_buffer")  # raises if the optimiser has not stepped
        if tau != 0:
            # a param's first momentum step sets the buffer to g, undamped (seen by step_record)
            first_flags = [step_record.sgd_first_step(p) for p in call.params]
            if any(f is None for f in first_flags):
                raise RuntimeError(
                    "sama_ext.adapt: SGD with dampening≠0 needs to know whether a param's last step was its first "
                    "(the momentum buffer starts as g, undamped); import sama_ext before the optimiser's step()")
            firsts = set(first_flags)
            if len(firsts) == 2:  # params at their first step and others: two calls
                first = [i for i, f in enumerate(first_flags) if f]
                rest = [i for i, f in enumerate(first_flags) if not f]
                return _sgd_part(call, first, 1.0, mu, nesterov) + _sgd_part(call, rest, 1.0 - tau, mu, nesterov)
            damp = 1.0 if firsts == {True} else 1.0 - tau
        else:
            damp = 1.0
        k = 1.0 + mu * damp if nesterov else damp
    sign = -1.0 if g["maximize"] else 1.0
    return ops.const_adapt(call.vectors, call.out, lr=_lr(g), factor=sign * k)


def _sgd_part(call: AdaptCall, idx: list[int], damp: float, mu: float, nesterov: bool) -> Tensor:
    k = 1.0 + mu * damp if nesterov else damp
    sign = -1.0 if call.group["maximize"] else 1.0
    return ops.const_adapt([call.vectors[i] for i in idx], [call.out[i] for i in idx], lr=_lr(call.group),
                           factor=sign * k)


@register_diagonal(torch.optim.RMSprop)
def _rmsprop(call: AdaptCall) -> Tensor:
    steps = call.state_list("step")
    # a step counter on the device (capturable) is not read: those params keep the general formula
    first = [i for i, s in enumerate(steps) if (not isinstance(s, Tensor) or s.device.type == "cpu") and float(s) == 1]
    if not first:
        return _rmsprop_part(call, list(range(len(call.params))))
    rest = [i for i in range(len(call.params)) if i not in set(first)]
    g = call.group
    S = call.state_list("square_avg")
    R2 = [S[i] - a * a for i, a in zip(first, [call.state_list("grad_avg")[i] for i in first])] if g["centered"] \
        else [S[i] for i in first]
    total = _first_step(call, first, R2)
    return total + _rmsprop_part(call, rest) if rest else total


def _rmsprop_part(call: AdaptCall, idx: list[int]) -> Tensor:
    g = call.group
    wd = float(g["weight_decay"])
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    buf = pick(call.state_list("momentum_buffer")) if wd and g["momentum"] > 0 else []
    return ops.rmsprop_adapt(
        pick(call.vectors), pick(call.grads), pick(call.state_list("square_avg")),
        pick(call.state_list("grad_avg")) if g["centered"] else [], pick(call.params) if wd else [], buf,
        pick(call.out), lr=_lr(g), alpha=float(g["alpha"]), eps=float(g["eps"]), weight_decay=wd,
        maximize=bool(g["maximize"]), safeguard=call.safeguard)


def _first_step(call: AdaptCall, idx: list[int], r2: list[Tensor]) -> Tensor:
    """RMSprop, and Adagrad from a zero accumulator, at a param's first step (host step counter 1;
    the pre-step averages are zero): du/dg_e = lr·eps/(R + eps)², R² = r2 (S, S − G² centered, Σ).
    The general formula is the difference of two nearly equal terms there, and float32 rounding
    (of the state, of R, of θ_pre under coupled decay) swamps it once |g_e| ≫ eps. The closed form
    is Adam's at its first step with β1 = β2 = 0 (bias corrections 1) and R² as the second moment:
    Adam's kernel computes it. lr: Adagrad's lr decay is 1 at step 1."""
    g = call.group
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    return ops.adam_adapt(
        pick(call.vectors), pick(call.grads), r2, r2, [], [], pick(call.out), lr=_lr(g), step=1.0, beta1=0.0,
        beta2=0.0, eps=float(g["eps"]), weight_decay=0.0, maximize=bool(g["maximize"]), safeguard=call.safeguard)


@register_diagonal(torch.optim.Adagrad)
def _adagrad(call: AdaptCall) -> Tensor:
    g = call.group
    steps = _steps(call)
    # First step from a zero accumulator: lr·eps/(R + eps)², the first-step closed form (see _first_step)
    first = ([i for i, s in enumerate(steps) if not isinstance(s, Tensor) and s == 1]
             if float(g.get("initial_accumulator_value", 1.0)) == 0 else [])
    rest = [i for i in range(len(call.params)) if i not in set(first)]
    parts = [_first_step(call, first, call.state_list("sum"))] if first else []
    if rest:
        pick = lambda xs: [xs[i] for i in rest]  # noqa: E731
        wd = float(g["weight_decay"])
        parts.append(ops.adagrad_adapt(
            pick(call.vectors), pick(call.grads), pick(call.state_list("sum")), pick(call.params) if wd else [],
            pick(call.out), lr=_lr(g), step=pick(steps), lr_decay=float(g["lr_decay"]), eps=float(g["eps"]),
            weight_decay=wd, maximize=bool(g["maximize"]), safeguard=call.safeguard))
    return sum(parts[1:], parts[0])


# ----------------------------------------------------------------------------- adapt()
def _check_pair(what: str, i: int, p: Tensor, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"sama_ext.adapt: {what}[{i}] is {type(x).__name__}, expected a Tensor")
    if x.shape != p.shape or x.dtype != p.dtype or x.device != p.device:
        raise ValueError(
            f"sama_ext.adapt: {what}[{i}] is {tuple(x.shape)} {x.dtype} on {x.device}, but params[{i}] is "
            f"{tuple(p.shape)} {p.dtype} on {p.device}; they must match")


def adapt_sumsq(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], vectors: Sequence[Tensor],
                grads: Sequence[Tensor] | None = None, out: Sequence[Tensor] | None = None,
                safeguard: str = "none") -> tuple[list[Tensor], Tensor]:
    """adapt() returning Σv² in float64 (meta_step derives ε from it)."""
    params, vectors = list(params), list(vectors)
    if len(params) != len(vectors):
        raise ValueError(f"sama_ext.adapt: {len(params)} params but {len(vectors)} vectors")
    if not params:
        raise ValueError("sama_ext.adapt: no params given")
    if safeguard not in SAFEGUARDS:
        raise ValueError(f"sama_ext.adapt: safeguard must be one of {sorted(SAFEGUARDS)}, not {safeguard!r}")
    if grads is None:
        grads = [p.grad for p in params]
        missing = [i for i, g in enumerate(grads) if g is None]
        if missing:
            raise RuntimeError(
                f"sama_ext.adapt: params {missing[:5]} have no .grad; adapt needs the gradient the optimiser "
                "consumed in its last step() (call it after optimizer.step() and before zero_grad(set_to_none=True), "
                "or pass grads=)")
    grads = list(grads)
    if out is None:
        out = [torch.empty_like(v, memory_format=torch.preserve_format) for v in vectors]
    out = list(out)
    if len(grads) != len(params) or len(out) != len(params):
        raise ValueError(f"sama_ext.adapt: need one grad and one out per param ({len(params)}), got "
                         f"{len(grads)} grads and {len(out)} outs")
    for i, p in enumerate(params):
        _check_pair("vectors", i, p, vectors[i])
        _check_pair("grads", i, p, grads[i])
        _check_pair("out", i, p, out[i])
        if grads[i].is_sparse:
            raise NotImplementedError(f"sama_ext.adapt: grads[{i}] is sparse; only dense gradients are supported")

    where = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            where[id(p)] = gi
    fn = _lookup(optimizer)
    # One call per (param group, device); partial sums are added in a fixed order.
    buckets: dict[tuple[int, torch.device], list[int]] = {}
    for i, p in enumerate(params):
        gi = where.get(id(p))
        if gi is None:
            raise ValueError(f"sama_ext.adapt: params[{i}] (shape {tuple(p.shape)}) is not managed by the given "
                             f"{type(optimizer).__name__}")
        buckets.setdefault((gi, p.device), []).append(i)
    total = None
    with torch.no_grad():
        for (gi, dev), idx in buckets.items():
            # the hyperparameters the last step() used, even if a scheduler changed the group since
            group = step_record.hyperparameters(optimizer, optimizer.param_groups[gi])
            call = AdaptCall(optimizer, group, [params[i] for i in idx],
                             [vectors[i] for i in idx], [grads[i] for i in idx], [out[i] for i in idx],
                             [optimizer.state.get(params[i], {}) for i in idx], SAFEGUARDS[safeguard])
            s = fn(call)
            s = s.to(params[0].device) if s.device != params[0].device else s
            total = s if total is None else total + s
    return out, total


def adapt(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], vectors: Sequence[Tensor],
          grads: Sequence[Tensor] | None = None, out: Sequence[Tensor] | None = None, *,
          safeguard: str = "none") -> tuple[list[Tensor], Tensor]:
    """v = diag(du/dg) ⊙ vectors for `optimizer`'s last step, and ‖v‖₂.

    Returns (v, norm): v in new tensors unless `out` is given (out=vectors works in place), norm a
    0-dim float32 tensor on the params' device. `grads` defaults to each param's .grad, which must
    be the gradient the optimiser consumed in its last step(). The hyperparameters are those that
    step used (recorded by a step hook, so a scheduler stepped since does not matter; steps taken
    before `import sama_ext` fall back to the live param groups). No host-device synchronisation.
    Coupled weight decay enters through θ before the step, which step() overwrote: it is
    recovered exactly from the post-step state (the update undone), so the diagonal is exact
    there too."""
    v, sumsq = adapt_sumsq(optimizer, params, vectors, grads, out, safeguard)
    return v, sumsq.sqrt().float()
