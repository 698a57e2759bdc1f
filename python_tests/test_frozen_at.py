"""frozen_at="theta_plus" (README, DESIGN §2): `frozen` inputs recorded at θ+εv instead of θ,
which saves one forward of base_loss at the price of an O(α) bias. Checked against float64
references written here in plain torch (test_meta_step.Reweight: SGD base, so v = lr·d exactly):
  * what it computes: the central difference with the weight net's input held at ℓ(θ+εv);
  * its bias against the one-step double-backward oracle (the α → 0 limit) shrinks linearly
    with α, while "theta"'s shrinks quadratically (a central difference);
  * it evaluates base_loss once fewer than "theta"."""
from __future__ import annotations

import pytest
import torch

import sama_ext
from test_meta_step import Reweight, _detach, flat, train

pytestmark = pytest.mark.usefixtures("guard_syncs")  # meta_step calls run under the sync guard
LR = 0.5


def _setup():
    pb = Reweight(seed=1)
    opt = torch.optim.SGD(pb.theta, lr=LR)
    train(pb.theta, opt, pb.base_loss_fn(_detach), 5, pb.lam)
    return pb, opt


def _brute_force(pb: Reweight, alpha: float, held_at: str) -> torch.Tensor:
    """(∇λL(θ−εv; c) − ∇λL(θ+εv; c))/(2ε), v = lr·∇θL_meta, c = ℓ(θ) or ℓ(θ+εv)."""
    d = torch.autograd.grad(pb.meta_loss(), pb.theta)
    v = [LR * t for t in d]
    eps = alpha / torch.sqrt(sum((t * t).sum() for t in v))
    th_p = [t.detach() + eps * u for t, u in zip(pb.theta, v)]
    th_m = [t.detach() - eps * u for t, u in zip(pb.theta, v)]
    c = (pb.per_sample() if held_at == "theta" else pb.per_sample(th_p)).detach()
    g_p, g_m = pb.grad_lam(th_p, c), pb.grad_lam(th_m, c)
    return flat([(a - b) / (2 * eps) for a, b in zip(g_m, g_p)])


def _meta_step(pb, opt, alpha, frozen_at):
    calls = []
    base = pb.base_loss_fn(sama_ext.frozen)

    def base_loss():
        calls.append(torch.is_grad_enabled())
        return base()

    for q in pb.lam:
        q.grad = None
    sama_ext.meta_step(pb.theta, opt, pb.lam, base_loss, pb.meta_loss, alpha=alpha, frozen_at=frozen_at)
    return flat([q.grad for q in pb.lam]), calls


@pytest.mark.parametrize("frozen_at", ["theta", "theta_plus"])
@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_frozen_at_computes_the_difference_held_at_its_point(frozen_at, alpha):
    pb, opt = _setup()
    got, _ = _meta_step(pb, opt, alpha, frozen_at)
    want = _brute_force(pb, alpha, frozen_at)
    other = _brute_force(pb, alpha, "theta_plus" if frozen_at == "theta" else "theta")
    err = float((got - want).norm() / want.norm())
    gap = float((other - want).norm() / want.norm())
    assert err < 1e-9, f"{frozen_at}: relative error {err:.2e} against its brute-force reference"
    assert gap > 1e3 * max(err, 1e-12)  # the two references are far apart: the check can tell them apart


def test_theta_plus_bias_is_first_order_in_alpha(record_property):
    pb, opt = _setup()
    oracle = flat(pb.one_step_oracle(LR))
    alphas = [0.4, 0.2, 0.1, 0.05]
    bias = {k: [] for k in ("theta", "theta_plus")}
    for a in alphas:
        for k in bias:
            got, _ = _meta_step(pb, opt, a, k)
            bias[k].append(float((got - oracle).norm() / oracle.norm()))
    print("relative bias vs the one-step oracle at α =", alphas, bias)
    for k, b in bias.items():
        record_property(f"bias_{k}", b)
    # theta_plus: halving α halves the bias (first order); theta: quarters it (second order)
    for b0, b1 in zip(bias["theta_plus"], bias["theta_plus"][1:]):
        assert 1.7 < b0 / b1 < 2.3
    for b0, b1 in zip(bias["theta"], bias["theta"][1:]):
        assert 3.4 < b0 / b1 < 4.6
    assert all(p > 10 * t for p, t in zip(bias["theta_plus"], bias["theta"]))


@pytest.mark.parametrize("frozen_at,expected", [("theta", [False, True, True]), ("theta_plus", [True, True])])
def test_theta_plus_saves_one_forward(frozen_at, expected):
    """"theta": a no-grad forward at θ, then θ+εv and θ−εv with grad; "theta_plus": just the two."""
    pb, opt = _setup()
    _, calls = _meta_step(pb, opt, 1.0, frozen_at)
    assert calls == expected
