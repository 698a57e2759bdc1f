"""Distributed SAMA data reweighting with torchrun — the same script on CPUs (gloo) and GPUs (NCCL).

    torchrun --nproc_per_node=2 examples/ddp_reweighting.py            # CPU here, GPUs elsewhere
    torchrun --nproc_per_node=2 examples/ddp_reweighting.py --quick

Each rank trains a DDP-wrapped classifier on its shard of a synthetic task with 50% label noise;
a DDP-wrapped weight net learns per-sample weights from the per-sample loss (through
`sama_ext.frozen`). `sama_ext.meta_step(..., base_module=, meta_module=)` runs two local passes and
one communicating backward whose hook all-reduces the meta-gradient bucket by bucket.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import sama_ext
from sama_ext import distributed as sdist


def make_data(n: int, noise: float, seed: int):
    """Gaussian blobs in 20-D, 5 classes; `noise` of the training labels replaced by another class."""
    centers = torch.randn(5, 20, generator=torch.Generator().manual_seed(12345)) * 0.6  # one task for all splits
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = centers[y] + torch.randn(n, 20, generator=g) * 1.5
    flip = torch.rand(n, generator=g) < noise
    noisy = torch.where(flip, (y + torch.randint(1, 5, (n,), generator=g)) % 5, y)
    return x, y, noisy, flip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--quick", action="store_true", help="a few steps, for smoke tests")
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--compression", choices=["none", "bf16", "fp16"], default="none")
    args = ap.parse_args()
    steps = 20 if args.quick else args.steps

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    # same data everywhere (seed 0), each rank trains on its own shard; a small clean meta set
    x, y, noisy, flip = make_data(4000, args.noise, seed=0)
    xt, yt, _, _ = make_data(2000, 0.0, seed=1)
    xm, ym, _, _ = make_data(100, 0.0, seed=2)
    shard = slice(rank, None, world)
    x, noisy = x[shard].to(device), noisy[shard].to(device)
    xm, ym, xt, yt = xm.to(device), ym.to(device), xt.to(device), yt.to(device)

    torch.manual_seed(0)  # identical initial weights on every rank
    net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 5)).to(device)
    wnet = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    dnet, dwnet = DDP(net), DDP(wnet)
    comm = sdist.register_comm_hook(dwnet, compression=None if args.compression == "none" else args.compression)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    meta_opt = torch.optim.Adam(wnet.parameters(), lr=1e-3)

    gen = torch.Generator(device="cpu").manual_seed(100 + rank)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen).to(device)
        xb, yb = x[idx], noisy[idx]

        def base_loss():
            per = F.cross_entropy(dnet(xb), yb, reduction="none")
            w = torch.sigmoid(dwnet(sama_ext.frozen(per).unsqueeze(1))).squeeze(1)
            return (w * per).sum() / w.sum()

        # base step: weights from the meta learner, held fixed (no gradient into it)
        opt.zero_grad()
        per = F.cross_entropy(dnet(xb), yb, reduction="none")
        with torch.no_grad():
            w = torch.sigmoid(wnet(per.detach().unsqueeze(1))).squeeze(1)
        ((w * per).sum() / w.sum()).backward()
        opt.step()

        # meta step: two local passes, one communicating backward through dwnet
        meta_opt.zero_grad()
        sama_ext.meta_step(list(net.parameters()), opt, list(wnet.parameters()), base_loss,
                           lambda: F.cross_entropy(dnet(xm), ym), base_module=dnet, meta_module=dwnet)
        meta_opt.step()

        if rank == 0 and (step + 1) % max(1, steps // 5) == 0:
            with torch.no_grad():
                acc = (net(xt).argmax(1) == yt).float().mean().item()
            print(f"step {step + 1:4d}  test accuracy {acc:.3f}  all-reduces so far {comm.allreduces}  "
                  f"bytes {comm.bytes_sent:,}", flush=True)
    # the meta step keeps ranks bit-identical
    for p in list(net.parameters()) + list(wnet.parameters()):
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        assert torch.equal(ref, p.detach()), "ranks diverged"
    if rank == 0:
        print(f"done: {world} ranks on {device.type}, parameters identical on every rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
