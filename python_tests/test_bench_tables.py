"""The benchmarks' verdict tables, on synthetic results whose ratios are known by hand.

The benchmarks themselves run in CI only as a smoke test (no thresholds); these tests make sure the
"against the targets" tables that docs/benchmarks.md quotes compute the ratios they claim.
"""
from __future__ import annotations

from cuda_bench import bench_kernels, bench_meta_step

MIB = 2**20


def _row(model, method, median_ms, peak_mib, params=1_000_000, **kw):
    return dict(model=model, method=method, median_ms=median_ms, peak_extra_bytes=peak_mib * MIB,
                params=params, **kw)


def test_meta_step_summary_ratios():
    # 14 passes × 4 bytes × 1e6 params at 2.8 GB/s = 20 ms of minimal traffic
    bw = 14 * 4 * 1_000_000 / 0.020
    rows = [
        _row("params", "floor", 70.0, 5),
        _row("params", "sama", 100.0, 10, floor="floor_fwd", floor_median_ms=70.0, overhead_ms=30.0, floor_ratio=1.43),
        _row("params", "sama_ref", 370.0, 30, floor="floor_fwd", floor_median_ms=70.0, overhead_ms=300.0,
             floor_ratio=5.3),
        _row("params", "neumann", 400.0, 40, floor="floor", floor_median_ms=70.0, overhead_ms=330.0, floor_ratio=5.7),
        _row("compute", "sama", 105.0, 10, floor="floor_fwd", floor_median_ms=100.0, overhead_ms=5.0,
             floor_ratio=1.05),
    ]
    lines = bench_meta_step.summarize(rows, ["compute", "params"],
                                      ["floor", "sama", "sama_ref", "neumann"], bw)
    text = "\n".join(lines)
    assert "| params | minimal element-wise traffic, 14 passes over θ at 2.8 GB/s | 20.0 ms | |" in text
    assert "| params | overhead sama_ref / sama | 10.00× (300.0 / 30.0 ms) | ≥ 3× |" in text
    assert "| params | overhead sama / minimal traffic | 1.50× | ≤ 1.5× |" in text
    assert "| params | throughput sama / neumann | 4.00× | ≥ 2× |" in text
    assert "| params | peak extra memory sama / neumann | 0.25× (10 / 40 MiB) | ≤ 0.6× |" in text
    # the ≤ 1.05× target belongs to the compute model only, the overhead targets to params only
    assert "| compute | sama / floor_fwd | 1.050× | ≤ 1.05× |" in text
    assert "| params | sama / floor_fwd | 1.430× | — |" in text
    assert "| compute | overhead sama / minimal traffic | 0.25× | — |" in text  # 5 ms / 20 ms
    # rows without a partner print no ratio (no CG, no sama_ref on compute)
    assert "sama / cg" not in text and "| compute | overhead sama_ref" not in text


def _case(kernel, dtype, numel, fused, speedup, size="bert-32M"):
    return dict(kernel=kernel, dtype=dtype, numel=numel, size=size, variants={"fused": fused}, speedup=speedup)


def test_kernel_targets_key_size_fp32_only():
    fused = dict(frac_copy=0.79, frac_copy_interleaved=1.10)
    cases = [
        _case("adam_adapt", "fp32", 32_000_000, fused, dict(eager=15.0, foreach=2.9, compile_best=1.4)),
        _case("adam_adapt", "bf16", 32_000_000, dict(frac_copy=0.1, frac_copy_interleaved=0.1), dict(eager=1.0)),
        _case("adam_adapt", "fp32", 1_000_000, dict(frac_copy=0.1, frac_copy_interleaved=0.1), dict(eager=1.0),
              size="bert-1M"),
        _case("perturb_from_", "fp32", 32_000_000, dict(frac_copy=0.64, frac_copy_interleaved=0.97), dict(eager=6.7)),
    ]
    rows = bench_kernels.target_rows({"cases": cases})
    got = {(r["kernel"], r["what"]): (r["value"], r["met"]) for r in rows}
    assert got == {
        ("adam_adapt", "speedup eager"): (15.0, True),
        ("adam_adapt", "speedup foreach"): (2.9, False),
        ("adam_adapt", "speedup compile_best"): (1.4, True),
        ("adam_adapt", "frac_copy_interleaved"): (1.10, True),
        ("adam_adapt", "frac_copy"): (0.79, False),
        ("perturb_from_", "frac_copy_interleaved"): (0.97, True),
        ("perturb_from_", "frac_copy"): (0.64, False),
    }


def test_meta_step_summary_nonpositive_overhead_has_no_ratio():
    rows = [_row("compute", "sama", 99.0, 10, floor="floor_fwd", floor_median_ms=100.0, overhead_ms=-1.0,
                 floor_ratio=0.99),
            _row("compute", "sama_ref", 130.0, 10, floor="floor_fwd", floor_median_ms=100.0, overhead_ms=30.0,
                 floor_ratio=1.3)]
    text = "\n".join(bench_meta_step.summarize(rows, ["compute"], ["sama", "sama_ref"], 1e10))
    assert "| compute | overhead sama_ref / sama | n/a (30.0 / -1.0 ms) | — |" in text
