"""One rank of an FSDP2 meta-learning run on gloo, launched as a subprocess by test_fsdp.py.

--mode check: for each config (two nesting layouts of fully_shard × Adam/AdamW/SGD) a fresh
  float64 base MLP sharded with fully_shard and a DDP weight net with SAMA's hook; several
  consecutive rounds of (FSDP base step, meta_step, SGD step of λ), every collective counted from
  outside sama_ext (torch.distributed's functions wrapped here), and everything the parent's
  independent oracle needs saved (full θ, optimiser state and consumed gradient, every rank's
  batches). Then "descend", bad inputs (each must raise before anything changes), and a pass 3
  that fails on every rank (θ, θ.grad, λ.grad as before; the next meta step works).
--mode fail: rank `--fail_rank` raises inside pass 2; the others must give up, not hang.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sama_ext  # noqa: E402
from sama_ext import distributed as sdist  # noqa: E402

DTYPE = torch.float64
ALPHA = 0.5
STEPS = 3
OPTS = {"adam": (torch.optim.Adam, dict(lr=1e-2)),
        "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9))}
# (nesting, optimiser, λ's gradient also flows through the sharded model, fully_shard options)
CONFIGS = {"layers-adamw": ("layers", "adamw", True, {}), "root-adam": ("root", "adam", False, {}),
           "layers-sgd": ("layers", "sgd", False, {}), "root-sgd": ("root", "sgd", True, {}),
           "keep-unsharded": ("layers", "adam", True, {"reshard_after_forward": False}),
           "bf16-compute": ("layers", "adam", True, {"mp_policy": "bf16"}),
           "cpu-offload": ("layers", "adam", True, {"offload_policy": "cpu"}),
           "bf16-params": ("layers", "adamw", True, {"dtype": torch.bfloat16}),
           "fsdp-lambda": ("layers", "adam", True, {"lam": "fsdp"}),
           "fsdp-lambda-root": ("root", "sgd", False, {"lam": "fsdp"}),
           "sama-na": ("root", "adam", True, {"method": "sama_na"}),
           "theta-plus": ("layers", "adam", False, {"frozen_at": "theta_plus"})}
STEP_OPTIONS = ("method", "frozen_at")  # meta_step's, not fully_shard's
EXACT = ("layers-adamw", "root-adam", "layers-sgd", "root-sgd", "keep-unsharded", "cpu-offload", "fsdp-lambda",
         "fsdp-lambda-root", "sama-na", "theta-plus")


def shard_options(opts: dict) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    out = dict(opts)
    if out.get("mp_policy") == "bf16":
        out["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if out.get("offload_policy") == "cpu":
        out["offload_policy"] = CPUOffloadPolicy(pin_memory=False)  # pinning needs a CUDA driver
    return out


class Base(nn.Module):
    """An MLP whose head stays with the root (so the root's FSDP group owns parameters too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.head = nn.Linear(6, 16), nn.Linear(16, 5), nn.Linear(5, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def base_forward(th, x):
    """The same network as a function of the full parameters (for the oracle)."""
    w1, b1, w2, b2, w3, b3 = th
    return torch.tanh(torch.tanh(x @ w1.T + b1) @ w2.T + b2) @ w3.T + b3


class WeightNet(nn.Sequential):
    def __init__(self):
        torch.manual_seed(1)
        super().__init__(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.to(DTYPE)

    def forward(self, c):
        return torch.sigmoid(super().forward(c.to(self[0].weight.dtype).unsqueeze(1))).squeeze(1)  # (c from a bf16 model)


def weight_net(lam, c):
    a, b, u, ub = lam
    return torch.sigmoid(torch.tanh(c[:, None] @ a.T + b) @ u.T + ub).squeeze(1)


def make_base(layout: str, dtype=DTYPE, **kw) -> nn.Module:
    base = Base().to(dtype)
    if layout == "layers":
        fully_shard(base.l1, **kw)
        fully_shard(base.l2, **kw)
    elif layout == "partial":  # θ partly sharded: the root (and its head) left replicated
        fully_shard(base.l1, **kw)
        return base
    fully_shard(base, **kw)
    return base


def batch(rank: int, step: int, n: int = 10):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def losses(base, wnet, x, y, xm, ym, through: bool = False):
    """through: λ's weights also scale the base model's input, so ∂L_base/∂λ is backpropagated
    through the sharded modules (FSDP's backward hooks run in passes 2 and 3)."""
    def base_loss():
        per = F.cross_entropy(base(x), y, reduction="none")
        w = wnet(sama_ext.frozen(per))
        loss = (w * per).sum() / w.sum()
        if through:
            loss = loss + 0.1 * F.cross_entropy(base(x * (1 + 0.1 * w[:, None])), y)
        return loss

    def meta_loss():
        return F.cross_entropy(base(xm), ym) + 0.05 * wnet(xm[:, 0].abs()).mean()

    return base_loss, meta_loss


def full(ts):
    return [t.full_tensor().detach().clone() for t in ts]


def shards(ts):
    """This rank's shards (a plain tensor: itself), copied."""
    with torch.no_grad():
        return [(t.to_local() if hasattr(t, "to_local") else t).detach().clone() for t in ts]


def same_bits(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def base_step(base, wnet, opt, x, y) -> dict:
    """An ordinary FSDP base step; returns what the oracle needs about it."""
    opt.zero_grad()
    per = F.cross_entropy(base(x), y, reduction="none")
    with torch.no_grad():
        w = wnet(per.detach())
    ((w * per).sum() / w.sum()).backward()
    params = list(base.parameters())
    rec = {"theta_pre": full(params), "grads": full([p.grad for p in params]),
           "state_pre": [{k: (v.full_tensor() if hasattr(v, "full_tensor") else v.clone()) if torch.is_tensor(v)
                          else v for k, v in opt.state[p].items()} for p in params]}
    opt.step()
    # where the second moment is exactly 0 after the step (safeguard "zero_unseen": diagonal 0)
    rec["unseen"] = [full([opt.state[p]["exp_avg_sq"]])[0] == 0 if "exp_avg_sq" in opt.state[p] else None
                     for p in params]
    return rec


# ----------------------------------------------------------------------------- counting collectives
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
                "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "reduce", "gather", "scatter",
                "all_to_all", "all_to_all_single", "barrier", "all_reduce_coalesced", "all_gather_coalesced",
                "broadcast_object_list", "all_gather_object", "send", "recv", "isend", "irecv")


class Tally:
    """Collectives seen from outside sama_ext, tagged with the number of closure calls so far."""

    def __init__(self):
        self.calls: list[str] = []
        self.events: list[tuple[int, str]] = []
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue

            def wrapped(*a, _fn=fn, _name=name, **k):
                self.events.append((len(self.calls), _name))
                return _fn(*a, **k)

            setattr(dist, name, wrapped)

    def wrap(self, fn, tag):
        def call():
            self.calls.append(tag)
            return fn()
        return call

    def start(self):
        self.calls, self.events = [], []


def setup(layout: str, opt_name: str, dtype=DTYPE, lam_fsdp: bool = False, **kw):
    """λ's module: DDP with SAMA's hook, or (lam_fsdp) sharded by fully_shard too (first layer + root)."""
    base = make_base(layout, dtype, **kw)
    wnet = WeightNet().to(dtype)
    if lam_fsdp:
        fully_shard(wnet[0])
        fully_shard(wnet)
        dwnet = wnet
    else:
        dwnet = DDP(wnet)
        sdist.register_comm_hook(dwnet)
    cls, hp = OPTS[opt_name]
    opt = cls(base.parameters(), **hp)
    meta_opt = torch.optim.SGD(wnet.parameters(), lr=0.1)
    return base, wnet, dwnet, opt, meta_opt


def run_config(rank: int, layout: str, opt_name: str, through: bool, opts: dict, tally: Tally,
               base_update: str = "restore") -> dict:
    opts = dict(opts)
    dtype = opts.pop("dtype", DTYPE)
    lam_fsdp = opts.pop("lam", None) == "fsdp"
    step_kw = {k: opts.pop(k) for k in STEP_OPTIONS if k in opts}
    base, wnet, dwnet, opt, meta_opt = setup(layout, opt_name, dtype=dtype, lam_fsdp=lam_fsdp, **shard_options(opts))
    params, lam = list(base.parameters()), list(wnet.parameters())
    g = torch.Generator().manual_seed(77)
    if lam_fsdp:  # λ.grad already holds something (the oracle adds it back): from an FSDP backward
        (1e-2 * wnet(torch.randn(7, generator=g, dtype=DTYPE).abs()).sum()).backward()
    else:
        for q in lam:
            q.grad = (1e-2 * torch.randn(q.shape, generator=g, dtype=DTYPE)).to(dtype)
    values = full if lam_fsdp else (lambda ts: [t.detach().clone() for t in ts])
    steps = []
    for step in range(STEPS):
        x, y = batch(rank, step)
        x = x.to(dtype)
        rec = base_step(base, wnet, opt, x, y)
        xm, ym = batch(rank, 10_000 + step, n=8)
        xm = xm.to(dtype)
        rec.update(theta=full(params), lam=values(lam), x=x, y=y, xm=xm, ym=ym,
                   prior=values([q.grad for q in lam]), shards_before=shards(params),
                   shard_shapes=[tuple(t.shape) for t in shards(params)])
        grads_before = [p.grad for p in params]
        grad_bits = shards(grads_before)
        base_loss, meta_loss = losses(base, dwnet, x, y, xm, ym, through)
        tally.start()
        info = sama_ext.meta_step(params, opt, lam, tally.wrap(base_loss, "base"), tally.wrap(meta_loss, "meta"),
                                  alpha=ALPHA, base_module=base, meta_module=dwnet, base_update=base_update,
                                  **step_kw)
        rec.update(calls=list(tally.calls), events=list(tally.events), eps=float(info.eps),
                   skipped=bool(info.skipped), lam_grad=values([q.grad for q in lam]),
                   shards_after=shards(params),
                   grad_same_objects=all(p.grad is g0 for p, g0 in zip(params, grads_before)),
                   grad_same_bits=all(same_bits(a, b) for a, b in zip(shards([p.grad for p in params]), grad_bits)))
        rec["theta_after"] = full(params)
        steps.append(rec)
        meta_opt.step()  # λ moves: the next round starts from another λ
        for q in lam:
            q.grad.mul_(0.5)
    return {"steps": steps, "n_groups": n_groups(base), "n_lam_groups": n_groups(wnet)}


def n_groups(module) -> int:
    """FSDP parameter groups that hold parameters (one reduce-scatter each per backward)."""
    return sum(1 for m in module.modules() if hasattr(m, "_get_fsdp_state")
               and any(pg.fsdp_params for pg in m._get_fsdp_state()._fsdp_param_groups))


def bad_inputs(rank: int) -> dict:
    """Each call must raise before any collective and change nothing; all ranks raise alike."""
    out = {}
    base, wnet, dwnet, opt, _ = setup("layers", "adam")
    params, lam = list(base.parameters()), list(wnet.parameters())
    x, y = batch(rank, 0)
    base_step(base, wnet, opt, x, y)
    xm, ym = batch(rank, 10_000, n=8)
    base_loss, meta_loss = losses(base, dwnet, x, y, xm, ym)
    plain = DDP(WeightNet())  # no SAMA hook
    partial = make_base("partial")
    p_opt = torch.optim.Adam(partial.parameters(), lr=1e-2, foreach=False)
    p_loss = torch.tensor(0.0, dtype=DTYPE, requires_grad=True)
    (F.cross_entropy(partial(x), y) + 0 * p_loss).backward()
    p_opt.step()

    def call(name, fn):
        before = (shards(params), [p.grad for p in params], [None if q.grad is None else q.grad.clone() for q in lam])
        n = len(tally_events)
        try:
            fn()
            out[name] = {"raised": None}
        except (ValueError, RuntimeError, TypeError, NotImplementedError) as e:
            out[name] = {"raised": f"{type(e).__name__}: {e}"}
        out[name]["unchanged"] = (all(same_bits(a, b) for a, b in zip(shards(params), before[0]))
                                  and all(p.grad is g0 for p, g0 in zip(params, before[1]))
                                  and all(same_bits(q.grad, g0) for q, g0 in zip(lam, before[2])))
        out[name]["collectives"] = tally_events[n:]

    tally_events = TALLY.events
    TALLY.start()
    call("subset", lambda: sama_ext.meta_step(params[:4], opt, lam, base_loss, meta_loss, base_module=base,
                                              meta_module=dwnet))
    call("no_hook", lambda: sama_ext.meta_step(params, opt, list(plain.module.parameters()), base_loss, meta_loss,
                                               base_module=base, meta_module=plain))
    call("no_meta_module", lambda: sama_ext.meta_step(params, opt, lam, base_loss, meta_loss, base_module=base))
    call("partial", lambda: sama_ext.meta_step(list(partial.parameters()), p_opt, lam, base_loss, meta_loss,
                                               base_module=partial.l1, meta_module=dwnet))
    call("partial_root", lambda: sama_ext.meta_step(list(partial.parameters()), p_opt, lam, base_loss, meta_loss,
                                                    base_module=partial, meta_module=dwnet))

    def no_grad_sync():
        base.set_requires_gradient_sync(False)
        try:
            sama_ext.meta_step(params, opt, lam, base_loss, meta_loss, base_module=base, meta_module=dwnet)
        finally:
            base.set_requires_gradient_sync(True)

    call("fsdp_no_sync", no_grad_sync)

    def ddp_no_sync():
        with dwnet.no_sync():
            sama_ext.meta_step(params, opt, lam, base_loss, meta_loss, base_module=base, meta_module=dwnet)

    call("ddp_no_sync", ddp_no_sync)
    call("neumann", lambda: sama_ext.meta_step(params, opt, lam, base_loss, meta_loss, base_module=base,
                                               meta_module=dwnet, method="neumann"))
    # an FSDP λ: only part of its parameters; its gradient sync off; with 16-bit θ
    _, fwnet, _, _, _ = setup("root", "sgd", lam_fsdp=True)
    flam = list(fwnet.parameters())
    call("fsdp_lambda_subset", lambda: sama_ext.meta_step(params, opt, flam[:2], base_loss, meta_loss,
                                                          base_module=base, meta_module=fwnet))

    def fsdp_lambda_no_sync():
        fwnet.set_requires_gradient_sync(False)
        try:
            sama_ext.meta_step(params, opt, flam, base_loss, meta_loss, base_module=base, meta_module=fwnet)
        finally:
            fwnet.set_requires_gradient_sync(True)

    call("fsdp_lambda_no_sync", fsdp_lambda_no_sync)
    b16, _, _, o16, _ = setup("root", "adam", dtype=torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    F.cross_entropy(b16(x16), y).backward()
    o16.step()
    call("fsdp_lambda_16bit", lambda: sama_ext.meta_step(list(b16.parameters()), o16, flam, base_loss, meta_loss,
                                                         base_module=b16, meta_module=fwnet))

    def divide_factor():
        base.set_gradient_divide_factor(2.0)
        try:
            sama_ext.meta_step(params, opt, lam, base_loss, meta_loss, base_module=base, meta_module=dwnet)
        finally:
            for m in base.modules():  # back to FSDP's default (the public setter takes a float only)
                if isinstance(m, FSDPModule):
                    for g in m._get_fsdp_state()._fsdp_param_groups:
                        g.gradient_divide_factor = None

    call("divide_factor", divide_factor)
    # after all of these, a correct call works on every rank — also with set_is_last_backward(False)
    # (gradient accumulation), which the meta step overrides for its own backwards and puts back
    base.set_is_last_backward(False)
    call("ok", lambda: sama_ext.meta_step(params, opt, lam, base_loss, meta_loss, base_module=base,
                                          meta_module=dwnet))
    out["ok"]["last_backward_kept"] = base._get_fsdp_state()._state_ctx.is_last_backward is False
    base.set_is_last_backward(True)
    return out


def failing_pass_3(rank: int, lam_fsdp: bool = False) -> dict:
    """Pass 3 fails on every rank (the frozen() check right after it, or its forward): nothing
    changes, FSDP's state is usable, and the next meta step agrees on every rank. With an FSDP λ
    the frozen() check fails after λ's reduce-scatter has written λ.grad."""
    base, wnet, dwnet, opt, _ = setup("layers", "adam", lam_fsdp=lam_fsdp)
    params, lam = list(base.parameters()), list(wnet.parameters())
    out = {}
    for k, how in enumerate(("forward", "frozen")):
        x, y = batch(rank, 40 + k)
        base_step(base, wnet, opt, x, y)
        xm, ym = batch(rank, 10_040 + k, n=8)
        base_loss, meta_loss = losses(base, dwnet, x, y, xm, ym)
        calls = [0]

        def failing(_f=base_loss, _how=how):
            calls[0] += 1
            if calls[0] < 3:
                return _f()
            if _how == "forward":
                raise RuntimeError("injected pass-3 failure")
            per = F.cross_entropy(base(x), y, reduction="none")  # no frozen(): the check after pass 3 raises
            w = dwnet(per.detach())
            return (w * per).sum() / w.sum()

        for q in lam:
            q.grad = torch.full_like(q, 0.25)
        before = (shards(params), [p.grad for p in params], shards([p.grad for p in params]),
                  shards([q.grad for q in lam]), [q.grad for q in lam])
        try:
            sama_ext.meta_step(params, opt, lam, failing, meta_loss, alpha=ALPHA, base_module=base,
                               meta_module=dwnet)
            raised = ""
        except (RuntimeError, ValueError) as e:
            raised = str(e)
        dist.barrier()
        out[how] = {"raised": raised,
                    "theta": all(same_bits(a, b) for a, b in zip(shards(params), before[0])),
                    "theta_grad": all(p.grad is g0 for p, g0 in zip(params, before[1]))
                    and all(same_bits(a, b) for a, b in zip(shards([p.grad for p in params]), before[2])),
                    "lam_grad": all(q.grad is g0 for q, g0 in zip(lam, before[4]))
                    and all(same_bits(a, b) for a, b in zip(shards([q.grad for q in lam]), before[3]))}
    # the model still works: a meta step after the failures succeeds and gives the same λ.grad on all ranks
    for q in lam:
        q.grad = None
    x, y = batch(rank, 50)
    base_step(base, wnet, opt, x, y)
    base_loss, meta_loss = losses(base, dwnet, x, y, *batch(rank, 10_050, n=8))
    info = sama_ext.meta_step(params, opt, lam, base_loss, meta_loss, alpha=ALPHA, base_module=base, meta_module=dwnet)
    out["after"] = {"skipped": bool(info.skipped),
                    "lam_grad": full([q.grad for q in lam]) if lam_fsdp else [q.grad.clone() for q in lam]}
    return out


def nonfinite_on_one_rank(rank: int, lam_fsdp: bool) -> dict:
    """Rank 1's L_base is infinite at θ+εv: every rank must report a skipped step, keep λ.grad's
    values and θ's shards (the DDP all-reduce, or the FSDP λ's finiteness flag, spreads it)."""
    base, wnet, dwnet, opt, _ = setup("layers", "adam", lam_fsdp=lam_fsdp)
    params, lam = list(base.parameters()), list(wnet.parameters())
    x, y = batch(rank, 60)
    base_step(base, wnet, opt, x, y)
    base_loss, meta_loss = losses(base, dwnet, x, y, *batch(rank, 10_060, n=8))
    g = torch.Generator().manual_seed(5)
    if lam_fsdp:
        (1e-2 * wnet(torch.randn(7, generator=g, dtype=DTYPE).abs()).sum()).backward()
    else:
        for q in lam:
            q.grad = torch.randn(q.shape, generator=g, dtype=DTYPE)
    calls = [0]

    def blows_up():
        calls[0] += 1
        loss = base_loss()
        return loss * float("inf") if rank == 1 and calls[0] == 2 else loss

    before, grads = shards(params), shards([q.grad for q in lam])
    info = sama_ext.meta_step(params, opt, lam, blows_up, meta_loss, alpha=ALPHA, base_module=base, meta_module=dwnet)
    return {"skipped": bool(info.skipped), "theta": all(same_bits(a, b) for a, b in zip(shards(params), before)),
            "lam_grad": all(same_bits(a, b) for a, b in zip(shards([q.grad for q in lam]), grads))}


TALLY: Tally | None = None


def check_mode(args) -> None:
    global TALLY
    TALLY = Tally()
    out = {name: run_config(args.rank, *cfg, TALLY) for name, cfg in CONFIGS.items()}
    out["descend"] = run_config(args.rank, "layers", "adam", True, {}, TALLY, base_update="descend")
    out["bad"] = bad_inputs(args.rank)
    out["fail3"] = failing_pass_3(args.rank)
    out["fail3-fsdp-lambda"] = failing_pass_3(args.rank, lam_fsdp=True)
    out["nonfinite"] = {kind: nonfinite_on_one_rank(args.rank, kind == "fsdp") for kind in ("ddp", "fsdp")}
    torch.save(out, os.path.join(args.out, f"rank{args.rank}.pt"))


def peft_mode(args) -> None:
    """A PEFT LoRA Llama (peft_lm) with fully_shard on each decoder layer and the root: base params
    = the adapters only. Two rounds of base step and meta step, recorded for the oracle."""
    import peft_lm

    rank = args.rank
    model = peft_lm.build()
    for layer in peft_lm.layers(model):
        fully_shard(layer)
    fully_shard(model)
    wnet = WeightNet()
    dwnet = DDP(wnet)
    sdist.register_comm_hook(dwnet)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [p for p in model.parameters() if p.requires_grad]
    frozen_params = [p for p in model.parameters() if not p.requires_grad]
    opt = torch.optim.Adam(lora, lr=1e-2)
    lam = list(wnet.parameters())
    steps = []
    for step in range(2):
        x = peft_lm.tokens(rank, step)
        opt.zero_grad()
        per = peft_lm.per_sequence(model, x)
        with torch.no_grad():
            w = wnet(per.detach())
        ((w * per).sum() / w.sum()).backward()
        rec = {"theta_pre": full(lora), "grads": full([p.grad for p in lora]),
               "state_pre": [{k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
                              for k, v in opt.state[p].items()} for p in lora]}
        opt.step()
        rec["unseen"] = [full([opt.state[p]["exp_avg_sq"]])[0] == 0 for p in lora]
        xm = peft_lm.tokens(rank, 1000 + step)
        for q in lam:
            q.grad = torch.full_like(q, 0.01 * (step + 1))
        rec.update(names=names, theta=full(lora), lam=[q.detach().clone() for q in lam], x=x, xm=xm,
                   prior=[q.grad.clone() for q in lam], shards_before=shards(lora), frozen_before=shards(frozen_params))
        base_loss, meta_loss = peft_lm.losses(model, dwnet, x, xm, sama_ext.frozen)
        sama_ext.meta_step(lora, opt, lam, base_loss, meta_loss, alpha=ALPHA, base_module=model, meta_module=dwnet)
        rec.update(lam_grad=[q.grad.clone() for q in lam], shards_after=shards(lora),
                   frozen_same=all(same_bits(a, b) for a, b in zip(shards(frozen_params), rec["frozen_before"])))
        del rec["frozen_before"]
        steps.append(rec)
    torch.save(steps, os.path.join(args.out, f"rank{rank}.pt"))


def fail_mode(args) -> None:
    """Rank fail_rank raises inside pass 2 (its θ is restored); the other ranks wait in a collective
    that never comes and must give up at the process group's timeout."""
    base, wnet, dwnet, opt, _ = setup("layers", "adam")
    params, lam = list(base.parameters()), list(wnet.parameters())
    x, y = batch(args.rank, 0)
    base_step(base, wnet, opt, x, y)
    base_loss, meta_loss = losses(base, dwnet, x, y, *batch(args.rank, 10_000, n=8))
    calls = [0]

    def failing():
        calls[0] += 1
        if args.rank == args.fail_rank and calls[0] == 2:
            raise RuntimeError(f"injected failure on rank {args.rank}")
        return base_loss()

    before = shards(params)
    try:
        sama_ext.meta_step(params, opt, lam, failing, meta_loss, base_module=base, meta_module=dwnet)
    except RuntimeError:
        restored = all(same_bits(a, b) for a, b in zip(shards(params), before))
        print(f"theta restored: {restored}", file=sys.stderr)
        raise


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="check", choices=("check", "fail", "peft"))
    ap.add_argument("--fail_rank", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=20))
    {"check": check_mode, "fail": fail_mode, "peft": peft_mode}[args.mode](args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
