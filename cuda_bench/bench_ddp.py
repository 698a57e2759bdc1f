"""When does each bucket's all-reduce start in a distributed meta step? (overlap, shown not asserted)

    PYTHONPATH=. python cuda_bench/bench_ddp.py [--world 2] [--quick] [--out bench_results]

Spawns `--world` gloo ranks on loopback (NCCL on GPUs when --device cuda). The meta learner is a
label-correction-sized network (several MB of parameters, many DDP buckets) so that pass 3's
backward has something to overlap with. For the communicating pass of each meta step, rank 0
records when the backward started, when each bucket's hook fired (= its all-reduce was
launched), and when the backward returned; and the bytes all-reduced per meta step against the
bytes of the meta module's gradient. Writes ddp_overlap.json and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(rank: int, world: int, port: int, args, out_file: str) -> None:
    import sama_ext
    from sama_ext import distributed as sdist

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    torch.manual_seed(0)
    width = 256 if args.quick else 1024
    base = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10)).to(device)
    # meta learner: corrects labels from (features, noisy one-hot) -> many parameters, many buckets
    meta = nn.Sequential(nn.Linear(64 + 10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).to(device)
    dbase, dmeta = DDP(base), DDP(meta, bucket_cap_mb=args.bucket_mb)
    state = sdist.register_comm_hook(dmeta)
    opt = torch.optim.Adam(base.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(256, 64, generator=g).to(device)
    y = torch.randint(0, 10, (256,), generator=g).to(device)
    xm, ym = x[:64], y[:64]

    def base_loss():
        soft = F.softmax(dmeta(torch.cat([x, F.one_hot(y, 10).float()], 1)), 1)
        return -(soft * F.log_softmax(dbase(x), 1)).sum(1).mean()

    rows = []
    for step in range(args.steps):
        opt.zero_grad()
        with torch.no_grad():
            soft = F.softmax(meta(torch.cat([x, F.one_hot(y, 10).float()], 1)), 1)
        (-(soft * F.log_softmax(dbase(x), 1)).sum(1).mean()).backward()
        opt.step()
        for q in meta.parameters():
            q.grad = None
        state.events, state.record_times = [], True
        b0, n0 = state.bytes_sent, state.allreduces
        marks = {}

        def timed_base_loss():
            loss = base_loss()
            if state.armed:  # pass 3: the backward starts right after this returns
                marks["fwd_end"] = time.perf_counter()
            return loss

        sama_ext.meta_step(list(base.parameters()), opt, list(meta.parameters()), timed_base_loss,
                           lambda: F.cross_entropy(dbase(xm), ym), base_module=dbase, meta_module=dmeta)
        if args.device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()  # meta_step returns after DDP waited for every all-reduce
        state.record_times = False
        rows.append({"step": step, "backward_start": marks.get("fwd_end"), "end": end,
                     "hooks": [(b, t) for b, t in state.events], "bytes": state.bytes_sent - b0,
                     "allreduces": state.allreduces - n0})
    grad_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"rows": rows, "grad_bytes": grad_bytes, "world": world, "device": args.device,
                       "meta_params": sum(p.numel() for p in meta.parameters())}, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bucket_mb", type=float, default=1.0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.bucket_mb = 3, 0.1
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"ddp: skipped, needs {args.world} GPUs for --device cuda (found {torch.cuda.device_count()}); "
              "run it on CPU (gloo) or on a multi-GPU machine")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = out / "ddp_overlap_raw.json"
    mp.start_processes(_rank, args=(args.world, port, args, str(raw)), nprocs=args.world, start_method="spawn")
    data = json.loads(raw.read_text())
    lines = ["| step | buckets = all-reduces | launch times after the backward started (ms) "
             "| launched while the backward was still computing | wait after the last launch (ms) "
             "| bytes all-reduced | meta gradient bytes |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"][1:]:  # step 0 uses DDP's initial single bucket
        t0, t1 = r["backward_start"], r["end"]
        times = sorted(t for _, t in r["hooks"])
        # every bucket but the last is launched before the backward has produced all gradients
        lines.append(f"| {r['step']} | {r['allreduces']} | {', '.join(f'{(t - t0) * 1e3:.1f}' for t in times)} "
                     f"| {len(times) - 1}/{len(times)} | {(t1 - times[-1]) * 1e3:.1f} | {r['bytes']:,} "
                     f"| {data['grad_bytes']:,} |")
    table = "\n".join(lines)
    summary = {**data, "table": table}
    (out / "ddp_overlap.json").write_text(json.dumps(summary, indent=1))
    (out / "ddp_overlap.md").write_text(table + "\n")
    print(f"world {data['world']} on {data['device']}, meta module {data['meta_params']:,} params")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
