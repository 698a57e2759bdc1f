"""cuda_bench.gpu_check: the dry run without a GPU says what it skipped and why; the report
names the card and carries the benchmarks' tables."""
from __future__ import annotations

import json
import tarfile
import time

import pytest
import torch

from cuda_bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the dry run (no GPU)")
def test_dry_run_skips_gpu_steps_with_the_reason(tmp_path, capsys):
    rc = gpu_check.main(["--out", str(tmp_path), "--only", "env,sanitizer"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "[skipped] sanitizer" in printed
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check, dry run on ") and "no GPU" in md
    assert "| sanitizer | skipped | 0 | skipped: torch.cuda.is_available() is False" in md
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["step"] for s in data["steps"]] == ["env", "sanitizer"] and data["gpu"] is False
    assert data["facts"]["torch"] == torch.__version__
    with tarfile.open(tmp_path / "gpu_check_all.tar.gz") as tar:
        assert {"gpu_check.md", "gpu_check.json"} <= set(tar.getnames())


def test_report_names_the_card_and_includes_the_tables(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "kernels.md").write_text("| kernel | GB/s |\n|---|---|\n| perturb_ | 4000 |\n")
    ctx = gpu_check.Ctx(out=tmp_path, gpu=True, why_no_gpu="", jobs=1, with_compile=False,
                        deadline=time.monotonic() + 10,
                        facts={"gpu": "NVIDIA H200", "capability": "9.0", "gpu_memory_gib": 139.8, "torch": "2.11"})
    md = gpu_check.report(ctx, [gpu_check.Result("ctest", "FAILED", 12.3, "a | b")])
    assert md.splitlines()[0] == "# GPU check: NVIDIA H200 (sm_90, 139.8 GiB)"
    assert "| ctest | FAILED | 12 | a \\| b |" in md
    assert "## kernels.md (NVIDIA H200)" in md and "| perturb_ | 4000 |" in md


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--only", "env,nope"])
