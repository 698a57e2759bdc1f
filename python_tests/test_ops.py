"""The fused kernels (compiled backend) against the pure-PyTorch reference and exact oracles:
random shapes and dtypes, many tensors, property-based cases, opcheck, torch.compile, errors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sama_ext
from sama_ext import ops, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Compiled kernel vs reference (or a closed form rounded to the storage dtype), relative to the
# data, per storage dtype (see _close). Both sides do fp32 math over 16-bit storage and round the
# same value to nearest, so 16-bit outputs are bit-equal except at rounding midpoints.
TOL = {torch.float32: 4e-6, torch.float64: 1e-13,   # fp32/fp64 math in another order (fp32: ~32 ulp)
       torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # one ulp of the 16-bit result, relative
TINY = {torch.float16: 2.0 ** -24}  # fp16's subnormal spacing (absolute)
DIFFER_16 = 0.01    # 16-bit: share of elements not bit-equal (fp32 values straddling a rounding midpoint)
CANCEL = 0.005      # share of elements beyond TOL relative (terms that cancelled to near 0)


@pytest.fixture(scope="module", autouse=True)
def compiled_backend():
    if sama_ext.backend() != "compiled":
        pytest.skip("SAMA_EXT_BACKEND=torch: these tests compare the compiled kernels with the reference")


def _shapes(rng: torch.Generator, n: int) -> list[tuple]:
    """Odd sizes, empties, scalars, and one tensor crossing the CPU/CUDA chunk boundaries."""
    fixed = [(), (1,), (0,), (3, 0), (7,), (33, 5), (65537,), (2, 40000)]
    out = [fixed[i % len(fixed)] for i in range(min(n, len(fixed)))]
    while len(out) < n:
        k = int(torch.randint(1, 4, (1,), generator=rng))
        out.append(tuple(int(torch.randint(1, 12, (1,), generator=rng)) for _ in range(k)))
    return out


def _randn(shapes, dtype, device, gen, scale=1.0):
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device) for s in shapes]


def _close(a, b, dtype, widen=1.0, terms=None):
    """a (the kernel) against b, over all elements of the lists together:
    * every element: |a − b| ≤ TOL·widen·(|b| + t), t = the magnitude of the terms that were
      added (`terms`, exact error scales) or else 1e-2·max|b| over the call;
    * without `terms`, all but a CANCEL share: |a − b| ≤ TOL·widen·|b| (relative to the element
      itself; the rest are results that cancelled to near 0, e.g. the two terms of Adam's
      diagonal, where the two operation orders differ relative to the result);
    * 16-bit storage: all but a DIFFER_16 share bit-equal.
    A wrong formula or rounding mode fails the shares on most elements, whatever their size."""
    assert len(a) == len(b)
    xs, ys, ts = [], [], []
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype == dtype and x.shape == y.shape
        x64, y64 = x.double().cpu().flatten(), y.double().cpu().flatten()
        assert torch.equal(x64.isnan(), y64.isnan()), "NaN in different places"
        xs.append(x64.nan_to_num(0.0))
        ys.append(y64.nan_to_num(0.0))
        if terms is not None:
            ts.append(torch.as_tensor(terms[i]).double().cpu().flatten().expand_as(y64))
    x, y = torch.cat(xs), torch.cat(ys)
    if x.numel() == 0:
        return
    t = torch.cat(ts) if terms is not None else 1e-2 * y.abs().max()
    tol, tiny, err = TOL[dtype] * widen, TINY.get(dtype, 0.0), (x - y).abs()
    bad = err > tol * (y.abs() + t) + tiny
    assert not bool(bad.any()), (f"{int(bad.sum())} of {x.numel()} {dtype} elements beyond tolerance, "
                                 f"e.g. {x[bad][:3].tolist()} vs {y[bad][:3].tolist()}")
    if terms is None:
        beyond = int((err > tol * y.abs() + tiny).sum())
        assert beyond <= CANCEL * x.numel() + 1, f"{beyond} of {x.numel()} {dtype} elements beyond {tol:g} relative"
    if dtype in (torch.bfloat16, torch.float16):
        differ = int((x != y).sum())
        assert differ <= DIFFER_16 * x.numel() + 1, f"{differ} of {x.numel()} {dtype} elements not bit-equal"


# ----------------------------------------------------------------------------- perturbations
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_perturbations_match_reference(device, dtype, tensor_scale):
    gen = torch.Generator().manual_seed(1)
    shapes = _shapes(gen, 40)
    theta = _randn(shapes, dtype, device, gen)
    v = _randn(shapes, dtype, device, gen)
    scale = torch.tensor(0.37, dtype=torch.float64, device=device) if tensor_scale else 0.37

    got, want = [t.clone() for t in theta], [t.clone() for t in theta]
    ops.perturb_(got, v, scale)
    reference.perturb_(want, v, scale)
    _close(got, want, dtype)

    got_b = [torch.empty_like(t) for t in theta]
    got = [t.clone() for t in theta]
    ops.perturb_save_(got, v, got_b, scale)
    assert all(torch.equal(b, t) for b, t in zip(got_b, theta)), "backup must be θ bit for bit"
    _close(got, want, dtype)

    got2 = [torch.empty_like(t) for t in theta]
    ops.perturb_from_(got2, theta, v, -2.0 if not tensor_scale else -2 * scale)
    want2 = [t.clone() for t in theta]
    reference.perturb_from_(want2, theta, v, -2.0 if not tensor_scale else -2 * scale)
    _close(got2, want2, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_is_one_rounding(device):
    """θ + εv with a single rounding: equal, bit for bit, to the float64 value rounded once."""
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(100_003, generator=gen).to(device)
    v = torch.randn(100_003, generator=gen).to(device) * 1e-3
    eps = torch.tensor(0.7182818, dtype=torch.float64)
    eps32 = float(torch.tensor(0.7182818, dtype=torch.float32))  # the kernel's fp32 scale
    got = theta.clone()
    ops.perturb_([got], [v], eps.to(device))
    exact = (theta.double() + eps32 * v.double()).float()  # float32·float32 is exact in float64
    assert torch.equal(got, exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_save_then_restore_is_bit_exact(device, dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = _shapes(gen, 25)
    theta0 = _randn(shapes, dtype, device, gen)
    v = _randn(shapes, dtype, device, gen)
    eps = torch.tensor(0.013, dtype=torch.float64, device=device)
    theta = [t.clone() for t in theta0]
    backup = [torch.empty_like(t) for t in theta]
    for _ in range(3):  # θ⁺, θ⁻ from the backup, restore: repeatedly
        ops.perturb_save_(theta, v, backup, eps)
        ops.perturb_from_(theta, backup, v, -eps)
        torch._foreach_copy_(theta, backup)
    assert all(torch.equal(a, b) for a, b in zip(theta, theta0))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_scale_is_a_noop_even_with_nonfinite_vectors(device):
    theta0 = torch.tensor([1.0, -0.0, 3.5, float("inf")], device=device)
    v = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], device=device)
    for scale in (0.0, torch.zeros((), dtype=torch.float64, device=device)):
        theta = theta0.clone()
        ops.perturb_([theta], [v], scale)
        assert torch.equal(theta.view(torch.int32), theta0.view(torch.int32))  # -0.0 stays -0.0
        backup = torch.empty_like(theta)
        ops.perturb_save_([theta], [v], [backup], scale)
        assert torch.equal(theta.view(torch.int32), theta0.view(torch.int32))
        assert torch.equal(backup.view(torch.int32), theta0.view(torch.int32))


# ----------------------------------------------------------------------------- combine
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_matches_reference(device, dtype, accumulate):
    gen = torch.Generator().manual_seed(4)
    shapes = _shapes(gen, 30)
    gm, gp, base = (_randn(shapes, dtype, device, gen) for _ in range(3))
    eps = torch.tensor(0.05, dtype=torch.float64, device=device)
    got, want = [b.clone() for b in base], [b.clone() for b in base]
    ops.combine_(got, gm, gp, eps, 0.5, accumulate)
    reference.combine_(want, gm, gp, eps, 0.5, accumulate)
    # with accumulate, out + 5·(g⁻ − g⁺) can cancel: rounding is relative to the terms added
    terms = [(b.double().abs() if accumulate else 0) + 5 * (m.double().abs() + p.double().abs())
             for b, m, p in zip(base, gm, gp)]
    _close(got, want, dtype, terms=terms)
    # closed form: 0.5·(g⁻ − g⁺)/(2·0.05) = 5·(g⁻ − g⁺)
    closed = [(b.double() if accumulate else 0) + 5 * (m.double() - p.double()) for b, m, p in zip(base, gm, gp)]
    _close(got, [c.to(dtype) for c in closed], dtype, terms=terms)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_combine_compresses_with_torch_rounding(device, out_dtype):
    """float32 in, 16-bit out: the kernel's rounding equals torch's own cast (round to nearest
    even), including subnormals, overflow to inf, NaN, and -0.0."""
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(50_000, generator=gen) * 10 ** torch.randint(-9, 6, (50_000,), generator=gen),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 6e-8, float("inf"), -float("inf"),
                                 float("nan"), 3e38, 1.17e-38])]).float().to(device)
    out = torch.empty_like(x, dtype=out_dtype)
    one = torch.tensor(0.5, dtype=torch.float64, device=device)  # scale/(2ε) = 1
    ops.combine_([out], [x], [torch.zeros_like(x)], one, 1.0, False)
    want = x.to(out_dtype)
    same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan())
    assert bool(same.all()), x[~same][:10]


@pytest.mark.parametrize("device", DEVICES)
def test_combine_skips_zero_or_nonfinite_eps(device):
    gm = [torch.tensor([1.0, float("nan")], device=device)]
    gp = [torch.tensor([2.0, 3.0], device=device)]
    for e in (0.0, float("inf"), float("nan")):
        eps = torch.tensor(e, dtype=torch.float64, device=device)
        out = [torch.tensor([7.0, 8.0], device=device)]
        ops.combine_(out, gm, gp, eps, 1.0, True)
        assert torch.equal(out[0], torch.tensor([7.0, 8.0], device=device))
        ops.combine_(out, gm, gp, eps, 1.0, False)
        assert torch.equal(out[0], torch.zeros(2, device=device))


# ----------------------------------------------------------------------------- adapt kernels
def _adam_state(shapes, dtype, device, gen):
    m = _randn(shapes, dtype, device, gen, 0.1)
    q = [x.abs() for x in _randn(shapes, dtype, device, gen, 0.01)]
    qmax = [x + y.abs() for x, y in zip(q, _randn(shapes, dtype, device, gen, 0.001))]
    return m, q, qmax


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad,wd", [(False, 0.0), (True, 0.1)])
def test_adam_adapt_matches_reference(device, dtype, amsgrad, wd):
    gen = torch.Generator().manual_seed(6)
    shapes = _shapes(gen, 30)
    d, g, theta = (_randn(shapes, dtype, device, gen) for _ in range(3))
    m, q, qmax = _adam_state(shapes, dtype, device, gen)
    steps = [float(1 + i % 5) for i in range(len(shapes))]  # per-tensor steps
    kw = dict(lr=1e-3, step=steps, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, maximize=amsgrad)
    args = (d, g, m, q, qmax if amsgrad else [], theta if wd else [])
    out_c, out_r = [torch.empty_like(x) for x in d], [torch.empty_like(x) for x in d]
    s_c = ops.adam_adapt(*args, out_c, **kw)
    s_r = reference.adam_adapt(*args, out_r, **kw)
    _close(out_c, out_r, dtype)
    assert s_c.dtype == torch.float64 and s_c.dim() == 0 and s_c.device.type == device
    torch.testing.assert_close(s_c, s_r.to(s_c.device), rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_adapt_kernels_per_tensor_steps_from_device(device):
    """Steps and lr given as tensors are read on the device, per tensor."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(5,), (9, 3), (1,)]
    d, g = _randn(shapes, torch.float64, device, gen), _randn(shapes, torch.float64, device, gen)
    m, q, _ = _adam_state(shapes, torch.float64, device, gen)
    steps_t = [torch.tensor(float(s), device=device) for s in (1, 4, 9)]
    lr_t = torch.tensor(3e-3, device=device)
    out_t, out_f = [torch.empty_like(x) for x in d], [torch.empty_like(x) for x in d]
    kw = dict(beta1=0.8, beta2=0.99, eps=1e-6)
    ops.adam_adapt(d, g, m, q, [], [], out_t, lr=lr_t, step=steps_t, **kw)
    ops.adam_adapt(d, g, m, q, [], [], out_f, lr=float(lr_t), step=[1.0, 4.0, 9.0], **kw)
    _close(out_t, out_f, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_adapt_kernels_match_reference(device, dtype):
    gen = torch.Generator().manual_seed(8)
    shapes = _shapes(gen, 20)
    d, g, theta = (_randn(shapes, dtype, device, gen) for _ in range(3))
    sq = [x.abs() + 0.01 for x in _randn(shapes, dtype, device, gen, 0.01)]
    ga = _randn(shapes, dtype, device, gen, 0.01)
    for fn_c, fn_r, args, kw in [
        (ops.const_adapt, reference.const_adapt, (d,), dict(lr=0.1, factor=-1.9)),
        (ops.rmsprop_adapt, reference.rmsprop_adapt, (d, g, sq, ga, theta, []),
         dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.1)),
        (ops.rmsprop_adapt, reference.rmsprop_adapt, (d, g, sq, ga, theta, ga),
         dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.1, safeguard=1)),
        (ops.rmsprop_adapt, reference.rmsprop_adapt, (d, g, sq, [], [], []),
         dict(lr=0.01, alpha=0.99, eps=1e-8, maximize=True)),
        (ops.adagrad_adapt, reference.adagrad_adapt, (d, g, sq, theta),
         dict(lr=0.1, step=3.0, lr_decay=0.01, eps=1e-10, weight_decay=0.2, safeguard=1)),
    ]:
        oc, orf = [torch.empty_like(x) for x in d], [torch.empty_like(x) for x in d]
        sc = fn_c(*args, oc, **kw)
        sr = fn_r(*args, orf, **kw)
        # undoing the step for coupled decay divides by (1 − lr·wd/D): fp32 rounding grows a little
        _close(oc, orf, dtype, widen=10.0 if dtype == torch.float32 else 1.0)
        torch.testing.assert_close(sc, sr.to(sc.device), rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_mixed_dtypes_one_call(device):
    """≥ 500 tensors of four dtypes in one call: grouped by dtype, every tensor handled."""
    gen = torch.Generator().manual_seed(9)
    shapes = _shapes(gen, 520)
    dtypes = [DTYPES[i % 4] for i in range(len(shapes))]
    d = [x.to(dt) for x, dt in zip(_randn(shapes, torch.float64, device, gen), dtypes)]
    out_c, out_r = [torch.empty_like(x) for x in d], [torch.empty_like(x) for x in d]
    s_c = ops.const_adapt(d, out_c, lr=0.5, factor=3.0)
    s_r = reference.const_adapt(d, out_r, lr=0.5, factor=3.0)
    for a, b, dt in zip(out_c, out_r, dtypes):
        _close([a], [b], dt)
    torch.testing.assert_close(s_c, s_r.to(s_c.device), rtol=1e-6, atol=0)


def test_reduction_is_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(10)
    d = [torch.randn(300_001, generator=gen), torch.randn(77, generator=gen)]
    threads = torch.get_num_threads()
    sums = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(ops.const_adapt(d, [torch.empty_like(x) for x in d], lr=1.0, factor=1.0).item())
    finally:
        torch.set_num_threads(threads)
    assert sums[0] == sums[1] == sums[2]
    assert math.isclose(sums[0], sum(float(x.double().square().sum()) for x in d), rel_tol=1e-12)


# ----------------------------------------------------------------------------- layouts and errors
@pytest.mark.parametrize("device", DEVICES)
def test_dense_non_contiguous_layout_is_handled(device):
    x = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    v = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    want = x + 0.25 * v
    ops.perturb_([x], [v], 0.25)
    torch.testing.assert_close(x, want)


def test_mismatched_inputs_raise_clear_errors():
    a, b = torch.randn(4, 3), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="must have the same strides"):
        ops.perturb_([a], [b.t()], 1.0)
    with pytest.raises(RuntimeError, match="has shape"):
        ops.perturb_([a], [b], 1.0)
    with pytest.raises(RuntimeError, match="same length"):
        ops.perturb_([a, a.clone()], [a], 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.perturb_([a], [a.double()], 1.0)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.perturb_([a.int()], [a.int()], 1.0)
    with pytest.raises(RuntimeError, match="must be dense and non-overlapping"):
        ops.perturb_([a[:, ::2]], [a[:, ::2]], 1.0)
    with pytest.raises(RuntimeError, match="must be dense and non-overlapping"):
        ops.perturb_([torch.ones(1).expand(4)], [torch.ones(4)], 1.0)
    with pytest.raises(ValueError, match="one-element tensor"):
        ops.perturb_([a], [a], torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must have one element"):
        torch.ops.sama_ext.perturb_([a], [a], 1.0, torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="coupled weight_decay"):
        torch.ops.sama_ext.adam_adapt([a], [a], [a], [a], [], [], [a], 1e-3, None, 1.0, None, 0.9, 0.999, 1e-8,
                                      0.1, False, 0)


# ----------------------------------------------------------------------------- dispatcher, compile
def _opcheck_cases():
    t = lambda *s: torch.randn(*s)  # noqa: E731
    p, v, b = [t(5), t(3, 7)], [t(5), t(3, 7)], [t(5), t(3, 7)]
    q = [x.abs() for x in v]
    e = torch.tensor(0.3, dtype=torch.float64)
    return [
        ("perturb_", (p, v, 0.5, None)),
        ("perturb_", (p, v, 1.0, e)),
        ("perturb_from_", (p, b, v, -1.0, e)),
        ("perturb_save_", (p, v, b, 1.0, e)),
        ("combine_", (b, p, v, e, 0.5, True)),
        ("const_adapt", (v, b, 0.1, None, 2.0)),
        ("adam_adapt", (v, p, p, q, q, p, b, 1e-3, e, 3.0, None, 0.9, 0.999, 1e-8, 0.1, True, 1)),
        ("rmsprop_adapt", (v, p, q, [], [], [], b, 1e-2, None, 0.99, 1e-8, 0.0, False, 0)),
        ("rmsprop_adapt", (v, p, [x + 1 for x in q], [0.1 * x for x in v], [t(5), t(3, 7)], [t(5), t(3, 7)], b,
                           1e-2, None, 0.99, 1e-8, 0.1, True, 1)),
        ("adagrad_adapt", (v, p, q, p, b, 1e-2, None, 2.0, None, 0.0, 1e-10, 0.1, False, 1)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sama_ext, name), args)


def test_pybind_module_matches_dispatcher():
    mod = sama_ext._backend.compiled().module
    x, v = torch.randn(10), torch.randn(10)
    y = x.clone()
    mod.perturb_([y], [v], 0.5, None)
    z = x.clone()
    torch.ops.sama_ext.perturb_([z], [v], 0.5, None)
    assert torch.equal(y, z)


def test_ops_work_under_torch_compile_fullgraph():
    p, v = [torch.randn(6), torch.randn(2, 3)], [torch.randn(6), torch.randn(2, 3)]
    eps = torch.tensor(0.25, dtype=torch.float64)
    want = [x + 0.25 * y for x, y in zip(p, v)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(p, v, eps):
        out = [torch.empty_like(x) for x in v]
        s = ops.const_adapt(v, out, lr=1.0, factor=1.0)
        ops.perturb_(p, v, eps)
        return s

    s = step(p, v, eps)
    _close(p, want, torch.float32)
    torch.testing.assert_close(s, sum(x.double().square().sum() for x in v))


# ----------------------------------------------------------------------------- property-based
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
       dtype=st.sampled_from(DTYPES), scale=st.floats(-4, 4, allow_nan=False), seed=st.integers(0, 2**31 - 1))
def test_property_perturb_and_const_adapt(sizes, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    theta = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    v = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    got, want = [t.clone() for t in theta], [t.clone() for t in theta]
    ops.perturb_(got, v, scale)
    reference.perturb_(want, v, scale)
    _close(got, want, dtype)
    oc, orf = [torch.empty_like(x) for x in v], [torch.empty_like(x) for x in v]
    sc = ops.const_adapt(v, oc, lr=scale, factor=1.5)
    sr = reference.const_adapt(v, orf, lr=scale, factor=1.5)
    _close(oc, orf, dtype)
    torch.testing.assert_close(sc, sr, rtol=1e-5, atol=1e-12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 2000), min_size=1, max_size=8), seed=st.integers(0, 2**31 - 1),
       step=st.integers(1, 50), amsgrad=st.booleans(), wd=st.sampled_from([0.0, 0.01]),
       safeguard=st.sampled_from([0, 1]))
def test_property_adam_adapt(sizes, seed, step, amsgrad, wd, safeguard):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n,) for n in sizes]
    d, g, theta = (_randn(shapes, torch.float64, "cpu", gen) for _ in range(3))
    m, q, qmax = _adam_state(shapes, torch.float64, "cpu", gen)
    for x in q:  # some exact zeros: the unseen-coordinate path
        x[::7] = 0
    kw = dict(lr=1e-3, step=float(step), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, safeguard=safeguard)
    args = (d, g, m, q, qmax if amsgrad else [], theta if wd else [])
    oc, orf = [torch.empty_like(x) for x in d], [torch.empty_like(x) for x in d]
    sc = ops.adam_adapt(*args, oc, **kw)
    sr = reference.adam_adapt(*args, orf, **kw)
    _close(oc, orf, torch.float64)
    torch.testing.assert_close(sc, sr, rtol=1e-10, atol=0)
