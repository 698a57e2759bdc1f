"""Pure-PyTorch reference of every fused kernel: the oracle in tests, the baseline in
benchmarks, and the `torch` backend (SAMA_EXT_BACKEND=torch).

Written the way a user would write it — eager, per tensor, fp32 math over 16-bit storage —
and kept independent of the C++ functors (same formulas, separate code). Signatures mirror
`sama_ext.ops`; scalars may be Python floats or tensors (never read on the host). The kernels
themselves do not check their inputs (they are also the eager baseline of the benchmarks):
`check_<op>`, with the same arguments, does, and sama_ext.ops calls it for every device before
running anything.
"""
from __future__ import annotations

import math
import struct
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["adam_adapt", "const_adapt", "rmsprop_adapt", "adagrad_adapt", "perturb_", "perturb_from_",
           "perturb_save_", "perturb_from_measured_", "perturb_save_measured_", "combine_", "rounding_draws",
           "round_stochastic"]

SAFEGUARDS = {"none": 0, "zero_unseen": 1}


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(op: str, ins: list[tuple[str, Sequence]], outs: list[tuple[str, Sequence]], mixed_out: bool = False,
           steps=None) -> None:
    """The torch backend's checks (the compiled ops make the same ones in C++): equal lengths;
    per tensor, one device and one shape in every list, one supported dtype for the inputs and
    the same for the outputs — or, for combine (`mixed_out`), float32/float64 inputs written
    into bfloat16/float16."""
    name0, main = ins[0]
    if len(main) == 0:
        raise RuntimeError(f"sama_ext.{op}: '{name0}' is an empty list; pass at least one tensor")
    for name, l in ins + outs:
        if len(l) != len(main):
            raise RuntimeError(f"sama_ext.{op}: '{name}' has {len(l)} tensors but '{name0}' has {len(main)}; "
                               "all lists must have the same length")
    if isinstance(steps, (list, tuple)) and len(steps) != len(main):
        raise ValueError(f"sama_ext.{op}: got {len(steps)} steps for {len(main)} tensors")
    for t, ref in enumerate(main):
        for kind, group in (("in", ins), ("out", outs)):
            for name, l in group:
                x = l[t]
                if not isinstance(x, Tensor):
                    raise TypeError(f"sama_ext.{op}: '{name}'[{t}] is {type(x).__name__}, expected a Tensor")
                if x.device != ref.device:
                    raise RuntimeError(f"sama_ext.{op}: '{name}'[{t}] is on {x.device} but '{name0}'[{t}] is on "
                                       f"{ref.device}; a tensor's lists must share a device")
                if x.shape != ref.shape:
                    raise RuntimeError(f"sama_ext.{op}: '{name}'[{t}] has shape {list(x.shape)} but '{name0}'[{t}] "
                                       f"has shape {list(ref.shape)}")
                if x.dtype not in _DTYPES:
                    raise RuntimeError(f"sama_ext.{op}: unsupported dtype {x.dtype} in '{name}'[{t}] (supported: "
                                       "float32, float64, bfloat16, float16)")
                same = x.dtype == ref.dtype
                if kind == "out" and not same and mixed_out:
                    same = ref.dtype in (torch.float32, torch.float64) and x.dtype in (torch.bfloat16, torch.float16)
                if not same:
                    raise RuntimeError(f"sama_ext.{op}: '{name}'[{t}] is {_name(x.dtype)} but '{name0}'[{t}] is "
                                       f"{_name(ref.dtype)}: unsupported dtype combination")


def _one(op: str, name: str, x) -> None:
    if isinstance(x, Tensor) and x.numel() != 1:
        raise ValueError(f"sama_ext.{op}: {name} must be a float or a one-element tensor, got shape {tuple(x.shape)}")


def _one_or_each(op: str, step) -> None:
    for i, s in enumerate(step) if isinstance(step, (list, tuple)) else [(None, step)]:
        _one(op, "step" if i is None else f"step[{i}]", s)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _needs_params(op: str, weight_decay, params) -> None:
    if weight_decay and len(params) == 0:
        raise RuntimeError(f"sama_ext.{op}: coupled weight_decay={weight_decay} needs the params list "
                           "(θ enters the gradient the optimiser used)")


def _opt(name: str, l: Sequence, on: bool = True) -> list:
    return [(name, l)] if on and len(l) else []


def _math(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _scalar(x, like: Tensor):
    """A Python float stays one; a tensor moves to the math dtype/device (no host read), except a
    CPU tensor given with tensors elsewhere: host memory, read as a float (as sama_ext.ops does)."""
    if isinstance(x, Tensor):
        if x.device.type == "cpu" and like.device.type != "cpu":
            return float(x)
        return x.to(device=like.device, dtype=like.dtype)
    return float(x)


def _sumsq(vs: Sequence[Tensor], device) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for v in vs:
        total = total + v.double().square().sum().to(device)
    return total


def _finish(vs, out) -> Tensor:
    for v, o in zip(vs, out):
        o.copy_(v)
    return _sumsq(vs, out[0].device)


def _ge(g, theta_pre, weight_decay, sign):
    """The gradient the optimiser used: s·g + wd·θ_pre (coupled decay)."""
    ge = sign * _math(g)
    return ge if weight_decay == 0 else ge + weight_decay * theta_pre


def adam_adapt(d, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, params, out, *, lr, step, beta1, beta2, eps,
               weight_decay=0.0, maximize=False, safeguard=0) -> Tensor:
    """v = s·du/dg_e·d for Adam/AdamW from the post-step state; returns Σv² (float64).
    Coupled decay: θ_pre = θ + lr·(m/bc1)/D, the step undone."""
    sign = -1.0 if maximize else 1.0
    amsgrad = len(max_exp_avg_sq) > 0
    steps = step if isinstance(step, (list, tuple)) else [step] * len(d)
    vs = []
    for i, di in enumerate(d):
        dm = _math(di)
        t = _scalar(steps[i], dm)
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        lr_i = _scalar(lr, dm)
        m = _math(exp_avg[i])
        q = _math(exp_avg_sq[i])
        qu = _math(max_exp_avg_sq[i]) if amsgrad else q
        h = qu.sqrt() / (bc2 ** 0.5 if not isinstance(bc2, Tensor) else bc2.sqrt())
        D = h + eps
        theta_pre = _math(params[i]) + lr_i * (m / bc1) / D if weight_decay else None
        ge = _ge(grads[i], theta_pre, weight_decay, sign)
        curved = h > 0
        if amsgrad:
            curved = curved & (q == qu)
        safe_h = torch.where(curved, h, torch.ones_like(h))
        second = torch.where(curved, (m / bc1 / D) * ((1 - beta2) / bc2 * ge / safe_h / D), torch.zeros_like(h))
        diag = lr_i * ((1 - beta1) / bc1 / D - second)
        # step 1: zero pre-step moments, the bracket is eps/D² exactly (see functors.h AdamDiag)
        first = torch.as_tensor(t == 1, device=dm.device) & (q == qu if amsgrad else True)
        diag = torch.where(first, lr_i * eps / (D * D), diag)
        if safeguard == SAFEGUARDS["zero_unseen"]:
            diag = torch.where(qu == 0, torch.zeros_like(diag), diag)
        vs.append(sign * diag * dm)
    return _finish(vs, out)


def const_adapt(d, out, *, lr, factor) -> Tensor:
    """v = lr·factor·d (SGD's diagonal is a constant)."""
    vs = [_scalar(lr, _math(di)) * factor * _math(di) for di in d]
    return _finish(vs, out)


def _undo_plain_step(theta, g, D, lr, wd, sign):
    """θ_pre from θ = θ_pre − lr·(s·g + wd·θ_pre)/D."""
    return (_math(theta) + lr * sign * _math(g) / D) / (1 - lr * wd / D)


def rmsprop_adapt(d, grads, square_avg, grad_avg, params, momentum_buffer, out, *, lr, alpha, eps,
                  weight_decay=0.0, maximize=False, safeguard=0) -> Tensor:
    sign = -1.0 if maximize else 1.0
    centered = len(grad_avg) > 0
    vs = []
    for i, di in enumerate(d):
        dm = _math(di)
        lr_i = _scalar(lr, dm)
        S = _math(square_avg[i])
        G = _math(grad_avg[i]) if centered else torch.zeros_like(S)
        R = (S - G * G).sqrt() if centered else S.sqrt()
        D = R + eps
        theta_pre = None
        if weight_decay:
            theta_pre = (_math(params[i]) + lr_i * _math(momentum_buffer[i]) if len(momentum_buffer)
                         else _undo_plain_step(params[i], grads[i], D, lr_i, weight_decay, sign))
        ge = _ge(grads[i], theta_pre, weight_decay, sign)
        safe_R = torch.where(R > 0, R, torch.ones_like(R))
        second = torch.where(R > 0, (ge / D) * ((1 - alpha) * (ge - G) / safe_R / D), torch.zeros_like(R))
        diag = lr_i * (1 / D - second)
        if safeguard == SAFEGUARDS["zero_unseen"]:
            diag = torch.where(S == 0, torch.zeros_like(diag), diag)
        vs.append(sign * diag * dm)
    return _finish(vs, out)


def adagrad_adapt(d, grads, state_sum, params, out, *, lr, step, lr_decay, eps, weight_decay=0.0,
                  maximize=False, safeguard=0) -> Tensor:
    sign = -1.0 if maximize else 1.0
    steps = step if isinstance(step, (list, tuple)) else [step] * len(d)
    vs = []
    for i, di in enumerate(d):
        dm = _math(di)
        t = _scalar(steps[i], dm)
        clr = _scalar(lr, dm) / (1 + (t - 1) * lr_decay)
        R = _math(state_sum[i]).sqrt()
        D = R + eps
        theta_pre = _undo_plain_step(params[i], grads[i], D, clr, weight_decay, sign) if weight_decay else None
        ge = _ge(grads[i], theta_pre, weight_decay, sign)
        safe_R = torch.where(R > 0, R, torch.ones_like(R))
        sum_pre = _math(state_sum[i]) - ge * ge  # Σ − g_e², g_e² rounded on its own (see functors.h AdagradDiag)
        diag = torch.where(R > 0, clr * ((sum_pre + eps * R) / (safe_R * D)) / D, clr / D)
        if safeguard == SAFEGUARDS["zero_unseen"]:
            diag = torch.where(R == 0, torch.zeros_like(diag), diag)
        vs.append(sign * diag * dm)
    return _finish(vs, out)


def _round_host(s: float, dtype: torch.dtype) -> float:
    """A Python float rounded to float32 as a C cast does (nearest even, inf past the range),
    without making a tensor of it."""
    if dtype == torch.float64:
        return s
    try:
        return struct.unpack("f", struct.pack("f", s))[0]
    except OverflowError:
        return math.copysign(math.inf, s)


def _axpy(x: Tensor, v: Tensor, scale) -> Tensor:
    """x + scale·v rounded once to x's dtype (as the fused kernel's fma): the scale is taken in the
    math dtype, the product and sum in float64 (exact for float32 operands up to one final rounding)."""
    xm = _math(x)
    s = _scalar(scale, xm)
    if isinstance(s, Tensor):
        y = (xm.double() + s.double() * _math(v).double()).to(xm.dtype)
        return torch.where(s == 0, xm, y)  # zero scale leaves x as it is, even where v is not finite
    if s == 0:
        return xm
    s = _round_host(s, xm.dtype)
    return (xm.double() + s * _math(v).double()).to(xm.dtype)


def perturb_(params, vectors, scale) -> None:
    """θ += scale·v (scale == 0: θ untouched)."""
    with torch.no_grad():
        for p, v in zip(params, vectors):
            p.copy_(_axpy(p, v, scale))


def perturb_from_(params, sources, vectors, scale) -> None:
    """θ = source + scale·v."""
    with torch.no_grad():
        for p, s, v in zip(params, sources, vectors):
            p.copy_(_axpy(s, v, scale))


def perturb_save_(params, vectors, backups, scale) -> None:
    """backup = θ; θ += scale·v."""
    with torch.no_grad():
        for p, v, b in zip(params, vectors, backups):
            b.copy_(p)
            p.copy_(_axpy(b, v, scale))


# ----------------------------------------------------------------------------- measured perturbations
# The same steps as csrc/core/stochastic_round.h, in int64 tensors holding 32-bit words (a 32×32
# product is formed from 16-bit halves so that nothing overflows int64).
_M32 = 0xFFFFFFFF


def _mulhilo(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    lo_part = m * (x & 0xFFFF)      # < 2^48
    t = m * (x >> 16) + (lo_part >> 16)  # < 2^49: the product is t·2^16 + (lo_part & 0xFFFF)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def _philox_word(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> Tensor:
    """Philox4x32-10, first output word (Salmon et al., SC'11)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0


def rounding_draws(seed: int, offset: int, tensor: int, numel: int, device=None) -> Tensor:
    """The 32-bit draws (as int64) of elements 0..numel-1 of tensor `tensor` for (seed, offset)."""
    seed, offset = int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    full = lambda v: torch.full_like(idx, v)  # noqa: E731
    return _philox_word(idx & _M32, idx >> 32, full(int(tensor) & _M32), full(offset & _M32),
                        seed & _M32, (seed >> 32) & _M32)


_FORMAT16 = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}


def round_stochastic(y: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 y rounded stochastically to bfloat16/float16 with 32-bit draws u (int64):
    sign(y)·(n + [u < f·2^32])·2^q, |y|·2^-q = n + f, q the exponent of the target's ulp at |y|."""
    mant, emin = _FORMAT16[dtype]
    bits = y.view(torch.int64)
    e = ((bits >> 52) & 0x7FF) - 1023
    q = torch.clamp(e, min=emin) - mant
    s = y.abs() * torch.ldexp(torch.ones_like(y), -q)
    n = torch.floor(s)
    up = (u.double() < (s - n) * 4294967296.0).double()
    r = (n + up) * torch.ldexp(torch.ones_like(y), q)
    r = torch.where(bits < 0, -r, r)
    r = torch.where(torch.isfinite(y), r, y)  # inf, NaN: as round-to-nearest
    return r.to(dtype)


def _measured(params, sources, vectors, scale, stochastic: bool, seed: int, offset: int, backups=None) -> Tensor:
    """θ = source + scale·v (rounded as csrc/core/functors.h PerturbMeasured); returns
    [Σ (θ − source)·v over the elements that moved, #moved] as float64."""
    dev = params[0].device
    dot = torch.zeros((), dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        for t, (p, src, v) in enumerate(zip(params, sources, vectors)):
            if backups is not None:
                backups[t].copy_(p)
                src = backups[t]
            new = _axpy(src, v, scale).to(p.dtype)
            if stochastic and p.dtype in _FORMAT16:
                a = _scalar(scale, _math(src))
                a = torch.as_tensor(_round_host(a, torch.float32) if not isinstance(a, Tensor) else a,
                                    dtype=torch.float32, device=dev).double()
                y = src.double() + a * v.float().double()
                u = rounding_draws(seed, offset, t, src.numel(), dev).reshape(src.shape)
                sr = round_stochastic(y, u, p.dtype)
                new = torch.where(a == 0, new, sr)
            diff = new.double() - src.double()
            moved = diff != 0
            dot = dot + torch.where(moved, diff * _math(v).double(), 0.0).sum().to(dev)
            count = count + moved.sum().to(dev)
            p.copy_(new)
    return torch.stack([dot, count])


def perturb_from_measured_(params, sources, vectors, scale, stochastic: bool = False, seed: int = 0,
                           offset: int = 0) -> Tensor:
    """θ = source + scale·v, measured (see `_measured`)."""
    return _measured(params, sources, vectors, scale, stochastic, seed, offset)


def perturb_save_measured_(params, vectors, backups, scale, stochastic: bool = False, seed: int = 0,
                           offset: int = 0) -> Tensor:
    """backup = θ; θ += scale·v, measured against the backup."""
    return _measured(params, params, vectors, scale, stochastic, seed, offset, backups=backups)


def combine_(out, g_minus, g_plus, eps: Tensor, scale: float = 1.0, accumulate: bool = False) -> None:
    """out (+)= scale·(g⁻ − g⁺)/(2ε); ε zero or non-finite contributes nothing."""
    with torch.no_grad():
        for o, gm, gp in zip(out, g_minus, g_plus):
            m = _math(gm)
            e = eps.to(device=m.device, dtype=torch.float64)
            ok = (e != 0) & torch.isfinite(e)
            c = torch.where(ok, scale / (2 * e), torch.zeros_like(e)).to(m.dtype)
            delta = torch.where(ok, c * (m - _math(gp)), torch.zeros_like(m))
            o.copy_(_math(o) + delta if accumulate else delta)


# ----------------------------------------------------------------------------- checks
# check_<op>(same arguments as <op>): raises what the compiled op would raise for bad lists,
# writes nothing.
def check_adam_adapt(d, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, params, out, *, lr, step, weight_decay=0.0,
                     **_) -> None:
    _one("adam_adapt", "lr", lr)
    _one_or_each("adam_adapt", step)
    _needs_params("adam_adapt", weight_decay, params)
    _check("adam_adapt", [("d", d), ("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
           + _opt("max_exp_avg_sq", max_exp_avg_sq) + _opt("params", params, bool(weight_decay)), [("out", out)],
           steps=step)


def check_const_adapt(d, out, *, lr, **_) -> None:
    _one("const_adapt", "lr", lr)
    _check("const_adapt", [("d", d)], [("out", out)])


def check_rmsprop_adapt(d, grads, square_avg, grad_avg, params, momentum_buffer, out, *, lr, weight_decay=0.0,
                        **_) -> None:
    _one("rmsprop_adapt", "lr", lr)
    _needs_params("rmsprop_adapt", weight_decay, params)
    _check("rmsprop_adapt", [("d", d), ("grads", grads), ("square_avg", square_avg)] + _opt("grad_avg", grad_avg)
           + _opt("params", params, bool(weight_decay))
           + _opt("momentum_buffer", momentum_buffer, bool(weight_decay)), [("out", out)])


def check_adagrad_adapt(d, grads, state_sum, params, out, *, lr, step, weight_decay=0.0, **_) -> None:
    _one("adagrad_adapt", "lr", lr)
    _one_or_each("adagrad_adapt", step)
    _needs_params("adagrad_adapt", weight_decay, params)
    _check("adagrad_adapt", [("d", d), ("grads", grads), ("state_sum", state_sum)]
           + _opt("params", params, bool(weight_decay)), [("out", out)], steps=step)


def check_perturb_(params, vectors, scale) -> None:
    _one("perturb_", "scale", scale)
    _check("perturb_", [("params", params), ("vectors", vectors)], [("params", params)])


def check_perturb_from_(params, sources, vectors, scale) -> None:
    _one("perturb_from_", "scale", scale)
    _check("perturb_from_", [("sources", sources), ("vectors", vectors)], [("params", params)])


def check_perturb_save_(params, vectors, backups, scale) -> None:
    _one("perturb_save_", "scale", scale)
    _check("perturb_save_", [("params", params), ("vectors", vectors)], [("params", params), ("backups", backups)])


def check_perturb_from_measured_(params, sources, vectors, scale, *_, **__) -> None:
    _one("perturb_from_measured_", "scale", scale)
    _check("perturb_from_measured_", [("sources", sources), ("vectors", vectors)], [("params", params)])


def check_perturb_save_measured_(params, vectors, backups, scale, *_, **__) -> None:
    _one("perturb_save_measured_", "scale", scale)
    _check("perturb_save_measured_", [("params", params), ("vectors", vectors)],
           [("params", params), ("backups", backups)])


def check_combine_(out, g_minus, g_plus, eps, scale=1.0, accumulate=False) -> None:
    _one("combine_", "eps", eps)
    _check("combine_", [("g_minus", g_minus), ("g_plus", g_plus)], [("out", out)], mixed_out=True)
