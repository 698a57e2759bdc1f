"""End-to-end meta step: time and peak memory per method, next to its floor.

    PYTHONPATH=. python cuda_bench/bench_meta_step.py [--device cpu|cuda] [--quick] [--out bench_results]

Models (randomly initialised, synthetic tokens; a Meta-Weight-Net on the per-sample loss):
  compute  — a small transformer encoder: the element-wise work should vanish in the noise;
  params   — a BERT-like 30522×256 embedding + 2 layers, batch 16×32, AdamW (~9.4M params): the
             element-wise work is a large share of the step;
  bert     — (CUDA only) BERT-base-sized: 30522×768 embedding, 12 layers, batch 32×128.
Methods: sama, sama_na, neumann, cg (iterations=3), and sama on the pure-PyTorch reference backend
("sama_ref"); "sama_tp" and "sama_ref_tp" are the same with frozen_at="theta_plus".
Floors, measured in the same run: "floor" is what SAMA cannot avoid — one L_meta forward + backward
to θ and λ and two L_base forwards + backwards to λ; that is exactly the autograd work of
frozen_at="theta_plus". The default frozen_at="theta" adds one L_base forward without a graph (to
record `sama_ext.frozen` inputs at θ): "floor_fwd" is the floor plus that forward. A method's
element-wise overhead is its time minus its own floor, both timed in the same process, alternating
call by call: the median over pairs of (method − floor), and likewise of method / floor.
Each (model, method) runs in a fresh subprocess: the backend is a per-process choice. Peak memory
is what one meta step needs beyond the state before it: on CUDA the allocator's peak during one
call after the warm-up minus what was allocated before it; on CPU, in a second fresh process (one warm-up
call, then one measured call), the peak resident set (VmHWM, reset through /proc/self/clear_refs
after the warm-up) minus the resident set at that point. That process fixes glibc's mmap threshold
at 64 KiB (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set at once (glibc
otherwise keeps them in its heap and the peak only grows); the timed processes run with glibc's
defaults, as users do. With --quick (a smoke test) the CPU figure comes from the timed process
itself, with glibc's defaults: rough.
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
METHODS = ["floor", "floor_fwd", "sama", "sama_tp", "sama_na", "neumann", "cg", "sama_ref", "sama_ref_tp"]
FLOOR_OF = {"sama": "floor_fwd", "sama_na": "floor_fwd", "sama_ref": "floor_fwd"}  # others: "floor"
MODELS = {
    "compute": dict(vocab=1000, d=256, layers=4, ffn=1024, heads=4, batch=16, seq=128),
    "params": dict(vocab=30522, d=256, layers=2, ffn=1024, heads=4, batch=16, seq=32),
    "bert": dict(vocab=30522, d=768, layers=12, ffn=3072, heads=12, batch=32, seq=128),
}
# timed calls per process (each paired with a floor call): more where a step is short and noisy
REPEATS = {"compute": 9, "params": 21, "bert": 15}
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

    def floor(extra_forward: bool):
        def run():
            torch.autograd.grad(meta_loss(), theta + lam, allow_unused=True)
            if extra_forward:  # what frozen_at="theta" adds
                with torch.no_grad():
                    base_loss()
            torch.autograd.grad(base_loss(), lam)
            torch.autograd.grad(base_loss(), lam)
        return run

    floors = {"floor": floor(False), "floor_fwd": floor(True)}
    if args.method in floors:
        run = floors[args.method]
    else:
        name = args.method.removesuffix("_tp")
        method = "sama" if name == "sama_ref" else name
        frozen_at = "theta_plus" if args.method.endswith("_tp") else "theta"

        def run():
            sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, method=method, iterations=3,
                               frozen_at=frozen_at)
    # A method's floor is timed in the same process, interleaved with it: the ratio of the two
    # does not depend on how fast this process happens to run (which varies by ~10 % here).
    run_floor = floors[_floor_of(args.method)] if args.method not in floors else None

    sama_ext.backend()  # build/load outside the timing
    out = {"model": args.model, "method": args.method, "backend": sama_ext.backend(),
           "params": sum(p.numel() for p in theta), "threads": torch.get_num_threads()}
    for _ in range(args.warmup):
        run()
    if args.memory:  # CPU: one call after the warm-up, in a process of its own
        out.update(_peak_rss_of(run))
        return out
    if device.type == "cpu" and args.quick:
        # the smoke test measures in the timed process, with glibc's default mmap threshold (a
        # rough figure), and on systems without /proc/self/clear_refs from getrusage's peak
        try:
            out.update(_peak_rss_of(run))
        except RuntimeError:
            import resource

            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            run()
            out["peak_extra_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if device.type == "cuda":  # the allocator's peak over one call, before the floor runs beside it
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base_mem
    if run_floor is not None:
        run_floor()
    times, floor_times = [], []

    def timed(fn):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    for i in range(args.repeats):
        if run_floor is not None and i % 2:  # alternate the order: no systematic first/second bias
            floor_times.append(timed(run_floor))
        times.append(timed(run))
        if run_floor is not None and not i % 2:
            floor_times.append(timed(run_floor))
    out.update(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, repeats=args.repeats)
    if floor_times:
        # paired: each call against the floor call next to it, so slow drifts cancel
        out.update(floor=_floor_of(args.method), floor_median_ms=statistics.median(floor_times) * 1e3,
                   overhead_ms=statistics.median(t - f for t, f in zip(times, floor_times)) * 1e3,
                   floor_ratio=statistics.median(t / f for t, f in zip(times, floor_times)))
    return out


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"bench_meta_step: no {field} in /proc/self/status")


def _peak_rss_of(run) -> dict:
    """Peak resident set of one call of run() beyond the resident set before it (Linux)."""
    rss_before = _reset_peak_rss()
    run()
    peak = _status_bytes("VmHWM")
    return dict(rss_before_bytes=rss_before, peak_rss_bytes=peak, peak_extra_bytes=peak - rss_before)


def _reset_peak_rss() -> int:
    """Resets the process's peak resident set to the current one (Linux) and returns it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError("bench_meta_step: CPU peak memory needs Linux's /proc/self/clear_refs") from e
    return _status_bytes("VmRSS")


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


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() or None
    except OSError:
        return None


def _run_worker(args, model: str, method: str, repeats: int, memory: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SAMA_EXT_BACKEND": "torch" if method.startswith("sama_ref") else os.environ.get("SAMA_EXT_BACKEND", "auto")}
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # see the module docstring; not in timed processes
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--method", method, "--device", args.device,
           "--repeats", str(repeats), "--warmup", "1" if args.quick or memory else "2"]
    if args.quick:
        cmd.append("--quick")
    if memory:
        cmd.append("--memory")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"worker {model}/{method} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT "):])


def _floor_of(method: str) -> str:
    return FLOOR_OF.get(method, "floor")


def summarize(rows: list[dict], models: list[str], methods: list[str], bw: float) -> list[str]:
    """Markdown: one row per (model, method), then the issue's ratios where their inputs ran."""
    by = {(r["model"], r["method"]): r for r in rows}
    mib = 2**20
    lines = ["| model | params | method | median ms | its floor, same process (ms) | × floor | over floor (ms) | "
             "peak extra memory | peak RSS |", "|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for model in models:
        for method in methods:
            r = by.get((model, method))
            if r is None:
                continue
            fl = f"{r['floor']} {r['floor_median_ms']:.1f}" if "floor" in r else ""
            ratio = f"{r['floor_ratio']:.3f}" if "floor_ratio" in r else ""
            over = f"{r['overhead_ms']:.1f}" if "overhead_ms" in r else ""
            rss = f"{r['peak_rss_bytes'] / mib:.0f} MiB" if "peak_rss_bytes" in r else ""
            lines.append(f"| {model} | {r['params']:,} | {method} | {r['median_ms']:.1f} | {fl} | {ratio} | {over} | "
                         f"{r['peak_extra_bytes'] / mib:.0f} MiB | {rss} |")
    lines += ["", "| model | quantity | value | target |", "|---|---|---:|---|"]
    for model in models:
        p = next((r["params"] for r in rows if r["model"] == model), None)
        if p is None:
            continue
        # minimal traffic of SAMA's element-wise work (fp32, AdamW, decoupled): adapt 5 (d, last
        # grad, m, q in; v out in place of d), perturb_save_ 4, perturb_from_ 3, restore 2 passes
        t_min = 14 * 4 * p / bw * 1e3
        lines.append(f"| {model} | minimal element-wise traffic, 14 passes over θ at {bw / 1e9:.1f} GB/s | "
                     f"{t_min:.1f} ms | |")
        # the targets: element-wise overhead on the parameter-heavy model, step vs floor on
        # the compute-heavy one (other models: the same figures, no target)
        t_over = "≥ 3×" if model == "params" else "—"
        t_min_target = "≤ 1.5×" if model == "params" else "—"
        t_floor = "≤ 1.05×" if model == "compute" else "—"
        for fast, ref in (("sama", "sama_ref"), ("sama_tp", "sama_ref_tp")):
            r, rr = by.get((model, fast)), by.get((model, ref))
            if r and rr and "overhead_ms" in r and "overhead_ms" in rr:
                # a non-positive overhead (noise on a compute-bound step) has no meaningful ratio
                q = f"{rr['overhead_ms'] / r['overhead_ms']:.2f}×" if r["overhead_ms"] > 0 else "n/a"
                lines.append(f"| {model} | overhead {ref} / {fast} | {q} "
                             f"({rr['overhead_ms']:.1f} / {r['overhead_ms']:.1f} ms) | {t_over} |")
            if r and "overhead_ms" in r:
                lines.append(f"| {model} | overhead {fast} / minimal traffic | {r['overhead_ms'] / t_min:.2f}× | "
                             f"{t_min_target} |")
                lines.append(f"| {model} | {fast} / {r['floor']} | {r['floor_ratio']:.3f}× | {t_floor} |")
        s_ = by.get((model, "sama"))
        for rival in ("neumann", "cg"):
            r = by.get((model, rival))
            if s_ and r:
                lines.append(f"| {model} | throughput sama / {rival} | {r['median_ms'] / s_['median_ms']:.2f}× | ≥ 2× |")
                lines.append(f"| {model} | peak extra memory sama / {rival} | "
                             f"{s_['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):.2f}× "
                             f"({s_['peak_extra_bytes'] / mib:.0f} / {r['peak_extra_bytes'] / mib:.0f} MiB) | ≤ 0.6× |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per process, each paired with a call of its floor (default: per model)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole (model, method) list this many times, interleaved, and report the "
                         "median over rounds (so that a drift of the machine hits every method alike)")
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return 0
    models = args.models or (["compute", "params"] + (["bert"] if args.device == "cuda" and not args.quick else []))
    repeats = args.repeats  # default: per model, REPEATS
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple, list[dict]] = {}
    for rnd in range(args.rounds):
        for model in models:
            for method in args.methods:
                n = repeats or (2 if args.quick else REPEATS.get(model, 9))
                r = _run_worker(args, model, method, n)
                if args.device == "cpu" and not args.quick:  # peak RSS in a process of its own (docstring)
                    m = _run_worker(args, model, method, n, memory=True)
                    r.update({k: m[k] for k in ("rss_before_bytes", "peak_rss_bytes", "peak_extra_bytes")})
                runs.setdefault((model, method), []).append(r)
                print(f"round {rnd + 1}/{args.rounds} {model:8s} {method:12s} {r['median_ms']:9.1f} ms  "
                      f"peak extra {r['peak_extra_bytes'] / 2**20:7.0f} MiB", flush=True)
    rows = []
    for (model, method), rs in runs.items():
        row = dict(rs[0])
        keys = ("median_ms", "min_ms", "floor_median_ms", "floor_ratio", "overhead_ms", "peak_extra_bytes",
                "peak_rss_bytes", "rss_before_bytes")
        for key in keys:
            if key in row:
                row[key] = statistics.median(r[key] for r in rs)
        row["rounds"] = [{k: r[k] for k in keys if k in r} for r in rs]
        rows.append(row)
    bw = _copy_bandwidth(torch.device(args.device))
    lines = summarize(rows, models, args.methods, bw)
    table = "\n".join(lines)
    info = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "device": args.device, "copy_bandwidth_Bps": bw,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "quick": args.quick,
            "rounds": args.rounds, "repeats": repeats or ("quick: 2" if args.quick else REPEATS), "torch_threads": rows[0].get("threads") if rows else None,
            "commit": _git_commit()}
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
