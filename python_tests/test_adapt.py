"""sama_ext.adapt (SAMA step 2, DESIGN §2) against the torch.func ground truth.

Every diagonal here comes from ``optim_oracle.oracle_diagonal``: torch.func applied to torch's
own functional optimiser update, never from sama_ext's formulas. Both backends (the compiled
kernels and the pure-PyTorch reference) and both devices (CPU; CUDA when present) are held to it.

Tolerances. v = diag ⊙ d is compared element-wise as
    |v − o·d| ≤ rtol·|o·d| + K·u·T·|d|
with o the oracle diagonal, u the unit roundoff of the math dtype (float64 for float64 params,
float32 otherwise) and T the sum of the magnitudes of the terms that make up the diagonal
(``term_scale``). The second part is the "atol where cancellation happens": the adaptive
diagonals are a difference of two terms, and at the first step they cancel almost exactly
(Adam: lr·eps/D² out of two terms ≈ lr/D), so no implementation — the oracle included — is
more accurate than u·T there. T is computed from the post-step state; it only sets the
tolerance, never the expected value. A sign flip or a wrong factor in either term moves v by
O(T·|d|), far beyond K·u·T·|d|.

In float32 at the first step that element-wise bound exceeds |o·d| for most elements (v = 0
would pass it: Adam's terms cancel to ~1e-6·T, and u·T ≈ 6e-8·T). So v is also held to a
norm-wise bound, ‖v − o·d‖ ≤ rtol·‖o·d‖ + K_NORM·u·‖T·d‖ (rounding errors add in quadrature,
so K_NORM is far below K), which v = 0 fails wherever ‖o·d‖ > K_NORM·u·‖T·d‖. Where float32
cannot resolve the diagonal even that way (FLOAT32_UNRESOLVED: the exact diagonal is below
float32's rounding of its terms), the float64 twin of the case is the guard;
test_float32_step1_bounds_bite checks both claims.
"""
from __future__ import annotations

import math
from torch.utils.weak import WeakIdKeyDictionary

import pytest
import torch

import sama_ext
from sama_ext import _backend, adaptation, reference, step_record
from optim_oracle import StepRecord, _clone_state, oracle_diagonal, stepped_optimizer

# torch.func's forward AD lazily scripts its decompositions on first use, which triggers
# torch.jit's deprecation warning; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

Adam, AdamW, SGD, RMSprop, Adagrad = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD,
                                      torch.optim.RMSprop, torch.optim.Adagrad)

# 0-dim, 1-element, odd sizes; in the BIG_CASES (and the 16-bit ones) also a tensor larger than
# the CPU kernel's 32768-element chunk (only there, to keep the oracle's time down).
SHAPES = [(13, 17), (), (5, 3), (1,), (3, 1, 11), (7,)]
SHAPES_BIG = [(181, 183)] + SHAPES[1:]
assert math.prod(SHAPES_BIG[0]) > 32768

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
K_ROUNDOFF = 32  # multiples of u·T allowed (see module doc); observed worst: ~5.3 (CPU, both backends)
K_NORM = 4  # multiples of u·‖T·d‖ allowed norm-wise; observed worst: 1.6 (CPU, both backends)
# float32 cases where ‖o·d‖ ≤ K_NORM·u·‖T·d‖ (measured ‖o·d‖/(u·‖T·d‖): 2.6, 0.48, 0.011), so
# that even v = 0 would pass: their float64 twins (same case id, f64) are what guard them.
FLOAT32_UNRESOLVED = {"adam-coupled_wd-x1", "rmsprop-momentum-x1", "adagrad-plain-x1"}


def _lr_t(x):
    return torch.tensor(x, dtype=torch.float64)


# id -> (optimiser class, param groups, number of steps). Groups split SHAPES evenly, in order.
CASES = {
    # ---------------------------------------------------------------- Adam
    "adam-x1": (Adam, [{"lr": 1e-2}, {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}], 1),
    "adam-x7": (Adam, [{"lr": 1e-2}, {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}], 7),
    "adam-coupled_wd-x1": (Adam, [{"lr": 1e-2, "weight_decay": 0.1}, {"lr": 2e-3, "weight_decay": 0.5}], 1),
    "adam-coupled_wd-x7": (Adam, [{"lr": 1e-2, "weight_decay": 0.1},
                                  {"lr": 2e-3, "weight_decay": 0.01, "betas": (0.5, 0.9)}], 7),
    "adam-amsgrad-x1": (Adam, [{"lr": 1e-2, "amsgrad": True}, {"lr": 1e-3, "amsgrad": True, "eps": 1e-4}], 1),
    "adam-amsgrad-x7": (Adam, [{"lr": 1e-2, "amsgrad": True}, {"lr": 1e-2, "weight_decay": 0.05}], 7),
    "adam-amsgrad_maximize_wd-x7": (Adam, [{"lr": 1e-2, "amsgrad": True, "maximize": True, "weight_decay": 0.1},
                                           {"lr": 5e-3, "maximize": True}], 7),
    "adam-maximize-x1": (Adam, [{"lr": 1e-2, "maximize": True}, {"lr": 1e-2}], 1),
    "adam-tensor_lr-x7": (Adam, [{"lr": _lr_t(1e-2), "foreach": False},
                                 {"lr": _lr_t(3e-3), "foreach": False, "weight_decay": 0.1}], 7),
    "adam-tensor_lr-x1": (Adam, [{"lr": _lr_t(1e-2), "foreach": False, "amsgrad": True}], 1),
    "adam-beta1_0_eps-x1": (Adam, [{"lr": 1e-2, "betas": (0.0, 0.9), "eps": 0.1},
                                   {"lr": 1e-1, "betas": (0.95, 0.9999), "eps": 1e-3}], 1),
    "adam-mixed_decoupling-x7": (Adam, [{"lr": 1e-2, "weight_decay": 0.1},
                                        {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}], 7),
    # ---------------------------------------------------------------- AdamW
    "adamw-x1": (AdamW, [{"lr": 1e-2, "weight_decay": 0.1, "maximize": True}, {"lr": 1e-3}], 1),
    "adamw-x7": (AdamW, [{"lr": 1e-2, "weight_decay": 0.1},
                         {"lr": 1e-3, "weight_decay": 0.5, "amsgrad": True, "betas": (0.7, 0.95)}], 7),
    "adamw-amsgrad_maximize-x7": (AdamW, [{"lr": 1e-2, "amsgrad": True, "maximize": True},
                                          {"lr": _lr_t(2e-3), "foreach": False, "eps": 1e-5}], 7),
    # ---------------------------------------------------------------- SGD (n_steps 1 and 5)
    **{f"sgd-{name}-x{n}": (SGD, groups, n) for n in (1, 5) for name, groups in {
        # momentum 0: torch keeps no per-param state at all
        "plain": [{"lr": 0.1}, {"lr": 0.03, "weight_decay": 0.1, "maximize": True, "dampening": 0.3}],
        "momentum": [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.01}],
        "dampening": [{"lr": 0.1, "momentum": 0.9, "dampening": 0.3},
                      {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1},
                      {"lr": _lr_t(0.2), "foreach": False, "momentum": 0.5, "dampening": 0.9, "maximize": True}],
        "nesterov": [{"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
                     {"lr": 0.02, "momentum": 0.7, "nesterov": True, "maximize": True}],
    }.items()},
    # ---------------------------------------------------------------- RMSprop
    **{f"rmsprop-{name}-x{n}": (RMSprop, groups, n) for n in (1, 6) for name, groups in {
        "plain": [{"lr": 1e-2}, {"lr": 1e-3, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.1}],
        "centered": [{"lr": 1e-2, "centered": True},
                     {"lr": 1e-2, "centered": True, "momentum": 0.9, "maximize": True}],
        "momentum": [{"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.05, "maximize": True},
                     {"lr": _lr_t(1e-3), "foreach": False, "alpha": 0.5, "centered": True,
                      "weight_decay": 0.1}],
    }.items()},
    # ---------------------------------------------------------------- Adagrad
    **{f"adagrad-{name}-x{n}": (Adagrad, groups, n) for n in (1, 6) for name, groups in {
        "plain": [{"lr": 0.1}, {"lr": 0.05, "lr_decay": 0.1, "weight_decay": 0.1}],
        "init_acc": [{"lr": 0.1, "initial_accumulator_value": 0.5, "maximize": True},
                     {"lr": _lr_t(0.1), "foreach": False, "eps": 1e-3, "lr_decay": 0.01,
                      "weight_decay": 0.2}],
    }.items()},
}
CASE_IDS = list(CASES)
BIG_CASES = {"adam-x7", "adam-amsgrad_maximize_wd-x7", "adamw-x1", "sgd-dampening-x5", "rmsprop-centered-x6",
             "adagrad-init_acc-x1"}
assert BIG_CASES <= set(CASES)


# 16-bit storage: torch's own step overflows with eps below fp16's range (1e-8 rounds to 0 and
# the update divides by it), so these use eps values that people train fp16/bf16 with.
CASES_16 = {
    "adam-x7": (Adam, [{"lr": 1e-2, "eps": 1e-3},
                       {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-4, "amsgrad": True, "maximize": True,
                        "weight_decay": 0.1}], 7),
    "adam-x1": (Adam, [{"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1}], 1),
    "adamw-x7": (AdamW, [{"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1}, {"lr": 1e-3, "eps": 1e-2}], 7),
    "sgd-x5": CASES["sgd-nesterov-x5"],
    "rmsprop-x6": (RMSprop, [{"lr": 1e-2, "eps": 1e-3, "centered": True},
                             {"lr": 1e-3, "eps": 1e-3, "momentum": 0.9, "weight_decay": 0.1, "maximize": True}], 6),
    "adagrad-x6": (Adagrad, [{"lr": 0.1, "eps": 1e-3, "initial_accumulator_value": 0.5, "maximize": True},
                             {"lr": 0.1, "eps": 1e-2, "lr_decay": 0.01, "weight_decay": 0.2}], 6),
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="no CUDA device"))]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# ----------------------------------------------------------------------------- helpers
_RECORDS: dict = {}


def record(case_id: str, dtype=torch.float64, device="cpu", cases=CASES):
    """(StepRecord, oracle diagonal) for a case, cached for the module. The params hold the
    post-step θ, as in real use: coupled weight decay needs θ_pre, which adapt must recover
    from the post-step state (test_coupled_decay_with_post_step_theta checks that alone)."""
    key = (case_id, dtype, device, id(cases))
    if key not in _RECORDS:
        cls, groups, n_steps = cases[case_id]
        shapes = SHAPES_BIG if case_id in BIG_CASES or cases is not CASES else SHAPES
        rec = stepped_optimizer(cls, groups, shapes, n_steps, seed=list(cases).index(case_id), dtype=dtype,
                                device=device)
        # 16-bit records: the oracle is not the yardstick there (test_adapt_16bit_matches_reference)
        oracle = [o.detach() for o in oracle_diagonal(rec)] if dtype in RTOL else None
        _RECORDS[key] = (rec, oracle)
    return _RECORDS[key]


def vectors_like(params, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for p in params]


def _group_of(opt, p):
    for group in opt.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise AssertionError("param not in optimiser")


def term_scale(opt, p, g) -> torch.Tensor:
    """How far rounding can move the diagonal at p, in units of the unit roundoff (float64).

    Σ of the magnitudes of the diagonal's terms, each with its inputs replaced by the sums of
    the magnitudes they are made of (g_e = s·g + wd·θ can cancel; so can centered RMSprop's
    S − G²), from the post-step state. It sets the tolerance only, never the expected value."""
    group, st = _group_of(opt, p), opt.state[p]
    f = lambda t: t.detach().to(torch.float64)  # noqa: E731
    lr = abs(float(group["lr"]))
    theta, g = f(p), f(g)
    if isinstance(opt, SGD):
        return torch.full_like(theta, lr * 2.0)
    if isinstance(opt, Adam) and group.get("decoupled_weight_decay", False):
        wd = 0.0
    else:
        wd = float(group["weight_decay"])
    ge = g.abs() + wd * theta.abs()
    if isinstance(opt, Adam):
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(st["step"])
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        q = f(st["exp_avg_sq"])
        qu = f(st["max_exp_avg_sq"]) if group["amsgrad"] else q
        h = (qu / bc2).sqrt()
        D = h + group["eps"]
        curved = (h > 0) & (q == qu)
        second = f(st["exp_avg"]).abs() / bc1 * (1 - beta2) / bc2 * ge / torch.where(curved, h, 1.0) / D / D
        return lr * ((1 - beta1) / bc1 / D + torch.where(curved, second, 0.0))
    if isinstance(opt, RMSprop):
        S = f(st["square_avg"])
        G = f(st["grad_avg"]) if group["centered"] else torch.zeros_like(S)
        R = (S - G * G).clamp_min(0).sqrt()
        D = R + group["eps"]
        pos = R > 0
        safe_R = torch.where(pos, R, 1.0)
        dR = (S + G * G) / (2 * safe_R)  # rounding of sqrt(S − G²), per unit roundoff
        second = (1 - group["alpha"]) * ge * (ge + G.abs()) / safe_R / D / D
        return lr * (1 / D + torch.where(pos, dR / D / D + second * (1 + dR / safe_R), 0.0))
    if isinstance(opt, Adagrad):
        clr = lr / (1 + (float(st["step"]) - 1) * group["lr_decay"])
        R = f(st["sum"]).sqrt()
        D = R + group["eps"]
        return clr * (1 / D + torch.where(R > 0, ge * ge / torch.where(R > 0, R, 1.0) / D / D, 0.0))
    raise AssertionError(type(opt))


def unit_roundoff(dtype):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2


def tolerances(rec, vecs, oracle, rtol):
    """(expected o·d in float64, per-element tolerance) for every param."""
    out = []
    for p, g, o, d in zip(rec.params, rec.grads, oracle, vecs):
        expected = o.detach().double() * d.double()
        tol = rtol * expected.abs() + K_ROUNDOFF * unit_roundoff(p.dtype) * term_scale(rec.optimizer, p, g) \
            * d.double().abs()
        out.append((expected, tol))
    return out


def assert_v_close(v, expected_tol, what=""):
    for i, (vi, (expected, tol)) in enumerate(zip(v, expected_tol)):
        assert vi.shape == expected.shape, f"{what} param {i}: shape {tuple(vi.shape)}"
        err = (vi.double() - expected).abs()
        bad = ~(err <= tol)
        if bad.any():
            j = int((err - tol).reshape(-1).argmax())
            raise AssertionError(
                f"{what} param {i} {tuple(vi.shape)}: {int(bad.sum())}/{vi.numel()} elements off; worst flat "
                f"index {j}: got {vi.reshape(-1)[j].item()!r}, oracle·d {expected.reshape(-1)[j].item()!r}, "
                f"tolerance {tol.reshape(-1)[j].item():.3g}")


def norm_bound(rec, vecs, oracle, rtol):
    """(‖o·d‖, allowed ‖v − o·d‖) norm-wise, see the module doc."""
    u = unit_roundoff(rec.params[0].dtype)
    e2 = t2 = 0.0
    for p, g, o, d in zip(rec.params, rec.grads, oracle, vecs):
        e2 += float((o.double() * d.double()).square().sum())
        t2 += float((term_scale(rec.optimizer, p, g) * d.double().abs()).square().sum())
    return math.sqrt(e2), rtol * math.sqrt(e2) + K_NORM * u * math.sqrt(t2)


def assert_norm_close(norm, expected_tol, rtol_out=0.0, what=""):
    """|norm − ‖o·d‖| ≤ ‖tol‖ (triangle inequality) + rounding of the returned norm."""
    ref = math.sqrt(sum(float(e.square().sum()) for e, _ in expected_tol))
    bound = math.sqrt(sum(float(t.square().sum()) for _, t in expected_tol)) + rtol_out * ref
    got = float(norm)
    assert abs(got - ref) <= bound, f"{what} norm {got!r} vs oracle {ref!r} (allowed {bound:.3g})"


# ============================================================================= the oracle
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_adapt_matches_oracle(case_id, dtype, backend, device):
    rec, oracle = record(case_id, dtype, device)
    vecs = vectors_like(rec.params)
    before = [d.clone() for d in vecs]
    v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs)
    for vi, d, d0, p in zip(v, vecs, before, rec.params):
        assert vi.dtype == p.dtype and vi.device == p.device
        assert vi is not d and torch.equal(d, d0), "without out=, the vectors must not change"
    exp_tol = tolerances(rec, vecs, oracle, RTOL[dtype])
    assert_v_close(v, exp_tol, case_id)
    _, allowed = norm_bound(rec, vecs, oracle, RTOL[dtype])
    err = math.sqrt(sum(float((vi.double() - e).square().sum()) for vi, (e, _) in zip(v, exp_tol)))
    assert err <= allowed, f"{case_id}: ‖v − o·d‖ = {err:.3g} > {allowed:.3g}"
    assert norm.shape == () and norm.dtype == torch.float32 and norm.device == rec.params[0].device
    # The float32 norm: ‖v‖ to float32 rounding, and the oracle's norm.
    own = math.sqrt(sum(float(x.double().square().sum()) for x in v))
    assert float(norm) == pytest.approx(own, rel=1e-6)
    assert_norm_close(norm, exp_tol, rtol_out=2 ** -23, what=case_id)
    # Σv² in float64 (what meta_step derives ε from) to the full tolerance.
    _, sumsq = adaptation.adapt_sumsq(rec.optimizer, rec.params, vecs)
    assert sumsq.dtype == torch.float64 and sumsq.shape == ()
    assert_norm_close(sumsq.sqrt(), exp_tol, what=case_id + " (Σv²)")


def test_oracle_cases_are_not_trivial():
    """The cases exercise what they claim: SGD's first step differs from the later ones under
    dampening, maximize flips signs, and at step 1 Adam's two terms nearly cancel."""
    o1 = record("sgd-dampening-x1")[1]
    o5 = record("sgd-dampening-x5")[1]
    assert torch.all(o1[0] == 0.1) and torch.allclose(o5[0], torch.tensor(0.1 * 0.7, dtype=torch.float64))
    torch.testing.assert_close(record("sgd-nesterov-x5")[1][-1], torch.full((7,), -0.02 * 1.7, dtype=torch.float64))
    rec, o = record("adam-x1")
    t = term_scale(rec.optimizer, rec.params[0], rec.grads[0])
    assert (o[0].abs() / t).median() < 1e-6
    rec, o = record("adam-x7")
    assert (o[0].abs() / term_scale(rec.optimizer, rec.params[0], rec.grads[0])).median() > 1e-2


def test_float32_step1_bounds_bite():
    """What test_adapt_matches_oracle's bounds can tell from v = 0 (module doc): the float64
    element-wise bound on every element of every case; in float32 the norm-wise bound on every
    case but FLOAT32_UNRESOLVED (the first steps of the adaptive optimisers, nothing else)."""
    unresolved = set()
    for case_id in CASE_IDS:
        for dtype in (torch.float64, torch.float32):
            rec, oracle = record(case_id, dtype)
            vecs = vectors_like(rec.params)
            if dtype == torch.float64:
                for e, tol in tolerances(rec, vecs, oracle, RTOL[dtype]):
                    assert bool((tol < e.abs()).all()), f"{case_id} f64: an element where v = 0 would pass"
            else:
                size, allowed = norm_bound(rec, vecs, oracle, RTOL[dtype])
                if size <= allowed:
                    unresolved.add(case_id)
    assert unresolved == FLOAT32_UNRESOLVED


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case_id", list(CASES_16))
def test_adapt_16bit_matches_reference(case_id, dtype, device, monkeypatch):
    """16-bit params: the post-step state itself is rounded to 16 bits (centered RMSprop's
    S − G² cancels there), so the oracle, which recomputes the step from the pre-step state,
    is not the yardstick; the reference is (fp32 math over the same 16-bit inputs, itself held
    to the oracle above). Results may differ by one 16-bit rounding."""
    rec, _ = record(case_id, dtype, device, CASES_16)
    assert all(torch.isfinite(p).all() for p in rec.params), "the 16-bit optimiser step itself overflowed"
    vecs = vectors_like(rec.params)
    v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs)  # the default (compiled) backend
    monkeypatch.setattr(_backend, "_choice", "torch")
    v_ref, norm_ref = sama_ext.adapt(rec.optimizer, rec.params, vecs)
    ulp = torch.finfo(dtype).eps  # spacing just above 1: one rounding step relative to the value
    for i, (a, b, p, g, d) in enumerate(zip(v, v_ref, rec.params, rec.grads, vecs)):
        assert a.dtype == dtype and b.dtype == dtype
        tol = ulp * b.double().abs() + K_ROUNDOFF * unit_roundoff(torch.float32) \
            * term_scale(rec.optimizer, p, g) * d.double().abs() + torch.finfo(dtype).tiny
        err = (a.double() - b.double()).abs()
        assert (err <= tol).all(), f"param {i}: max excess {(err - tol).max().item():.3g}"
    assert norm.dtype == torch.float32
    assert float(norm) == pytest.approx(float(norm_ref), rel=1e-5)


# ============================================================================= arguments & results
def test_out_semantics(backend, device):
    rec, oracle = record("adam-coupled_wd-x7", torch.float64, device)
    vecs = vectors_like(rec.params)
    exp_tol = tolerances(rec, vecs, oracle, RTOL[torch.float64])

    # In place: out=vectors returns the very tensors, now holding v.
    ptrs = [d.data_ptr() for d in vecs]
    v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs, out=vecs)
    assert all(a is b for a, b in zip(v, vecs)) and [d.data_ptr() for d in vecs] == ptrs
    assert_v_close(v, exp_tol, "out=vectors")
    assert_norm_close(norm, exp_tol, rtol_out=2 ** -23)

    # A separate out list is filled and returned; vectors untouched.
    vecs = vectors_like(rec.params)
    outs = [torch.full_like(d, float("nan")) for d in vecs]
    v, _ = sama_ext.adapt(rec.optimizer, rec.params, vecs, out=outs)
    assert all(a is b for a, b in zip(v, outs))
    assert_v_close(v, exp_tol, "out=list")
    assert all(torch.equal(a, b) for a, b in zip(vecs, vectors_like(rec.params)))

    # Explicit grads= gives the same result as the default p.grad, even with p.grad cleared.
    saved = [p.grad for p in rec.params]
    try:
        for p in rec.params:
            p.grad = None
        v2, norm2 = sama_ext.adapt(rec.optimizer, rec.params, vecs, grads=rec.grads)
    finally:
        for p, g in zip(rec.params, saved):
            p.grad = g
    assert all(torch.equal(a, b) for a, b in zip(v, v2))
    assert norm2.shape == () and norm2.dtype == torch.float32 and norm2.device.type == torch.device(device).type
    # ... and the gradient does matter (Adam's second term reads it).
    v3, _ = sama_ext.adapt(rec.optimizer, rec.params, vecs, grads=[2 * g for g in rec.grads])
    assert not torch.equal(v3[0], v[0])


def test_param_subset_and_order(backend):
    """Params from several groups, interleaved and partial: v stays aligned with the input."""
    rec, oracle = record("rmsprop-momentum-x6")
    order = [5, 0, 3, 2]
    params = [rec.params[i] for i in order]
    vecs = vectors_like(params, seed=9)
    v, norm = sama_ext.adapt(rec.optimizer, params, vecs)
    sub = StepRecord(rec.optimizer, params, [], [], [rec.grads[i] for i in order])
    exp_tol = tolerances(sub, vecs, [oracle[i] for i in order], RTOL[torch.float64])
    assert_v_close(v, exp_tol)
    assert_norm_close(norm, exp_tol, rtol_out=2 ** -23)


def test_per_param_step_counts(backend, device):
    """Adam params that started at different steps (no .grad at first) keep their own bias
    correction: per-tensor step counts."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(40, 30), (7,), ()]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device).requires_grad_() for s in shapes]
    opt = Adam([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 1e-1, "amsgrad": True}])
    schedule = [[True, False, False], [True, False, True], [True, True, True], [True, True, True]]
    rec = _manual_record(opt, params, schedule, gen)
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 2.0, 3.0]
    oracle = oracle_diagonal(rec)
    vecs = vectors_like(params)
    v, norm = sama_ext.adapt(opt, params, vecs)
    exp_tol = tolerances(rec, vecs, oracle, RTOL[torch.float64])
    assert_v_close(v, exp_tol)
    assert_norm_close(norm, exp_tol, rtol_out=2 ** -23)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_adam_capturable_device_scalars(device, backend):
    """capturable=True keeps step counters (and here lr) on the GPU: read there, not on the host.
    Compared with the oracle of the same run without capturable (same data, same update)."""
    groups = [{"lr": torch.tensor(1e-2, device=device), "amsgrad": True}, {"lr": 3e-3, "weight_decay": 0.1}]
    rec = stepped_optimizer(Adam, [dict(g, capturable=True) for g in groups], SHAPES, 5, seed=8, device=device)
    twin = stepped_optimizer(Adam, [dict(g, lr=float(g["lr"])) for g in groups], SHAPES, 5, seed=8, device=device)
    assert all(rec.optimizer.state[p]["step"].device.type == "cuda" for p in rec.params)
    oracle = oracle_diagonal(twin)
    vecs = vectors_like(rec.params)
    v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs)
    exp_tol = tolerances(rec, vecs, oracle, 1e-8)
    assert_v_close(v, exp_tol)
    assert_norm_close(norm, exp_tol, rtol_out=2 ** -23)


def _manual_record(opt, params, schedule, gen):
    """Step `opt` with random grads; schedule[k][i] says whether params[i] has a grad at step k."""
    for k, has in enumerate(schedule):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) if h else None
                 for p, h in zip(params, has)]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        if k == len(schedule) - 1:
            assert all(g is not None for g in grads)
            theta_pre = [p.detach().clone() for p in params]
            state_pre = [_clone_state(opt.state[p]) for p in params]
        opt.step()
    return StepRecord(opt, params, theta_pre, state_pre, [g.clone() for g in grads])


def test_noncontiguous_vectors_rejected_or_handled(backend):
    rec, oracle = record("adam-x7")
    p = rec.params[2]  # (5, 3)
    d = torch.randn(3, 5, dtype=torch.float64).t()
    assert not d.is_contiguous()
    try:
        v, _ = sama_ext.adapt(rec.optimizer, [p], [d])
    except RuntimeError as e:
        assert "contiguous" in str(e)
    else:
        torch.testing.assert_close(v[0], oracle[2] * d, rtol=1e-10, atol=1e-15)


# ============================================================================= coupled decay, post-step θ
@pytest.mark.parametrize("n_steps", [1, 7])
@pytest.mark.parametrize("cls,kw", [(Adam, {"lr": 1e-2}), (Adam, {"lr": 1e-2, "amsgrad": True}),
                                    (RMSprop, {"lr": 1e-2}), (RMSprop, {"lr": 1e-2, "momentum": 0.9}),
                                    (RMSprop, {"lr": 1e-2, "centered": True}), (Adagrad, {"lr": 1e-1})],
                         ids=lambda x: x.__name__ if isinstance(x, type) else "-".join(f"{k}" for k in x))
def test_coupled_decay_with_post_step_theta(cls, kw, n_steps, backend):
    """Coupled weight decay: the step used θ_pre, which step() overwrote. adapt recovers it from
    the post-step state, so the diagonal is exact with the post-step θ — at step 1 too, where the
    two terms of Adam's diagonal nearly cancel and reading θ instead of θ_pre was off ~1e5×."""
    for wd in (0.1, 0.01):
        rec = stepped_optimizer(cls, dict(kw, weight_decay=wd), [(40, 30), (9,)], n_steps, seed=21)
        oracle = [o.detach() for o in oracle_diagonal(rec)]
        vecs = vectors_like(rec.params)
        v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs)  # post-step θ, as in real use
        exp_tol = tolerances(rec, vecs, oracle, 1e-9)
        assert_v_close(v, exp_tol, f"wd={wd}")
        assert_norm_close(norm, exp_tol, rtol_out=2 ** -23)


# ============================================================================= safeguard
@pytest.mark.parametrize("groups", [
    [{"lr": 1e-2}, {"lr": 3e-3, "betas": (0.8, 0.99), "maximize": True}],
    [{"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1, "decoupled_weight_decay": True}, {"lr": 1e-3, "eps": 1e-6}],
], ids=["adam", "adamw_amsgrad"])
def test_safeguard_zero_unseen(groups, backend, device):
    rec = stepped_optimizer(Adam, groups, [(40, 7), (6,), (9, 5)], 5, seed=3, device=device, sparse_rows=True)
    oracle = oracle_diagonal(rec)
    vecs = vectors_like(rec.params)
    exp_tol = tolerances(rec, vecs, oracle, RTOL[torch.float64])
    masks = [m if m is not None else torch.zeros(p.shape, dtype=torch.bool, device=device)
             for m, p in zip(rec.unseen_mask, rec.params)]
    assert masks[0].any() and masks[2].any() and not masks[1].any()
    for p, m in zip(rec.params, masks):
        assert (rec.optimizer.state[p]["exp_avg_sq"][m] == 0).all()
        assert (rec.optimizer.state[p]["exp_avg_sq"][~m] > 0).all()

    # "none": the exact diagonal everywhere, lr(1−β1)/(bc1·eps) (sign-flipped under maximize) on unseen rows.
    v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs, safeguard="none")
    assert_v_close(v, exp_tol, "none")
    assert_norm_close(norm, exp_tol, rtol_out=2 ** -23)
    for p, o, m in zip(rec.params, oracle, masks):
        group = _group_of(rec.optimizer, p)
        beta1 = group["betas"][0]
        closed = group["lr"] * (1 - beta1) / ((1 - beta1 ** 5) * group["eps"]) * (-1 if group["maximize"] else 1)
        torch.testing.assert_close(o[m], torch.full_like(o[m], closed), rtol=1e-9, atol=0)

    # "zero_unseen": exactly 0 there, the oracle elsewhere.
    v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs, safeguard="zero_unseen")
    masked = [(torch.where(m, 0.0, e), torch.where(m, 0.0, t)) for (e, t), m in zip(exp_tol, masks)]
    for vi, m in zip(v, masks):
        assert torch.equal(vi[m], torch.zeros_like(vi[m]))
    assert_v_close(v, masked, "zero_unseen")
    assert_norm_close(norm, masked, rtol_out=2 ** -23)
    ref_norm = math.sqrt(sum(float(e.square().sum()) for e, _ in exp_tol))
    assert float(norm) < 0.1 * ref_norm  # the unseen rows dominated ‖v‖ (DESIGN §2)


# ============================================================================= SGD's first step
@pytest.mark.parametrize("n_steps,expected", [(1, 0.1), (2, 0.1 * 0.7), (5, 0.1 * 0.7)])
def test_sgd_dampening_counts_steps(n_steps, expected, backend):
    rec = stepped_optimizer(SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, [(3,)], n_steps, seed=0)
    assert step_record.sgd_first_step(rec.params[0]) == (n_steps == 1)  # seen from the state before the step
    d = vectors_like(rec.params)
    v, _ = sama_ext.adapt(rec.optimizer, rec.params, d)
    torch.testing.assert_close(oracle_diagonal(rec)[0], torch.full((3,), expected, dtype=torch.float64))
    torch.testing.assert_close(v[0], expected * d[0], rtol=1e-14, atol=0)


def test_sgd_dampening_param_first_seen_late(backend):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2)]
    opt = SGD(params, lr=0.1, momentum=0.9, dampening=0.3)
    rec = _manual_record(opt, params, [[True, False], [True, True]], gen)
    oracle = oracle_diagonal(rec)
    assert torch.all(oracle[1] == 0.1)  # params[1]'s buffer started as g at the last step
    d = vectors_like(params)
    v, _ = sama_ext.adapt(opt, params, d)
    for vi, o, di in zip(v, oracle, d):
        torch.testing.assert_close(vi, o * di, rtol=1e-14, atol=0)


# ============================================================================= errors
def _adam_stepped(shapes=((3,), (2, 2)), n=1, **kw):
    return stepped_optimizer(Adam, {"lr": 1e-2, **kw}, list(shapes), n, seed=0)


@pytest.mark.parametrize("cls,kwargs", [
    (Adam, {}), (AdamW, {"amsgrad": True}), (SGD, {"lr": 0.1, "momentum": 0.9}), (RMSprop, {"centered": True}),
    (Adagrad, {}),  # creates its state (sum, step=0) in __init__: step 0 must be refused
], ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_error_never_stepped(cls, kwargs):
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    opt = cls([p], **kwargs)
    with pytest.raises(RuntimeError, match=rf"(has no optimiser state|has step 0).*{cls.__name__}\.step\(\)"):
        sama_ext.adapt(opt, [p], [torch.randn(3)])


def test_error_no_grad():
    rec = _adam_stepped()
    rec.params[1].grad = None
    with pytest.raises(RuntimeError, match=r"params \[1\] have no \.grad.*grads="):
        sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params))


def test_error_param_not_managed():
    rec = _adam_stepped()
    stranger = torch.randn(3, dtype=torch.float64, requires_grad=True)
    stranger.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"params\[1\].*not managed by the given Adam"):
        sama_ext.adapt(rec.optimizer, [rec.params[0], stranger], vectors_like([rec.params[0], stranger]))


@pytest.mark.parametrize("bad", ["shape", "dtype", "count"])
def test_error_vectors_mismatch(bad):
    rec = _adam_stepped()
    vecs = vectors_like(rec.params)
    if bad == "shape":
        vecs[1] = vecs[1].reshape(4)
        match = r"vectors\[1\] is \(4,\).*params\[1\] is \(2, 2\).*must match"
    elif bad == "dtype":
        vecs[0] = vecs[0].float()
        match = r"vectors\[0\] is \(3,\) torch\.float32.*torch\.float64.*must match"
    else:
        vecs = vecs[:1]
        match = r"2 params but 1 vectors"
    with pytest.raises(ValueError, match=match):
        sama_ext.adapt(rec.optimizer, rec.params, vecs)


def test_error_out_and_grads_mismatch():
    rec = _adam_stepped()
    vecs = vectors_like(rec.params)
    with pytest.raises(ValueError, match=r"out\[1\].*must match"):
        sama_ext.adapt(rec.optimizer, rec.params, vecs, out=[vecs[0], vecs[1].float()])
    with pytest.raises(ValueError, match=r"grads\[0\].*must match"):
        sama_ext.adapt(rec.optimizer, rec.params, vecs, grads=[g.reshape(1, 3) if g.dim() == 1 else g
                                                              for g in rec.grads])
    with pytest.raises(ValueError, match="no params"):
        sama_ext.adapt(rec.optimizer, [], [])


def test_error_unsupported_optimizer():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    opt = torch.optim.Adamax([p])
    opt.step()
    with pytest.raises(NotImplementedError, match=r"Adamax.*register_diagonal"):
        sama_ext.adapt(opt, [p], [torch.randn(3)])


def test_adam_subclass_overriding_step_is_refused():
    class ClippedAdam(Adam):
        def step(self, closure=None):
            return super().step(closure)

    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    opt = ClippedAdam([p])
    opt.step()
    with pytest.raises(NotImplementedError, match=r"ClippedAdam.*register_diagonal"):
        sama_ext.adapt(opt, [p], [torch.randn(3)])


def test_adam_subclass_keeping_step_works(backend):
    class TaggedAdam(Adam):
        pass

    rec = stepped_optimizer(TaggedAdam, [{"lr": 1e-2, "amsgrad": True}, {"lr": 1e-3}], SHAPES[1:], 4, seed=5)
    oracle = oracle_diagonal(rec)
    vecs = vectors_like(rec.params)
    v, norm = sama_ext.adapt(rec.optimizer, rec.params, vecs)
    exp_tol = tolerances(rec, vecs, oracle, RTOL[torch.float64])
    assert_v_close(v, exp_tol)
    assert_norm_close(norm, exp_tol, rtol_out=2 ** -23)


class _Triple(torch.optim.Optimizer):
    """θ −= 3·lr·g, a step counter in the state."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["n"] = self.state[p].get("n", 0) + 1
                    p.sub_(3 * group["lr"] * p.grad)


def test_register_diagonal_custom_optimizer(monkeypatch):
    monkeypatch.setattr(adaptation, "_REGISTRY", dict(adaptation._REGISTRY))
    calls = []

    @sama_ext.register_diagonal(_Triple)
    def triple(call: sama_ext.AdaptCall):
        calls.append(call)
        total = torch.zeros((), dtype=torch.float64)
        for d, o in zip(call.vectors, call.out):
            o.copy_(3 * call.group["lr"] * d)
            total = total + o.double().square().sum()
        return total

    assert adaptation._REGISTRY[_Triple] is triple  # the decorator returns the function
    params = [torch.randn(s, requires_grad=True) for s in [(3,), (2, 2), ()]]
    opt = _Triple([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.5}])
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    vecs = vectors_like(params)
    v, norm = sama_ext.adapt(opt, params, vecs)
    assert [len(c.params) for c in calls] == [2, 1]
    # the group as its last step used it (a snapshot), with the live params list
    assert calls[0].group["params"] is opt.param_groups[0]["params"] and calls[0].group["lr"] == 0.1
    assert calls[1].states[0] is opt.state[params[2]]
    assert calls[0].grads[0] is params[0].grad and calls[0].safeguard == 0
    for vi, d, lr in zip(v, vecs, [0.1, 0.1, 0.5]):
        torch.testing.assert_close(vi, 3 * lr * d)
    expected = math.sqrt(sum(float((3 * lr * d).double().square().sum()) for d, lr in zip(vecs, [0.1, 0.1, 0.5])))
    assert float(norm) == pytest.approx(expected, rel=1e-6)

    # Registering also rescues a step-overriding subclass of a built-in.
    class MyAdam(Adam):
        def step(self, closure=None):
            return super().step(closure)

    sama_ext.register_diagonal(MyAdam, adaptation._REGISTRY[Adam])
    rec = stepped_optimizer(MyAdam, {"lr": 1e-2}, [(4,)], 3, seed=1)
    v, _ = sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params))
    torch.testing.assert_close(v[0], oracle_diagonal(rec)[0] * vectors_like(rec.params)[0], rtol=1e-10, atol=0)


def test_error_unknown_safeguard():
    rec = _adam_stepped()
    with pytest.raises(ValueError, match=r"safeguard must be one of.*'floor'"):
        sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params), safeguard="floor")


def test_error_sgd_dampening_without_step_count(monkeypatch):
    # As if the optimiser had stepped before sama_ext's step hook was installed.
    rec = stepped_optimizer(SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, [(3,)], 2, seed=0)
    monkeypatch.setattr(step_record, "_sgd_first", WeakIdKeyDictionary())
    with pytest.raises(RuntimeError, match=r"dampening.*import sama_ext before"):
        sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params))
    # Without dampening whether the step was the first is irrelevant.
    rec = stepped_optimizer(SGD, {"lr": 0.1, "momentum": 0.9}, [(3,)], 2, seed=0)
    monkeypatch.setattr(step_record, "_sgd_first", WeakIdKeyDictionary())
    sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params))


def test_error_state_missing_for_options():
    rec = _adam_stepped()
    rec.optimizer.param_groups[0]["amsgrad"] = True  # switched on after stepping without it
    # the step's own options are used: the diagonal is that of the step without AMSGrad
    v, _ = sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params))
    rec.optimizer.param_groups[0]["amsgrad"] = False
    v_plain, _ = sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params))
    assert all(torch.equal(a, b) for a, b in zip(v, v_plain))
    # without a recorded step (stepped before sama_ext was imported) the live group is read
    step_record._records.pop(rec.optimizer)
    rec.optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(RuntimeError, match=r"has no 'max_exp_avg_sq' in its optimiser state.*Adam\.step\(\)"):
        sama_ext.adapt(rec.optimizer, rec.params, vectors_like(rec.params))


# ============================================================================= the reference directly
def test_reference_functions_match_oracle():
    """sama_ext.reference.* called directly (not through adapt's wiring) on an Adam record."""
    rec, oracle = record("adam-amsgrad_maximize_wd-x7")
    opt = rec.optimizer
    for group in opt.param_groups:
        idx = [i for i, p in enumerate(rec.params) if any(p is q for q in group["params"])]
        ps = [rec.params[i] for i in idx]
        vecs = vectors_like(ps)
        outs = [torch.empty_like(d) for d in vecs]
        st = [opt.state[p] for p in ps]
        beta1, beta2 = group["betas"]
        with torch.no_grad():  # as adapt() calls it (θ requires grad)
            sumsq = reference.adam_adapt(
                vecs, [rec.grads[i] for i in idx], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                [s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [], ps, outs, lr=group["lr"],
                step=[s["step"] for s in st], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], maximize=group["maximize"])
        sub = StepRecord(opt, ps, [], [], [rec.grads[i] for i in idx])
        exp_tol = tolerances(sub, vecs, [oracle[i] for i in idx], RTOL[torch.float64])
        assert_v_close(outs, exp_tol)
        assert_norm_close(sumsq.sqrt(), exp_tol)
