"""Peak memory of one meta step beyond the state before it, and of its floor (the three
autograd passes alone), in a process of its own (test_memory.py runs it).

    python python_tests/memory_worker.py --device cpu|cuda [--frozen-at theta|theta_plus]

The model puts almost all of its memory in θ (two 2048×2048 linear layers, 8.4M params) and
almost none in activations (a batch of 8), so θ-sized buffers stand out. CPU: the peak resident
set (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call; run with
MALLOC_MMAP_THRESHOLD_ set low so that freed tensors leave the resident set at once. CUDA: the
allocator's peak minus what was allocated before the call. Prints one line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

import sama_ext

WIDTH, BATCH = 2048, 8


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra(run, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frozen-at", default="theta")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)).to(device)
    head = torch.randn(WIDTH, 10, device=device) / WIDTH ** 0.5  # fixed: θ is the two square layers
    wnet = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    theta, lam = list(model.parameters()), list(wnet.parameters())
    x, y = torch.randn(BATCH, WIDTH, device=device), torch.randint(0, 10, (BATCH,), device=device)
    xm, ym = torch.randn(BATCH, WIDTH, device=device), torch.randint(0, 10, (BATCH,), device=device)

    def base_loss():
        per = F.cross_entropy(model(x) @ head, y, reduction="none")
        w = torch.sigmoid(wnet(sama_ext.frozen(per).unsqueeze(1))).squeeze(1)
        return (w * per).sum() / w.sum()

    def meta_loss():
        return F.cross_entropy(model(xm) @ head, ym)

    opt.zero_grad()
    base_loss().backward()
    opt.step()

    def step():
        for q in lam:
            q.grad = None
        sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, frozen_at=args.frozen_at)

    def floor():  # the passes meta_step cannot avoid, nothing else
        torch.autograd.grad(meta_loss(), theta + lam, allow_unused=True)
        with torch.no_grad():
            base_loss()
        torch.autograd.grad(base_loss(), lam)
        torch.autograd.grad(base_loss(), lam)

    sama_ext.backend()
    step()  # warm-up: lazy initialisation (thread pools, the loaded extension) is not the step's
    floor()
    out = {"backend": sama_ext.backend(),
           "theta_bytes": sum(p.numel() * p.element_size() for p in theta),
           "floor_extra_bytes": peak_extra(floor, device),
           "step_extra_bytes": peak_extra(step, device)}
    out["floor_extra_bytes_again"] = peak_extra(floor, device)  # the spread of the measurement
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
