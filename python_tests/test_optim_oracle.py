"""Validates optim_oracle independently of any hand-derived optimiser math.

The reference here is brute force: re-run the REAL optimizer.step() (on a deep
copy at the pre-step state) with perturbed gradients and take central finite
differences in float64.  Since the update is element-wise, all coordinates are
perturbed at once with a random sign each.
"""

import pytest
import torch

from optim_oracle import (
    oracle_diagonal,
    oracle_jacobian,
    replay_last_step,
    stepped_optimizer,
)

# torch.func's forward AD lazily scripts its decompositions on first use,
# which triggers torch.jit's deprecation warning; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

SHAPES = [(5, 4), (7,), ()]
Adam, AdamW, SGD, RMSprop, Adagrad = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def central_difference(record, h):
    """(u(g + h*s) - u(g - h*s)) / (2*h*s) per coordinate, s = random signs.

    ``h`` is a float or a list of per-param tensors (per-coordinate step)."""
    gen = torch.Generator().manual_seed(1234)
    signs = [torch.randint(0, 2, g.shape, generator=gen).to(g.dtype) * 2 - 1 for g in record.grads]
    hs = h if isinstance(h, list) else [torch.full_like(g, h) for g in record.grads]
    up = replay_last_step(record, [g + hh * s for g, hh, s in zip(record.grads, hs, signs)])
    down = replay_last_step(record, [g - hh * s for g, hh, s in zip(record.grads, hs, signs)])
    return [(a - b) / (2 * hh * s) for a, b, hh, s in zip(up, down, hs, signs)]


def assert_matches_fd(record, rtol=1e-6, atol=1e-9, h=1e-5):
    oracle = oracle_diagonal(record)
    fd = central_difference(record, h)
    for i, (o, f) in enumerate(zip(oracle, fd)):
        assert o.shape == record.params[i].shape
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, f, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
    return oracle


# ---------------------------------------------------------------- (1) SGD == lr


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("maximize", [False, True])
def test_plain_sgd_is_exactly_lr(weight_decay, maximize):
    lr = 0.125
    kwargs = {"lr": lr, "weight_decay": weight_decay, "maximize": maximize}
    rec = stepped_optimizer(SGD, kwargs, SHAPES, 3, seed=0)
    expected = -lr if maximize else lr
    for d in oracle_diagonal(rec):
        assert d.dtype == torch.float64
        assert torch.equal(d, torch.full_like(d, expected))


# ---------------------------------------------------- (2) oracle == finite diff

CASES = [
    # Adam first step: eps large enough that du/dg is not ~1e-10 (FD noise floor).
    (Adam, {"lr": 1e-2, "eps": 0.1}, 1),
    (Adam, {"lr": 1e-2}, 4),
    (Adam, {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1}, 3),
    (Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}, 4),
    (Adam, {"lr": 1e-2, "amsgrad": True, "maximize": True}, 3),
    (Adam, {"lr": torch.tensor(1e-2, dtype=torch.float64)}, 3),
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1}, 3),
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "maximize": True}, 4),
    (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, 1),  # buffer created this step
    (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, 3),
    (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, 1),
    (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}, 3),
    (SGD, {"lr": torch.tensor(0.1, dtype=torch.float64), "momentum": 0.5}, 2),
    (RMSprop, {"lr": 1e-2}, 3),
    (RMSprop, {"lr": torch.tensor(1e-2, dtype=torch.float64), "momentum": 0.5}, 2),
    (RMSprop, {"lr": 1e-2, "alpha": 0.9, "eps": 1e-4, "momentum": 0.5}, 1),
    (RMSprop, {"lr": 1e-2, "centered": True}, 3),
    (RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}, 3),
    (Adagrad, {"lr": 0.1}, 3),
    (Adagrad, {"lr": torch.tensor(0.1, dtype=torch.float64), "initial_accumulator_value": 0.1}, 2),
    (Adagrad, {"lr": 0.1, "lr_decay": 0.1, "eps": 1e-3}, 1),
    (
        Adagrad,
        {"lr": 0.1, "lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.5, "maximize": True},
        3,
    ),
]


def _case_id(case):
    cls, kw, n = case
    # Tensor-valued options show as "T"; a plain float lr is left out for brevity.
    shown = {k: ("T" if torch.is_tensor(v) else v) for k, v in kw.items() if k != "lr" or torch.is_tensor(v)}
    opts = ",".join(f"{k}={v}" for k, v in shown.items())
    return f"{cls.__name__}[{opts}]x{n}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_oracle_matches_finite_differences(case):
    cls, kwargs, n_steps = case
    rec = stepped_optimizer(cls, kwargs, SHAPES, n_steps, seed=n_steps)
    assert_matches_fd(rec)


def test_several_param_groups():
    groups = [
        {"lr": 1e-2, "betas": (0.9, 0.99)},
        {"lr": 3e-2, "amsgrad": True, "weight_decay": 0.2},
        {"lr": 5e-3, "maximize": True},
    ]
    shapes = [(3, 2), (4,), (2, 2), (5,), (3,)]
    rec = stepped_optimizer(Adam, groups, shapes, 3, seed=7)
    assert rec.group_index == [0, 0, 1, 1, 2]
    assert [tuple(p.shape) for p in rec.params] == shapes
    assert [len(g["params"]) for g in rec.optimizer.param_groups] == [2, 2, 1]
    oracle = assert_matches_fd(rec)

    # Explicit group sizes, and group hyperparameters really reach the oracle:
    # the same data under a single group with group 0's settings must agree on
    # group 0's params and disagree elsewhere.
    sized = [dict(g, num_params=n) for g, n in zip(groups, (1, 3, 1))]
    rec2 = stepped_optimizer(Adam, sized, shapes, 3, seed=7)
    assert rec2.group_index == [0, 1, 1, 1, 2]
    assert_matches_fd(rec2)
    single = oracle_diagonal(stepped_optimizer(Adam, groups[0], shapes, 3, seed=7))
    for i, (a, b) in enumerate(zip(oracle, single)):
        assert torch.allclose(a, b, rtol=1e-12, atol=0) == (rec.group_index[i] == 0)


def test_maximize_flips_sign():
    # With maximize the whole trajectory sees -g: m -> -m, v unchanged, so the
    # update is the mirror image and du/dg flips sign.
    plain = oracle_diagonal(stepped_optimizer(Adam, {"lr": 1e-2}, SHAPES, 3, seed=3))
    mirrored = oracle_diagonal(stepped_optimizer(Adam, {"lr": 1e-2, "maximize": True}, SHAPES, 3, seed=3))
    for a, b in zip(plain, mirrored):
        torch.testing.assert_close(a, -b, rtol=1e-12, atol=0.0)


# -------------------------------------------------- unseen (never-hit) coordinates


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (Adam, {"lr": 1e-2}),
        (Adam, {"lr": 1e-2, "amsgrad": True}),
        (AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
        (Adagrad, {"lr": 0.1, "lr_decay": 0.05}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(v),
)
def test_unseen_coordinates(cls, kwargs):
    rec = stepped_optimizer(cls, kwargs, [(6, 3), (4,)], 3, seed=11, sparse_rows=True)
    mask = rec.unseen_mask[0]
    assert mask.any() and not mask.all() and rec.unseen_mask[1] is None
    assert (rec.grads[0][mask] == 0).all()
    second_moment = {Adam: "exp_avg_sq", AdamW: "exp_avg_sq", RMSprop: "square_avg", Adagrad: "sum"}[cls]
    assert (rec.state_pre[0][second_moment][mask] == 0).all()

    # Raw AD hits sqrt(0) there: inf * 0 = nan (this is why the oracle resolves it).
    raw = oracle_diagonal(rec, resolve_nonfinite=False)[0]
    assert torch.isnan(raw[mask]).all() and torch.isfinite(raw[~mask]).all()

    oracle = oracle_diagonal(rec)
    assert torch.isfinite(oracle[0]).all()
    torch.testing.assert_close(oracle[0][~mask], raw[~mask], rtol=0, atol=0)
    # At g == 0 the update is ~ c*g/(k|g| + eps): FD needs h << eps there.
    h_unseen = 1e-6 * kwargs.get("eps", cls([torch.zeros(1)]).defaults["eps"])
    hs = [torch.where(mask, h_unseen, 1e-5), torch.full_like(rec.grads[1], 1e-5)]
    fd = central_difference(rec, hs)
    torch.testing.assert_close(oracle[0][mask], fd[0][mask], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(oracle[0][~mask], fd[0][~mask], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(oracle[1], fd[1], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------- (3) J is diagonal


@pytest.mark.parametrize(
    "cls,kwargs,n_steps",
    [
        (Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}, 3),
        (AdamW, {"lr": 1e-2}, 2),
        (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, 1),
        (RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.3}, 2),
        (Adagrad, {"lr": 0.1, "lr_decay": 0.1}, 2),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_jacobian_is_diagonal(cls, kwargs, n_steps):
    rec = stepped_optimizer(cls, kwargs, [(2, 2), (3,)], n_steps, seed=5)
    jac = oracle_jacobian(rec)
    assert jac.shape == (7, 7)
    diag = torch.diagonal(jac)
    # Off-diagonal entries (within and across params) must be exactly zero.
    assert torch.equal(jac - torch.diag(diag), torch.zeros_like(jac))
    expected = torch.cat([d.reshape(-1) for d in oracle_diagonal(rec)])
    torch.testing.assert_close(diag, expected, rtol=1e-12, atol=0.0)


# ------------------------------------------------------------ record plumbing


def test_record_replays_the_real_last_step():
    rec = stepped_optimizer(RMSprop, {"lr": 1e-2, "momentum": 0.5, "centered": True}, SHAPES, 3, seed=2)
    for p, g in zip(rec.params, rec.grads):
        assert torch.equal(p.grad, g)
    u = replay_last_step(rec, rec.grads)
    for theta, p, uu in zip(rec.theta_pre, rec.params, u):
        assert torch.equal(theta - p.detach(), uu)
        assert not torch.equal(theta, p.detach())
    # The record's pre-step state is not touched by the oracle.
    before = [{k: v.clone() for k, v in st.items()} for st in rec.state_pre]
    oracle_diagonal(rec)
    for st, old in zip(rec.state_pre, before):
        assert all(torch.equal(st[k], old[k]) for k in old)


def test_float32_record():
    rec = stepped_optimizer(Adam, {"lr": 1e-2}, SHAPES, 3, seed=4, dtype=torch.float32)
    exact = oracle_diagonal(rec)  # computed in float64 at the float32 state
    native = oracle_diagonal(rec, compute_dtype=None)
    for e, n in zip(exact, native):
        assert e.dtype == n.dtype == torch.float32
        torch.testing.assert_close(e, n, rtol=1e-4, atol=1e-7)
