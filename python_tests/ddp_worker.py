"""One rank of a DDP meta-learning run on gloo, launched as a subprocess by test_distributed.py.

Each rank trains a small base MLP (DDP-wrapped) on its own batches, with a DDP-wrapped weight
net as the meta learner, and saves what the parent needs to compare against the single-process
average: the state right before each checked meta step, its per-rank batches, and λ.grad after.
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


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE)
    wnet = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).to(DTYPE)
    return base, wnet


def batch(rank: int, step: int, n: int = 12):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def losses(base_fn, wnet_fn, x, y, xm, ym):
    def base_loss():
        per = F.cross_entropy(base_fn(x), y, reduction="none")
        w = torch.sigmoid(wnet_fn(sama_ext.frozen(per).unsqueeze(1))).squeeze(1)
        return (w * per).sum() / w.sum()

    def meta_loss():
        return F.cross_entropy(base_fn(xm), ym)

    return base_loss, meta_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--base_update", default="restore")
    ap.add_argument("--fail_rank", type=int, default=-1)
    ap.add_argument("--static_graph", action="store_true")
    args = ap.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=20))
    rank = args.rank
    base, wnet = make_models()
    dbase = DDP(base)
    dwnet = DDP(wnet, bucket_cap_mb=0.0005, static_graph=args.static_graph)  # several small buckets
    state = sdist.register_comm_hook(dwnet, compression=None if args.compression == "none" else args.compression)
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    meta_opt = torch.optim.SGD(wnet.parameters(), lr=0.1)
    records = []
    for step in range(args.steps):
        # ordinary base step through the DDP base model (weights from the meta module, no grad)
        x, y = batch(rank, step)
        opt.zero_grad()
        per = F.cross_entropy(dbase(x), y, reduction="none")
        with torch.no_grad():
            w = torch.sigmoid(wnet(per.detach().unsqueeze(1))).squeeze(1)
        ((w * per).sum() / w.sum()).backward()
        opt.step()

        xm, ym = batch(rank, 10_000 + step, n=8)
        snap = {"theta": [p.detach().clone() for p in base.parameters()],
                "grads": [p.grad.detach().clone() for p in base.parameters()],
                "opt": {k: v for k, v in opt.state_dict().items()},
                "lam": [q.detach().clone() for q in wnet.parameters()],
                "x": x, "y": y, "xm": xm, "ym": ym}
        snap["opt"] = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                                   opt.state_dict())
        base_loss, meta_loss = losses(dbase, dwnet, x, y, xm, ym)
        if rank == args.fail_rank and step == args.steps - 1:
            def base_loss():  # noqa: F811 — a closure that fails on this rank only
                raise RuntimeError("injected failure on rank %d" % rank)
        meta_opt.zero_grad()
        before = state.allreduces
        state.record_times, state.events = True, []
        sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters()), base_loss, meta_loss,
                           base_module=dbase, meta_module=dwnet, base_update=args.base_update)
        snap["allreduces"] = state.allreduces - before
        snap["bucket_ids"] = [b for b, _ in state.events]
        state.record_times = False
        snap["lam_grad"] = [q.grad.detach().clone() for q in wnet.parameters()]
        snap["theta_after"] = [p.detach().clone() for p in base.parameters()]
        records.append(snap)
        meta_opt.step()
    # buckets of an ordinary backward through the meta module (for the one-all-reduce-per-bucket check)
    before = state.allreduces
    x, y = batch(rank, 99)
    out = dwnet(x[:, :1])
    out.sum().backward()
    n_buckets = state.allreduces - before
    torch.save({"records": records, "n_buckets": n_buckets,
                "final_theta": [p.detach().clone() for p in base.parameters()],
                "final_lam": [q.detach().clone() for q in wnet.parameters()]},
               os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
