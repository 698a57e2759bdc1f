"""Kernel microbenchmarks: each fused sama_ext kernel against the pure-PyTorch forms a user
would write, on transformer parameter lists, as ratios in one run and as a fraction of the
machine's copy bandwidth measured in the same run.

Variants per kernel:
  fused    sama_ext.ops.* (the compiled extension; ε/scale passed as a device tensor, as SAMA does)
  eager    sama_ext.reference.* (per tensor, fp32 math over 16-bit storage)
  foreach  a torch._foreach_* form written here (in the storage dtype; Python-float scalars)
  compile  torch.compile(sama_ext.reference.*) over the whole list; compile time reported apart,
           runtime measured warmed up

Effective GB/s counts the MINIMAL traffic: every tensor the kernel must read or write, once
(adam_adapt: d, g, m, q read, v written = 5 tensors). The copy bandwidth is dst.copy_(src) on
buffers far beyond the last-level cache, read+write bytes, all threads.

    PYTHONPATH=. python cuda_bench/bench_kernels.py --quick
    PYTHONPATH=. python cuda_bench/bench_kernels.py --sizes bert:32M,gpt2:32M --dtypes fp32
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `cuda_bench` and `sama_ext` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from cuda_bench import common
from cuda_bench.shapes import numel as shapes_numel, parse_size

VARIANTS = ("fused", "eager", "foreach", "compile", "compile_foreach")
COMPILE_FORMS = {"reference": "compile", "foreach": "compile_foreach"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_SIZES = "bert:1M,gpt2:1M"
FULL_SIZES = "bert:1M,bert:4M,bert:16M,bert:32M,gpt2:32M,bert:full,gpt2:full"
KEY_RANGE = (24_000_000, 50_000_000)  # the key size: 24-50M fp32 elements

# Adam hyperparameters of the benchmark (post-step state at step 10)
ADAM = dict(lr=1e-3, step=10, beta1=0.9, beta2=0.999, eps=1e-8)
SGD_FACTOR = 0.9
PERTURB_SCALE = 1e-3
COMBINE_EPS = 0.01


# ----------------------------------------------------------------------------- foreach forms
def foreach_adam_adapt(d, grads, exp_avg, exp_avg_sq, out, *, lr, step, beta1, beta2, eps) -> Tensor:
    """v = lr·[(1-β1)/bc1 − (1-β2)/(bc1·bc2)·m·g/(h·D)]/D·d, h = √(q/bc2), D = h + eps; Σv².
    Where h = 0, q = 0 forces g = 0 (q ≥ (1-β2)g²), so clamping h keeps that term 0."""
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    h = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_mul_(h, 1 / math.sqrt(bc2))
    D = torch._foreach_add(h, eps)
    torch._foreach_clamp_min_(h, 1e-30)
    t = torch._foreach_mul(exp_avg, grads)
    torch._foreach_div_(t, h)
    torch._foreach_div_(t, D)
    torch._foreach_mul_(t, -lr * (1 - beta2) / (bc1 * bc2))
    torch._foreach_add_(t, lr * (1 - beta1) / bc1)
    torch._foreach_div_(t, D)
    torch._foreach_mul_(t, d)
    torch._foreach_copy_(out, t)
    return _foreach_sumsq(out)


def foreach_const_adapt(d, out, *, lr, factor) -> Tensor:
    torch._foreach_copy_(out, d)
    torch._foreach_mul_(out, lr * factor)
    return _foreach_sumsq(out)


def _foreach_sumsq(xs) -> Tensor:
    norms = torch._foreach_norm(xs, 2, dtype=torch.float32)
    return torch.stack(norms).double().square().sum()


def foreach_perturb_(params, vectors, scale: float) -> None:
    torch._foreach_add_(params, vectors, alpha=scale)


def foreach_perturb_from_(params, sources, vectors, scale: float) -> None:
    torch._foreach_copy_(params, sources)
    torch._foreach_add_(params, vectors, alpha=scale)


def foreach_perturb_save_(params, vectors, backups, scale: float) -> None:
    torch._foreach_copy_(backups, params)
    torch._foreach_add_(params, vectors, alpha=scale)


def foreach_combine_(out, g_minus, g_plus, eps: float, scale: float = 1.0) -> None:
    torch._foreach_copy_(out, g_minus)
    torch._foreach_sub_(out, g_plus)
    torch._foreach_mul_(out, scale / (2 * eps))


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One kernel on one tensor list: the callables of each variant and what to compare."""
    kernel: str
    reads: int
    writes: int
    run: dict[str, Callable[[], object]]
    compile_targets: dict[str, tuple[Callable, tuple, dict]]  # variant -> (function, args, kwargs) to torch.compile
    results: Callable[[], list[Tensor]]           # tensors the kernel writes (compared across variants)
    reset: Callable[[], None] = lambda: None      # restores in-place inputs before a checked run
    tensors: list = field(default_factory=list)   # keeps everything alive / freed together


def _fill(shapes, dtype, device, lo=-1.0, hi=1.0) -> list[Tensor]:
    return [torch.empty(s, dtype=dtype, device=device).uniform_(lo, hi) for s in shapes]


def make_case(kernel: str, shapes, dtype, device) -> Case:
    from sama_ext import ops, reference

    f = lambda lo=-1.0, hi=1.0: _fill(shapes, dtype, device, lo, hi)  # noqa: E731
    empty = lambda: [torch.empty(s, dtype=dtype, device=device) for s in shapes]  # noqa: E731
    eps_t = torch.tensor(PERTURB_SCALE, dtype=torch.float64, device=device)

    if kernel == "adam_adapt":
        d, g, m = f(), f(), f(-0.1, 0.1)
        q = f(1e-4, 1e-2)
        out = empty()
        res = {}

        def fused():
            res["s"] = ops.adam_adapt(d, g, m, q, [], [], out, **ADAM)

        def eager():
            res["s"] = reference.adam_adapt(d, g, m, q, [], [], out, **ADAM)

        def foreach():
            res["s"] = foreach_adam_adapt(d, g, m, q, out, **ADAM)

        return Case(kernel, 4, 1, {"fused": fused, "eager": eager, "foreach": foreach},
                    {"compile": (reference.adam_adapt, (d, g, m, q, [], [], out), ADAM),
                     "compile_foreach": (foreach_adam_adapt, (d, g, m, q, out), ADAM)},
                    lambda: [*out, res["s"].reshape(1)], tensors=[d, g, m, q, out])

    if kernel == "const_adapt":
        d, out = f(), empty()
        res = {}
        kw = dict(lr=ADAM["lr"], factor=SGD_FACTOR)

        def fused():
            res["s"] = ops.const_adapt(d, out, **kw)

        def eager():
            res["s"] = reference.const_adapt(d, out, **kw)

        def foreach():
            res["s"] = foreach_const_adapt(d, out, **kw)

        return Case(kernel, 1, 1, {"fused": fused, "eager": eager, "foreach": foreach},
                    {"compile": (reference.const_adapt, (d, out), kw),
                     "compile_foreach": (foreach_const_adapt, (d, out), kw)},
                    lambda: [*out, res["s"].reshape(1)], tensors=[d, out])

    if kernel == "perturb_":
        p, v = f(), f()
        s = PERTURB_SCALE
        return Case(kernel, 2, 1, {"fused": lambda: ops.perturb_(p, v, eps_t),
                                   "eager": lambda: reference.perturb_(p, v, s),
                                   "foreach": lambda: foreach_perturb_(p, v, s)},
                    {"compile": (reference.perturb_, (p, v, s), {}), "compile_foreach": (foreach_perturb_, (p, v, s), {})},
                    lambda: p, tensors=[p, v])

    if kernel == "perturb_from_":
        p, src, v = empty(), f(), f()
        s = PERTURB_SCALE
        return Case(kernel, 2, 1, {"fused": lambda: ops.perturb_from_(p, src, v, eps_t),
                                   "eager": lambda: reference.perturb_from_(p, src, v, s),
                                   "foreach": lambda: foreach_perturb_from_(p, src, v, s)},
                    {"compile": (reference.perturb_from_, (p, src, v, s), {}),
                     "compile_foreach": (foreach_perturb_from_, (p, src, v, s), {})},
                    lambda: p, tensors=[p, src, v])

    if kernel == "perturb_save_":
        p, v, b = f(), f(), empty()
        s = PERTURB_SCALE
        return Case(kernel, 2, 2, {"fused": lambda: ops.perturb_save_(p, v, b, eps_t),
                                   "eager": lambda: reference.perturb_save_(p, v, b, s),
                                   "foreach": lambda: foreach_perturb_save_(p, v, b, s)},
                    {"compile": (reference.perturb_save_, (p, v, b, s), {}),
                     "compile_foreach": (foreach_perturb_save_, (p, v, b, s), {})},
                    lambda: [*p, *b], tensors=[p, v, b])

    if kernel == "combine_":
        out, gm, gp = empty(), f(), f()
        e = torch.tensor(COMBINE_EPS, dtype=torch.float32, device=device)
        return Case(kernel, 2, 1, {"fused": lambda: ops.combine_(out, gm, gp, e),
                                   "eager": lambda: reference.combine_(out, gm, gp, e),
                                   "foreach": lambda: foreach_combine_(out, gm, gp, COMBINE_EPS)},
                    {"compile": (reference.combine_, (out, gm, gp, e), {}),
                     "compile_foreach": (foreach_combine_, (out, gm, gp, COMBINE_EPS), {})},
                    lambda: out, tensors=[out, gm, gp])

    raise ValueError(f"unknown kernel {kernel!r}")


KERNELS = ("adam_adapt", "const_adapt", "perturb_", "perturb_from_", "perturb_save_", "combine_")
IN_PLACE = {"perturb_", "perturb_save_"}  # kernels whose result depends on the state they start from


# ----------------------------------------------------------------------------- checks
def check_case(case: Case, variants: dict[str, Callable], snapshot_inputs: list[Tensor]) -> dict:
    """Runs each variant once from the same inputs and compares what it wrote with the fused
    result: max |diff| / max |fused| over all written tensors (and Σv² where returned)."""
    saved = [x.clone() for x in snapshot_inputs]

    def restore():
        for x, s in zip(snapshot_inputs, saved):
            x.copy_(s)

    restore()
    variants["fused"]()
    ref = [x.clone() for x in case.results()]
    scale = max((r.abs().max().item() for r in ref if r.numel()), default=1.0) or 1.0
    errs = {}
    for name, fn in variants.items():
        if name == "fused":
            continue
        restore()
        fn()
        got = case.results()
        err = max(((a.double() - b.double()).abs().max().item() for a, b in zip(got, ref) if a.numel()),
                  default=0.0)
        errs[name] = err / scale
    restore()
    return errs


# ----------------------------------------------------------------------------- compile
class Compiler:
    """torch.compile of the reference functions and of the foreach forms. `static` compiles per
    case (exact shapes); `dynamic` compiles once per (kernel, form, dtype, tensor count) with
    symbolic sizes and reuses the graph for the other sizes of the same architecture (the first
    size pays the compile)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.cache: dict[tuple, Callable] = {}
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 1024)

    def new_case(self) -> None:
        if self.mode == "static":  # drop the last case's graphs (memory; no recompile-limit build-up)
            torch._dynamo.reset()
            self.cache.clear()

    def get(self, case: Case, variant: str, dtype, n_tensors: int) -> tuple[Callable, bool]:
        fn, args, kwargs = case.compile_targets[variant]
        key = (case.kernel, variant, dtype, n_tensors)
        if key not in self.cache:
            compiled = torch.compile(fn, dynamic=(self.mode == "dynamic"))
            self.cache[key] = compiled
            fresh = True
        else:
            fresh = False
        c = self.cache[key]
        return (lambda: c(*args, **kwargs)), fresh

    def forget(self, kernel: str) -> None:
        for k in [k for k in self.cache if k[0] == kernel]:
            del self.cache[k]


def _graph_count() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return -1


# ----------------------------------------------------------------------------- main loop
def run_case(kernel, label, shapes, dtype_name, device, args, compiler: Compiler | None) -> dict:
    dtype = DTYPES[dtype_name]
    n = shapes_numel(shapes)
    elem = torch.empty((), dtype=dtype).element_size()
    case = make_case(kernel, shapes, dtype, device)
    variants = dict(case.run)
    busy = common.wait_for_quiet(args.wait_quiet, args.wait_max) if device.type == "cpu" else None
    copy = common.copy_bandwidth(device, args.copy_bytes, repeats=3 if args.quick else 5)  # beside the case, under the same load
    rec: dict = {"others_cpu_busy_before": busy, "copy_beside": copy, "kernel": kernel, "size": label, "numel": n, "n_tensors": len(shapes), "dtype": dtype_name,
                 "device": str(device), "min_bytes": (case.reads + case.writes) * n * elem,
                 "tensors_read": case.reads, "tensors_written": case.writes, "variants": {}}
    if compiler is not None and _wants_compile(args, label, n):
        compiler.new_case()
        rec["compile"] = {}
        for form in args.compile_forms:
            name = COMPILE_FORMS[form]
            g0 = _graph_count()
            call, fresh = compiler.get(case, name, dtype, len(shapes))
            common.sync(device)
            t0 = time.perf_counter()
            call()
            common.sync(device)
            first = time.perf_counter() - t0
            rec["compile"][name] = {"form": form, "mode": compiler.mode, "fresh": fresh, "first_call_s": first,
                                    "graphs": _graph_count() - g0 if g0 >= 0 else None}
            variants[name] = call
        g_after_compile = _graph_count()
    # correctness of the baselines (small lists only: it clones every input)
    if args.check and n <= args.check_max:
        rec["check_max_rel_err"] = check_case(case, variants, _inputs_to_restore(case))
    # A copy timed in the same interleaved rounds as the variants: the bandwidth the machine gives
    # at this very moment (this VM's drifts by tens of percent from minute to minute). Its buffers
    # move as many counted bytes as the kernel, capped at 2 × 512 MiB (far beyond any cache).
    copy_n = max(1, min(rec["min_bytes"] // 2, 512 << 20) // 4)
    copy_src = torch.empty(copy_n, dtype=torch.float32, device=device).uniform_()
    copy_dst = torch.empty_like(copy_src)
    variants["copy"] = lambda: copy_dst.copy_(copy_src)
    # warm-up, then interleaved rounds (so a burst of load elsewhere hits every variant alike).
    # With --wait-quiet, a timing loop during which other processes took more than that share of
    # the CPU is redone after waiting for quiet (at most --retries times; the quietest is kept).
    tries = []
    for attempt in range(1 + (args.retries if args.wait_quiet and device.type == "cpu" else 0)):
        if attempt:
            common.wait_for_quiet(args.wait_quiet, args.wait_max)
        for fn in variants.values():
            for _ in range(args.warmup):
                fn()
        common.sync(device)
        samples = {k: [] for k in variants}
        window = common.Window()  # what other processes took during the whole timing loop
        for _ in range(args.repeats):
            for name, fn in variants.items():
                samples[name].append(common.time_once(fn, device))
        others = window.others_frac() if device.type == "cpu" else None
        tries.append((others if others is not None else 0.0, samples))
        if others is None or not args.wait_quiet or others <= args.wait_quiet:
            break
    others, samples = min(tries, key=lambda t: t[0])
    rec["others_cpu_frac"] = others if device.type == "cpu" else None
    rec["timing_attempts"] = [round(t[0], 3) for t in tries]
    for name, ts in samples.items():
        st = common.summarize(ts)
        moved = 2 * copy_n * 4 if name == "copy" else rec["min_bytes"]
        st.update(gbps=moved / st["median_s"] / 1e9, gbps_best=moved / st["min_s"] / 1e9)
        (rec if name == "copy" else rec["variants"]).__setitem__("copy_interleaved" if name == "copy" else name, st)
    rec["copy_interleaved"]["buffer_bytes"] = copy_n * 4
    del copy_src, copy_dst
    t_f = rec["variants"]["fused"]["median_s"]
    rec["speedup"] = {k: v["median_s"] / t_f for k, v in rec["variants"].items() if k != "fused"}
    compiled = [k for k in ("compile", "compile_foreach") if k in rec["variants"]]
    if compiled:
        best = min(compiled, key=lambda k: rec["variants"][k]["median_s"])
        rec["speedup"]["compile_best"] = rec["speedup"][best]
        rec["compile_best"] = best
        # graphs compiled during warm-up and timing: > 0 means a timed call recompiled
        rec["graphs_after_first_calls"] = _graph_count() - g_after_compile if g_after_compile >= 0 else None
    del case, variants
    gc.collect()
    return rec


def _wants_compile(args, label: str, n: int) -> bool:
    if args.compile_sizes == "all":
        return True
    if args.compile_sizes == "key":
        return KEY_RANGE[0] <= n <= KEY_RANGE[1]
    return label in {s.strip() for s in args.compile_sizes.split(",")}


def _inputs_to_restore(case: Case) -> list[Tensor]:
    """In-place kernels start each checked run from the same θ (and write buffers start equal)."""
    flat = []
    for group in case.tensors:
        if isinstance(group, list):
            flat += [t for t in group if isinstance(t, Tensor)]
    return flat if case.kernel in IN_PLACE else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes ({QUICK_SIZES}), 3 repeats, no torch.compile: a smoke test (< ~1 min on 2 CPU cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated MODEL:SIZE with MODEL bert|gpt2 and SIZE full|N[k|M] (default {FULL_SIZES})")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 7; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--compile", dest="force_compile", action="store_true",
                   help="run the torch.compile variant even with --quick")
    p.add_argument("--compile-mode", default="static", choices=["static", "dynamic"],
                   help="static (torch.compile's default): a compile per case, exact shapes; dynamic: one compile "
                        "per kernel, dtype and architecture with symbolic sizes, reused across sizes")
    p.add_argument("--compile-sizes", default="key",
                   help="which cases get the torch.compile variant: 'key' (lists of 24-50M elements, the issue's "
                        "key size), 'all', or comma-separated size labels (e.g. bert-32M,bert-base). On a 2-core "
                        "CPU one cold compile of a 199-tensor list takes minutes")
    p.add_argument("--compile-forms", default="reference,foreach",
                   help="what torch.compile compiles: reference (sama_ext.reference.*, per tensor), foreach (the "
                        "foreach form below, a per-list function), or both; the speedup uses the faster")
    p.add_argument("--keep-compile-cache", action="store_true",
                   help="use inductor's usual on-disk cache (default: a fresh one, so compile times are cold)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check of the baselines")
    p.add_argument("--check-max", type=int, default=8_000_000, help="check lists up to this many elements")
    p.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer size (default ≥ 8× LLC)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="FRACTION",
                   help="before each case, wait until other processes use less than this fraction of the CPU "
                        "(e.g. 0.2; for shared machines)")
    p.add_argument("--wait-max", type=float, default=600.0, help="longest wait per case for --wait-quiet, seconds")
    p.add_argument("--retries", type=int, default=2,
                   help="with --wait-quiet: redo a case's timing loop (after waiting) when others took more than "
                        "that share of the CPU during it, at most this many times; the quietest attempt is kept")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every variant and the copy (default: torch's, i.e. all cores)")
    p.add_argument("--out", default="bench_results", help="results folder (JSON, Markdown, PNG)")
    p.add_argument("--tag", default="kernels", help="file name stem of the outputs")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else FULL_SIZES
    args.use_compile = not args.no_compile and (not args.quick or args.force_compile)
    args.compile_forms = [f.strip() for f in args.compile_forms.split(",") if f.strip()]
    for f in args.compile_forms:
        if f not in COMPILE_FORMS:
            p.error(f"--compile-forms: unknown form {f!r} (reference, foreach)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels: --device cuda but torch sees no GPU")
    if args.use_compile and not args.keep_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sama_bench_inductor_")
    import sama_ext

    t_start = time.perf_counter()
    backend = sama_ext.backend()  # builds the extension on first use (before any timing)
    if backend != "compiled":
        print("bench_kernels: WARNING: SAMA_EXT_BACKEND selects the pure-PyTorch reference; 'fused' is not "
              "the compiled kernels in this run", file=sys.stderr)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"bench_kernels: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for k in kernels:
        if k not in KERNELS:
            raise SystemExit(f"bench_kernels: unknown kernel {k!r} (choose from {', '.join(KERNELS)})")

    info = common.machine_info(device)
    from sama_ext._backend import compiled as _compiled

    info["sama_ext_backend"] = backend
    info["sama_ext_build"] = _compiled().origin if backend == "compiled" else None
    if device.type == "cpu":
        common.wait_for_quiet(args.wait_quiet, args.wait_max)
    copy_start = common.copy_bandwidth(device, args.copy_bytes)
    copy_gbps = copy_start["gbps_median"]
    print(f"# {info['cpu_model']} ({info['torch_threads']} threads), torch {info['torch_version']}, "
          f"device {info['device_name']}: copy {copy_gbps:.1f} GB/s (read+write, "
          f"{copy_start['buffer_bytes'] / 2**20:.0f} MiB buffers)", flush=True)

    compiler = Compiler(args.compile_mode) if args.use_compile else None
    cases = []
    for kernel in kernels:
        for dtype_name in dtypes:
            for label, shapes in sizes:
                rec = run_case(kernel, label, shapes, dtype_name, device, args, compiler)
                cases.append(rec)
                print(format_line(rec), flush=True)
        if compiler is not None:
            compiler.forget(kernel)
            torch._dynamo.reset()
    copy_end = common.copy_bandwidth(device, args.copy_bytes)
    common.free_copy_buffers()
    # The machine's copy bandwidth: the best median of all copy measurements in this run (at the
    # start, beside each case, at the end). On a shared machine the best is the least disturbed,
    # and dividing by it gives the lower (conservative) fraction.
    all_copy = [copy_start["gbps_median"], copy_end["gbps_median"]] + [c["copy_beside"]["gbps_median"] for c in cases]
    copy_gbps = max(all_copy)
    for c in cases:
        for st in c["variants"].values():
            st["frac_copy"] = st["gbps"] / copy_gbps
            st["frac_copy_beside"] = st["gbps"] / c["copy_beside"]["gbps_median"]
            st["frac_copy_interleaved"] = st["gbps"] / c["copy_interleaved"]["gbps"]
    result = {
        "benchmark": "kernels", "machine": info,
        "config": {k: v for k, v in vars(args).items()},
        "copy_bandwidth": {"start": copy_start, "end": copy_end, "used_gbps": copy_gbps,
                           "all_medians_gbps": all_copy,
                           "note": "frac_copy uses used_gbps, the best median of every copy measurement in the run; "
                                   "frac_copy_beside uses the copy measured just before the case"},
        "cases": cases, "wall_s": time.perf_counter() - t_start,
    }
    result["targets"] = target_rows(result)
    print(f"# copy bandwidth at the end: {copy_end['gbps_median']:.1f} GB/s; wall {result['wall_s']:.0f} s",
          flush=True)
    write_outputs(result, Path(args.out), args.tag)
    return result


# ----------------------------------------------------------------------------- reports
def format_line(r: dict) -> str:
    v = r["variants"]
    parts = [f"{r['kernel']:<14} {r['size']:<12} {r['dtype']:<5} n={r['numel'] / 1e6:7.1f}M"]
    for name in VARIANTS:
        if name in v:
            parts.append(f"{name} {v[name]['median_s'] * 1e3:9.2f} ms ({v[name]['gbps']:5.1f} GB/s)")
    parts.append("fused x " + " ".join(f"{k}:{r['speedup'][k]:.2f}" for k in (*VARIANTS[1:], "compile_best")
                                       if k in r["speedup"]))
    for name, c in r.get("compile", {}).items():
        parts.append(f"{name} first call {c['first_call_s']:.1f} s ({c['graphs']} graphs)")
    parts.append(f"copy interleaved {r['copy_interleaved']['gbps']:.1f} GB/s, beside {r['copy_beside']['gbps_median']:.1f} "
                 f"GB/s; others' CPU {_others(r)}")
    return " | ".join(parts)


def _others(r: dict) -> str:
    """The share of the CPU other processes took during the case's timing loop."""
    v = r.get("others_cpu_frac")
    return "–" if v is None else f"{100 * v:.0f}%"


def markdown(result: dict) -> str:
    m, cb = result["machine"], result["copy_bandwidth"]
    lines = [
        f"# sama_ext kernel benchmark ({m['date_utc']} UTC)", "",
        f"- machine: {m['cpu_model']}, {m['cpu_logical_cores']} logical cores, {m['torch_threads']} torch threads; "
        f"device `{m['device']}` ({m['device_name']})",
        f"- torch {m['torch_version']}, {m['cxx']}, sama_ext backend {m['sama_ext_backend']}, commit {m['git_commit']}",
        f"- copy bandwidth (dst.copy_(src), {cb['start']['buffer_bytes'] / 2**20:.0f} MiB buffers, read+write): "
        f"**{cb['used_gbps']:.1f} GB/s** used for `% copy` (best median of {len(cb['all_medians_gbps'])} measurements: "
        f"start, beside each case, end; range {min(cb['all_medians_gbps']):.1f}-{max(cb['all_medians_gbps']):.1f}); "
        f"{cb['start']['gbps_median']:.1f} GB/s at the start, {cb['end']['gbps_median']:.1f} GB/s at the end"
        + (f" (others' CPU {100 * cb['start']['others_cpu_frac']:.0f}% / {100 * cb['end']['others_cpu_frac']:.0f}%)"
           if cb['start'].get('others_cpu_frac') is not None else ""),
        f"- {result['config']['repeats']} timed calls per variant (interleaved), median shown; GB/s from the minimal "
        "traffic; `x eager` etc. = baseline time / fused time (> 1: fused is faster); others' CPU = the share of "
        "the machine other processes used during the case's timing loop (/proc/stat; a noise indicator)",
        "",
        "| kernel | size | dtype | elements | fused ms | fused GB/s | % copy interleaved | % copy (best of run) | "
        "eager ms | foreach ms | compile ms (ref / foreach) | x eager | x foreach | x compile (best) | "
        "compile s (ref / foreach) | copy interleaved GB/s | others' CPU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        v, s = r["variants"], r["speedup"]
        ms = lambda k: f"{v[k]['median_s'] * 1e3:.2f}" if k in v else "–"  # noqa: E731
        sp = lambda k: f"{s[k]:.2f}" if k in s else "–"  # noqa: E731
        comp = " / ".join(f"{r['compile'][k]['first_call_s']:.1f}" + ("" if r["compile"][k]["fresh"] else " (reused)")
                          if k in r.get("compile", {}) else "–" for k in ("compile", "compile_foreach"))
        cms = " / ".join(ms(k) for k in ("compile", "compile_foreach"))
        lines.append(f"| {r['kernel']} | {r['size']} | {r['dtype']} | {r['numel'] / 1e6:.1f}M | {ms('fused')} | "
                     f"{v['fused']['gbps']:.1f} | {100 * v['fused']['frac_copy_interleaved']:.0f}% | "
                     f"{100 * v['fused']['frac_copy']:.0f}% | {ms('eager')} | "
                     f"{ms('foreach')} | {cms} | {sp('eager')} | {sp('foreach')} | {sp('compile_best')} | {comp} | "
                     f"{r['copy_interleaved']['gbps']:.1f} | {_others(r)} |")
    lines += targets_markdown(result)
    checks = [r for r in result["cases"] if "check_max_rel_err" in r]
    if checks:
        worst = {}
        for r in checks:
            for k, e in r["check_max_rel_err"].items():
                worst[(r["dtype"], k)] = max(worst.get((r["dtype"], k), 0.0), e)
        lines += ["", "Baselines vs fused (max |diff| / max |fused| over the checked cases): " +
                  ", ".join(f"{k} {d}: {e:.1e}" for (d, k), e in sorted(worst.items()))]
    return "\n".join(lines) + "\n"


# The targets, for fp32 lists of 24-50M elements: (kernel, what, threshold)
TARGETS = [
    ("adam_adapt", "speedup eager", 3.0), ("adam_adapt", "speedup foreach", 3.0),
    ("adam_adapt", "speedup compile_best", 0.9),
] + [(k, f, 0.8) for k in ("adam_adapt", "perturb_", "perturb_from_", "perturb_save_")
     for f in ("frac_copy_interleaved", "frac_copy")]


def target_rows(result: dict) -> list[dict]:
    rows = []
    for r in result["cases"]:
        if r["dtype"] != "fp32" or not KEY_RANGE[0] <= r["numel"] <= KEY_RANGE[1]:
            continue
        for kernel, what, thr in TARGETS:
            if r["kernel"] != kernel:
                continue
            if what.startswith("frac_copy"):
                val = r["variants"]["fused"][what]
            else:
                val = r["speedup"].get(what.split()[1])
            if val is not None:
                rows.append({"kernel": kernel, "size": r["size"], "what": what, "target": thr, "value": val,
                             "met": val >= thr})
    return rows


def targets_markdown(result: dict) -> list[str]:
    rows = target_rows(result)
    if not rows:
        return []
    out = ["", "Targets (fp32, 24-50M elements; speedup = baseline time / fused time; frac_copy_interleaved = fused "
           "GB/s / the GB/s of a copy timed in the same interleaved rounds; frac_copy = fused GB/s / the best copy "
           "median of the whole run, the conservative figure):", "",
           "| kernel | size | measure | target | measured | met |", "|---|---|---|---:|---:|---|"]
    for t in rows:
        out.append(f"| {t['kernel']} | {t['size']} | {t['what']} | ≥ {t['target']:g} | {t['value']:.2f} | "
                   f"{'yes' if t['met'] else '**no**'} |")
    return out


def _model(size_label: str) -> str:
    return "gpt2" if size_label.startswith("gpt2") else "bert"


def plot(result: dict, path: Path) -> bool:
    if not common.have_matplotlib():
        print("bench_kernels: matplotlib is not installed; skipping the plot", file=sys.stderr)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r["kernel"] for r in result["cases"]))
    cols = min(3, len(kernels))
    rows = math.ceil(len(kernels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    copy = result["copy_bandwidth"]["used_gbps"]
    colors = {"fused": "C3", "eager": "C0", "foreach": "C2", "compile": "C1", "compile_foreach": "C4"}
    styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
    for ax, kernel in zip(axes.flat, kernels):
        rs = [r for r in result["cases"] if r["kernel"] == kernel]
        for dt in dict.fromkeys(r["dtype"] for r in rs):
            for name in VARIANTS:
                for model, marker in (("bert", "o"), ("gpt2", "s")):  # one line per architecture
                    pts = sorted((r["numel"], r["variants"][name]["gbps"]) for r in rs
                                 if r["dtype"] == dt and name in r["variants"] and _model(r["size"]) == model)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(dt, "-"), marker=marker, ms=3,
                                color=colors[name], label=f"{name} {dt}" if model == "bert" or not any(
                                    _model(r["size"]) == "bert" for r in rs) else None)
        ax.axhline(copy, color="k", lw=0.8, ls=":", label="copy")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(kernel)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s (minimal traffic)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kernels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"sama_ext kernels on {m['device_name']} ({m['torch_threads']} threads), "
                 f"torch {m['torch_version']}, {m['date_utc']} UTC; circles: BERT shapes, squares: GPT-2 shapes; "
                 f"dotted: copy", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / f"{tag}.json", result)
    (out / f"{tag}.md").write_text(markdown(result))
    made = plot(result, out / f"{tag}.png")
    print(f"# wrote {out / (tag + '.json')}, {out / (tag + '.md')}" + (f", {out / (tag + '.png')}" if made else ""))


if __name__ == "__main__":
    main()
