"""sama_ext.hf.SamaTrainer under DDP: 2 processes on gloo (CPU), started with torchrun's environment
(hf_ddp_worker.py), against an oracle computed here without SamaTrainer and without DDP — one
process replays both ranks' batches: the base step on the rank-averaged gradient, then a
single-process `sama_ext.meta_step` per rank on that rank's micro-batch and meta shard; DDP's λ.grad
must be the average of those. A rank-local λ.grad (no comm hook) fails it, and the ranks' λ diverge."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import sama_ext  # noqa: E402
from test_hf_trainer import BATCH, bert, cls_losses, cls_rows, wnet  # noqa: E402

WORKER = Path(__file__).resolve().parent / "hf_ddp_worker.py"
WORLD, N_TRAIN, N_META = 2, 32, 16
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_ddp")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(sama_ext.__file__).parents[1]),
                                                                   os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a DDP rank hung past the test's time limit")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_first_meta_step_is_the_rank_average(ranks):
    rows, meta = cls_rows(N_TRAIN, 0), cls_rows(N_META, 1)
    batches = [[rows[i] for i in res["a_seen"][:BATCH]] for res in ranks]
    assert set(ranks[0]["a_seen"][:BATCH]).isdisjoint(ranks[1]["a_seen"][:BATCH])   # each rank its own shard
    model, net = bert(), wnet()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    def wloss(b, weigh):
        per = cls_losses(model, b)
        w = weigh(per)
        return (w * per).sum() / w.sum()

    # the base step DDP takes: the rank average of each rank's gradient, clipped, AdamW
    grads = [torch.autograd.grad(wloss(b, lambda per: net(per.detach().unsqueeze(1)).squeeze(1).detach()), params)
             for b in batches]
    for p, *g in zip(params, *grads):
        p.grad = sum(g) / WORLD
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    # each rank's meta step, in one process (θ is restored bit for bit after each)
    per_rank = []
    for r, b in enumerate(batches):
        lam_net = copy.deepcopy(net)
        info = sama_ext.meta_step(params, opt, list(lam_net.parameters()),
                                  lambda b=b, n=lam_net: wloss(b, lambda per: n(sama_ext.frozen(per).unsqueeze(1)).squeeze(1)),
                                  lambda r=r: cls_losses(model, meta[r::WORLD]).mean())
        assert not bool(info.skipped)
        per_rank.append([p.grad for p in lam_net.parameters()])
    expect = [sum(g) / WORLD for g in zip(*per_rank)]
    # the ranks' own meta-gradients differ: an un-averaged λ.grad could not pass below
    assert max(float((a - b).abs().max()) for a, b in zip(*per_rank)) > 100 * max(float(e.abs().max()) for e in expect) * 1e-5
    meta_opt_net = copy.deepcopy(net)
    for p, g in zip(meta_opt_net.parameters(), expect):
        p.grad = g.clone()
    torch.optim.Adam(meta_opt_net.parameters(), lr=1e-3).step()
    for res in ranks:
        for got, want in zip(res["a_grad"], expect):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
        for got, want in zip(res["a_lam"], meta_opt_net.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)
        for got, want in zip(res["a_theta"], params):
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
    # the logged meta loss is the rank average of each rank's meta loss at the new θ
    with torch.no_grad():
        want = sum(float(cls_losses(model, meta[r::WORLD]).mean()) for r in range(WORLD)) / WORLD
    for res in ranks:
        assert res["a_log"][0]["meta_loss"] == pytest.approx(want, rel=1e-5)


def test_ranks_identical_and_weights_gathered(ranks):
    r0, r1 = ranks
    for key in ("b_lam", "b_theta"):   # several steps: the ranks stay identical bit for bit
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
    assert not all(torch.equal(a, b) for a, b in zip(r0["b_lam"], wnet().parameters()))   # λ did move
    # each rank recorded its own shard; learned_weights() covers every example, aligned by index
    (s0, c0), (s1, c1) = r0["b_local"], r1["b_local"]
    assert torch.equal(c0 + c1, torch.full_like(c0, 2)), "each epoch shows every example to exactly one rank"
    assert int(c0.sum()) == int(c1.sum()) == N_TRAIN   # 2 epochs of a 16-example shard each
    assert bool((c0 != c1).any())   # ... a different one each epoch for some: the ranks' records differ
    expect = (s0 + s1) / (c0 + c1)
    for res in ranks:
        w = res["b_weights"]
        assert w.shape == (N_TRAIN,) and not torch.isnan(w).any()
        torch.testing.assert_close(w, expect.cpu(), rtol=0, atol=0)
        assert sorted(res["b_pruned"]) == sorted(torch.topk(expect, N_TRAIN // 2).indices.tolist())


def test_resume_under_ddp_equals_uninterrupted(ranks):
    for res in ranks:
        for key in ("lam", "theta"):
            for a, b in zip(res[f"b_{key}"], res[f"c_{key}"]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(res["b_weights"], res["c_weights"], rtol=0, atol=0)
