"""cuda_bench/bench_guard.py's verdicts (the guard itself runs in CI through
`python -m cuda_bench --quick`; its measurements are not repeated here)."""
from __future__ import annotations

import math

from cuda_bench import bench_guard, run_all


def _values(**kw):
    base = {"adam_fused_vs_eager": 15.0, "meta_step_vs_floor": 1.5, "meta_step_vs_reference": 20.0}
    return {**base, **kw}


def test_healthy_values_pass():
    assert all(r["ok"] for r in bench_guard.verdicts(_values()))


def test_each_gross_regression_fails_its_guard():
    for name, bad in [("adam_fused_vs_eager", 1.05), ("meta_step_vs_floor", 12.5), ("meta_step_vs_reference", 0.6)]:
        rows = {r["guard"]: r["ok"] for r in bench_guard.verdicts(_values(**{name: bad}))}
        assert rows == {k: k != name for k in rows}, name


def test_thresholds_are_inclusive_and_nan_fails():
    rows = {r["guard"]: r["ok"] for r in bench_guard.verdicts(_values(adam_fused_vs_eager=3.0, meta_step_vs_floor=3.0))}
    assert rows["adam_fused_vs_eager"] and rows["meta_step_vs_floor"]
    rows = {r["guard"]: r["ok"] for r in bench_guard.verdicts(_values(meta_step_vs_floor=math.nan))}
    assert not rows["meta_step_vs_floor"]


def test_quick_suite_includes_the_guard():
    assert "guard" in run_all.SUITES and run_all.SUITES["guard"][0] == "cuda_bench.bench_guard"
