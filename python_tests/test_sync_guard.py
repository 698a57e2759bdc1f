""""meta_step, adapt and the ops never synchronise with the GPU" (README, DESIGN §4), checked on
a CPU with sync_guard.no_host_reads: representative configurations of every entry point run
under the guard, which raises on any device->host read (see sync_guard.py for what counts as
a device tensor on a CPU-only machine). test_meta_step.py runs all of its meta_step/adapt calls
under the same guard (conftest.guard_syncs); this file adds the configurations it does not
cover (backends, every optimiser, tensor lr, theta_plus, the skip path, the ops one by one) and
checks that the guard itself catches each kind of read."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sama_ext
from sama_ext import _backend, ops
from sync_guard import HostSyncError, host_tensors_of, no_host_reads


# ----------------------------------------------------------------------------- the guard itself
READS = {
    "item": lambda t: t.sum().item(),
    "bool": lambda t: bool(t.sum() > 0),
    "float": lambda t: float(t.sum()),
    "int": lambda t: int(t.sum()),
    "index": lambda t: [0, 1, 2][(t.sum() > 0).long()],
    "format": lambda t: f"{t.sum():.3f}",
    "if": lambda t: 1 if t.sum() > 0 else 0,
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "np.asarray": lambda t: np.asarray(t),
    "repr": lambda t: repr(t),
    "nonzero": lambda t: t.nonzero(),
    "mask": lambda t: t[t > 0],
    "masked_select": lambda t: torch.masked_select(t, t > 0),
    "equal": lambda t: torch.equal(t, t),
    "allclose": lambda t: torch.allclose(t, t),
    "isfinite(all)": lambda t: bool(torch.isfinite(t).all()),
    "unique": lambda t: torch.unique(t),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_guard_catches_each_kind_of_read(read):
    x = torch.randn(5)
    with pytest.raises(HostSyncError):
        with no_host_reads():
            READS[read](x * 2)  # a computed tensor
    READS[read](x * 2)  # and the read itself is fine outside the guard (tensor methods restored)


def test_guard_allows_host_tensors_and_what_is_computed_from_them():
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    p.grad = torch.ones(3)
    opt.step()
    host = host_tensors_of(opt)
    step = opt.state[p]["step"]
    assert any(t is step for t in host) and any(t is opt.param_groups[0]["lr"] for t in host)
    with no_host_reads(host):
        assert float(step) == 1.0 and float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)
        assert int(step + 1) == 2  # a CPU op on a host tensor gives a host tensor
        with pytest.raises(HostSyncError):
            float(opt.state[p]["exp_avg"].sum())  # optimiser buffers live with θ
        with pytest.raises(HostSyncError):
            float(step * p.detach().sum())  # mixed with a device tensor: a device tensor


def test_guard_sees_backward_and_nesting_restores():
    w = torch.randn(4, requires_grad=True)

    class ReadInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            return g * float(g.sum())  # a host read in the backward pass

    with pytest.raises(HostSyncError):
        with no_host_reads():
            ReadInBackward.apply(w).sum().backward()
    assert isinstance(repr(w), str) and w.tolist()  # patches undone after an exception


# ----------------------------------------------------------------------------- meta_step under the guard
def _problem(opt_name: str, seed: int = 0, lr_tensor: bool = False):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    wnet = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    lr = torch.tensor(0.01) if lr_tensor else 0.01
    opt = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=lr),
        "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=lr, amsgrad=True, weight_decay=0.1),
        "adam_coupled_wd": lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=0.01),
        "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3),
        "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
        "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=lr, centered=True, momentum=0.5),
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.01),
    }[opt_name](list(base.parameters()))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    xm, ym = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def base_loss():
        per = F.cross_entropy(base(x), y, reduction="none")
        w = torch.sigmoid(wnet(sama_ext.frozen(per).unsqueeze(1))).squeeze(1)
        return (w * per).mean()

    def meta_loss():
        return F.cross_entropy(base(xm), ym)

    for _ in range(3):
        opt.zero_grad()
        base_loss().backward()
        opt.step()
    for q in wnet.parameters():
        q.grad = None
    return list(base.parameters()), opt, list(wnet.parameters()), base_loss, meta_loss


CONFIGS = {
    "adam": ("adam", {}),
    "adam/none-safeguard/descend": ("adam", dict(safeguard="none", base_update="descend")),
    "adam/theta_plus": ("adam", dict(frozen_at="theta_plus")),
    "adamw_amsgrad": ("adamw_amsgrad", {}),
    "adam_coupled_wd/tensor-lr": ("adam_coupled_wd", dict(_lr_tensor=True)),
    "sgd_dampening": ("sgd_dampening", {}),
    "sgd_nesterov/sama_na": ("sgd_nesterov", dict(method="sama_na")),
    "rmsprop_centered": ("rmsprop_centered", {}),
    "adagrad": ("adagrad", {}),
    "adam/neumann": ("adam", dict(method="neumann", iterations=2)),
    "adam/cg": ("adam", dict(method="cg", iterations=2)),
    "adam/skipped (zero v)": ("adam", dict(_zero_meta=True)),
}


@pytest.fixture(params=["compiled", "torch"])
def either_backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(_backend, "_choice", "torch")  # the reference kernels, op by op
    elif sama_ext.backend() != "compiled":
        pytest.skip("SAMA_EXT_BACKEND=torch for the whole run")
    assert sama_ext.backend() == request.param
    return request.param


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_meta_step_never_reads_device_values(config, either_backend):
    opt_name, kw = CONFIGS[config]
    kw = dict(kw)
    theta, opt, lam, base_loss, meta_loss = _problem(opt_name, lr_tensor=kw.pop("_lr_tensor", False))
    if kw.pop("_zero_meta", False):
        meta_loss = (lambda f: lambda: 0.0 * f())(meta_loss)  # ‖v‖ = 0: the skip path
    with no_host_reads(host_tensors_of(opt), "meta_step"):
        info = sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, alpha=0.5, **kw)
    # (and it did its work: outside the guard, reading is allowed)
    assert bool(info.skipped) == (config == "adam/skipped (zero v)")
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in lam)


@pytest.mark.parametrize("opt_name", ["adam", "adamw_amsgrad", "sgd_dampening", "rmsprop_centered", "adagrad"])
def test_adapt_never_reads_device_values(opt_name, either_backend):
    theta, opt, _, _, meta_loss = _problem(opt_name)
    d = torch.autograd.grad(meta_loss(), theta)
    with no_host_reads(host_tensors_of(opt), "adapt"):
        v, norm = sama_ext.adapt(opt, theta, d, safeguard="zero_unseen")
        sama_ext.perturb_(theta, v, 1e-3 / norm)
    assert float(norm) > 0


def test_ops_never_read_device_scalars(either_backend):
    """Every op, with its scalars (lr, step, ε) given as device tensors: nothing is host here."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7,), (3, 5), ()]

    def r():
        return [torch.randn(s, generator=g) for s in shapes]

    d, grads, m, th, out = r(), r(), r(), r(), r()
    q = [t.abs() + 0.1 for t in r()]
    lr, eps = torch.tensor(0.01), torch.tensor(0.3, dtype=torch.float64)
    steps = [torch.tensor(3.0), torch.tensor(4.0), torch.tensor(5.0)]
    with no_host_reads((), "ops"):
        ops.adam_adapt(d, grads, m, q, [], th, out, lr=lr, step=steps, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.01, safeguard=1)
        ops.adam_adapt(d, grads, m, q, q, [], out, lr=0.01, step=[3.0, 4.0, 5.0], beta1=0.9, beta2=0.999,
                       eps=1e-8, maximize=True)
        ops.const_adapt(d, out, lr=lr, factor=0.5)
        ops.rmsprop_adapt(d, grads, q, m, [], [], out, lr=lr, alpha=0.99, eps=1e-8, safeguard=1)
        ops.adagrad_adapt(d, grads, q, [], out, lr=lr, step=steps, lr_decay=0.01, eps=1e-10)
        backup = [torch.empty_like(t) for t in th]
        ops.perturb_save_(th, out, backup, eps)
        ops.perturb_from_(th, backup, out, -eps)
        ops.perturb_(th, out, eps)
        ops.combine_(out, d, grads, eps, 0.5, True)
