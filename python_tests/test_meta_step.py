"""sama_ext.meta_step (DESIGN §2, §3) against independent oracles.

Nothing here compares meta_step with sama_ext's own output. The oracles are
  * closed forms on a ridge problem with a learnable bias towards λ:
        L_base(w, λ) = ‖Xw − y‖² + β‖w − λ‖²,   L_meta(w) = ‖X'w − y'‖²,
    where ∇λL_base = −2β(w − λ) is linear in w, so SAMA's central difference is exact:
        SAMA = 2β·diag(du/dg)⊙d,  d = 2X'ᵀ(X'w − y'),
    and the true hypergradient at w*(λ) = (XᵀX + βI)⁻¹(Xᵀy + βλ) is β(XᵀX + βI)⁻¹∇L_meta(w*);
  * the torch.func ground truth of the optimisers' diagonals (optim_oracle.oracle_diagonal);
  * brute-force central differences and double-backward one-step hypergradients in plain torch,
    on a noisy-label reweighting problem (base MLP, weight net w(ℓ; λ) on per-sample losses).

meta_step accumulates into λ.grad like backward(); base-loss backward() calls in training fill
λ.grad too, so every test clears it before the meta step.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sama_ext
import sama_oracle
from optim_oracle import StepRecord, _clone_state, oracle_diagonal

# torch.func's forward AD lazily scripts its decompositions on first use (torch.jit deprecation
# warning); not ours to fix.
# Every meta_step/adapt call here runs under the sync guard (conftest.guard_syncs): a host read
# of a device tensor inside them fails the test.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("guard_syncs")]

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
F64 = torch.float64
COMPILED = sama_ext.backend() == "compiled"  # (builds the extension on first use)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add contention (a base step took 80 ms instead of 2 ms
    # with 2 threads on a loaded 2-core machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers
def flat(ts) -> torch.Tensor:
    if isinstance(ts, torch.Tensor):
        ts = [ts]
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in ts])


def cosine(a, b) -> float:
    return sama_oracle.cosine(flat(a), flat(b))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (so −0.0 ≠ 0.0 and NaN payloads count)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().reshape(-1).contiguous().view(as_int).cpu().clone()


def assert_bits_equal(ts, saved, what="tensor"):
    for i, (a, b) in enumerate(zip(ts, saved)):
        if b is None:
            assert a is None, f"{what}[{i}] was None and is now set"
            continue
        assert a is not None, f"{what}[{i}] was removed"
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(bits(a), bits(b)), f"{what}[{i}] changed"


def snapshot(ts):
    return [None if t is None else t.detach().clone() for t in ts]


def train(params, opt, loss_fn, steps, meta_params=()):
    """`steps` real optimiser steps on loss_fn; returns the StepRecord of the last one (for the
    torch.func oracle) and leaves p.grad = the gradient that step consumed. Clears λ.grad."""
    params = list(params)
    pre = state = None
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        if k == steps - 1:
            pre = [p.detach().clone() for p in params]
            state = [_clone_state(opt.state[p]) for p in params]
        opt.step()
    for q in meta_params:
        q.grad = None
    return StepRecord(optimizer=opt, params=params, theta_pre=pre, state_pre=state,
                      grads=[p.grad.detach().clone() for p in params])


class Ridge:
    """L_base(w, λ) = ‖Xw − y‖² + β‖w − λ‖², L_meta(w) = ‖X'w − y'‖² (all closed forms in float64 on CPU)."""

    def __init__(self, seed=0, p=6, n=24, n_meta=32, beta=0.7, kappa=None, device="cpu", dtype=F64):
        g = torch.Generator().manual_seed(seed)

        def r(*s):
            return torch.randn(*s, generator=g, dtype=F64)

        X = r(n, p)
        if kappa is not None:  # eigenvalues of A = XᵀX + βI evenly spread over [β, κβ]
            U, _, Vh = torch.linalg.svd(X, full_matrices=False)
            X = U @ torch.diag(torch.linspace(0, (kappa - 1) * beta, p, dtype=F64).sqrt()) @ Vh
        self.X64, self.y64, self.Xm64, self.ym64 = X, r(n), r(n_meta, p), r(n_meta)
        self.beta, self.p = beta, p
        self.X, self.y, self.Xm, self.ym = (t.to(device, dtype) for t in (self.X64, self.y64, self.Xm64, self.ym64))
        self.w = r(p).to(device, dtype).requires_grad_()
        self.lam = r(p).to(device, dtype).requires_grad_()

    def base_loss(self):
        return ((self.X @ self.w - self.y) ** 2).sum() + self.beta * ((self.w - self.lam) ** 2).sum()

    def meta_loss(self):
        return ((self.Xm @ self.w - self.ym) ** 2).sum()

    def A(self):
        return self.X64.T @ self.X64 + self.beta * torch.eye(self.p, dtype=F64)

    def d(self, w=None):
        w = (self.w if w is None else w).detach().double().cpu()
        return 2 * self.Xm64.T @ (self.Xm64 @ w - self.ym64)

    def w_star(self, lam=None):
        lam = (self.lam if lam is None else lam).detach().double().cpu()
        return torch.linalg.solve(self.A(), self.X64.T @ self.y64 + self.beta * lam)

    def true_hypergrad(self):
        """dL_meta(w*(λ))/dλ = β A⁻¹ ∇L_meta(w*), evaluated at the current w (= w* when converged)."""
        return self.beta * torch.linalg.solve(self.A(), self.d())

    def meta_at_optimum(self, lam=None):
        ws = self.w_star(lam)
        return float(((self.Xm64 @ ws - self.ym64) ** 2).sum())


def assert_close_scaled(got, expected, rtol):
    """|got − expected| ≤ rtol·(|expected| + max|expected|·1e-3) element-wise."""
    got, expected = flat(got), flat(expected)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * 1e-3 * float(expected.abs().max()))


# ----------------------------------------------------------------------------- 1. closed forms on ridge
# (SGD kwargs, number of base steps, factor k with diag(du/dg) = k·lr)
SGD_CASES = [
    pytest.param({}, 3, 1.0, id="plain"),
    pytest.param({"weight_decay": 0.1}, 3, 1.0, id="weight_decay"),
    pytest.param({"momentum": 0.9}, 1, 1.0, id="momentum-first-step"),
    pytest.param({"momentum": 0.9}, 3, 1.0, id="momentum"),
    pytest.param({"momentum": 0.9, "dampening": 0.3}, 1, 1.0, id="dampening-first-step"),
    pytest.param({"momentum": 0.9, "dampening": 0.3}, 4, 0.7, id="dampening"),
    pytest.param({"momentum": 0.9, "nesterov": True}, 1, 1.9, id="nesterov-first-step"),
    pytest.param({"momentum": 0.9, "nesterov": True}, 4, 1.9, id="nesterov"),
    pytest.param({"maximize": True}, 2, -1.0, id="maximize"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs,steps,k", SGD_CASES)
def test_ridge_sgd_equals_closed_form(device, kwargs, steps, k):
    lr, alpha = 0.02, 0.8
    pr = Ridge(seed=1, device=device)
    opt = torch.optim.SGD([pr.w], lr=lr, **kwargs)
    rec = train([pr.w], opt, pr.base_loss, steps, [pr.lam])
    # the hand factor is the torch.func ground truth of this SGD's real update
    diag = oracle_diagonal(rec)[0].cpu()
    torch.testing.assert_close(diag, torch.full_like(diag, k * lr), rtol=1e-12, atol=0)
    w0 = pr.w.detach().clone()

    info = sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss, alpha=alpha)

    d = pr.d()
    expected = 2 * pr.beta * k * lr * d
    assert pr.lam.grad.dtype == F64 and pr.lam.grad.device == pr.lam.device
    assert_close_scaled(pr.lam.grad, expected, rtol=1e-9)
    assert torch.equal(pr.w.detach(), w0)
    v_norm = abs(k) * lr * float(d.norm())
    assert not bool(info.skipped)
    assert math.isclose(float(info.v_norm), v_norm, rel_tol=1e-12)
    assert math.isclose(float(info.eps), alpha / v_norm, rel_tol=1e-12)
    assert math.isclose(float(info.meta_loss), float(((pr.Xm64 @ w0.cpu() - pr.ym64) ** 2).sum()), rel_tol=1e-12)


ADAM_CASES = [
    pytest.param(torch.optim.Adam, {"lr": 0.05}, id="adam"),
    pytest.param(torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.95), "amsgrad": True}, id="adam-amsgrad"),
    pytest.param(torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}, id="adamw"),
    pytest.param(torch.optim.Adam, {"lr": 0.05, "maximize": True}, id="adam-maximize"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_cls,kwargs", ADAM_CASES)
def test_ridge_adam_equals_oracle_diagonal(device, opt_cls, kwargs):
    pr = Ridge(seed=2, device=device)
    opt = opt_cls([pr.w], **kwargs)
    rec = train([pr.w], opt, pr.base_loss, 5, [pr.lam])
    diag = oracle_diagonal(rec)[0].cpu()
    sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss)
    assert_close_scaled(pr.lam.grad, 2 * pr.beta * diag * pr.d(), rtol=1e-9)
    # and it is not the SGD answer (the diagonal is far from constant here)
    assert not torch.allclose(flat(pr.lam.grad), 2 * pr.beta * kwargs["lr"] * pr.d(), rtol=1e-2)


def test_sama_na_uses_d():
    pr = Ridge(seed=3)
    opt = torch.optim.Adam([pr.w], lr=0.05)
    train([pr.w], opt, pr.base_loss, 3, [pr.lam])
    sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss, method="sama_na")
    assert_close_scaled(pr.lam.grad, 2 * pr.beta * pr.d(), rtol=1e-9)


# ----------------------------------------------------------------------------- 2. vs the true hypergradient
def _at_optimum(pr: Ridge):
    with torch.no_grad():
        pr.w.copy_(pr.w_star().to(pr.w))


@pytest.mark.parametrize("device", DEVICES)
def test_cg_reaches_true_hypergradient(device):
    pr = Ridge(seed=4, kappa=20.0, device=device)
    _at_optimum(pr)
    opt = torch.optim.SGD([pr.w], lr=0.01)  # never stepped: the baselines need no last gradient
    true = pr.true_hypergrad()
    errs = {}
    for k in (1, pr.p, 2 * pr.p):
        pr.lam.grad = None
        w0 = pr.w.detach().clone()
        sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss, method="cg", iterations=k)
        assert torch.equal(pr.w.detach(), w0)
        errs[k] = float((flat(pr.lam.grad) - true).norm() / true.norm())
    print("CG relative error by iterations:", errs)
    assert errs[pr.p] < 1e-8 and errs[2 * pr.p] < 1e-8
    assert errs[1] > 1e-3  # one iteration is not enough at κ = 20: the test sees the iteration count


@pytest.mark.parametrize("device", DEVICES)
def test_neumann_converges_to_true_hypergradient(device):
    pr = Ridge(seed=5, kappa=5.0, device=device)
    _at_optimum(pr)
    opt = torch.optim.SGD([pr.w], lr=0.01)
    H = 2 * pr.A()
    eta = 0.9 / float(torch.linalg.eigvalsh(H).max())
    d, true = pr.d(), pr.true_hypergrad()
    errs = []
    for k in (1, 5, 20, 100):
        pr.lam.grad = None
        sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss, method="neumann", iterations=k,
                           neumann_lr=eta)
        # closed form: 2β·η·Σ_{j=0..k} (I − ηH)^j d
        M = torch.eye(pr.p, dtype=F64) - eta * H
        acc, term = d.clone(), d.clone()
        for _ in range(k):
            term = M @ term
            acc = acc + term
        assert_close_scaled(pr.lam.grad, 2 * pr.beta * eta * acc, rtol=1e-10)
        errs.append(float((flat(pr.lam.grad) - true).norm() / true.norm()))
    print("Neumann relative error at 1, 5, 20, 100 iterations:", errs)
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[0] > 0.1 and errs[-1] < 1e-6


def test_sama_cosine_with_true_hypergradient(record_property):
    """At a converged SGD base, SAMA = 2β·lr·∇L_meta(w*) while the truth is β A⁻¹ ∇L_meta(w*):
    the cosine between them depends on A's conditioning. It must equal cos(d, A⁻¹d) computed
    here in float64, and for SPD A that is at least the Kantorovich bound 2√κ/(1+κ)."""
    report = {}
    for kappa in (5.0, 74.0):
        cs = []
        bound = 2 * math.sqrt(kappa) / (1 + kappa)
        for seed in range(8):
            pr = Ridge(seed=100 + seed, kappa=kappa, beta=1.0)
            assert math.isclose(float(torch.linalg.cond(pr.A())), kappa, rel_tol=1e-6)
            _at_optimum(pr)
            lr = 1.0 / float(torch.linalg.eigvalsh(2 * pr.A()).max())
            opt = torch.optim.SGD([pr.w], lr=lr)
            train([pr.w], opt, pr.base_loss, 1, [pr.lam])  # ∇ ≈ 0: w stays at w*
            sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss)
            c = cosine(pr.lam.grad, pr.true_hypergrad())
            d = pr.d()
            assert c == pytest.approx(cosine(d, torch.linalg.solve(pr.A(), d)), abs=1e-9)
            assert c >= bound - 1e-9
            cs.append(c)
        report[kappa] = (sum(cs) / len(cs), min(cs), max(cs))
        record_property(f"sama_cos_true_kappa{kappa:g}_mean", report[kappa][0])
        record_property(f"sama_cos_true_kappa{kappa:g}_min", report[kappa][1])
    print("SAMA (SGD base) cosine with the true hypergradient, (mean, min, max) over 8 problems:", report)


def test_meta_training_reaches_optimum():
    """Alternate 5 SGD base steps and one SAMA meta step with Adam on λ. SAMA's fixed point is
    ∇L_meta(w) = 0 and w*(λ) is onto, so the optimum is min_w ‖X'w − y'‖² (least squares)."""
    pr = Ridge(seed=0, kappa=5.0, beta=1.0, p=6)
    with torch.no_grad():
        pr.w.zero_()
        pr.lam.zero_()
    opt = torch.optim.SGD([pr.w], lr=1.0 / float(torch.linalg.eigvalsh(2 * pr.A()).max()))
    meta_opt = torch.optim.Adam([pr.lam], lr=0.05)
    optimum = float(((pr.Xm64 @ torch.linalg.lstsq(pr.Xm64, pr.ym64).solution - pr.ym64) ** 2).sum())
    start = pr.meta_at_optimum()
    assert start > 1.5 * optimum
    for _ in range(150):
        for _ in range(5):
            opt.zero_grad()
            pr.base_loss().backward()
            opt.step()
        meta_opt.zero_grad()  # also drops what the base backward put into λ.grad
        sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss)
        meta_opt.step()
    final = pr.meta_at_optimum()
    print(f"meta training: L_meta(w*(λ)) {start:.4f} -> {final:.4f}, optimum {optimum:.4f}")
    assert final <= 1.01 * optimum


# ----------------------------------------------------------------------------- reweighting problem
class Reweight:
    """Noisy-label classification: MLP din→hidden→k (tanh) on per-sample losses ℓ_i, weighted by
    a weight net w(c; λ) = sigmoid(W2·tanh(W1·c + b1) + b2), 1→16→1; L_base = mean(w(c_i)·ℓ_i)
    with c = stop(ℓ); L_meta = mean CE on a clean set. Written functionally so that θ can be
    replaced by perturbed copies for brute-force differences."""

    def __init__(self, seed=0, n=64, din=5, hidden=16, k=3, noise=0.4, device="cpu", dtype=F64,
                 input_feature=False):
        g = torch.Generator().manual_seed(seed)

        def r(*s):
            return torch.randn(*s, generator=g, dtype=F64)

        Wt = r(din, k)
        x = r(n, din)
        y = (x @ Wt).argmax(1)
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, torch.randint(0, k, (n,), generator=g), y)
        xm = r(n, din)
        ym = (xm @ Wt).argmax(1)
        th = [r(din, hidden) / din ** 0.5, torch.zeros(hidden, dtype=F64), r(hidden, k) / hidden ** 0.5,
              torch.zeros(k, dtype=F64)]
        lam = [r(16, 1), r(16), r(1, 16) / 4, torch.zeros(1, dtype=F64)]
        self.x, self.xm = x.to(device, dtype), xm.to(device, dtype)
        self.y, self.ym = y.to(device), ym.to(device)
        self.theta = [t.to(device, dtype).requires_grad_() for t in th]
        self.lam = [t.to(device, dtype).requires_grad_() for t in lam]
        self.input_feature = input_feature

    def mlp(self, th, x):
        return torch.tanh(x @ th[0] + th[1]) @ th[2] + th[3]

    def per_sample(self, th=None):
        return F.cross_entropy(self.mlp(self.theta if th is None else th, self.x), self.y, reduction="none")

    def wnet(self, c, lam=None):
        lam = self.lam if lam is None else lam
        return torch.sigmoid(torch.tanh(c[:, None] @ lam[0].T + lam[1]) @ lam[2].T + lam[3]).squeeze(1)

    def loss_with_input(self, th, c):
        """L_base at θ = th with the weight net's input held at c."""
        return (self.wnet(c) * self.per_sample(th)).mean()

    def base_loss_fn(self, stop):
        def base_loss():
            ell = self.per_sample()
            c = self.x[:, 0] if self.input_feature else stop(ell)
            return (self.wnet(c) * ell).mean()
        return base_loss

    def meta_loss(self):
        return F.cross_entropy(self.mlp(self.theta, self.xm), self.ym)

    def grad_lam(self, th, c):
        with torch.enable_grad():
            return torch.autograd.grad(self.loss_with_input(th, c), self.lam)

    def one_step_oracle(self, lr):
        """−lr·∂/∂λ[∇θL_base(θ, λ)·d], d = ∇θL_meta(θ), weight-net input held at ℓ(θ): the exact
        hypergradient of L_meta(θ − lr·∇θL_base(θ, λ)) to first order, at the current θ."""
        ell = self.per_sample()
        c = self.x[:, 0] if self.input_feature else ell.detach()
        g_theta = torch.autograd.grad((self.wnet(c) * ell).mean(), self.theta, create_graph=True)
        d = torch.autograd.grad(self.meta_loss(), self.theta)
        dot = sum((a * b).sum() for a, b in zip(g_theta, d))
        return [-lr * h for h in torch.autograd.grad(dot, self.lam)]


def _detach(x):
    return x.detach()


# ----------------------------------------------------------------------------- 3. brute-force central difference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["feature_input", "detach"])
def test_adam_reweighting_equals_brute_force_difference(device, variant):
    """Adam base, nonlinear problem, float64: meta_step equals (∇λL(θ−εv) − ∇λL(θ+εv))/(2ε) with
    v = oracle_diagonal ⊙ d and ε = α/‖v‖, computed here in plain torch. "detach" re-evaluates the
    weight net's input at each point (that is what .detach() means); "feature_input" weights by a
    fixed input feature (no stop-gradient input at all)."""
    alpha = 0.5
    pb = Reweight(seed=3, device=device, input_feature=(variant == "feature_input"))
    opt = torch.optim.Adam(pb.theta, lr=0.01)
    base_loss = pb.base_loss_fn(_detach)
    rec = train(pb.theta, opt, base_loss, 6, pb.lam)
    diag = oracle_diagonal(rec)
    d = torch.autograd.grad(pb.meta_loss(), pb.theta)
    v = [a * b for a, b in zip(diag, d)]
    eps = alpha / torch.sqrt(sum((t * t).sum() for t in v))
    th_p = [t.detach() + eps * u for t, u in zip(pb.theta, v)]
    th_m = [t.detach() - eps * u for t, u in zip(pb.theta, v)]

    def c_at(th):
        return pb.x[:, 0] if pb.input_feature else pb.per_sample(th).detach()

    g_p, g_m = pb.grad_lam(th_p, c_at(th_p)), pb.grad_lam(th_m, c_at(th_m))
    expected = [(a - b) / (2 * eps) for a, b in zip(g_m, g_p)]

    theta0 = snapshot(pb.theta)
    info = sama_ext.meta_step(pb.theta, opt, pb.lam, base_loss, pb.meta_loss, alpha=alpha)
    assert_bits_equal(pb.theta, theta0, "θ")
    assert math.isclose(float(info.eps), float(eps), rel_tol=1e-12)
    for got, exp in zip(pb.lam, expected):
        assert_close_scaled(got.grad, exp, rtol=1e-8)


# ----------------------------------------------------------------------------- 4. the frozen trap
def _frozen_vs_detach(pb: Reweight, opt, lr, alpha):
    oracle = pb.one_step_oracle(lr)
    out = {}
    for name, stop in (("frozen", sama_ext.frozen), ("detach", _detach)):
        for q in pb.lam:
            q.grad = None
        sama_ext.meta_step(pb.theta, opt, pb.lam, pb.base_loss_fn(stop), pb.meta_loss, alpha=alpha)
        out[name] = cosine([q.grad for q in pb.lam], oracle)
    return out, oracle


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_matches_double_backward_oracle_and_detach_does_not(device, record_property):
    # α = 0.01 (and α = 1 in test_frozen_at_default_alpha): frozen inputs are held at ℓ(θ);
    # detach's error does not shrink with α (it estimates another derivative), so the gap stays.
    lr, alpha = 0.5, 0.01
    pb = Reweight(seed=0, device=device)
    opt = torch.optim.SGD(pb.theta, lr=lr)
    train(pb.theta, opt, pb.base_loss_fn(_detach), 30, pb.lam)
    cos, _ = _frozen_vs_detach(pb, opt, lr, alpha)
    print(f"cosine with the one-step oracle (α={alpha}): frozen {cos['frozen']:.6f}, detach {cos['detach']:.6f}")
    record_property("cos_frozen", cos["frozen"])
    record_property("cos_detach", cos["detach"])
    assert cos["frozen"] > 0.999
    assert cos["detach"] < 0.9 and cos["detach"] < cos["frozen"] - 0.05


def test_frozen_at_default_alpha():
    lr = 0.5
    pb = Reweight(seed=1)
    opt = torch.optim.SGD(pb.theta, lr=lr)
    train(pb.theta, opt, pb.base_loss_fn(_detach), 5, pb.lam)
    cos, oracle = _frozen_vs_detach(pb, opt, lr, alpha=1.0)
    # what holding the input at the unperturbed ℓ(θ) gives (brute force, plain torch)
    d = torch.autograd.grad(pb.meta_loss(), pb.theta)
    v = [lr * t for t in d]
    eps = 1.0 / torch.sqrt(sum((t * t).sum() for t in v))
    c = pb.per_sample().detach()
    g_p = pb.grad_lam([t.detach() + eps * u for t, u in zip(pb.theta, v)], c)
    g_m = pb.grad_lam([t.detach() - eps * u for t, u in zip(pb.theta, v)], c)
    held = [(a - b) / (2 * eps) for a, b in zip(g_m, g_p)]
    at_theta = cosine(held, oracle)
    print(f"α=1: frozen {cos['frozen']:.4f}, detach {cos['detach']:.4f}, input held at ℓ(θ) {at_theta:.4f}")
    # meta_step with frozen computes exactly that brute-force difference, even at α = 1 ...
    for q in pb.lam:
        q.grad = None
    sama_ext.meta_step(pb.theta, opt, pb.lam, pb.base_loss_fn(sama_ext.frozen), pb.meta_loss, alpha=1.0)
    assert_close_scaled([q.grad for q in pb.lam], held, rtol=1e-9)
    assert cos["frozen"] == pytest.approx(at_theta, abs=1e-9)
    # ... which at α = 1 is still the one-step hypergradient (frozen's error is O(α²))
    assert cos["frozen"] > 0.999


def _theta_lam_state(pb):
    return snapshot(pb.theta), snapshot([q.grad for q in pb.lam])


@pytest.mark.parametrize("frozen_at", ["theta", "theta_plus"])
@pytest.mark.parametrize("mode", ["more_calls", "fewer_calls", "other_shape", "other_dtype"])
def test_frozen_inconsistent_closure_raises_and_restores(mode, frozen_at):
    pb = Reweight(seed=2)
    opt = torch.optim.SGD(pb.theta, lr=0.1)
    train(pb.theta, opt, pb.base_loss_fn(_detach), 2, pb.lam)
    for q in pb.lam:
        q.grad = torch.randn_like(q)
    calls = [0]

    def base_loss():
        calls[0] += 1
        second = calls[0] == 2
        ell = pb.per_sample()
        if mode == "other_shape" and second:
            c = torch.cat([sama_ext.frozen(ell[:-1]), ell[-1:].detach()])
        elif mode == "other_dtype" and second:
            c = sama_ext.frozen(ell.float()).double()
        else:
            c = sama_ext.frozen(ell)
        n_extra = {"more_calls": int(second), "fewer_calls": int(not second)}.get(mode, 0)
        for _ in range(n_extra):
            c = c + 0 * sama_ext.frozen(ell)
        return (pb.wnet(c) * ell).mean()

    theta0, grads0 = _theta_lam_state(pb)
    with pytest.raises(RuntimeError, match="frozen"):
        sama_ext.meta_step(pb.theta, opt, pb.lam, base_loss, pb.meta_loss, frozen_at=frozen_at)
    assert calls[0] == 2
    assert_bits_equal(pb.theta, theta0, "θ")
    assert_bits_equal([q.grad for q in pb.lam], grads0, "λ.grad")
    # and frozen is plain detach again afterwards (no recorder left behind)
    x = torch.randn(3, requires_grad=True)
    assert torch.equal(sama_ext.frozen(x), x) and torch.equal(sama_ext.frozen(x * 2), x * 2)


def test_frozen_outside_meta_step_is_detach():
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    y = x * 3
    z = sama_ext.frozen(y)
    assert not z.requires_grad and z.grad_fn is None
    assert torch.equal(z, y.detach())
    for _ in range(3):  # any number of calls, any shapes
        assert torch.equal(sama_ext.frozen(y[0]), y[0].detach())
    # also after a successful meta step
    pr = Ridge(seed=0)
    opt = torch.optim.SGD([pr.w], lr=0.01)
    train([pr.w], opt, pr.base_loss, 1, [pr.lam])
    sama_ext.meta_step([pr.w], opt, [pr.lam], lambda: pr.base_loss() + 0 * sama_ext.frozen(pr.w).sum(), pr.meta_loss)
    z = sama_ext.frozen(y)
    assert not z.requires_grad and torch.equal(z, y.detach())


# ----------------------------------------------------------------------------- 5. exact restore and descend
def _tiny(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 2), (1,), (5,), ()]
    theta = [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]
    lam = [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]
    target = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]

    def base_loss():
        return sum((torch.sin(t) * q + t * t).sum() for t, q in zip(theta, lam))

    def meta_loss():
        return sum(((t - u) ** 2).sum() for t, u in zip(theta, target))

    return theta, lam, base_loss, meta_loss


@pytest.mark.parametrize("device", DEVICES)
def test_exact_restore_over_1000_meta_steps(device):
    theta, lam, base_loss, meta_loss = _tiny(device)
    opt = torch.optim.Adam(theta, lr=0.1)
    train(theta, opt, base_loss, 3, lam)
    saved = snapshot(theta)
    alphas = [10.0 ** (-3 + 4 * ((k * 0.618034) % 1.0)) for k in range(1000)]  # 1e-3 … 10
    # the restore is not trivially exact: a naive +εv, −2εv, +εv in float32 drifts
    d = torch.autograd.grad(meta_loss(), theta)
    drift = False
    with torch.no_grad():
        for a in alphas[:50]:
            e = a / float(torch.sqrt(sum((t.double() ** 2).sum() for t in d)))
            drift |= any(not torch.equal(((t + e * u) - 2 * e * u) + e * u, t) for t, u in zip(theta, d))
    assert drift
    for k, a in enumerate(alphas):
        sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, alpha=a)
        if k % 250 == 0:
            assert_bits_equal(theta, saved, "θ")
    assert_bits_equal(theta, saved, "θ")
    assert all(torch.isfinite(q.grad).all() for q in lam)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_descend_is_theta_minus_eps_v_one_rounding(device, opt_name):
    theta, lam, base_loss, meta_loss = _tiny(device, seed=1)
    if opt_name == "sgd":
        lr = 0.5  # a power of two: v = lr·d is exact in float32
        opt = torch.optim.SGD(theta, lr=lr)
    else:
        opt = torch.optim.Adam(theta, lr=0.1)
    rec = train(theta, opt, base_loss, 3, lam)
    d = [g.detach() for g in torch.autograd.grad(meta_loss(), theta)]
    if opt_name == "sgd":
        v = [lr * t for t in d]
    else:  # the kernel's float32 v, anchored to the torch.func oracle
        v, _ = sama_ext.adapt(opt, theta, d)
        for a, o, t in zip(v, oracle_diagonal(rec), d):
            torch.testing.assert_close(a, o * t, rtol=1e-5, atol=1e-7)
    theta0 = snapshot(theta)
    info = sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, alpha=0.7, base_update="descend")
    eps32 = info.eps.float().double()
    expected = [(t.double() - eps32 * u.double()).float() for t, u in zip(theta0, v)]
    assert_bits_equal(theta, expected, "θ")
    assert any(not torch.equal(a, b) for a, b in zip(theta, theta0))
    # λ.grad is the same as with the exact restore
    grads_descend = snapshot([q.grad for q in lam])
    with torch.no_grad():
        for t, t0 in zip(theta, theta0):
            t.copy_(t0)
    for q in lam:
        q.grad = None
    sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, alpha=0.7)
    assert_bits_equal([q.grad for q in lam], grads_descend, "λ.grad")


# ----------------------------------------------------------------------------- 6. skipped steps
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["zero_d", "lam_only_meta", "inf_grad", "nan_d"])
@pytest.mark.parametrize("base_update", ["restore", "descend"])
def test_zero_or_nonfinite_v_skips(device, case, base_update):
    theta, lam, base_loss, meta_loss = _tiny(device, seed=2)
    opt = torch.optim.Adam(theta, lr=0.1)
    train(theta, opt, base_loss, 3, lam)
    direct = None
    if case == "zero_d":
        def m():
            return 0 * meta_loss()  # d = 0 exactly (dense zeros)
    elif case == "lam_only_meta":
        def m():
            return sum((q ** 2).sum() for q in lam)
        direct = [2 * q.detach() for q in lam]
    elif case == "nan_d":
        def m():
            return meta_loss() * torch.tensor(float("nan"), device=device)
    else:  # a consumed gradient with an inf, handed over as last_grads (editing .grad in place is refused)
        m = meta_loss
        last = [t.grad.clone() for t in theta]
        last[1][0, 1] = float("inf")
    for q in lam:
        q.grad = torch.randn_like(q)
    theta0, grads0 = snapshot(theta), snapshot([q.grad for q in lam])
    info = sama_ext.meta_step(theta, opt, lam, base_loss, m, base_update=base_update,
                              last_grads=last if case == "inf_grad" else None)
    assert bool(info.skipped)
    assert float(info.eps) == 0.0
    assert_bits_equal(theta, theta0, "θ")
    if direct is None:
        assert_bits_equal([q.grad for q in lam], grads0, "λ.grad")
    else:
        for q, g0, dg in zip(lam, grads0, direct):
            assert torch.equal(q.grad, g0 + dg)
    assert all(torch.isfinite(q.grad).all() for q in lam)


# ----------------------------------------------------------------------------- 7. behaviour
def test_nn_module_with_frozen_params():
    pr = Ridge(seed=6)
    model = nn.Linear(pr.p, 1).double()
    model.bias.requires_grad_(False)
    lam = pr.lam

    def base_loss():
        return ((model(pr.X).squeeze(1) - pr.y) ** 2).sum() + pr.beta * ((model.weight[0] - lam) ** 2).sum()

    def meta_loss():
        return ((model(pr.Xm).squeeze(1) - pr.ym) ** 2).sum()

    lr = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # the optimiser holds the frozen bias too
    train([model.weight], opt, base_loss, 3, [lam])
    bias0 = model.bias.detach().clone()
    w0 = model.weight.detach().clone()
    sama_ext.meta_step(model.parameters(), opt, [lam], base_loss, meta_loss)
    w, b = w0[0], float(bias0)
    d = 2 * pr.Xm64.T @ (pr.Xm64 @ w + b - pr.ym64)
    assert_close_scaled(lam.grad, 2 * pr.beta * lr * d, rtol=1e-9)
    assert model.bias.grad is None and torch.equal(model.bias, bias0) and torch.equal(model.weight, w0)


@pytest.mark.parametrize("device", DEVICES)
def test_several_param_groups(device):
    pr = Ridge(seed=7, p=7, device=device)
    w1 = pr.w.detach()[:3].clone().requires_grad_()
    w2 = pr.w.detach()[3:].clone().requires_grad_()
    lam = pr.lam

    def base_loss():
        w = torch.cat([w1, w2])
        return ((pr.X @ w - pr.y) ** 2).sum() + pr.beta * ((w - lam) ** 2).sum()

    def meta_loss():
        return ((pr.Xm @ torch.cat([w1, w2]) - pr.ym) ** 2).sum()

    # SGD: group factors lr1 and lr2·(1 + μ)
    opt = torch.optim.SGD([{"params": [w1], "lr": 0.03}, {"params": [w2], "lr": 0.01, "momentum": 0.9,
                                                           "nesterov": True}])
    train([w1, w2], opt, base_loss, 3, [lam])
    sama_ext.meta_step([w1, w2], opt, [lam], base_loss, meta_loss)
    d = pr.d(torch.cat([w1, w2]))
    k = torch.cat([torch.full((3,), 0.03, dtype=F64), torch.full((4,), 0.01 * 1.9, dtype=F64)])
    assert_close_scaled(lam.grad, 2 * pr.beta * k * d, rtol=1e-9)

    # Adam: different lr and betas per group, against the torch.func oracle
    lam.grad = None
    opt = torch.optim.Adam([{"params": [w1], "lr": 0.05}, {"params": [w2], "lr": 0.02, "betas": (0.7, 0.9)}])
    rec = train([w1, w2], opt, base_loss, 4, [lam])
    diag = torch.cat([t.cpu() for t in oracle_diagonal(rec)])
    sama_ext.meta_step([w1, w2], opt, [lam], base_loss, meta_loss)
    assert_close_scaled(lam.grad, 2 * pr.beta * diag * pr.d(torch.cat([w1, w2])), rtol=1e-9)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_bf16_params_match_float32_loosely(opt_name):
    ref = Ridge(seed=8, dtype=torch.float32)
    lr = 0.01
    opt32 = torch.optim.SGD([ref.w], lr=lr) if opt_name == "sgd" else torch.optim.Adam([ref.w], lr=lr)
    train([ref.w], opt32, ref.base_loss, 3, [ref.lam])
    # the same situation in bfloat16 (params, grads, optimiser state)
    w = ref.w.detach().bfloat16().requires_grad_()
    lam = ref.lam.detach().bfloat16().requires_grad_()
    w.grad = ref.w.grad.bfloat16()
    X, y, Xm, ym = (t.bfloat16() for t in (ref.X, ref.y, ref.Xm, ref.ym))
    opt16 = torch.optim.SGD([w], lr=lr) if opt_name == "sgd" else torch.optim.Adam([w], lr=lr)
    if opt_name == "adam":
        st = opt32.state[ref.w]
        opt16.state[w] = {"step": st["step"].clone(), "exp_avg": st["exp_avg"].bfloat16(),
                          "exp_avg_sq": st["exp_avg_sq"].bfloat16()}

    def base16():
        return ((X @ w - y) ** 2).sum() + ref.beta * ((w - lam) ** 2).sum()

    def meta16():
        return ((Xm @ w - ym) ** 2).sum()

    w0 = w.detach().clone()
    sama_ext.meta_step([w], opt16, [lam], base16, meta16)
    sama_ext.meta_step([ref.w], opt32, [ref.lam], ref.base_loss, ref.meta_loss)
    assert lam.grad.dtype == torch.bfloat16 and torch.isfinite(lam.grad).all()
    assert torch.equal(bits(w), bits(w0))
    c = cosine(lam.grad, ref.lam.grad)
    rel = float((flat(lam.grad) - flat(ref.lam.grad)).norm() / flat(ref.lam.grad).norm())
    print(f"bf16 vs float32 ({opt_name}): cosine {c:.5f}, relative error {rel:.4f}")
    assert c > 0.99 and rel < 0.1


def test_autocast_bf16_inside_closures():
    lr = 0.5
    runs = {}
    for amp in (False, True):
        pb = Reweight(seed=4, dtype=torch.float32)
        opt = torch.optim.SGD(pb.theta, lr=lr)
        train(pb.theta, opt, pb.base_loss_fn(_detach), 5, pb.lam)
        base = pb.base_loss_fn(sama_ext.frozen)

        def base_loss():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return base()

        def meta_loss():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return pb.meta_loss()

        theta0 = snapshot(pb.theta)
        sama_ext.meta_step(pb.theta, opt, pb.lam, base_loss, meta_loss, alpha=0.1)
        assert_bits_equal(pb.theta, theta0, "θ")
        assert all(q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all() for q in pb.lam)
        runs[amp] = [q.grad.clone() for q in pb.lam]
    c = cosine(runs[True], runs[False])
    print(f"autocast bf16 vs float32 meta-gradient cosine: {c:.5f}")
    assert c > 0.95


def test_lambda_grad_accumulates():
    pb = Reweight(seed=5)
    opt = torch.optim.Adam(pb.theta, lr=0.01)
    base_loss = pb.base_loss_fn(sama_ext.frozen)
    train(pb.theta, opt, base_loss, 3, pb.lam)
    sama_ext.meta_step(pb.theta, opt, pb.lam, base_loss, pb.meta_loss)
    one = snapshot([q.grad for q in pb.lam])
    sama_ext.meta_step(pb.theta, opt, pb.lam, base_loss, pb.meta_loss)
    for q, g in zip(pb.lam, one):
        torch.testing.assert_close(q.grad, 2 * g, rtol=1e-13, atol=0)
    assert any(g.abs().max() > 0 for g in one)
    # onto an existing .grad (e.g. from the meta optimiser's own loss)
    pre = [torch.randn_like(q) for q in pb.lam]
    for q, p0 in zip(pb.lam, pre):
        q.grad = p0.clone()
    sama_ext.meta_step(pb.theta, opt, pb.lam, base_loss, pb.meta_loss)
    for q, p0, g in zip(pb.lam, pre, one):  # (the kernel adds with one rounding: not bit-equal to p0 + g)
        torch.testing.assert_close(q.grad, p0 + g, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_grad_scaler_base_step(opt_name):
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') unavailable: {e}")
    lr = 0.02
    results = {}
    for use_scaler in (False, True):
        pr = Ridge(seed=9, dtype=torch.float32)
        opt = torch.optim.SGD([pr.w], lr=lr) if opt_name == "sgd" else torch.optim.Adam([pr.w], lr=lr)
        for k in range(4):
            opt.zero_grad()
            if k == 3:
                pre = [pr.w.detach().clone()]
                state = [_clone_state(opt.state[pr.w])]
            if use_scaler:
                scaler.scale(pr.base_loss()).backward()
                scaler.step(opt)  # unscales p.grad in place: p.grad is what the step consumed
                scaler.update()
            else:
                pr.base_loss().backward()
                opt.step()
        pr.lam.grad = None
        rec = StepRecord(optimizer=opt, params=[pr.w], theta_pre=pre, state_pre=state, grads=[pr.w.grad.clone()])
        sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, pr.meta_loss)
        diag = oracle_diagonal(rec)[0].double()
        assert_close_scaled(pr.lam.grad, 2 * pr.beta * diag * pr.d(), rtol=2e-3)  # float32 central difference
        results[use_scaler] = pr.lam.grad.clone()
    # a power-of-two scale is exact: the scaled run is the unscaled run, bit for bit
    assert torch.equal(results[True], results[False])


def test_dropout_masks_are_replayed():
    """L_base = ‖Xw − y‖² + β‖dropout(w − λ)‖²: with the same mask m at θ±, SAMA = 2β·m²⊙lr·d exactly,
    m ∈ {0, 1/(1−p)}; a different mask at θ− would add (m⁻² − m⁺²)(w − λ)/(2ε), far off."""
    pr = Ridge(seed=10, p=12)
    lr, p_drop = 0.01, 0.5

    def base_loss(pd=p_drop):
        return ((pr.X @ pr.w - pr.y) ** 2).sum() + pr.beta * (F.dropout(pr.w - pr.lam, pd, True) ** 2).sum()

    opt = torch.optim.SGD([pr.w], lr=lr)
    train([pr.w], opt, base_loss, 3, [pr.lam])
    d = pr.d()
    torch.manual_seed(123)
    sama_ext.meta_step([pr.w], opt, [pr.lam], base_loss, pr.meta_loss)
    first = pr.lam.grad.clone()
    ratio = flat(first) / (2 * pr.beta * lr * d)
    scale2 = 1 / (1 - p_drop) ** 2
    near = torch.minimum(ratio.abs(), (ratio - scale2).abs())
    assert near.max() < 1e-8, ratio
    assert (ratio.abs() < 1e-8).any() and ((ratio - scale2).abs() < 1e-8).any()
    # the mask is the one the RNG state at entry draws (meta_loss draws nothing)
    torch.manual_seed(123)
    m = F.dropout(torch.ones(pr.p, dtype=F64), p_drop, True)
    assert_close_scaled(first, 2 * pr.beta * m ** 2 * lr * d, rtol=1e-9)
    # same seed, same result
    pr.lam.grad = None
    torch.manual_seed(123)
    sama_ext.meta_step([pr.w], opt, [pr.lam], base_loss, pr.meta_loss)
    assert torch.equal(pr.lam.grad, first)
    # p = 0: the closed form
    pr.lam.grad = None
    sama_ext.meta_step([pr.w], opt, [pr.lam], lambda: base_loss(0.0), pr.meta_loss)
    assert_close_scaled(pr.lam.grad, 2 * pr.beta * lr * d, rtol=1e-9)


# ----------------------------------------------------------------------------- gradient layouts
# torch.autograd.grad (unlike AccumulateGrad) returns gradients in whatever layout the backward
# produced: stride-0 expansions (the gradient of p.sum()), channels_last conv gradients for
# contiguous params, ... meta_step must accept them (DESIGN §3: params of any nn.Module).


@pytest.mark.parametrize("opt_name", ["sgd", "sama_na"])
def test_expanded_meta_gradient(opt_name):
    """L_meta = (Σw − 1)²: ∂L_meta/∂w is 2(Σw − 1)·1, which autograd returns as a stride-0 expansion."""
    pr = Ridge(seed=11)
    lr = 0.05
    opt = torch.optim.SGD([pr.w], lr=lr)
    train([pr.w], opt, pr.base_loss, 2, [pr.lam])

    def meta_loss():
        return (pr.w.sum() - 1) ** 2

    assert torch.autograd.grad(meta_loss(), pr.w)[0].stride() == (0,)
    method = "sama_na" if opt_name == "sama_na" else "sama"
    sama_ext.meta_step([pr.w], opt, [pr.lam], pr.base_loss, meta_loss, method=method)
    d = 2 * (pr.w.detach().sum() - 1) * torch.ones(pr.p, dtype=F64)
    assert_close_scaled(pr.lam.grad, 2 * pr.beta * (lr if method == "sama" else 1.0) * d, rtol=1e-9)


def test_channels_last_base_gradient():
    """Base conv weights W (contiguous) trained on channels_last input; L_base has β‖W − Λ‖², so
    SAMA = 2β·lr·∂L_meta/∂W exactly. ∂L_meta/∂W comes out of autograd in channels_last."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double()
    x = torch.randn(2, 3, 8, 8, dtype=F64).contiguous(memory_format=torch.channels_last)
    target = torch.randn(2, 4, 6, 6, dtype=F64)
    lam = torch.randn_like(conv.weight).requires_grad_()
    beta, lr = 0.3, 0.05

    def base_loss():
        return ((conv(x) - target) ** 2).mean() + beta * ((conv.weight - lam) ** 2).sum()

    def meta_loss():
        return (conv(x) ** 2).mean()

    opt = torch.optim.SGD([conv.weight], lr=lr)
    train([conv.weight], opt, base_loss, 2, [lam])
    d = torch.autograd.grad(meta_loss(), conv.weight)[0]
    assert d.stride() != conv.weight.stride()
    sama_ext.meta_step([conv.weight], opt, [lam], base_loss, meta_loss)
    assert_close_scaled(lam.grad, 2 * beta * lr * d, rtol=1e-9)


def test_channels_last_meta_gradient():
    """λ = a conv meta net's weight applied to channels_last input, m = conv_λ(x); θ has m's shape;
    L_base = β‖θ − m‖² is linear in θ through ∇λ, so SAMA = 2β·lr·J_mᵀ d exactly (a vector-Jacobian
    product, computed here by autograd)."""
    torch.manual_seed(1)
    meta_net = nn.Conv2d(3, 4, 3, bias=False).double()
    x = torch.randn(2, 3, 8, 8, dtype=F64).contiguous(memory_format=torch.channels_last)
    theta = torch.randn(2, 4, 6, 6, dtype=F64, requires_grad=True)
    target = torch.randn(2, 4, 6, 6, dtype=F64)
    beta, lr = 0.3, 0.05

    def base_loss():
        return beta * ((theta - meta_net(x)) ** 2).sum()

    def meta_loss():
        return ((theta - target) ** 2).sum()

    opt = torch.optim.SGD([theta], lr=lr)
    train([theta], opt, base_loss, 2, list(meta_net.parameters()))
    d = torch.autograd.grad(meta_loss(), theta)[0]
    expected = torch.autograd.grad(meta_net(x), meta_net.weight, grad_outputs=2 * beta * lr * d)[0]
    sama_ext.meta_step([theta], opt, list(meta_net.parameters()), base_loss, meta_loss)
    assert_close_scaled(meta_net.weight.grad, expected, rtol=1e-9)


# ----------------------------------------------------------------------------- 8. errors change nothing
def _error_setup():
    pb = Reweight(seed=6)
    opt = torch.optim.Adam(pb.theta, lr=0.01)
    base_loss = pb.base_loss_fn(sama_ext.frozen)
    train(pb.theta, opt, base_loss, 2, pb.lam)
    pb.lam[0].grad = torch.randn_like(pb.lam[0])  # one set, the others None
    return pb, opt, base_loss


def _second_call_raises(base_loss):
    calls = [0]

    def f():
        calls[0] += 1
        if calls[0] == 2:
            raise KeyError("boom at θ−εv")
        return base_loss()
    return f


ERROR_CASES = {
    "unknown_method": (ValueError, "unknown method", lambda pb, opt, bl: dict(method="samaa")),
    "bad_base_update": (ValueError, "base_update", lambda pb, opt, bl: dict(base_update="descent")),
    "bad_alpha": (ValueError, "alpha", lambda pb, opt, bl: dict(alpha=0.0)),
    "lam_not_in_base_loss": (ValueError, "does not depend on any meta param",
                             lambda pb, opt, bl: dict(base_loss=lambda: pb.per_sample().mean())),
    "lam_only_detached": (ValueError, "does not depend on any meta param",
                          lambda pb, opt, bl: dict(base_loss=lambda: (pb.wnet(pb.per_sample().detach()).detach()
                                                                      * pb.per_sample()).mean())),
    "no_base_grad": (RuntimeError, "no .grad", lambda pb, opt, bl: dict(_no_grad=True)),
    "base_loss_not_scalar": (ValueError, "scalar",
                             lambda pb, opt, bl: dict(base_loss=lambda: pb.wnet(pb.per_sample().detach())
                                                      * pb.per_sample())),
    "meta_loss_not_scalar": (ValueError, "scalar",
                             lambda pb, opt, bl: dict(meta_loss=lambda: F.cross_entropy(
                                 pb.mlp(pb.theta, pb.xm), pb.ym, reduction="none"))),
    "meta_loss_no_grad": (ValueError, "require grad",
                          lambda pb, opt, bl: dict(meta_loss=lambda: pb.meta_loss().detach())),
    "foreign_optimizer": (ValueError, "not managed",
                          lambda pb, opt, bl: dict(base_optimizer=torch.optim.SGD(pb.theta[:2], lr=0.1))),
    "overlap": (ValueError, "overlap", lambda pb, opt, bl: dict(meta_params=pb.lam + [pb.theta[0]])),
    "base_loss_raises_midway": (KeyError, "boom", lambda pb, opt, bl: dict(base_loss=_second_call_raises(bl))),
    # distributed wrappers are checked before anything runs (DDP itself: test_distributed.py)
    "base_module_not_ddp": (TypeError, "DistributedDataParallel",
                            lambda pb, opt, bl: dict(base_module=nn.Linear(2, 2))),
    "meta_module_not_ddp": (TypeError, "DistributedDataParallel",
                            lambda pb, opt, bl: dict(meta_module=nn.Linear(2, 2))),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_change_nothing(case):
    exc, match, make = ERROR_CASES[case]
    pb, opt, base_loss = _error_setup()
    kw = dict(base_params=pb.theta, base_optimizer=opt, meta_params=pb.lam, base_loss=base_loss,
              meta_loss=pb.meta_loss)
    kw.update(make(pb, opt, base_loss))
    if kw.pop("_no_grad", False):
        for t in pb.theta:
            t.grad = None
    theta0 = snapshot(pb.theta)
    grads0 = snapshot([t.grad for t in pb.theta])
    lam_grads0 = snapshot([q.grad for q in pb.lam])
    state0 = {i: snapshot(list(opt.state[t].values())) for i, t in enumerate(pb.theta)}
    with pytest.raises(exc, match=match):
        sama_ext.meta_step(**kw)
    assert_bits_equal(pb.theta, theta0, "θ")
    assert_bits_equal([t.grad for t in pb.theta], grads0, "θ.grad")
    assert_bits_equal([q.grad for q in pb.lam], lam_grads0, "λ.grad")
    for i, t in enumerate(pb.theta):
        assert_bits_equal(list(opt.state[t].values()), state0[i], "optimiser state")
    # frozen is plain detach again (no recorder left behind)
    x = torch.randn(2, requires_grad=True)
    assert torch.equal(sama_ext.frozen(x), x)
