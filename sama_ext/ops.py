"""The fused kernels as Python functions: thin wrappers over `torch.ops.sama_ext.*`
(compiled backend) or `sama_ext.reference` (torch backend), same arguments either way.

Scalars such as lr, steps, scale and ε may be Python floats or tensors. A tensor on the
tensors' device is read on the device (never `.item()`), so nothing here synchronises with the
GPU; a CPU tensor given with GPU tensors is host memory and is read on the host. Per-tensor
steps known on the host (floats) travel as host values into the kernels' per-tensor
constants — no device copy, so they are legal during CUDA-graph capture; tensors with different
host steps go to different launch groups (one per distinct value). Steps on the device
(capturable or fused Adam) are gathered with one `torch.stack`.

Tensors may be spread over several devices (a model split over GPUs): the lists are split by
the device of the first list's tensors, every device's call is checked before any of them
runs, each device gets one call (its own launches), and the sums of squares returned by the
adapt ops are added in the order in which the devices first appear, on the first tensor's
device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import reference
from ._backend import backend, check_device, compiled

__all__ = ["adam_adapt", "const_adapt", "rmsprop_adapt", "adagrad_adapt", "perturb_", "perturb_from_",
           "perturb_save_", "perturb_from_measured_", "perturb_save_measured_", "combine_"]


def _compiled() -> bool:
    return backend() == "compiled"


def _device_of(t: Tensor):
    """What tensors are grouped by: the device index (-1 on the CPU), 3x cheaper to read than
    `t.device` with hundreds of tensors per call. Tensors of two device types with the same
    index meet in one call, where the op's own device check rejects them with a clear error.
    (A test replaces this function to fake a second device.)"""
    return t.get_device()


def _by_device(op: str, lists: dict, optional: Sequence[str] = ()) -> list[tuple[object, list[int], dict]]:
    """Splits an op's per-tensor lists by the device of the first list's tensors.

    `lists` maps argument names to lists with one entry per tensor (the first one decides the
    device); the names in `optional` may also be empty lists (a variant switched off). Returns
    [(device key, positions in the lists, {name: sub-list})], devices in order of first
    appearance. List mismatches raise RuntimeError, as the compiled ops' own checks do."""
    names = list(lists)
    main_name, main = names[0], list(lists[names[0]])
    if not main:
        raise RuntimeError(f"sama_ext.{op}: '{main_name}' is an empty list; pass at least one tensor")
    for name in names[1:]:
        n = len(lists[name])
        if n != len(main) and not (n == 0 and name in optional):
            raise RuntimeError(f"sama_ext.{op}: '{name}' has {n} entries but '{main_name}' has {len(main)}; "
                               "all lists must have the same length")
    try:
        keys = {_device_of(t) for t in main}  # one device, the common case: no index lists
    except AttributeError:
        keys = None
    if keys is not None and len(keys) == 1:
        (key,) = keys
        return [(key, list(range(len(main))), {name: list(lists[name]) for name in names})]
    index: dict = {}
    for i, t in enumerate(main):
        if not isinstance(t, Tensor):
            raise TypeError(f"sama_ext.{op}: '{main_name}'[{i}] is {type(t).__name__}, expected a Tensor")
        index.setdefault(_device_of(t), []).append(i)
    return [(key, idx, {name: [lists[name][i] for i in idx] if len(lists[name]) else [] for name in names})
            for key, idx in index.items()]


def _device_of_group(sub: dict):
    """The real device of a group (its first list's first tensor)."""
    return next(iter(sub.values()))[0].device


def _sum_in_order(parts: list[Tensor]) -> Tensor:
    """Per-device partial sums, added in a fixed order on the first one's device."""
    total = parts[0]
    for p in parts[1:]:
        total = total + (p if p.device == total.device else p.to(total.device))
    return total


def _check_all(groups, check: Callable[[int, dict], None]) -> None:
    """Runs check(i, group) for every group; with several devices an error also says which
    positions of the given lists its indices (counted within one device's call) refer to."""
    for i, (_, idx, sub) in enumerate(groups):
        try:
            check(i, sub)
        except (RuntimeError, ValueError, TypeError) as e:
            if len(groups) == 1:
                raise
            raise type(e)(f"{e} [in the call for the tensors on {_device_of_group(sub)}: its tensors 0, 1, ... are "
                          f"positions {idx} of the lists given]") from e


def _run(op: str, groups: list[tuple[object, list[int], dict]], op_args: Callable[[dict], tuple],
         ref_call: Callable[[Callable, dict], Tensor | None], reduce: bool):
    """One call per device group: every group's arguments are prepared and checked before the
    first launch, so an invalid input never leaves another device's tensors half updated.
    `ref_call(fn, group)` calls fn with the reference's arguments (fn: the reference op, or its
    check_<op>)."""
    if not _compiled():
        _check_all(groups, lambda i, sub: ref_call(getattr(reference, "check_" + op), sub))
        parts = [ref_call(getattr(reference, op), sub) for _, _, sub in groups]
        return _sum_in_order(parts) if reduce else None
    for _, _, sub in groups:
        check_device(_device_of_group(sub))
    calls = [op_args(sub) for _, _, sub in groups]
    # Under torch.compile the wrappers are traced on fake tensors, which cannot be checked here:
    # each op then checks its own call when the graph runs.
    if len(calls) > 1 and not torch.compiler.is_compiling():
        check = getattr(compiled().module, "check_" + op)
        _check_all(groups, lambda i, sub: check(*calls[i]))
    fn = getattr(torch.ops.sama_ext, op)
    parts = [fn(*args) for args in calls]
    return _sum_in_order(parts) if reduce else None


def _scalar(op: str, name: str, x, device) -> tuple[float, Tensor | None]:
    """(host factor, optional device tensor) for a float-or-tensor scalar on `device`."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"sama_ext.{op}: {name} must be a float or a one-element tensor, got shape "
                             f"{tuple(x.shape)}")
        if x.device == device:
            return 1.0, x
        if x.device.type == "cpu":
            return float(x), None  # host memory: reading it waits for no device
        return 1.0, x.to(device)
    return float(x), None


def _steps(op: str, step, n: int, device) -> tuple[float, Tensor | None, list[float]]:
    """Adam/Adagrad steps for n tensors on `device`: (host value, device steps of shape [n] or
    None, per-tensor host values or []). `step` is one float or tensor, or one per tensor."""
    if not isinstance(step, (list, tuple)):
        v, t = _scalar(op, "step", step, device)
        return v, (None if t is None else t.reshape(1).expand(n)), []
    if len(step) != n:
        raise ValueError(f"sama_ext.{op}: got {len(step)} steps for {n} tensors")
    host: list[float] = []
    on_device: list[Tensor | None] = []
    for i, s in enumerate(step):
        if isinstance(s, Tensor):
            if s.device == device and s.dim() == 0:  # the common case (capturable Adam), kept cheap
                host.append(1.0)
                on_device.append(s)
                continue
            v, t = _scalar(op, f"step[{i}]", s, device)
            host.append(v)
            on_device.append(None if t is None else t.reshape(()))
        else:
            host.append(float(s))
            on_device.append(None)
    stacked = None
    first = next((t for t in on_device if t is not None), None)
    if first is not None:  # one stack (and one cast in the op) for all device steps
        one = torch.ones((), dtype=first.dtype, device=device) if any(t is None for t in on_device) else None
        stacked = torch.stack([one if t is None else t for t in on_device])
    if all(h == host[0] for h in host):
        return host[0], stacked, []
    return 1.0, stacked, host


def adam_adapt(d, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, params, out, *, lr, step, beta1, beta2, eps,
               weight_decay=0.0, maximize=False, safeguard=0) -> Tensor:
    """out = s·du/dg·d for Adam/AdamW (post-step state); returns Σ out² as a float64 device scalar.
    `max_exp_avg_sq` is empty unless AMSGrad; `params` is needed only for coupled weight decay.
    `step`: one float or tensor, or one per tensor (floats, or 0-dim tensors on the device)."""
    lists = dict(d=d, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq,
                 params=params, out=out)
    if isinstance(step, (list, tuple)):
        if len(step) != len(d):
            raise ValueError(f"sama_ext.adam_adapt: got {len(step)} steps for {len(d)} tensors")
        lists["step"] = step
    groups = _by_device("adam_adapt", lists, optional=("max_exp_avg_sq", "params"))

    def op_args(g):
        dev = _device_of_group(g)
        lr_v, lr_t = _scalar("adam_adapt", "lr", lr, dev)
        st_v, st_t, st_host = _steps("adam_adapt", g.get("step", step), len(g["d"]), dev)
        return (g["d"], g["grads"], g["exp_avg"], g["exp_avg_sq"], g["max_exp_avg_sq"], g["params"], g["out"],
                lr_v, lr_t, st_v, st_t, float(beta1), float(beta2), float(eps), float(weight_decay),
                bool(maximize), int(safeguard), st_host)

    def ref_call(fn, g):
        return fn(g["d"], g["grads"], g["exp_avg"], g["exp_avg_sq"], g["max_exp_avg_sq"],
                  g["params"], g["out"], lr=lr, step=g.get("step", step), beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, maximize=maximize, safeguard=safeguard)

    return _run("adam_adapt", groups, op_args, ref_call, reduce=True)


def const_adapt(d, out, *, lr, factor) -> Tensor:
    """out = lr·factor·d; returns Σ out²."""
    groups = _by_device("const_adapt", dict(d=d, out=out))

    def op_args(g):
        lr_v, lr_t = _scalar("const_adapt", "lr", lr, _device_of_group(g))
        return g["d"], g["out"], lr_v, lr_t, float(factor)

    return _run("const_adapt", groups, op_args,
                lambda fn, g: fn(g["d"], g["out"], lr=lr, factor=factor), reduce=True)


def rmsprop_adapt(d, grads, square_avg, grad_avg, params, momentum_buffer, out, *, lr, alpha, eps,
                  weight_decay=0.0, maximize=False, safeguard=0) -> Tensor:
    """out = s·du/dg·d for RMSprop (`grad_avg` empty unless centered; `params` and, with momentum,
    `momentum_buffer` needed only for coupled weight decay); returns Σ out²."""
    groups = _by_device("rmsprop_adapt", dict(d=d, grads=grads, square_avg=square_avg, grad_avg=grad_avg,
                                              params=params, momentum_buffer=momentum_buffer, out=out),
                        optional=("grad_avg", "params", "momentum_buffer"))

    def op_args(g):
        lr_v, lr_t = _scalar("rmsprop_adapt", "lr", lr, _device_of_group(g))
        return (g["d"], g["grads"], g["square_avg"], g["grad_avg"], g["params"], g["momentum_buffer"], g["out"],
                lr_v, lr_t, float(alpha), float(eps), float(weight_decay), bool(maximize), int(safeguard))

    def ref_call(fn, g):
        return fn(g["d"], g["grads"], g["square_avg"], g["grad_avg"], g["params"], g["momentum_buffer"], g["out"],
                  lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, maximize=maximize, safeguard=safeguard)

    return _run("rmsprop_adapt", groups, op_args, ref_call, reduce=True)


def adagrad_adapt(d, grads, state_sum, params, out, *, lr, step, lr_decay, eps, weight_decay=0.0,
                  maximize=False, safeguard=0) -> Tensor:
    """out = s·du/dg·d for Adagrad; returns Σ out². `step` as for adam_adapt."""
    lists = dict(d=d, grads=grads, state_sum=state_sum, params=params, out=out)
    if isinstance(step, (list, tuple)):
        if len(step) != len(d):
            raise ValueError(f"sama_ext.adagrad_adapt: got {len(step)} steps for {len(d)} tensors")
        lists["step"] = step
    groups = _by_device("adagrad_adapt", lists, optional=("params",))

    def op_args(g):
        dev = _device_of_group(g)
        lr_v, lr_t = _scalar("adagrad_adapt", "lr", lr, dev)
        st_v, st_t, st_host = _steps("adagrad_adapt", g.get("step", step), len(g["d"]), dev)
        return (g["d"], g["grads"], g["state_sum"], g["params"], g["out"], lr_v, lr_t, st_v, st_t,
                float(lr_decay), float(eps), float(weight_decay), bool(maximize), int(safeguard), st_host)

    def ref_call(fn, g):
        return fn(g["d"], g["grads"], g["state_sum"], g["params"], g["out"], lr=lr, step=g.get("step", step),
                  lr_decay=lr_decay, eps=eps, weight_decay=weight_decay, maximize=maximize, safeguard=safeguard)

    return _run("adagrad_adapt", groups, op_args, ref_call, reduce=True)


def perturb_(params: Sequence[Tensor], vectors: Sequence[Tensor], scale) -> None:
    """θ += scale·v in place, one rounding; `scale` a float or a one-element tensor (read on the
    device). A zero scale leaves θ exactly as it was, even where v is not finite."""
    if len(params) == 0:
        return
    groups = _by_device("perturb_", dict(params=params, vectors=vectors))

    def op_args(g):
        return (g["params"], g["vectors"], *_scalar("perturb_", "scale", scale, _device_of_group(g)))

    _run("perturb_", groups, op_args, lambda fn, g: fn(g["params"], g["vectors"], scale), reduce=False)


def perturb_from_(params, sources, vectors, scale) -> None:
    """θ = source + scale·v (one rounding from the source)."""
    if len(params) == 0:
        return
    groups = _by_device("perturb_from_", dict(params=params, sources=sources, vectors=vectors))

    def op_args(g):
        return (g["params"], g["sources"], g["vectors"], *_scalar("perturb_from_", "scale", scale,
                                                                   _device_of_group(g)))

    _run("perturb_from_", groups, op_args,
         lambda fn, g: fn(g["params"], g["sources"], g["vectors"], scale), reduce=False)


def perturb_save_(params, vectors, backups, scale) -> None:
    """backup = θ, then θ += scale·v, in one pass."""
    if len(params) == 0:
        return
    groups = _by_device("perturb_save_", dict(params=params, vectors=vectors, backups=backups))

    def op_args(g):
        return (g["params"], g["vectors"], g["backups"], *_scalar("perturb_save_", "scale", scale,
                                                                   _device_of_group(g)))

    _run("perturb_save_", groups, op_args,
         lambda fn, g: fn(g["params"], g["vectors"], g["backups"], scale), reduce=False)


def _measured_result(total: Tensor) -> tuple[Tensor, Tensor]:
    return total[0], total[1].to(torch.int64)


def _seed_arg(x) -> int:
    """A 64-bit seed or offset as the schema's signed int (same bits)."""
    x = int(x) & (2**64 - 1)
    return x - 2**64 if x >= 2**63 else x


def perturb_from_measured_(params, sources, vectors, scale, *, stochastic: bool = False, seed: int = 0,
                           offset: int = 0) -> tuple[Tensor, Tensor]:
    """θ = source + scale·v as `perturb_from_`, and from the same pass (issue 18) the realized
    perturbation: (Σ (θ − source)·v over the elements that changed, float64; how many changed,
    int64), 0-dim tensors on the first tensor's device. `stochastic`: bfloat16/float16 θ is
    rounded stochastically, E[θ] = source + scale·v, with a counter-based generator keyed by
    (seed, offset, the tensor's index in the lists — per device when the lists span devices —,
    the element's index in the tensor): the same bits on every backend and launch geometry.
    float32/float64 θ rounds to nearest either way. A zero scale leaves θ as it is."""
    groups = _by_device("perturb_from_measured_", dict(params=params, sources=sources, vectors=vectors))
    st, sd, off = bool(stochastic), _seed_arg(seed), _seed_arg(offset)

    def op_args(g):
        return (g["params"], g["sources"], g["vectors"],
                *_scalar("perturb_from_measured_", "scale", scale, _device_of_group(g)), st, sd, off)

    return _measured_result(_run("perturb_from_measured_", groups, op_args,
                                 lambda fn, g: fn(g["params"], g["sources"], g["vectors"], scale, st, sd, off),
                                 reduce=True))


def perturb_save_measured_(params, vectors, backups, scale, *, stochastic: bool = False, seed: int = 0,
                           offset: int = 0) -> tuple[Tensor, Tensor]:
    """backup = θ, then θ += scale·v (as `perturb_save_`), measured and rounded as
    `perturb_from_measured_` (against the backup)."""
    groups = _by_device("perturb_save_measured_", dict(params=params, vectors=vectors, backups=backups))
    st, sd, off = bool(stochastic), _seed_arg(seed), _seed_arg(offset)

    def op_args(g):
        return (g["params"], g["vectors"], g["backups"],
                *_scalar("perturb_save_measured_", "scale", scale, _device_of_group(g)), st, sd, off)

    return _measured_result(_run("perturb_save_measured_", groups, op_args,
                                 lambda fn, g: fn(g["params"], g["vectors"], g["backups"], scale, st, sd, off),
                                 reduce=True))


def combine_(out, g_minus, g_plus, eps: Tensor, scale: float = 1.0, accumulate: bool = False) -> None:
    """out (+)= scale·(g⁻ − g⁺)/(2ε); a zero or non-finite ε (a skipped step) contributes nothing.
    `eps` is a one-element tensor (copied to each device it is not on)."""
    if len(out) == 0:
        return
    if not isinstance(eps, Tensor) or eps.numel() != 1:
        raise ValueError(f"sama_ext.combine_: eps must be a one-element tensor, got "
                         f"{tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__}")
    groups = _by_device("combine_", dict(out=out, g_minus=g_minus, g_plus=g_plus))

    def op_args(g):
        dev = _device_of_group(g)
        return (g["out"], g["g_minus"], g["g_plus"], eps if eps.device == dev else eps.to(dev), float(scale),
                bool(accumulate))

    _run("combine_", groups, op_args,
         lambda fn, g: fn(g["out"], g["g_minus"], g["g_plus"], eps, scale, accumulate), reduce=False)
