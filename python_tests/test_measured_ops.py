"""The measured perturbation ops (issue 18): perturb_save_measured_ / perturb_from_measured_ write
θ as perturb_save_ / perturb_from_ do and return, from the same pass, Σ(θ_new − θ_src)·v and the
count of changed elements; with `stochastic`, bfloat16/float16 θ is rounded stochastically by a
counter-based generator. Oracles: the pure-PyTorch reference (bit for bit, stochastic rounding
included), float64 recomputations, the round-to-nearest ops, and the statistics of the rounding
against the exact float64 value."""
from __future__ import annotations

import pytest
import torch

import sama_ext
from sama_ext import _backend, ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.contiguous().view(INTS[t.element_size()])


def _same_bits(a, b):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _case(dtype, seed=0, sizes=(1, 7, 33, 1000, 70001, 0, 5)):
    """θ in (-3, 3) and directions whose size spans three decades: many 16-bit elements move by
    less than an ulp, some not at all."""
    g = torch.Generator().manual_seed(seed)
    theta = [(torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3).to(dtype) for n in sizes]
    vs = [((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1)
           * 10 ** -(3 * torch.rand(n, generator=g, dtype=torch.float64))).to(dtype) for n in sizes]
    return theta, vs


def _f64_measure(new, src, vs):
    """Σ (new − src)·v and #(new ≠ src), recomputed in float64."""
    dot, count = 0.0, 0
    for a, b, v in zip(new, src, vs):
        d = a.double() - b.double()
        dot += float((d * v.double())[d != 0].sum())
        count += int((d != 0).sum())
    return dot, count


def _compiled():
    if _backend.requested() == "torch":
        pytest.skip("SAMA_EXT_BACKEND=torch: no compiled kernels to compare")
    assert sama_ext.backend() == "compiled"


def _with_reference(fn):
    saved = _backend._choice
    _backend._choice = "torch"
    try:
        return fn()
    finally:
        _backend._choice = saved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_compiled_equals_reference_bit_for_bit(dtype, stochastic, tensor_scale):
    _compiled()
    theta, vs = _case(dtype, seed=1)
    scale = torch.tensor(-0.37, dtype=torch.float64) if tensor_scale else 0.0123
    kw = dict(stochastic=stochastic, seed=2**63 + 12345, offset=7)
    out = {}
    for name in ("compiled", "torch"):
        p = [t.clone() for t in theta]
        b = [torch.full_like(t, float("nan")) for t in theta]
        q = [torch.full_like(t, float("nan")) for t in theta]
        run = lambda: (ops.perturb_save_measured_(p, vs, b, scale, **kw),  # noqa: E731
                       ops.perturb_from_measured_(q, b, vs, -scale if not tensor_scale else -scale, **kw))
        res = run() if name == "compiled" else _with_reference(run)
        out[name] = (p, b, q, res)
    (pc, bc, qc, rc), (pr, br, qr, rr) = out["compiled"], out["torch"]
    if dtype == torch.float64:  # the kernel's fma vs the reference's float64 a·v + x: one rounding apart
        assert all(torch.allclose(a, b, rtol=0, atol=4 * 2 ** -52) for a, b in zip(pc + qc, pr + qr))  # |θ| < 3
    else:
        assert _same_bits(pc, pr) and _same_bits(qc, qr)
    assert _same_bits(bc, br)
    assert _same_bits(bc, theta)
    for (dot_c, n_c), (dot_r, n_r), new, in zip(rc, rr, (pc, qc)):
        assert n_c.dtype == torch.int64 and dot_c.dtype == torch.float64
        assert int(n_c) == int(n_r)
        want_dot, want_n = _f64_measure(new, theta, vs)
        assert int(n_c) == want_n
        assert float(dot_c) == pytest.approx(want_dot, rel=1e-12, abs=1e-300)
        assert float(dot_r) == pytest.approx(want_dot, rel=1e-12, abs=1e-300)
    if dtype in (torch.bfloat16, torch.float16):  # a case where rounding decides: some elements stay
        assert 0 < int(rc[0][1]) < sum(t.numel() for t in theta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_to_nearest_equals_the_unmeasured_ops(dtype, backend):
    theta, vs = _case(dtype, seed=2)
    p1, b1 = [t.clone() for t in theta], [torch.empty_like(t) for t in theta]
    p2, b2 = [t.clone() for t in theta], [torch.empty_like(t) for t in theta]
    ops.perturb_save_(p1, vs, b1, 0.01)
    ops.perturb_save_measured_(p2, vs, b2, 0.01)
    assert _same_bits(p1, p2) and _same_bits(b1, b2)
    ops.perturb_from_(p1, b1, vs, -0.01)
    ops.perturb_from_measured_(p2, b2, vs, -0.01, stochastic=dtype in (torch.float32, torch.float64))
    assert _same_bits(p1, p2)  # float32/float64 round to nearest even when asked for stochastic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype, backend):
    # θ + s·v with s·v below half an ulp everywhere and of one sign: round-to-nearest drops it
    # every time (mean error −0.25 ulp here: the check below fails for it); stochastic rounding's
    # error (θ_new − exact)/ulp has mean 0 and variance ≤ 1/4 per element.
    n = 200_000
    g = torch.Generator().manual_seed(3)
    theta = (1 + torch.randint(0, 128, (n,), generator=g) / 128).to(dtype)  # [1, 2): ulp = 2^-7 / 2^-10
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    v = (torch.rand(n, generator=g, dtype=torch.float64) * ulp / 2).to(dtype)  # one sign, below half an ulp
    exact = theta.double() + v.double()  # scale 1 (exact in float32)

    def err(stochastic):
        p = [theta.clone()]
        _, count = ops.perturb_from_measured_(p, [theta], [v], 1.0, stochastic=stochastic, seed=11, offset=0)
        e = (p[0].double() - exact) / ulp
        assert bool(((e > -1) & (e < 1)).all())  # always one of the two neighbours of the exact value
        assert int(count) == int((p[0] != theta).sum())
        return e, int(count) / n

    e, moved = err(True)
    se = float(e.std()) / n ** 0.5
    assert abs(float(e.mean())) < 5 * se, (float(e.mean()), se)
    assert 0.23 < moved < 0.27  # P(up) = fraction of the ulp covered, uniform on (0, 1/2): 1/4
    e_rn, moved_rn = err(False)
    assert moved_rn < 0.01  # (a few v round to exactly half an ulp: ties to even)
    assert abs(float(e_rn.mean())) > 50 * se  # the same check fails for round-to-nearest


def test_independent_of_thread_count_and_layout():
    _compiled()
    theta, vs = _case(torch.bfloat16, seed=4, sizes=(200_003, 17))
    results = []
    n0 = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p, b = [t.clone() for t in theta], [torch.empty_like(t) for t in theta]
            res = ops.perturb_save_measured_(p, vs, b, 0.003, stochastic=True, seed=5, offset=9)
            results.append((p, res))
    finally:
        torch.set_num_threads(n0)
    # the same values at an odd element offset in a larger buffer (scalar head, then vectors)
    bufs = [torch.zeros(t.numel() + 3, dtype=t.dtype) for t in theta]
    views = [buf[3:] for buf in bufs]
    for w, t in zip(views, theta):
        w.copy_(t)
    vbuf = [torch.zeros(v.numel() + 3, dtype=v.dtype) for v in vs]
    vviews = [buf[3:] for buf in vbuf]
    for w, v in zip(vviews, vs):
        w.copy_(v)
    bb = [torch.empty(t.numel() + 3, dtype=t.dtype)[3:] for t in theta]
    res = ops.perturb_save_measured_(views, vviews, bb, 0.003, stochastic=True, seed=5, offset=9)
    results.append((views, res))
    (p0, (d0, c0)) = results[0]
    for p, (d, c) in results[1:]:
        assert _same_bits(p, p0)
        assert int(c) == int(c0) and float(d) == float(d0)


def test_draws_depend_on_seed_offset_and_tensor_index(backend):
    theta, vs = _case(torch.bfloat16, seed=6, sizes=(5000, 5000))
    vs = [vs[0], vs[0].clone()]
    theta = [theta[0], theta[0].clone()]

    def run(seed, offset):
        p = [t.clone() for t in theta]
        ops.perturb_from_measured_(p, theta, vs, 0.01, stochastic=True, seed=seed, offset=offset)
        return p

    a, b, c = run(1, 0), run(1, 1), run(2, 0)
    assert _same_bits(a, run(1, 0))  # reproducible
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # same values, another tensor index: other draws


@pytest.mark.parametrize("stochastic", [False, True])
def test_zero_scale_leaves_theta_and_counts_nothing(stochastic, backend):
    theta, vs = _case(torch.bfloat16, seed=7, sizes=(100,))
    vs[0][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    p, b = [theta[0].clone()], [torch.empty_like(theta[0])]
    dot, count = ops.perturb_save_measured_(p, vs, b, torch.zeros((), dtype=torch.float64), stochastic=stochastic)
    assert _same_bits(p, theta) and _same_bits(b, theta)
    assert float(dot) == 0.0 and int(count) == 0


def test_bad_input_writes_nothing(backend):
    theta, vs = _case(torch.bfloat16, seed=8, sizes=(50, 60))
    p = [t.clone() for t in theta]
    b = [torch.full_like(t, 7.0) for t in theta]
    bad_v = [vs[0], vs[1][:59]]  # the second tensor's shape is wrong: checked before any write
    with pytest.raises(RuntimeError, match="shape"):
        ops.perturb_save_measured_(p, bad_v, b, 0.5, stochastic=True)
    assert _same_bits(p, theta)
    assert all(bool((x == 7).all()) for x in b)


def test_reference_philox_known_answers():
    # Random123's published Philox4x32-10 vectors (first output word), through the reference's
    # int64 arithmetic: counter (0,0,0,0) key (0,0), and all ones.
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    zeros = torch.zeros(1, dtype=torch.int64)
    assert int(reference._philox_word(zeros, zeros, zeros, zeros, 0, 0)) == 0x6627E8D5
    assert int(reference._philox_word(ones, ones, ones, ones, 0xFFFFFFFF, 0xFFFFFFFF)) == 0x408F276D


def _opcheck_cases():
    t = lambda *s: torch.randn(*s)  # noqa: E731
    p, v, b = [t(5), t(3, 7)], [t(5), t(3, 7)], [t(5), t(3, 7)]
    h = [x.bfloat16() for x in p]
    hv = [x.bfloat16() for x in v]
    hb = [x.bfloat16() for x in b]
    e = torch.tensor(0.3, dtype=torch.float64)
    return [
        ("perturb_save_measured_", (p, v, b, 1.0, e, False, 0, 0)),
        ("perturb_save_measured_", (h, hv, hb, 0.5, None, True, 3, 4)),
        ("perturb_from_measured_", (p, b, v, -1.0, e, False, 0, 0)),
        ("perturb_from_measured_", (h, hb, hv, 0.01, e, True, -5, 2)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=[f"{c[0]}-{i}" for i, c in enumerate(_opcheck_cases())])
def test_opcheck(name, args):
    _compiled()
    torch.library.opcheck(getattr(torch.ops.sama_ext, name), args)
