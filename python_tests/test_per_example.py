"""sama_ext.PerExampleWeights (λ = one logit per training example) and the simple noisy-label
baselines of sama_ext.noisy_label_baselines, against independent oracles: the logistic function
written out in float64, its derivative s(1 − s), sorting, closed forms, and — for meta_step with
per-example λ — the true one-step lookahead hypergradient by central differences over every λ_i."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sama_ext
from sama_ext.noisy_label_baselines import finetune_last_layer, small_loss_fraction, small_loss_mean


def _logistic64(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([1.0 / (1.0 + math.exp(-float(v))) for v in x], dtype=torch.float64)


def test_forward_is_the_logistic_of_the_indexed_logits():
    w = sama_ext.PerExampleWeights(7)
    with torch.no_grad():
        w.logits.copy_(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0]))
    idx = torch.tensor([6, 0, 3, 3])
    got = w(idx)
    want = _logistic64(torch.tensor([4.0, -3.0, 0.5, 0.5]))
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert torch.allclose(got.double(), want, atol=1e-7)
    assert torch.allclose(sama_ext.PerExampleWeights(3)(torch.arange(3)), torch.full((3,), 0.5))  # init 0
    assert torch.allclose(w.weights().double(), _logistic64(w.logits.detach()), atol=1e-7)
    assert not w.weights().requires_grad


def test_gradient_touches_only_the_batch_and_accumulates_repeats():
    w = sama_ext.PerExampleWeights(5, init=0.3)
    idx = torch.tensor([1, 4, 1])
    upstream = torch.tensor([2.0, -1.0, 0.5])
    (w(idx) * upstream).sum().backward()
    s = 1.0 / (1.0 + math.exp(-0.3))
    want = torch.zeros(5, dtype=torch.float64)
    want[1], want[4] = (2.0 + 0.5) * s * (1 - s), -1.0 * s * (1 - s)
    assert torch.allclose(w.logits.grad.double(), want, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
def test_bad_size_is_refused(bad):
    with pytest.raises(ValueError, match="positive int"):
        sama_ext.PerExampleWeights(bad)


def test_bad_init_and_indices_are_refused():
    with pytest.raises(ValueError, match="finite"):
        sama_ext.PerExampleWeights(3, init=float("nan"))
    w = sama_ext.PerExampleWeights(4)
    with pytest.raises(TypeError, match="integer tensor"):
        w(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        w([0, 1])
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        w(torch.tensor([0, 4]))
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        w(torch.tensor([-1, 2]))  # plain indexing would wrap this around silently
    assert w(torch.tensor([], dtype=torch.long)).shape == (0,)
    assert "n=4" in repr(w)


def test_meta_step_with_per_example_weights_is_the_lookahead_hypergradient():
    """After an ordinary Adam base step, SAMA's λ.grad for per-example logits points along the true
    gradient of λ ↦ L_meta(θ after that step), computed by central differences in float64 (each
    point a real Adam step from the same pre-step state)."""
    torch.manual_seed(0)
    n, d, c = 12, 6, 3
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, c, (n,))
    xm, ym = torch.randn(20, d, dtype=torch.float64), torch.randint(0, c, (20,))
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c)).double()
    lam = sama_ext.PerExampleWeights(n, dtype=torch.float64)
    with torch.no_grad():
        lam.logits.copy_(torch.randn(n, dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    theta = list(model.parameters())
    idx = torch.tensor([0, 3, 4, 7, 8, 11])

    def base_loss():
        per = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        w = lam(idx)
        return (w * per).sum() / w.sum()

    def meta_loss():
        return F.cross_entropy(model(xm), ym)

    for _ in range(3):  # a few steps, so that Adam has a state
        opt.zero_grad()
        base_loss().backward(inputs=theta)
        opt.step()
    theta0, state0 = [p.detach().clone() for p in theta], copy.deepcopy(opt.state_dict())
    lam0 = lam.logits.detach().clone()

    def after_step(logits) -> float:
        with torch.no_grad():
            lam.logits.copy_(logits)
            for p, t in zip(theta, theta0):
                p.copy_(t)
        opt.load_state_dict(copy.deepcopy(state0))
        opt.zero_grad()
        base_loss().backward(inputs=theta)
        opt.step()
        with torch.no_grad():
            return float(meta_loss())

    h = 1e-5
    truth = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = h
        truth[i] = (after_step(lam0 + e) - after_step(lam0 - e)) / (2 * h)
    after_step(lam0)
    lam.logits.grad = None
    sama_ext.meta_step(theta, opt, [lam.logits], base_loss, meta_loss, alpha=1e-3)
    got = lam.logits.grad
    outside = torch.ones(n, dtype=torch.bool)
    outside[idx] = False
    assert torch.all(got[outside] == 0) and torch.all(truth[outside].abs() < 1e-9)
    assert float(F.cosine_similarity(got, truth, dim=0)) > 0.99
    assert 0.8 < float(truth.norm() / got.norm()) < 1.25


# ------------------------------------------------------------------------ the simple baselines
def test_small_loss_schedule_closed_form():
    assert small_loss_fraction(0, 0.6) == 1.0
    assert small_loss_fraction(5, 0.6) == pytest.approx(1 - 0.3)
    assert small_loss_fraction(10, 0.6) == pytest.approx(0.4)
    assert small_loss_fraction(59, 0.6) == pytest.approx(0.4)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="noise rate"):
            small_loss_fraction(3, bad)


@pytest.mark.parametrize("keep", [1.0, 0.4, 0.05, 0.0])
def test_small_loss_mean_is_the_mean_of_the_smallest(keep):
    losses = torch.tensor([0.9, 0.1, 2.0, 0.5, 0.3, 1.5, 0.7, 0.2, 1.1, 0.05])
    k = max(1, math.ceil(round(keep * 10, 9)))   # 1.0 → 10, 0.4 → 4, 0.05 → 1, 0 → 1
    want = sum(sorted(losses.tolist())[:k]) / k
    assert float(small_loss_mean(losses, keep)) == pytest.approx(want)


def test_finetune_last_layer_fits_the_head_only_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(40, 8)
    y = torch.randint(0, 4, (40,))  # random labels: only fitting the head can explain them
    tuned = finetune_last_layer(model, x, y, steps=300)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                       # the original is untouched
    for a, b in zip(model[0].parameters(), tuned[0].parameters()):
        assert torch.equal(a, b)                                  # features frozen
    assert not torch.equal(model[2].weight, tuned[2].weight)
    with torch.no_grad():
        assert F.cross_entropy(tuned(x), y) < 0.5 * F.cross_entropy(model(x), y)
    with pytest.raises(TypeError, match="nn.Sequential ending in an nn.Linear"):
        finetune_last_layer(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), x, y)
