"""Adam's diagonal where the second moment is 0 (DESIGN §2): with meta_step's default safeguard
the float32 meta-gradient keeps its direction at small α, against a float64 double-backward
oracle of the exact SAMA quantity. The oracle's v is built from optim_oracle's torch.func diagonal
of torch's own Adam update (never from sama_ext.adapt), and the meta-gradient is checked in size
(‖v‖, relative error), not only in direction. (The measurement behind the default:
docs/safeguard.md.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sama_ext
from optim_oracle import StepRecord, _clone_state, oracle_diagonal

# torch.func's forward AD scripts its decompositions on first use (a torch.jit deprecation warning);
# meta_step runs under the sync guard (conftest.guard_syncs).
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("guard_syncs")]


def _setup(seed: int, dtype):
    """An MLP whose inputs are 40% 'rare' features (non-zero in ~0.2% of samples), trained 20
    Adam steps with a reweighting net: many first-layer weights never saw a gradient."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(dtype)
    wnet = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1)).to(dtype)
    opt = torch.optim.Adam(base.parameters(), lr=1e-3)
    rare = torch.rand(64, generator=g) < 0.4

    def data(n):
        x = torch.rand(n, 64, generator=g)
        keep = torch.where(rare, (torch.rand(n, 64, generator=g) < 0.002).float(), torch.ones(n, 64))
        return (x * keep).to(dtype), torch.randint(0, 10, (n,), generator=g)

    def weighted(x, y):
        per = F.cross_entropy(base(x), y, reduction="none")
        w = torch.sigmoid(wnet(sama_ext.frozen(per).unsqueeze(1))).squeeze(1)
        return (w * per).sum() / w.sum()

    th = list(base.parameters())
    for k in range(20):
        x, y = data(64)
        opt.zero_grad()
        weighted(x, y).backward()
        if k == 19:  # the last step, for the torch.func oracle
            pre, state = [p.detach().clone() for p in th], [_clone_state(opt.state[p]) for p in th]
        opt.step()
    rec = StepRecord(optimizer=opt, params=th, theta_pre=pre, state_pre=state,
                     grads=[p.grad.detach().clone() for p in th])
    xm, ym = data(100)
    return base, wnet, opt, lambda: weighted(x, y), lambda: F.cross_entropy(base(xm), ym), rec


def _oracle(seed: int, safeguard: str) -> tuple[torch.Tensor, float]:
    """(−∂/∂λ[∇θL_base · v], ‖v‖) in float64 by double backward, v = diag ⊙ dL_meta/dθ with the
    torch.func diagonal of torch's Adam step (zeroed where exp_avg_sq is 0 for "zero_unseen")."""
    base, wnet, opt, base_loss, meta_loss, rec = _setup(seed, torch.float64)
    th, lam = list(base.parameters()), list(wnet.parameters())
    d = torch.autograd.grad(meta_loss(), th)
    diag = oracle_diagonal(rec)
    if safeguard == "zero_unseen":
        diag = [torch.where(opt.state[p]["exp_avg_sq"] == 0, 0.0, t) for p, t in zip(th, diag)]
    v = [a * b for a, b in zip(diag, d)]
    g_th = torch.autograd.grad(base_loss(), th, create_graph=True)
    mixed = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g_th, v)), lam)
    norm = float(torch.sqrt(sum((t * t).sum() for t in v)))
    return -torch.cat([m.flatten() for m in mixed]), norm


def _meta_grad(seed: int, alpha: float, **kw) -> tuple[torch.Tensor, sama_ext.MetaStepInfo]:
    base, wnet, opt, base_loss, meta_loss, _ = _setup(seed, torch.float32)
    for q in wnet.parameters():
        q.grad = None
    info = sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters()), base_loss, meta_loss,
                              alpha=alpha, **kw)
    return torch.cat([q.grad.flatten().double() for q in wnet.parameters()]), info


@pytest.mark.parametrize("seed", [0, 1])
def test_zeroing_unseen_coordinates_does_not_change_the_estimated_quantity(seed):
    (exact, norm_exact), (zeroed, norm_zeroed) = _oracle(seed, "none"), _oracle(seed, "zero_unseen")
    assert F.cosine_similarity(exact, zeroed, dim=0) > 0.99999
    assert float((exact - zeroed).norm() / exact.norm()) < 1e-4
    assert norm_exact > 10 * norm_zeroed  # while ‖v‖ is dominated by the unseen coordinates


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha", [1e-2, 1e-1, 1.0])
def test_default_keeps_direction_in_float32(seed, alpha, record_property):
    truth, norm_exact = _oracle(seed, "none")
    _, norm_zeroed = _oracle(seed, "zero_unseen")
    got, info = _meta_grad(seed, alpha)  # default safeguard
    cos = float(F.cosine_similarity(got, truth, dim=0))
    rel = float((got - truth).norm() / truth.norm())
    exact, info_exact = _meta_grad(seed, alpha, safeguard="none")
    record_property("cos_default", cos)
    record_property("rel_err_default", rel)
    record_property("cos_exact_diagonal", float(F.cosine_similarity(exact, truth, dim=0)))
    assert cos > 0.99 and rel < (0.2 if alpha == 1.0 else 0.06)  # α = 1: O(α²) truncation (0.09 measured)
    # ‖v‖ (float32 run, float64 oracle): both diagonals, so a wrong lr, step or β shows in size
    assert float(info.v_norm) == pytest.approx(norm_zeroed, rel=1e-4)
    assert float(info_exact.v_norm) == pytest.approx(norm_exact, rel=1e-4)
    assert float(info.eps) == pytest.approx(alpha / norm_zeroed, rel=1e-4)
