"""End-to-end meta step: time and peak memory per method, next to its floor.

    PYTHONPATH=. python cuda_bench/bench_meta_step.py [--device cpu|cuda] [--quick] [--out bench_results]

Models (randomly initialised, synthetic tokens; a Meta-Weight-Net on the per-sample loss):
  compute  — a small transformer encoder: the element-wise work should vanish in the noise;
  params   — a BERT-like 30522×256 embedding + 2 layers, batch 16×32, AdamW (~9.4M params): the
             element-wise work is a large share of the step;
  bert     — (CUDA only) BERT-base-sized: 30522×768 embedding, 12 layers, batch 32×128.
Methods: sama, sama_na, neumann, cg (iterations=3), and sama on the pure-PyTorch reference backend
("sama_ref"). The floor is what SAMA cannot avoid: one L_meta forward + backward to θ and two
L_base forwards + backwards to λ, measured in the same run. Each (model, method) runs in a fresh
subprocess: the backend is a per-process choice, and CPU peak memory is the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
METHODS = ["floor", "sama", "sama_na", "neumann", "cg", "sama_ref"]
MODELS = {
    "compute": dict(vocab=1000, d=256, layers=4, ffn=1024, heads=4, batch=16, seq=128),
    "params": dict(vocab=30522, d=256, layers=2, ffn=1024, heads=4, batch=16, seq=32),
    "bert": dict(vocab=30522, d=768, layers=12, ffn=3072, heads=12, batch=32, seq=128),
}
QUICK = {
    "compute": dict(vocab=500, d=128, layers=2, ffn=256, heads=4, batch=8, seq=32),
    "params": dict(vocab=30522, d=32, layers=1, ffn=64, heads=4, batch=8, seq=16),
}


class Encoder(nn.Module):
    def __init__(self, vocab, d, layers, ffn, heads, n_classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tok):
        return self.head(self.enc(self.emb(tok)).mean(1))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _worker(args) -> dict:
    import sama_ext

    device = torch.device(args.device)
    cfg = (QUICK if args.quick else MODELS)[args.model]
    torch.manual_seed(0)
    model = Encoder(cfg["vocab"], cfg["d"], cfg["layers"], cfg["ffn"], cfg["heads"]).to(device)
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g).to(device)
    lab = torch.randint(0, 4, (cfg["batch"],), generator=g).to(device)
    tokm = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g).to(device)
    labm = torch.randint(0, 4, (cfg["batch"],), generator=g).to(device)
    theta, lam = list(model.parameters()), list(wnet.parameters())

    def base_loss():
        per = F.cross_entropy(model(tok), lab, reduction="none")
        w = torch.sigmoid(wnet(sama_ext.frozen(per).unsqueeze(1))).squeeze(1)
        return (w * per).sum() / w.sum()

    def meta_loss():
        return F.cross_entropy(model(tokm), labm)

    # one ordinary base step: optimiser state and p.grad as meta_step expects
    opt.zero_grad()
    base_loss().backward()
    opt.step()
    for q in lam:
        q.grad = None

    if args.method == "floor":
        def run():
            torch.autograd.grad(meta_loss(), theta + lam, allow_unused=True)
            torch.autograd.grad(base_loss(), lam)
            torch.autograd.grad(base_loss(), lam)
    else:
        method = "sama" if args.method == "sama_ref" else args.method

        def run():
            sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, method=method, iterations=3)

    sama_ext.backend()  # build/load outside the timing
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.repeats):
        _sync(device)
        t = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t)
    out = {"model": args.model, "method": args.method, "backend": sama_ext.backend(),
           "params": sum(p.numel() for p in theta), "median_ms": statistics.median(times) * 1e3,
           "min_ms": min(times) * 1e3, "repeats": args.repeats}
    if device.type == "cuda":
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base_mem
    else:
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_rss_bytes"] = rss_after
        out["peak_rss_growth_bytes"] = rss_after - rss_before
    return out


def _copy_bandwidth(device) -> float:
    """Read+write bytes per second of a large copy (the machine's practical memory bandwidth)."""
    n = 64 * 2**20
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return 0
    models = args.models or (["compute", "params"] + (["bert"] if args.device == "cuda" and not args.quick else []))
    repeats = args.repeats or (2 if args.quick else 7)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        for method in args.methods:
            env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   "SAMA_EXT_BACKEND": "torch" if method == "sama_ref" else os.environ.get("SAMA_EXT_BACKEND",
                                                                                          "auto")}
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--method", method, "--device",
                   args.device, "--repeats", str(repeats), "--warmup", "1" if args.quick else "2"]
            if args.quick:
                cmd.append("--quick")
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                raise RuntimeError(f"worker {model}/{method} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(line[0][len("RESULT "):]))
            print(f"{model:8s} {method:9s} {rows[-1]['median_ms']:9.1f} ms", flush=True)
    bw = _copy_bandwidth(torch.device(args.device))
    by = {(r["model"], r["method"]): r for r in rows}
    lines = ["| model | params | method | median ms | × floor | overhead over floor (ms) | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for model in models:
        floor = by.get((model, "floor"))
        for method in args.methods:
            r = by[(model, method)]
            mem = r.get("peak_extra_bytes", r.get("peak_rss_bytes"))
            ratio = f"{r['median_ms'] / floor['median_ms']:.2f}" if floor else "—"
            over = f"{r['median_ms'] - floor['median_ms']:.1f}" if floor else "—"
            lines.append(f"| {model} | {r['params']:,} | {method} | {r['median_ms']:.1f} | {ratio} | {over} | "
                         f"{mem / 2**20:.0f} MiB |")
        if floor and (model, "sama") in by:
            n = by[(model, "sama")]["params"]
            # minimal traffic of SAMA's element-wise work (fp32, AdamW): adapt 5, perturb_save 4,
            # perturb_from 3, restore 2 tensor passes over θ
            t_min = 14 * 4 * n / bw * 1e3
            lines.append(f"| {model} | | minimal element-wise traffic at {bw / 1e9:.1f} GB/s | {t_min:.1f} | | | |")
    table = "\n".join(lines)
    info = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "device": args.device, "copy_bandwidth_Bps": bw,
            "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                     if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    (out_dir / "meta_step.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    (out_dir / "meta_step.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
