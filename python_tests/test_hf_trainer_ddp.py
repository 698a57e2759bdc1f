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
from test_hf_trainer import BATCH, bert, cls_losses, cls_rows, targs, wnet  # noqa: E402

from sama_ext.hf import SamaTrainer  # noqa: E402

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


def oracle(micro, net, weigh, meta, meta_lr):
    """What DDP must give, in one process: micro[r] is rank r's list of micro-batches of the first
    optimiser step, weigh(λ module, per-example losses, batch) the weights. Returns the expected
    λ.grad, λ after the meta optimiser's step, θ after the base step and each rank's meta loss."""
    model = bert()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    def base_loss(batches, lam_net, w_of):
        total = 0
        for b in batches:
            per = cls_losses(model, b)
            w = weigh(lam_net, w_of(per), b)
            total = total + (w * per).sum() / w.sum()
        return total / len(batches)

    # the base step DDP takes: the rank average of each rank's gradient, clipped, AdamW
    grads = [torch.autograd.grad(base_loss(batches, net, lambda per: per.detach()), params) for batches in micro]
    for p, *g in zip(params, *grads):
        p.grad = sum(g) / WORLD
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    # each rank's meta step, in one process (θ is restored bit for bit after each)
    per_rank = []
    for r, batches in enumerate(micro):
        lam_net = copy.deepcopy(net)
        info = sama_ext.meta_step(params, opt, list(lam_net.parameters()),
                                  lambda b=batches, n=lam_net: base_loss(b, n, sama_ext.frozen),
                                  lambda r=r: cls_losses(model, meta[r::WORLD]).mean())
        assert not bool(info.skipped)
        per_rank.append([p.grad for p in lam_net.parameters()])
    expect = [sum(g) / WORLD for g in zip(*per_rank)]
    # the ranks' own meta-gradients differ: an un-averaged λ.grad could not pass the comparison
    assert max(float((a - b).abs().max()) for a, b in zip(*per_rank)) > 0.1 * max(float(e.abs().max()) for e in expect)
    stepped = copy.deepcopy(net)
    for p, g in zip(stepped.parameters(), expect):
        p.grad = g.clone()
    torch.optim.Adam(stepped.parameters(), lr=meta_lr).step()
    with torch.no_grad():
        meta_losses = [float(cls_losses(model, meta[r::WORLD]).mean()) for r in range(WORLD)]
    return expect, [p.detach() for p in stepped.parameters()], [p.detach() for p in params], meta_losses


def _micro(res, key, rows, ga):
    seen = res[key]
    return [[rows[i] for i in seen[k * BATCH:(k + 1) * BATCH]] for k in range(ga)]


def test_first_meta_step_is_the_rank_average(ranks):
    rows, meta = cls_rows(N_TRAIN, 0), cls_rows(N_META, 1)
    micro = [_micro(res, "a_seen", rows, 1) for res in ranks]
    assert set(ranks[0]["a_seen"][:BATCH]).isdisjoint(ranks[1]["a_seen"][:BATCH])   # each rank its own shard
    expect, lam, theta, meta_losses = oracle(micro, wnet(), lambda n, z, b: n(z.unsqueeze(1)).squeeze(1), meta, 1e-3)
    for res in ranks:
        for got, want in zip(res["a_grad"], expect):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
        for got, want in zip(res["a_lam"], lam):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for got, want in zip(res["a_theta"], theta):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        # the logged meta loss is the rank average of each rank's meta loss at the new θ
        assert res["a_log"][0]["meta_loss"] == pytest.approx(sum(meta_losses) / WORLD, rel=1e-5)


def test_domain_weights_with_accumulation(ranks):
    """weighting="domain" (λ = the logits, in their own DDP module), 2 micro-batches per step."""
    domains = ("code", "legal", "prose")
    rows = [dict(r, domain=domains[i % 3]) for i, r in enumerate(cls_rows(N_TRAIN, 0))]
    micro = [_micro(res, "d_seen", rows, 2) for res in ranks]

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(3))

    def weigh(n, z, b):
        return torch.softmax(n.logits, 0)[torch.tensor([domains.index(r["domain"]) for r in b])] * 3

    expect, lam, _, _ = oracle(micro, Logits(), weigh, cls_rows(N_META, 1), 0.1)
    for res in ranks:
        torch.testing.assert_close(res["d_grad"][0], expect[0], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(res["d_lam"][0], lam[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(list(res["d_weights"].values())), torch.softmax(lam[0], 0))


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


def test_errors(ranks, tmp_path):
    for res in ranks:
        assert "method='neumann' runs in one process only" in res["e_error"]
    with pytest.raises(ValueError, match="meta_compression= applies to DDP runs"):
        SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1), train_dataset=cls_rows(8, 0),
                    meta_dataset=cls_rows(4, 1), meta_compression="bf16")
