"""sama_ext.ops on GPUs, as far as a CPU can show it (issue 12, item 3): per-tensor steps without
device copies, lists spread over several devices, every call checked before anything runs, error
messages that name the argument, and no host synchronisation anywhere in the ops.

Runs on both backends (SAMA_EXT_BACKEND=compiled|torch) where the property is one of the
Python API; properties of the compiled op registration are marked compiled-only. A second
device is faked by replacing sama_ext.ops._device_of (the grouping key): that exercises the
splitting, the per-device calls, the checks before launch and the order of the partial sums,
but no real cross-device copy (that needs two GPUs).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sama_ext
from sama_ext import ops, reference

CUDA = torch.cuda.is_available()
compiled_only = pytest.mark.skipif(sama_ext.backend() != "compiled",
                                   reason="a property of the compiled ops (SAMA_EXT_BACKEND=torch)")
ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8)


class Recorder(TorchDispatchMode):
    """The top-level ops a call dispatches (those inside a custom op's kernel are not seen)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def names(self, include_views=False):
        return [str(f) for f in self.ops if include_views or not f.is_view]


def _adam_case(shapes, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda s, k=1.0: (torch.randn(s, generator=gen, dtype=torch.float64) * k).to(dtype).to(device)  # noqa: E731
    d = [r(s) for s in shapes]
    g = [r(s) for s in shapes]
    m = [r(s, 0.1) for s in shapes]
    q = [r(s, 0.01).abs() + 1e-4 for s in shapes]
    return d, g, m, q


def _per_tensor_oracle(fn, n, step_of, *lists, **kw):
    """Each tensor alone through the reference with its own float step: float64 math, no lists."""
    outs, total = [], torch.zeros((), dtype=torch.float64)
    for i in range(n):
        o = [torch.empty_like(lists[0][i])]
        total = total + fn(*[[l[i]] if len(l) else [] for l in lists], o, step=step_of(i), **kw)
        outs.append(o[0])
    return outs, total


# ----------------------------------------------------------------------------- per-tensor steps
@pytest.mark.parametrize("which", ["adam", "adagrad"])
def test_host_steps_that_differ_need_no_device_tensor(which):
    """Per-tensor steps known on the host reach the kernel as host values: the call dispatches
    the fused op and nothing else (before: torch.tensor(steps, device=...), an H2D copy and a
    stream sync on a GPU, illegal during graph capture)."""
    shapes = [(7,), (3, 5), (1,), (40,), (2, 2)]
    steps = [1.0, 4.0, 1.0, 250.0, 9.0]
    d, g, m, q = _adam_case(shapes)
    out = [torch.empty_like(x) for x in d]
    with Recorder() as rec:
        if which == "adam":
            s = ops.adam_adapt(d, g, m, q, [], [], out, lr=1e-3, step=steps, **ADAM)
        else:
            s = ops.adagrad_adapt(d, g, q, [], out, lr=0.1, step=steps, lr_decay=0.01, eps=1e-10)
    names = rec.names(include_views=True)
    assert not [n for n in names if "lift_fresh" in n], names  # no tensor made from host data
    if sama_ext.backend() == "compiled":
        assert names == [f"sama_ext.{which}_adapt.default"], names
    if which == "adam":
        want, total = _per_tensor_oracle(reference.adam_adapt, len(d), lambda i: steps[i], d, g, m, q, [], [],
                                         lr=1e-3, **ADAM)
    else:
        want, total = _per_tensor_oracle(reference.adagrad_adapt, len(d), lambda i: steps[i], d, g, q, [],
                                         lr=0.1, lr_decay=0.01, eps=1e-10)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s, total, rtol=1e-13, atol=0)


@compiled_only
def test_device_steps_are_gathered_with_one_stack():
    """Steps kept on the device (capturable/fused Adam): one stack for all of them, not one cast
    per parameter; the number of ops does not grow with the number of tensors."""
    counts = []
    for n in (4, 40):
        shapes = [(3,)] * n
        d, g, m, q = _adam_case(shapes, seed=n)
        steps = [torch.tensor(float(1 + i % 7)) for i in range(n)]  # float32, as Adam keeps them
        out = [torch.empty_like(x) for x in d]
        with Recorder() as rec:
            s = ops.adam_adapt(d, g, m, q, [], [], out, lr=1e-3, step=steps, **ADAM)
        counts.append(rec.names())
        want, total = _per_tensor_oracle(reference.adam_adapt, n, lambda i: float(1 + i % 7), d, g, m, q, [], [],
                                         lr=1e-3, **ADAM)
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(s, total, rtol=1e-13, atol=0)
    assert counts[0] == counts[1] == ["aten.stack.default", "sama_ext.adam_adapt.default"], counts


@pytest.mark.parametrize("which", ["adam", "adagrad"])
def test_mixed_host_and_device_steps(which):
    """Some steps on the host, some on the device, in one list: each tensor gets its own."""
    shapes = [(5,), (6,), (2, 3), (4,)]
    steps = [3.0, torch.tensor(8.0), 3.0, torch.tensor(2.0, dtype=torch.float64)]
    floats = [3.0, 8.0, 3.0, 2.0]
    d, g, m, q = _adam_case(shapes, seed=3)
    out = [torch.empty_like(x) for x in d]
    if which == "adam":
        s = ops.adam_adapt(d, g, m, q, [], [], out, lr=2e-3, step=steps, **ADAM)
        want, total = _per_tensor_oracle(reference.adam_adapt, len(d), lambda i: floats[i], d, g, m, q, [], [],
                                         lr=2e-3, **ADAM)
    else:
        s = ops.adagrad_adapt(d, g, q, [], out, lr=0.1, step=steps, lr_decay=0.1, eps=1e-10)
        want, total = _per_tensor_oracle(reference.adagrad_adapt, len(d), lambda i: floats[i], d, g, q, [],
                                         lr=0.1, lr_decay=0.1, eps=1e-10)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s, total, rtol=1e-13, atol=0)


def test_one_step_tensor_for_all_tensors():
    d, g, m, q = _adam_case([(3,), (4,)], seed=5)
    out, want = [torch.empty_like(x) for x in d], [torch.empty_like(x) for x in d]
    s = ops.adam_adapt(d, g, m, q, [], [], out, lr=1e-3, step=torch.tensor(6.0), **ADAM)
    s_want = reference.adam_adapt(d, g, m, q, [], [], want, lr=1e-3, step=6.0, **ADAM)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s, s_want, rtol=1e-13, atol=0)


@compiled_only
@pytest.mark.parametrize("case", ["host_steps", "device_steps", "both"])
def test_opcheck_with_per_tensor_steps(case):
    t = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    d, g, m = [t(5), t(3, 7)], [t(5), t(3, 7)], [t(5), t(3, 7)]
    q = [x.abs() + 0.1 for x in (t(5), t(3, 7))]
    out = [t(5), t(3, 7)]
    host = [] if case == "device_steps" else [2.0, 11.0]
    dev = None if case == "host_steps" else torch.tensor([3.0, 1.0])
    torch.library.opcheck(torch.ops.sama_ext.adam_adapt,
                          (d, g, m, q, [], [], out, 1e-3, None, 1.0, dev, 0.9, 0.999, 1e-8, 0.0, False, 0, host))
    torch.library.opcheck(torch.ops.sama_ext.adagrad_adapt,
                          (d, g, q, [], out, 0.1, None, 1.0, dev, 0.01, 1e-10, 0.0, False, 0, host))


@compiled_only
def test_per_tensor_steps_under_torch_compile_fullgraph():
    """The wrappers' step handling traces without graph breaks (host and device steps)."""
    d, g, m, q = _adam_case([(4,), (2, 3), (5,)], dtype=torch.float32, seed=41)
    dev_steps = [torch.tensor(2.0), torch.tensor(7.0), torch.tensor(7.0)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(d, g, m, q, dev_steps):
        out_h = [torch.empty_like(x) for x in d]
        out_d = [torch.empty_like(x) for x in d]
        s_h = ops.adam_adapt(d, g, m, q, [], [], out_h, lr=1e-3, step=[2.0, 7.0, 3.0], **ADAM)
        s_d = ops.adam_adapt(d, g, m, q, [], [], out_d, lr=1e-3, step=dev_steps, **ADAM)
        return out_h, out_d, s_h, s_d

    out_h, out_d, s_h, s_d = step(d, g, m, q, dev_steps)
    for out, s, steps in ((out_h, s_h, [2.0, 7.0, 3.0]), (out_d, s_d, [2.0, 7.0, 7.0])):
        want, total = _per_tensor_oracle(reference.adam_adapt, 3, lambda i: steps[i], d, g, m, q, [], [], lr=1e-3,
                                         **ADAM)
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s, total, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- several devices
def test_by_device_groups_in_order_of_first_appearance(monkeypatch):
    monkeypatch.setattr(ops, "_device_of", lambda t: t.device)  # tell CPU from meta (both index -1)
    a, b, c = torch.ones(2), torch.ones(3, device="meta"), torch.ones(4)
    e = torch.ones(5, device="meta")
    groups = ops._by_device("op", dict(x=[a, b, c, e], y=["ya", "yb", "yc", "ye"], opt=[]), optional=("opt",))
    assert [k for k, _, _ in groups] == [torch.device("cpu"), torch.device("meta")]
    assert [idx for _, idx, _ in groups] == [[0, 2], [1, 3]]
    assert groups[0][2]["x"][0] is a and groups[0][2]["x"][1] is c and groups[0][2]["y"] == ["ya", "yc"]
    assert groups[1][2]["x"][0] is b and groups[1][2]["x"][1] is e and groups[1][2]["y"] == ["yb", "ye"]
    assert groups[0][2]["opt"] == [] and groups[1][2]["opt"] == []
    with pytest.raises(RuntimeError, match="'y' has 1 entries but 'x' has 4; all lists must have the same length"):
        ops._by_device("op", dict(x=[a, b, c, e], y=["ya"]))
    with pytest.raises(RuntimeError, match="'opt' has 1 entries"):
        ops._by_device("op", dict(x=[a, b, c, e], opt=[a]), optional=("opt",))
    with pytest.raises(TypeError, match=r"'x'\[1\] is NoneType"):
        ops._by_device("op", dict(x=[a, None]))


@contextlib.contextmanager
def _two_fake_devices(monkeypatch, second, third=()):
    """Tensors in `second` (and `third`) count as other devices (all still live on the CPU)."""
    label = {id(t): "fake:1" for t in second}
    label.update({id(t): "fake:2" for t in third})
    with monkeypatch.context() as mp:
        mp.setattr(ops, "_device_of", lambda t: label.get(id(t), t.get_device()))
        yield


def test_partial_sums_are_added_in_device_order():
    """(a + b) + c, in the order the devices appear: with these values any other order rounds
    differently."""
    a, b, c = (torch.tensor(x, dtype=torch.float64) for x in (1.0, 1e-16, 1e-16))
    assert ops._sum_in_order([a, b, c]).item() == 1.0
    assert ops._sum_in_order([c, b, a]).item() == 1.0 + 2.220446049250313e-16


def _count_sama(rec):
    return sum(str(f).startswith("sama_ext.") for f in rec.ops)


def test_adapt_over_three_devices_adds_partial_sums_in_order(monkeypatch):
    """One call per device; the per-device sums are added first device first. The devices' sums
    differ by 1e16, so that any other order of addition rounds differently."""
    shapes = [(6,), (3, 4), (9,), (2,), (5, 5), (1,)]
    steps = [2.0, 5.0, 5.0, 1.0, 3.0, 4.0]
    d, g, m, q = _adam_case(shapes, seed=11)
    first, second, third = [0, 2], [1, 4], [3, 5]
    for i in second + third:
        d[i] = d[i] * 1e-8  # Σv² on those devices ~1e-16 of the first
    out = [torch.empty_like(x) for x in d]
    with _two_fake_devices(monkeypatch, [d[i] for i in second], [d[i] for i in third]), Recorder() as rec:
        s = ops.adam_adapt(d, g, m, q, [], [], out, lr=1e-3, step=steps, **ADAM)
    if sama_ext.backend() == "compiled":
        assert _count_sama(rec) == 3  # one call per device
    parts = []
    for idx in (first, second, third):  # the same call per device, without the fake
        sub = lambda l: [l[i] for i in idx]  # noqa: E731
        o = [torch.empty_like(d[i]) for i in idx]
        parts.append(ops.adam_adapt(sub(d), sub(g), sub(m), sub(q), [], [], o, lr=1e-3, step=sub(steps), **ADAM))
        for i, x in zip(idx, o):
            assert torch.equal(out[i], x)
    assert torch.equal(s, (parts[0] + parts[1]) + parts[2])
    want, total = _per_tensor_oracle(reference.adam_adapt, len(d), lambda i: steps[i], d, g, m, q, [], [],
                                     lr=1e-3, **ADAM)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s, total, rtol=1e-13, atol=0)


def test_other_ops_over_two_devices(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    shapes = [(4,), (3, 3), (7,), (1,)]
    r = lambda: [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]  # noqa: E731
    p, v, src, gm, gp = r(), r(), r(), r(), r()
    sq = [x.abs() + 0.01 for x in r()]
    eps = torch.tensor(0.125, dtype=torch.float64)
    scale = torch.tensor(-0.5, dtype=torch.float64)

    def run(p, bk, out, vout):
        ops.perturb_save_(p, v, bk, scale)
        ops.perturb_(p, v, 0.25)
        ops.perturb_from_(p, src, v, scale)
        ops.combine_(out, gm, gp, eps, 0.5, accumulate=True)
        s1 = ops.const_adapt(v, vout, lr=torch.tensor(0.1, dtype=torch.float64), factor=2.0)
        s2 = ops.rmsprop_adapt(v, gm, sq, [], [], [], vout, lr=0.01, alpha=0.9, eps=1e-8)
        return s1, s2

    p1, bk1, out1, vo1 = [x.clone() for x in p], [torch.empty_like(x) for x in p], [x.clone() for x in gm], \
        [torch.empty_like(x) for x in p]
    p2, bk2, out2, vo2 = [x.clone() for x in p], [torch.empty_like(x) for x in p], [x.clone() for x in gm], \
        [torch.empty_like(x) for x in p]
    want = run(p1, bk1, out1, vo1)
    with _two_fake_devices(monkeypatch, [p2[0], p2[2], out2[2], v[2]]):
        got = run(p2, bk2, out2, vo2)
    for a, b in zip(p1 + bk1 + out1 + vo1, p2 + bk2 + out2 + vo2):
        assert torch.equal(a, b)
    # the values, by hand: backups hold θ0, θ ends at src − 0.5·v
    for b, x0 in zip(bk2, p):
        assert torch.equal(b, x0)
    for x, s_, vv in zip(p2, src, v):
        torch.testing.assert_close(x, s_ - 0.5 * vv, rtol=1e-15, atol=1e-15)
    for o, o0, a, c in zip(out2, gm, gm, gp):
        torch.testing.assert_close(o, o0 + 0.5 * (a - c) / (2 * 0.125), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got[0], sum(((0.2 * x) ** 2).sum() for x in v), rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-13, atol=0)


def test_every_device_is_checked_before_any_launch(monkeypatch):
    """The second device's call is invalid (dtype mismatch): nothing is written on the first."""
    p = [torch.zeros(4), torch.zeros(3)]
    v = [torch.ones(4), torch.ones(3, dtype=torch.float64)]
    with _two_fake_devices(monkeypatch, [p[1]]):
        with pytest.raises(RuntimeError, match=r"perturb_: 'vectors'\[0\] is (Double|float64) but 'params'\[0\] is "
                                               r"(Float|float32).*its tensors 0, 1, ... are positions \[1\]"):
            ops.perturb_(p, v, 1.0)
    assert torch.equal(p[0], torch.zeros(4)), "the first device's tensors were written before the error"


def test_torch_backend_checks_before_writing():
    """The reference path (SAMA_EXT_BACKEND=torch) checks a whole call before its first write,
    with the compiled op's errors."""
    p, v = [torch.zeros(4), torch.zeros(3)], [torch.ones(4), torch.ones(2)]
    with pytest.raises(RuntimeError, match=r"perturb_: 'vectors'\[1\] has shape \[2\] but 'params'\[1\] has shape"):
        ops.perturb_(p, v, 1.0)
    with pytest.raises(RuntimeError, match="same length"):
        ops.perturb_(p, v[:1], 1.0)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.perturb_([torch.zeros(2, dtype=torch.int32)], [torch.zeros(2, dtype=torch.int32)], 1.0)
    with pytest.raises(RuntimeError, match="coupled weight_decay"):
        ops.adam_adapt(v, v, v, v, [], [], p, lr=1e-3, step=1.0, weight_decay=0.1, **ADAM)
    with pytest.raises(ValueError, match="got 1 steps for 2 tensors"):
        ops.adam_adapt(v, v, v, v, [], [], [x.clone() for x in v], lr=1e-3, step=[1.0], **ADAM)
    with pytest.raises(ValueError, match="combine_: eps must be a one-element tensor"):
        ops.combine_(p, p, p, torch.ones(2))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in p)


# ----------------------------------------------------------------------------- checks before launch
def test_unsupported_dtype_pair_in_combine_writes_nothing():
    """out[0] (float32 from float32) is valid, out[1] (float32 from bfloat16) is not: the call
    must fail before the first group runs."""
    out = [torch.zeros(5), torch.zeros(5)]
    gm = [torch.ones(5), torch.ones(5, dtype=torch.bfloat16)]
    gp = [torch.zeros(5), torch.zeros(5, dtype=torch.bfloat16)]
    eps = torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"combine_: 'out'\[1\] is float32 but 'g_minus'\[1\] is bfloat16"):
        ops.combine_(out, gm, gp, eps)
    assert torch.equal(out[0], torch.zeros(5)), "an earlier group was written before the error"


@compiled_only
def test_error_messages_name_the_scalar():
    a = torch.randn(4)
    two = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="perturb_: scale tensor must have one element"):
        torch.ops.sama_ext.perturb_([a], [a], 1.0, two)
    with pytest.raises(RuntimeError, match="combine_: eps tensor must have one element"):
        torch.ops.sama_ext.combine_([a.clone()], [a], [a], two, 1.0, False)
    with pytest.raises(RuntimeError, match="const_adapt: lr tensor must have one element"):
        torch.ops.sama_ext.const_adapt([a], [a.clone()], 1.0, two, 1.0)
    with pytest.raises(RuntimeError, match="adam_adapt: step tensor must be 1-D with 1 entries"):
        torch.ops.sama_ext.adam_adapt([a], [a], [a], [a.abs()], [], [], [a.clone()], 1e-3, None, 1.0, two, 0.9,
                                      0.999, 1e-8, 0.0, False, 0)
    with pytest.raises(RuntimeError, match="adagrad_adapt: per-tensor step has 2 entries but 'd' has 1 tensors"):
        torch.ops.sama_ext.adagrad_adapt([a], [a], [a.abs()], [], [a.clone()], 0.1, None, 1.0, None, 0.0, 1e-10,
                                         0.0, False, 0, [1.0, 2.0])


def test_python_errors_name_the_scalar():
    a = torch.randn(4)
    two = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="perturb_: scale must be a float or a one-element tensor"):
        ops.perturb_([a.clone()], [a], two)
    with pytest.raises(ValueError, match="const_adapt: lr must be a float or a one-element tensor"):
        ops.const_adapt([a], [a.clone()], lr=two, factor=1.0)
    with pytest.raises(ValueError, match=r"adam_adapt: step\[1\] must be a float or a one-element tensor"):
        ops.adam_adapt([a, a], [a, a], [a, a], [a.abs()] * 2, [], [], [a.clone(), a.clone()], lr=1e-3,
                       step=[1.0, two], **ADAM)


# ----------------------------------------------------------------------------- no host sync
_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    """Any read of a tensor's value into Python fails (on a GPU each would be a sync)."""
    with monkeypatch.context() as mp:
        for name in _HOST_READS:
            def fail(self, *a, _name=name, **k):
                raise AssertionError(f"Tensor.{_name} called: a host read of a tensor (a sync on a GPU)")
            mp.setattr(torch.Tensor, name, fail)
        yield


def _all_ops_with_tensor_scalars(dtype=torch.float32, device="cpu"):
    """Every op once, scalars given as tensors on the device, steps per tensor (host floats and
    device tensors), plus Python-float scales."""
    gen = torch.Generator().manual_seed(21)
    shapes = [(5,), (2, 3), (33,)]
    r = lambda: [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]  # noqa: E731
    p, v, g, m = r(), r(), r(), r()
    q = [x.abs() + 0.01 for x in r()]
    out, bk = [torch.empty_like(x) for x in p], [torch.empty_like(x) for x in p]
    t = lambda x: torch.tensor(x, dtype=torch.float64, device=device)  # noqa: E731
    lr, eps, scale = t(1e-3), t(0.25), t(-0.5)
    dev_steps = [torch.tensor(float(k), device=device) for k in (1, 2, 3)]

    def run():
        sums = [
            ops.adam_adapt(v, g, m, q, [], [], out, lr=lr, step=[1.0, 2.0, 7.0], **ADAM),
            ops.adam_adapt(v, g, m, q, q, p, out, lr=lr, step=dev_steps, weight_decay=0.1, **ADAM),
            ops.adam_adapt(v, g, m, q, [], [], out, lr=1e-3, step=[dev_steps[0], 5.0, 5.0], **ADAM),
            ops.adagrad_adapt(v, g, q, [], out, lr=lr, step=[1.0, 3.0, 3.0], lr_decay=0.01, eps=1e-10),
            ops.adagrad_adapt(v, g, q, p, out, lr=lr, step=dev_steps, lr_decay=0.01, eps=1e-10, weight_decay=0.1),
            ops.const_adapt(v, out, lr=lr, factor=2.0),
            ops.rmsprop_adapt(v, g, q, [], [], [], out, lr=lr, alpha=0.9, eps=1e-8),
        ]
        ops.perturb_save_(p, v, bk, scale)
        ops.perturb_(p, v, eps)
        ops.perturb_(p, v, 0.3)
        ops.perturb_from_(p, bk, v, scale)
        ops.perturb_from_(p, bk, v, 0.0)
        ops.combine_(out, g, m, eps, 0.5, accumulate=True)
        return sums

    return run


def test_ops_never_read_tensors_on_the_host(monkeypatch):
    run = _all_ops_with_tensor_scalars()
    want = run()  # sanity: the same calls work without the patch
    with _no_host_reads(monkeypatch):
        got = run()
    assert len(got) == len(want)


def test_reference_never_reads_tensors_on_the_host(monkeypatch):
    """The reference itself (the torch backend), called directly."""
    gen = torch.Generator().manual_seed(22)
    p = [torch.randn(4, generator=gen), torch.randn(3, generator=gen)]
    v = [torch.randn(4, generator=gen), torch.randn(3, generator=gen)]
    q = [x.abs() for x in v]
    out = [torch.empty_like(x) for x in p]
    with _no_host_reads(monkeypatch):
        reference.adam_adapt(v, p, v, q, [], [], out, lr=torch.tensor(1e-3), step=[torch.tensor(2.0), 3.0], **ADAM)
        reference.adagrad_adapt(v, p, q, [], out, lr=0.1, step=[torch.tensor(2.0), 3.0], lr_decay=0.0, eps=1e-10)
        reference.perturb_(p, v, torch.tensor(0.5))
        reference.perturb_(p, v, 0.1)  # a Python float is rounded without a tensor
        reference.combine_(out, p, v, torch.tensor(0.3), 1.0, True)


def test_host_read_guard_catches_a_read(monkeypatch):
    """The guard above is not vacuous."""
    with _no_host_reads(monkeypatch):
        for read in (lambda x: x.item(), float, bool, int, lambda x: x.tolist()):
            with pytest.raises(AssertionError, match="host read"):
                read(torch.tensor(1.0))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
def test_ops_never_synchronise_on_cuda():
    run = _all_ops_with_tensor_scalars(device="cuda")
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA-graph capture)")
def test_per_tensor_host_steps_in_a_cuda_graph():
    """Per-tensor host steps are legal during capture and replay to the eager result."""
    if sama_ext.backend() != "compiled":
        pytest.skip("the torch backend's reference is not written for graph capture")
    d, g, m, q = _adam_case([(300,), (70000,), (5,)], dtype=torch.float32, device="cuda", seed=31)
    steps = [1.0, 10.0, 100.0]
    eager = [torch.empty_like(x) for x in d]
    s_eager = ops.adam_adapt(d, g, m, q, [], [], eager, lr=1e-3, step=steps, **ADAM)
    out = [torch.empty_like(x) for x in d]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.adam_adapt(d, g, m, q, [], [], out, lr=1e-3, step=steps, **ADAM)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s = ops.adam_adapt(d, g, m, q, [], [], out, lr=1e-3, step=steps, **ADAM)
    for o in out:
        o.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, eager):
        assert torch.equal(a, b)
    assert torch.equal(s, s_eager)
