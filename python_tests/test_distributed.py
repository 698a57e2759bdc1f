"""DDP meta steps on gloo, 2–3 processes on loopback, against the single-process average."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sama_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_worker  # noqa: E402

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, world: int, timeout: float = 240, **kw) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    extra = []
    for k, v in kw.items():
        if v is True:
            extra.append(f"--{k}")
        elif v is not False:
            extra += [f"--{k}", str(v)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world", str(world), "--port",
                               str(port), "--out", str(tmp_path), *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a DDP rank hung past the test's time limit")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _single_process_average(rec_per_rank: list[dict]) -> list[torch.Tensor]:
    """The oracle: each rank's meta step re-run alone from the same state, then averaged."""
    total = None
    for rec in rec_per_rank:
        base, wnet = ddp_worker.make_models()
        with torch.no_grad():
            for p, t, g in zip(base.parameters(), rec["theta"], rec["grads"]):
                p.copy_(t)
                p.grad = g.clone()
            for q, t in zip(wnet.parameters(), rec["lam"]):
                q.copy_(t)
        opt = torch.optim.Adam(base.parameters(), lr=1e-2)
        opt.load_state_dict(rec["opt"])
        base_loss, meta_loss = ddp_worker.losses(base, wnet, rec["x"], rec["y"], rec["xm"], rec["ym"])
        sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters()), base_loss, meta_loss)
        grads = [q.grad for q in wnet.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [t / len(rec_per_rank) for t in total]


def _load(tmp_path, world):
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_meta_gradient_is_the_single_process_average(tmp_path, world):
    res = _launch(tmp_path, world, steps=3)
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    data = _load(tmp_path, world)
    for step in range(3):
        recs = [d["records"][step] for d in data]
        for r in recs[1:]:  # identical state on all ranks before the step ...
            assert all(torch.equal(a, b) for a, b in zip(r["theta"], recs[0]["theta"]))
            assert all(torch.equal(a, b) for a, b in zip(r["lam"], recs[0]["lam"]))
        want = _single_process_average(recs)
        for r in recs:  # ... and the same averaged meta-gradient everywhere, equal to the oracle
            for got, w in zip(r["lam_grad"], want):
                torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-13)
            assert all(torch.equal(a, b) for a, b in zip(r["theta_after"], recs[0]["theta"]))  # exact restore
        # exactly one all-reduce per bucket per meta step (DDP's first backward uses one big
        # bucket; from the second on, the buckets of an ordinary backward)
        for r in recs:
            assert r["allreduces"] == len(r["bucket_ids"]) == len(set(r["bucket_ids"]))
            assert r["allreduces"] == (data[0]["n_buckets"] if step > 0 else 1)
    assert data[0]["n_buckets"] >= 2


def test_ddp_compression_bf16_within_tolerance(tmp_path):
    res = _launch(tmp_path, 2, steps=1, compression="bf16")
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    data = _load(tmp_path, 2)
    recs = [d["records"][0] for d in data]
    want = _single_process_average(recs)
    for got, w in zip(recs[0]["lam_grad"], want):
        torch.testing.assert_close(got, w, rtol=2e-2, atol=1e-2 * float(w.abs().max()))  # one bf16 rounding
        assert not torch.equal(got, w)  # it really was compressed


def test_ddp_many_steps_keep_ranks_identical_and_base_trains(tmp_path):
    """50 meta steps with 'descend' (ranks re-synchronised) and ordinary DDP base steps between."""
    res = _launch(tmp_path, 2, steps=50, base_update="descend", timeout=400)
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    a, b = _load(tmp_path, 2)
    assert all(torch.equal(x, y) for x, y in zip(a["final_theta"], b["final_theta"]))
    assert all(torch.equal(x, y) for x, y in zip(a["final_lam"], b["final_lam"]))
    first, last = a["records"][0]["theta"], a["final_theta"]
    assert any(not torch.equal(x, y) for x, y in zip(first, last))  # the base model did train


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    res = _launch(tmp_path, 2, steps=2, fail_rank=1, timeout=180)
    assert res[1].returncode != 0 and "injected failure" in res[1].stderr
    assert res[0].returncode != 0  # rank 0 gave up (collective timeout / peer gone) instead of hanging


def test_static_graph_is_refused(tmp_path):
    res = _launch(tmp_path, 2, steps=1, static_graph=True, timeout=180)
    assert all(r.returncode != 0 for r in res)
    assert any("static_graph=True" in r.stderr for r in res)


def test_meta_step_refuses_missing_hook_and_partial_coverage():
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    port = _free_port()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        base, wnet = ddp_worker.make_models()
        dw = DDP(wnet)
        opt = torch.optim.SGD(base.parameters(), lr=0.1)
        with pytest.raises(RuntimeError, match="register_comm_hook"):
            sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters()), lambda: None, lambda: None,
                               meta_module=dw)
        sama_ext.distributed.register_comm_hook(dw)
        with pytest.raises(ValueError, match="exactly meta_module's trainable parameters"):
            sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters())[:2], lambda: None,
                               lambda: None, meta_module=dw)
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            sama_ext.distributed.register_comm_hook(wnet)
    finally:
        torch.distributed.destroy_process_group()
