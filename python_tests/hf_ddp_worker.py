"""One rank of test_hf_trainer_ddp.py: SamaTrainer under DDP (gloo, CPU), started with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Writes what it saw and
learned to OUT/rank{r}.pt; the test compares that against an oracle computed without SamaTrainer."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hf_trainer import Recorded, bert, cls_rows, targs, wnet  # noqa: E402

from sama_ext.hf import SamaTrainer  # noqa: E402

N_TRAIN, N_META = 32, 16
DOMAINS = ("code", "legal", "prose")


def domain_rows(n, seed):
    return [dict(r, domain=DOMAINS[i % 3]) for i, r in enumerate(cls_rows(n, seed))]


def dargs(out, **kw):
    return targs(out, ddp_backend="gloo", **kw)


def lam(t):
    return [p.detach().clone() for p in t.meta_params]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    res = {}
    # A: one optimiser step and its meta step
    train, meta = Recorded(cls_rows(N_TRAIN, 0)), cls_rows(N_META, 1)
    a = SamaTrainer(model=bert(), args=dargs(out / "a", max_steps=1), train_dataset=train, meta_dataset=meta,
                    weighting="sample", weight_net=wnet())
    assert a.args.world_size == 2 and a.meta_ddp is not None
    train.seen.clear()
    a.train()
    res["a_seen"] = list(train.seen)
    res["a_grad"] = [p.grad.detach().clone() for p in a.meta_params]
    res["a_lam"] = lam(a)
    res["a_theta"] = [p.detach().clone() for p in a.model.parameters()]
    res["a_log"] = [h for h in a.state.log_history if "meta_loss" in h]

    # D: domain weights, gradient accumulation 2: one optimiser step and its meta step
    train = Recorded(domain_rows(N_TRAIN, 0))
    d = SamaTrainer(model=bert(), args=dargs(out / "d", max_steps=1, gradient_accumulation_steps=2),
                    train_dataset=train, meta_dataset=meta, weighting="domain", meta_lr=0.1)
    train.seen.clear()
    d.train()
    res["d_seen"] = list(train.seen)
    res["d_grad"] = [p.grad.detach().clone() for p in d.meta_params]
    res["d_lam"] = lam(d)
    res["d_weights"] = d.learned_weights()

    # B: 4 steps (2 epochs of 2 steps on each rank), random meta batches, a checkpoint at step 2
    kw = dict(weighting="sample", meta_batch_size=3)
    b = SamaTrainer(model=bert(), train_dataset=Recorded(cls_rows(N_TRAIN, 0)), meta_dataset=meta, weight_net=wnet(),
                    args=dargs(out / "b", max_steps=4, lr_scheduler_type="linear", save_strategy="steps", save_steps=2),
                    **kw)
    b.train()
    res["b_lam"] = lam(b)
    res["b_theta"] = [p.detach().clone() for p in b.model.parameters()]
    res["b_local"] = (b._w_sum.clone(), b._w_count.clone())
    res["b_weights"] = b.learned_weights()
    res["b_pruned"] = list(b.prune(keep=0.5).indices)
    # C: resumed from B's checkpoint-2
    c = SamaTrainer(model=bert(), train_dataset=cls_rows(N_TRAIN, 0), meta_dataset=meta, weight_net=wnet(),
                    args=dargs(out / "b", max_steps=4, lr_scheduler_type="linear"), **kw)
    c.train(resume_from_checkpoint=str(out / "b" / "checkpoint-2"))
    res["c_lam"] = lam(c)
    res["c_theta"] = [p.detach().clone() for p in c.model.parameters()]
    res["c_weights"] = c.learned_weights()
    try:  # implicit-differentiation baselines are single-process
        SamaTrainer(model=bert(), args=dargs(out / "e", max_steps=1), train_dataset=cls_rows(8, 0), meta_dataset=meta,
                    method="neumann")
    except NotImplementedError as e:
        res["e_error"] = str(e)
    torch.save(res, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
