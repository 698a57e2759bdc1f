"""One rank of a DDP meta-learning run on gloo, launched as a subprocess by test_distributed.py.

Two modes:

--mode check (the default): for each case (gradient_as_bucket_view off and on, bf16 compression)
  a fresh DDP base MLP (Adam) and a DDP weight net `LayoutNet` whose parameters have every layout
  a user can give DDP: a transposed weight, a channels_last conv weight, a parameter whose
  gradient autograd returns expanded (stride 0), a float32 parameter next to float64 ones (DDP
  buckets per dtype), all split over several small buckets. Each case runs two meta steps (the
  first before DDP rebuilds its buckets, the second after) with λ.grad already set, a meta loss
  that depends on λ directly, and every collective counted from outside (torch.distributed's
  functions wrapped here, plus the process group's sequence number, which also counts DDP's own
  C++ collectives); then three meta steps that fail in or right after pass 3 (in its forward; in
  the frozen() consistency check after it; in its backward, after some buckets were written).
  It saves what the parent's independent oracle needs.
--mode train: a plain loop of base and meta steps (many steps with "descend", a rank that fails)
  for the tests of behaviour across steps.
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
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sama_ext  # noqa: E402
from sama_ext import distributed as sdist  # noqa: E402

DTYPE = torch.float64
ALPHA = 0.5
LR = 1e-2
BUCKET_CAP_MB = 200 / 2**20  # 200 bytes: several buckets, several params in some of them
CASES = {"plain": dict(gradient_as_bucket_view=False, compression=None),
         "bucket_view": dict(gradient_as_bucket_view=True, compression=None),
         "bf16": dict(gradient_as_bucket_view=False, compression="bf16")}


class LayoutNet(nn.Module):
    """Per-sample weights from a per-sample loss c (and a float32 side term).

    Parameters, in order: A (2, 8) stored transposed; b (8,); K (3, 2, 2, 2) conv weight in
    channels_last; kb (3,); s (3,) used through s.sum() (autograd returns its gradient expanded);
    u (3,); B (2, 4) float32 stored transposed. B only enters `side`, so the float64 parameters'
    gradients carry no float32 rounding."""

    def __init__(self, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def r(*shape, dtype=DTYPE, scale=0.5):
            return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

        self.A = nn.Parameter(r(8, 2).t())
        self.b = nn.Parameter(r(8, scale=0.1))
        self.K = nn.Parameter(r(3, 2, 2, 2).contiguous(memory_format=torch.channels_last))
        self.kb = nn.Parameter(r(3, scale=0.1))
        self.s = nn.Parameter(r(3, scale=0.3))
        self.u = nn.Parameter(r(3))
        self.B = nn.Parameter(r(4, 2, dtype=torch.float32).t())

    def forward(self, c):
        feat = torch.stack([c, c * c / 4], 1)
        h1 = torch.tanh(feat @ self.A + self.b)
        h2 = torch.tanh(F.conv2d(h1.reshape(-1, 2, 2, 2), self.K, self.kb)).flatten(1)
        h2 = h2 * (1 + 0.1 * self.s.sum())
        w = torch.sigmoid(h2 @ self.u)
        side = torch.sigmoid(feat.float() @ self.B).mean(1)
        return w, side


def check_layouts(wnet: LayoutNet) -> None:
    """The layouts this test is about really are there."""
    assert not wnet.A.is_contiguous() and wnet.A.stride() == (1, 2)
    assert wnet.K.is_contiguous(memory_format=torch.channels_last) and not wnet.K.is_contiguous()
    assert not wnet.B.is_contiguous() and wnet.B.dtype == torch.float32


def make_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE)


def batch(rank: int, step: int, n: int = 12):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def losses(base_fn, wnet_fn, x, y, xm, ym, stop=sama_ext.frozen):
    """base_loss: weighted loss with the weights of a frozen per-sample loss, plus a float32
    side term; meta_loss: validation loss plus a term in λ itself (λ's direct gradient)."""
    def base_loss():
        per = F.cross_entropy(base_fn(x), y, reduction="none")
        w, side = wnet_fn(stop(per))
        return (w * per).sum() / w.sum() + (per.float() * side).mean().double()

    def meta_loss():
        w, _ = wnet_fn(xm[:, 0].abs())
        return F.cross_entropy(base_fn(xm), ym) + 0.05 * w.mean()

    return base_loss, meta_loss


def base_step(dbase, wnet, opt, x, y) -> dict:
    """An ordinary DDP base step; returns what the oracle needs about it (the state before it,
    the gradient it consumed)."""
    base = dbase.module
    opt.zero_grad()
    per = F.cross_entropy(dbase(x), y, reduction="none")
    with torch.no_grad():
        w, _ = wnet(per.detach())
    ((w * per).sum() / w.sum()).backward()
    rec = {"theta_pre": [p.detach().clone() for p in base.parameters()],
           "state_pre": [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                         for p in base.parameters()],
           "grads": [p.grad.detach().clone() for p in base.parameters()]}
    opt.step()
    return rec


# ----------------------------------------------------------------------------- counting collectives
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
                "barrier", "all_reduce_coalesced", "broadcast_object_list", "all_gather_object", "send", "recv",
                "isend", "irecv", "batch_isend_irecv")


class Tally:
    """Collectives seen from outside sama_ext, tagged with the number of closure calls so far."""

    def __init__(self):
        self.calls: list[str] = []     # "meta" / "base", in call order
        self.seq_at_call: list[int] = []
        self.sync_at_call: list[tuple[bool, ...]] = []  # each DDP module's reducer armed for this forward?
        self.modules: tuple = ()
        self.events: list[tuple[int, str]] = []
        self.pg = dist.distributed_c10d._get_default_group()

    def seq(self) -> int:
        return self.pg._get_sequence_number_for_group()

    def install(self) -> None:
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
            self.seq_at_call.append(self.seq())
            self.sync_at_call.append(tuple(bool(m.require_backward_grad_sync) for m in self.modules))
            return fn()
        return call

    def start(self):
        self.calls, self.seq_at_call, self.sync_at_call, self.events = [], [], [], []
        return self.seq()


def run_case(rank: int, name: str, cfg: dict, tally: Tally) -> dict:
    base = make_base()
    wnet = LayoutNet()
    check_layouts(wnet)
    dbase = DDP(base)
    dwnet = DDP(wnet, bucket_cap_mb=BUCKET_CAP_MB, gradient_as_bucket_view=cfg["gradient_as_bucket_view"])
    state = sdist.register_comm_hook(dwnet, compression=cfg["compression"])
    check_layouts(wnet)  # DDP kept them
    opt = torch.optim.Adam(base.parameters(), lr=LR)
    lam = list(wnet.parameters())
    out = {"steps": [], "bucket_sizes": dwnet._get_ddp_logging_data()["bucket_sizes"]}

    def meta(step: int, prior_from: str) -> dict:
        x, y = batch(rank, step)
        rec = base_step(dbase, wnet, opt, x, y)
        xm, ym = batch(rank, 10_000 + step, n=8)
        rec.update(theta=[p.detach().clone() for p in base.parameters()], lam=[q.detach().clone() for q in lam],
                   x=x, y=y, xm=xm, ym=ym, prior=[q.grad.detach().clone() for q in lam], prior_from=prior_from)
        base_loss, meta_loss = losses(dbase, dwnet, x, y, xm, ym)
        seq0 = tally.start()
        tally.modules = (dbase, dwnet)
        sama_ext.meta_step(list(base.parameters()), opt, lam, tally.wrap(base_loss, "base"),
                           tally.wrap(meta_loss, "meta"), alpha=ALPHA, base_module=dbase, meta_module=dwnet)
        rec.update(seq_start=seq0, seq_end=tally.seq(), calls=list(tally.calls), seq_at_call=list(tally.seq_at_call),
                   sync_at_call=list(tally.sync_at_call),
                   events=list(tally.events), lam_grad=[q.grad.detach().clone() for q in lam],
                   lam_grad_strides=[q.grad.stride() for q in lam],
                   theta_after=[p.detach().clone() for p in base.parameters()])
        return rec

    # DDP rebuilds a module's buckets in the first forward after its first synchronised backward,
    # with collectives of its own: let the base module's happen here, outside the counted steps
    for step in (-2, -1):
        base_step(dbase, wnet, opt, *batch(rank, step))
    # 1. before the meta module's first synchronised backward: its initial buckets; λ.grad set by hand
    g = torch.Generator().manual_seed(77)
    for q in lam:
        q.grad = (1e-2 * torch.randn(q.shape, generator=g, dtype=torch.float64)).to(q.dtype)  # ~ the meta part
    out["steps"].append(meta(0, "hand"))
    # an ordinary backward of the meta module: DDP rebuilds its buckets here (in the forward),
    # and λ.grad becomes DDP's averaged gradient (with gradient_as_bucket_view, views into buckets)
    for q in lam:
        q.grad = None
    w, side = dwnet(batch(rank, 500)[0][:, 0].abs())
    (1e-2 * (w.sum() + side.sum().double())).backward()
    # 2. the rebuilt buckets; λ.grad from DDP's backward
    out["steps"].append(meta(1, "ddp"))
    log = dwnet._get_ddp_logging_data()
    out["rebuilt_bucket_sizes"] = log["rebuilt_bucket_sizes"]
    out["rebuilt_per_bucket_param_indices"] = log["rebuilt_per_bucket_param_indices"]

    # 3a. rank 1's L_base is not finite at θ+εv: the all-reduce spreads that to every rank, and every
    # rank must skip the step (λ.grad's bits as before, θ restored) without another collective
    x, y = batch(rank, 30)
    base_step(dbase, wnet, opt, x, y)
    xm, ym = batch(rank, 10_030, n=8)
    base_loss, meta_loss = losses(dbase, dwnet, x, y, xm, ym)
    calls = [0]

    def blows_up(_f=base_loss):
        calls[0] += 1
        loss = _f()
        return loss * float("inf") if rank == 1 and calls[0] == 2 else loss

    g = torch.Generator().manual_seed(78)
    for q in lam:
        q.grad = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.dtype)
    bits_before = [q.grad.detach().clone() for q in lam]
    theta_before = [p.detach().clone() for p in base.parameters()]
    info = sama_ext.meta_step(list(base.parameters()), opt, lam, blows_up, meta_loss, alpha=ALPHA,
                              base_module=dbase, meta_module=dwnet)
    out["nonfinite"] = {"skipped": bool(info.skipped),
                        "same_bits": all(same_bits(q.grad, b) for q, b in zip(lam, bits_before)),
                        "theta_restored": all(same_bits(p, t) for p, t in zip(base.parameters(), theta_before))}

    # 3. pass 3 fails: λ.grad must be the same tensors with the same bits, θ restored
    for how in ("forward", "frozen", "backward"):  # last: an aborted backward leaves DDP unusable
        x, y = batch(rank, 20 + len(how))
        base_step(dbase, wnet, opt, x, y)
        xm, ym = batch(rank, 10_020, n=8)
        base_loss, meta_loss = losses(dbase, dwnet, x, y, xm, ym)
        # the same loss without its frozen() call: pass 3 succeeds, the consistency check after it raises
        unfrozen = losses(dbase, dwnet, x, y, xm, ym, stop=torch.Tensor.detach)[0]
        grads_before = [q.grad for q in lam]
        bits_before = [q.grad.detach().clone() for q in lam]
        theta_before = [p.detach().clone() for p in base.parameters()]
        seen = {"calls": 0, "clobbered": False}

        def raise_in_backward(_grad):
            # by now the buckets of the params nearer the output were written with g⁻: with
            # gradient_as_bucket_view those are the old λ.grad tensors themselves
            seen["clobbered"] = not all(same_bits(g, b) for g, b in zip(grads_before, bits_before))
            raise RuntimeError("injected pass-3 failure (backward)")

        def failing(_f=base_loss, _how=how):
            seen["calls"] += 1
            if seen["calls"] < 3:  # frozen() record at θ, pass 2
                return _f()
            if _how == "forward":
                raise RuntimeError("injected pass-3 failure (forward)")
            if _how == "frozen":
                return unfrozen()
            seen["handle"] = wnet.kb.register_hook(raise_in_backward)
            return _f()

        try:
            sama_ext.meta_step(list(base.parameters()), opt, lam, failing, meta_loss, alpha=ALPHA,
                               base_module=dbase, meta_module=dwnet)
            raised = ""
        except RuntimeError as e:
            raised = str(e)
        if "handle" in seen:
            seen.pop("handle").remove()
        # the aborted backward may leave bucket all-reduces in flight (every rank started the same
        # ones); gloo's barrier waits for all earlier work, so none is pending at teardown
        dist.barrier()
        out[f"fail_{how}"] = {
            "raised": raised, "calls": seen["calls"], "clobbered": seen["clobbered"],
            "same_objects": all(q.grad is g0 for q, g0 in zip(lam, grads_before)),
            "same_bits": all(same_bits(q.grad, b) for q, b in zip(lam, bits_before)),
            "theta_restored": all(same_bits(p, t) for p, t in zip(base.parameters(), theta_before)),
            "hook_disarmed": not state.armed,
        }
    return out


def same_bits(a, b) -> bool:
    if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def check_mode(args) -> None:
    tally = Tally()
    tally.install()
    cases = {name: run_case(args.rank, name, cfg, tally) for name, cfg in CASES.items()}
    torch.save(cases, os.path.join(args.out, f"rank{args.rank}.pt"))


# ----------------------------------------------------------------------------- train mode
class WeightNet(nn.Sequential):
    def __init__(self):
        torch.manual_seed(1)
        super().__init__(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        self.to(DTYPE)

    def forward(self, c):
        w = torch.sigmoid(super().forward(c.unsqueeze(1))).squeeze(1)
        return w, None


def train_mode(args) -> None:
    rank = args.rank
    base, wnet = make_base(), WeightNet()
    dbase = DDP(base)
    dwnet = DDP(wnet, bucket_cap_mb=0.0005)
    sdist.register_comm_hook(dwnet)
    opt = torch.optim.Adam(base.parameters(), lr=LR)
    meta_opt = torch.optim.SGD(wnet.parameters(), lr=0.1)
    first_theta = None
    for step in range(args.steps):
        x, y = batch(rank, step)
        base_step(dbase, wnet, opt, x, y)
        if first_theta is None:
            first_theta = [p.detach().clone() for p in base.parameters()]
        xm, ym = batch(rank, 10_000 + step, n=8)

        def base_loss():
            per = F.cross_entropy(dbase(x), y, reduction="none")
            w, _ = dwnet(sama_ext.frozen(per))
            return (w * per).sum() / w.sum()

        def meta_loss():
            return F.cross_entropy(dbase(xm), ym)

        if rank == args.fail_rank and step == args.steps - 1:
            def base_loss():  # noqa: F811 — a closure that fails on this rank only
                raise RuntimeError("injected failure on rank %d" % rank)
        meta_opt.zero_grad()
        sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters()), base_loss, meta_loss,
                           base_module=dbase, meta_module=dwnet, base_update=args.base_update)
        meta_opt.step()
    torch.save({"first_theta": first_theta, "final_theta": [p.detach().clone() for p in base.parameters()],
                "final_lam": [q.detach().clone() for q in wnet.parameters()]},
               os.path.join(args.out, f"rank{rank}.pt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="check", choices=("check", "train"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--base_update", default="restore")
    ap.add_argument("--fail_rank", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=20))
    (check_mode if args.mode == "check" else train_mode)(args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
