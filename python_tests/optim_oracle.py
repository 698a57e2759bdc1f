"""Ground-truth "adaptation diagonals" for stock torch.optim optimisers.

For an optimiser whose last ``step()`` consumed the gradient ``g`` and moved
``theta_pre -> theta_new = theta_pre - u(g)``, the adaptation diagonal is the
element-wise derivative ``du/dg``.  This module obtains it WITHOUT any
hand-derived optimiser math: it differentiates torch's own functional update
(``torch.optim.adam.adam``, ``torch.optim.sgd.sgd``, ...) with ``torch.func``
at the optimiser state as it was before that step.  The per-optimiser glue
below only mirrors how each optimiser's ``step()`` wires its group dict and
state into the functional; every arithmetic operation is torch's.

Typical use from a test::

    rec = stepped_optimizer(torch.optim.Adam, {"lr": 1e-2}, [(4, 3), (5,)],
                            n_steps=3, seed=0)
    expected = oracle_diagonal(rec)            # list, aligned with rec.params

Notes on torch internals this has to work around (see the helpers below):

* ``_single_tensor_sgd`` creates the momentum buffer on the first step as
  ``grad.detach().clone()``.  The ``detach`` only exists to drop autograd
  history, but under torch.func it also drops the tangent, which would make
  ``du/dg`` silently wrong (0 instead of ``lr``).  We neutralise ``detach``
  with a TorchFunctionMode while the functional runs.
* Adam's amsgrad path does ``torch.maximum(a, b, out=a)``; ops with ``out=``
  refuse AD inputs, so the same mode rewrites them as ``a.copy_(op(a, b))``.
* The functionals update their state in place.  We pass every per-element
  state buffer into the transformed function as an explicit (zero-tangent)
  input and clone it there, so the in-place ops act on transform-level
  tensors and never touch the record's state.
* Coordinates that have never seen a gradient (Adam/RMSprop/Adagrad second
  moment exactly 0 and ``g == 0``) hit ``sqrt`` at 0: forward/reverse AD yield
  ``inf * 0 = nan`` there although the update ``c*g/(k|g| + eps)`` is smooth
  with derivative ``c/eps``.  ``oracle_diagonal`` resolves such entries as the
  limit of the AD derivative at ``g +- delta`` (delta tiny), still with no
  optimiser-specific formula; see ``_resolve_nonfinite``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.func import jacfwd, jvp
from torch.optim.adagrad import adagrad
from torch.optim.adam import adam
from torch.optim.rmsprop import rmsprop
from torch.optim.sgd import sgd
from torch.overrides import TorchFunctionMode

__all__ = [
    "StepRecord",
    "stepped_optimizer",
    "oracle_diagonal",
    "oracle_jacobian",
    "replay_last_step",
    "SUPPORTED_OPTIMIZERS",
]


# --------------------------------------------------------------------------
# Recording real optimiser steps
# --------------------------------------------------------------------------


@dataclass
class StepRecord:
    optimizer: torch.optim.Optimizer  # after all steps
    params: list[torch.Tensor]  # the live params (post-step values)
    theta_pre: list[torch.Tensor]  # param values before the LAST step (clones)
    state_pre: list[dict]  # per-param optimiser state before the last step (deep clones)
    grads: list[torch.Tensor]  # the gradient the last step consumed (also left in p.grad)
    # Extras (not part of the required API, but handy for tests):
    group_index: list[int] = field(default_factory=list)  # param i lives in group group_index[i]
    # True where the raw gradient was forced to 0 in every step (sparse_rows=True);
    # None for params that have no such rows.
    unseen_mask: list[torch.Tensor | None] = field(default_factory=list)


def _clone_state(state: dict) -> dict:
    return {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in state.items()}


def _pick_unseen_rows(n_rows: int, gen: torch.Generator) -> torch.Tensor:
    """About a third of the rows, but at least one zero row and (if possible) one live row."""
    perm = torch.randperm(n_rows, generator=gen)
    n_zero = max(1, n_rows // 3) if n_rows > 1 else 1
    rows = torch.zeros(n_rows, dtype=torch.bool)
    rows[perm[:n_zero]] = True
    return rows


def stepped_optimizer(
    opt_cls,
    kwargs: dict | Sequence[dict],
    shapes: list[tuple],
    n_steps: int,
    seed: int,
    dtype=torch.float64,
    device="cpu",
    grad_scale=1.0,
    sparse_rows: bool = False,
) -> StepRecord:
    """Create params of the given shapes (random normal), one param group (or let kwargs
    be a list of group dicts for several groups), run n_steps real optimizer.step() with
    random gradients, leaving p.grad = the last gradient.

    With a list of G group dicts, the params are split into G consecutive chunks, as
    even as possible (earlier groups get the extra ones), unless a dict says how many
    it takes with the extra key ``"num_params"`` (then every dict must).  Each dict
    holds that group's hyperparameters; anything it omits falls back to the
    optimiser's constructor defaults.  Params (and every per-param list in the
    record) stay in ``shapes`` order, which is also optimizer.param_groups order.

    sparse_rows=True: make some rows of every 2-D gradient exactly zero in every step (so
    Adam's exp_avg_sq stays exactly 0 there) – used to test the 'unseen coordinate' case.
    """
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1 (the record describes the last step)")
    # CPU generator so that a given seed yields the same data on every device.
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=dtype).to(device)

    params = [randn(tuple(s)).requires_grad_(True) for s in shapes]

    if isinstance(kwargs, dict):
        group_index = [0] * len(params)
        optimizer = opt_cls(params, **kwargs)
    else:
        group_dicts = [dict(k) for k in kwargs]
        if any("num_params" in d for d in group_dicts):
            sizes = [d.pop("num_params") for d in group_dicts]
        else:
            base, extra = divmod(len(params), len(group_dicts))
            sizes = [base + (k < extra) for k in range(len(group_dicts))]
        if sum(sizes) != len(params):
            raise ValueError(f"group sizes {sizes} do not add up to {len(params)} params")
        group_index = [k for k, n in enumerate(sizes) for _ in range(n)]
        groups, start = [], 0
        for d, n in zip(group_dicts, sizes):
            groups.append({"params": params[start : start + n], **d})
            start += n
        optimizer = opt_cls(groups)

    unseen_mask: list[torch.Tensor | None] = []
    for p in params:
        if sparse_rows and p.dim() == 2:
            rows = _pick_unseen_rows(p.shape[0], gen).to(device)
            unseen_mask.append(rows[:, None].expand(p.shape).clone())
        else:
            unseen_mask.append(None)

    theta_pre: list[torch.Tensor] = []
    state_pre: list[dict] = []
    grads: list[torch.Tensor] = []
    for step in range(n_steps):
        grads = []
        for p, mask in zip(params, unseen_mask):
            g = grad_scale * randn(p.shape)
            if mask is not None:
                g = g.masked_fill(mask, 0.0)
            grads.append(g)
            p.grad = g.clone()
        if step == n_steps - 1:
            theta_pre = [p.detach().clone() for p in params]
            state_pre = [_clone_state(optimizer.state[p]) for p in params]
        optimizer.step()

    return StepRecord(
        optimizer=optimizer,
        params=params,
        theta_pre=theta_pre,
        state_pre=state_pre,
        grads=[g.clone() for g in grads],
        group_index=group_index,
        unseen_mask=unseen_mask,
    )


# --------------------------------------------------------------------------
# Per-optimiser glue: how step() feeds the functional
# --------------------------------------------------------------------------
#
# ``gather`` runs the optimiser's own ``_init_group`` on a scratch copy (so lazy
# state initialisation, e.g. Adam's first step or SGD's missing momentum
# buffer, is exactly torch's) and returns the lists step() would pass.
# ``apply`` calls the functional with the group's hyperparameters exactly as
# step() does, except foreach/fused are forced off so the single-tensor
# reference implementation runs.
#
# Lists named in ``buffers`` hold per-element state (or None) that the update
# reads and mutates; they become zero-tangent inputs of the differentiated
# function.  ``steps`` are scalar step counters, cloned but not differentiated.


@dataclass(frozen=True)
class _Family:
    buffers: tuple[str, ...]
    gather: Callable  # (opt, group) -> (params, grads, lists: dict, extra: dict)
    apply: Callable  # (group, params, grads, lists, extra) -> None


def _gather_adam(opt, group):
    lists = {k: [] for k in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")}
    params, grads = [], []
    has_complex = opt._init_group(group, params, grads, *lists.values())
    return params, grads, lists, {"has_complex": has_complex}


def _apply_adam(group, params, grads, lists, extra):
    beta1, beta2 = group["betas"]
    adam(
        params,
        grads,
        lists["exp_avgs"],
        lists["exp_avg_sqs"],
        lists["max_exp_avg_sqs"],
        lists["state_steps"],
        amsgrad=group["amsgrad"],
        has_complex=extra["has_complex"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
        foreach=False,
        capturable=group["capturable"],
        differentiable=group["differentiable"],
        fused=False,
        grad_scale=None,
        found_inf=None,
        # AdamW is Adam with this flag set in its param groups.
        decoupled_weight_decay=group["decoupled_weight_decay"],
    )


def _gather_sgd(opt, group):
    params, grads, bufs = [], [], []
    has_sparse_grad = opt._init_group(group, params, grads, bufs)
    # step() only collects momentum buffers when momentum != 0; keep the list
    # aligned with params either way so it can be passed as a "buffer".
    if not bufs:
        bufs = [None] * len(params)
    return params, grads, {"momentum_buffer_list": bufs}, {"has_sparse_grad": has_sparse_grad}


def _apply_sgd(group, params, grads, lists, extra):
    sgd(
        params,
        grads,
        lists["momentum_buffer_list"],
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
        has_sparse_grad=extra["has_sparse_grad"],
        foreach=False,
        fused=False,
        grad_scale=None,
        found_inf=None,
    )


def _gather_rmsprop(opt, group):
    params, grads = [], []
    square_avgs, momentum_buffer_list, grad_avgs, state_steps = [], [], [], []
    # Note: _init_group takes momentum buffers BEFORE grad_avgs (the functional
    # takes them the other way round).
    has_complex = opt._init_group(
        group, params, grads, square_avgs, momentum_buffer_list, grad_avgs, state_steps
    )
    n = len(params)
    lists = {
        "square_avgs": square_avgs,
        "grad_avgs": grad_avgs or [None] * n,
        "momentum_buffer_list": momentum_buffer_list or [None] * n,
        "state_steps": state_steps,
    }
    return params, grads, lists, {"has_complex": has_complex}


def _apply_rmsprop(group, params, grads, lists, extra):
    # Pass empty lists where step() would (no centering / no momentum).
    grad_avgs = lists["grad_avgs"] if group["centered"] else []
    bufs = lists["momentum_buffer_list"] if group["momentum"] > 0 else []
    rmsprop(
        params,
        grads,
        lists["square_avgs"],
        grad_avgs,
        bufs,
        lists["state_steps"],
        lr=group["lr"],
        alpha=group["alpha"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        centered=group["centered"],
        foreach=False,
        maximize=group["maximize"],
        differentiable=group["differentiable"],
        capturable=group["capturable"],
        has_complex=extra["has_complex"],
    )


def _gather_adagrad(opt, group):
    params, grads, state_sums, state_steps = [], [], [], []
    has_sparse_grad, has_complex = opt._init_group(group, params, grads, state_sums, state_steps)
    lists = {"state_sums": state_sums, "state_steps": state_steps}
    return params, grads, lists, {"has_sparse_grad": has_sparse_grad, "has_complex": has_complex}


def _apply_adagrad(group, params, grads, lists, extra):
    adagrad(
        params,
        grads,
        lists["state_sums"],
        lists["state_steps"],
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        lr_decay=group["lr_decay"],
        eps=group["eps"],
        has_sparse_grad=extra["has_sparse_grad"],
        foreach=False,
        maximize=group["maximize"],
        differentiable=group["differentiable"],
        has_complex=extra["has_complex"],
        fused=False,
        grad_scale=None,
        found_inf=None,
    )


# Looked up through the MRO, so AdamW (a subclass of Adam) uses the Adam entry.
_FAMILIES: dict[type, _Family] = {
    torch.optim.Adam: _Family(("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), _gather_adam, _apply_adam),
    torch.optim.SGD: _Family(("momentum_buffer_list",), _gather_sgd, _apply_sgd),
    torch.optim.RMSprop: _Family(
        ("square_avgs", "grad_avgs", "momentum_buffer_list"), _gather_rmsprop, _apply_rmsprop
    ),
    torch.optim.Adagrad: _Family(("state_sums",), _gather_adagrad, _apply_adagrad),
}
SUPPORTED_OPTIMIZERS = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def _family(opt: torch.optim.Optimizer) -> _Family:
    for cls in type(opt).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    raise NotImplementedError(f"no oracle for {type(opt).__name__}")


class _Differentiable(TorchFunctionMode):
    """Value-preserving rewrites that let AD see through the functional.

    * ``Tensor.detach`` becomes an alias.  torch's optimisers detach only to cut
      autograd history (step() runs under no_grad anyway); the value is
      unchanged, so the update's true dependence on g must flow through.  Under
      torch.func, detach would also cut the tangent (SGD's first-step
      ``buf = grad.detach().clone()`` would give du/dg = 0 instead of lr).
    * ``op(..., out=t)`` becomes ``t.copy_(op(...))``.  Ops with ``out=`` refuse
      dual/grad-tracking inputs (Adam's amsgrad does
      ``torch.maximum(max_sq, sq, out=max_sq)``); copy_ is differentiable.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.detach:
            return args[0].view_as(args[0])
        out = kwargs.pop("out", None)
        if isinstance(out, torch.Tensor):
            return out.copy_(func(*args, **kwargs))
        if out is not None:
            kwargs["out"] = out
        return func(*args, **kwargs)


# --------------------------------------------------------------------------
# Rebuilding the pre-step optimiser
# --------------------------------------------------------------------------


def _restore_pre_step(record: StepRecord, dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """A deep copy of record.optimizer put back to just before its last step.

    Params hold theta_pre, state holds state_pre, p.grad holds the last gradient.
    With ``dtype`` given, params, grads and per-element state buffers are cast
    (scalar step counters keep their dtype, as torch chose it).
    """
    opt = copy.deepcopy(record.optimizer)
    copies = [p for g in opt.param_groups for p in g["params"]]
    if len(copies) != len(record.params):
        raise ValueError("record and optimizer disagree on the number of params")

    def cast(t):
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for p, theta, st, g in zip(copies, record.theta_pre, record.state_pre, record.grads):
        with torch.no_grad():
            p.data = cast(theta.clone())
        p.grad = cast(g.clone())
        opt.state[p] = {
            # "step" is the scalar counter in all supported optimisers; its dtype is torch's choice.
            k: (cast(v.clone()) if torch.is_tensor(v) and k != "step" else copy.deepcopy(v))
            for k, v in st.items()
        }
    return opt


def replay_last_step(record: StepRecord, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """u = theta_pre - theta_new from running the REAL optimizer.step() (on a deep
    copy, from the pre-step state) with the given gradients instead of record.grads."""
    opt = _restore_pre_step(record)
    copies = [p for g in opt.param_groups for p in g["params"]]
    for p, g in zip(copies, grads):
        p.grad = g.detach().clone().to(p.dtype)
    opt.step()
    return [theta - p.detach() for theta, p in zip(record.theta_pre, copies)]


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


def _group_update_fn(opt, group):
    """(u_fn, grads, params, buffers) for one param group of a pre-step copy.

    ``buffers`` maps (list name, param position) to a per-element state tensor.
    ``u_fn(grads, params, buffers)`` returns the update u for each param; it is
    pure (it clones everything the functional mutates), so torch.func can
    differentiate it with respect to any of its three arguments.
    """
    fam = _family(opt)
    params, grads, lists, extra = fam.gather(opt, group)
    # torch.func primals must all be tensors, so absent buffers (None, e.g. SGD's
    # momentum buffer before the first step) stay out of the pytree and are
    # put back as None inside u_fn.
    buffers = {(k, i): b for k in fam.buffers for i, b in enumerate(lists[k]) if b is not None}
    steps = lists.get("state_steps")

    def u_fn(gs, ps, bufs):
        work_p = [p.clone() for p in ps]
        work_lists = dict(lists)
        for k in fam.buffers:
            work_lists[k] = [None if b is None else bufs[(k, i)].clone() for i, b in enumerate(lists[k])]
        if steps is not None:
            work_lists["state_steps"] = [s.clone() for s in steps]
        with _Differentiable():
            fam.apply(group, work_p, list(gs), work_lists, extra)
        return [p0 - p1 for p0, p1 in zip(ps, work_p)]

    return u_fn, grads, params, buffers


def _jvp_diag(u_fn, grads, params, buffers) -> list[torch.Tensor]:
    # The update is element-wise, so J @ ones is exactly the diagonal
    # (oracle_jacobian / the tests check that J is diagonal).
    tangents = (
        [torch.ones_like(g) for g in grads],
        [torch.zeros_like(p) for p in params],
        {k: torch.zeros_like(b) for k, b in buffers.items()},
    )
    _, du = jvp(u_fn, (grads, params, buffers), tangents)
    return list(du)


def _resolve_nonfinite(u_fn, grads, params, buffers, diag, delta_exp=0.4):
    """Replace non-finite diagonal entries by the limit of the AD derivative.

    AD produces inf*0 = nan where sqrt meets an exactly-zero second moment
    with g == 0 (a coordinate that has never seen a gradient).  The update
    itself is smooth there, so its derivative is the limit of the AD
    derivative at g +- delta.  We evaluate both one-sided values at a delta so
    small (tiny**0.4: ~1e-123 in float64, ~5e-16 in float32) that it is
    invisible next to any eps, yet delta**2 is still a normal number.  If the
    two sides disagree or stay non-finite, the derivative genuinely does not
    exist and the entry is left as nan.
    """
    bad = [~torch.isfinite(d) for d in diag]
    if not any(b.any() for b in bad):
        return diag
    one_sided = []
    for sign in (1.0, -1.0):
        delta = sign * torch.finfo(grads[0].dtype).tiny ** delta_exp
        shifted = [g + delta * b.to(g.dtype) for g, b in zip(grads, bad)]
        one_sided.append(_jvp_diag(u_fn, shifted, params, buffers))
    out = []
    for d, b, plus, minus in zip(diag, bad, *one_sided):
        agree = torch.isfinite(plus) & torch.isfinite(minus) & torch.isclose(plus, minus, rtol=1e-9, atol=0.0)
        limit = torch.where(agree, 0.5 * (plus + minus), torch.full_like(d, float("nan")))
        out.append(torch.where(b, limit, d))
    return out


def oracle_diagonal(
    record: StepRecord,
    compute_dtype: torch.dtype | None = torch.float64,
    resolve_nonfinite: bool = True,
) -> list[torch.Tensor]:
    """du/dg for every param (same shapes), from torch.func on the optimiser's own
    functional update at (theta_pre, state_pre, grads) with the group's hyperparameters.

    compute_dtype: dtype the functional runs in (default float64, so float32 records
    get an accurate derivative at their float32 state); None keeps the record's dtype.
    Results are returned in each param's own dtype.
    resolve_nonfinite: resolve never-seen coordinates (sqrt at 0) by their limit,
    see _resolve_nonfinite; False returns raw AD values (nan there).
    """
    opt = _restore_pre_step(record, compute_dtype)
    diags: list[torch.Tensor] = []
    for group in opt.param_groups:
        u_fn, grads, params, buffers = _group_update_fn(opt, group)
        if len(params) != len(group["params"]):
            raise ValueError("every param in the record must have a gradient")
        diag = _jvp_diag(u_fn, grads, params, buffers)
        if resolve_nonfinite:
            diag = _resolve_nonfinite(u_fn, grads, params, buffers, diag)
        diags.extend(diag)
    return [d.to(p.dtype) for d, p in zip(diags, record.params)]


def oracle_jacobian(
    record: StepRecord, group: int = 0, compute_dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """Dense Jacobian d(flat u)/d(flat g) over all params of one param group.

    Built with jacfwd (a jvp per basis vector, vmapped), whereas oracle_diagonal
    pushes a single all-ones tangent; the off-diagonal entries show whether that
    shortcut is valid.  Reverse mode is not an option: RMSprop and Adagrad do
    ``sqrt().add_(eps)`` in place on the saved sqrt output, which autograd rejects.
    Size is (N, N) for N = total numel in the group: tiny cases only.
    """
    opt = _restore_pre_step(record, compute_dtype)
    u_fn, grads, params, buffers = _group_update_fn(opt, opt.param_groups[group])

    def flat_u(flat_g):
        gs, offset = [], 0
        for g in grads:
            gs.append(flat_g[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return torch.cat([u.reshape(-1) for u in u_fn(gs, params, buffers)])

    return jacfwd(flat_u)(torch.cat([g.reshape(-1) for g in grads]))
