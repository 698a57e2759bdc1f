"""SAMA data reweighting of a LoRA-adapted decoder LM sharded with FSDP2 (fully_shard), with torchrun.

    torchrun --nproc_per_node=2 examples/fsdp_reweighting.py            # CPU (gloo) here, GPUs (NCCL) elsewhere
    torchrun --nproc_per_node=2 examples/fsdp_reweighting.py --quick    # a few steps, for smoke tests

A small Llama (HF config in code, random init, no download) gets PEFT LoRA adapters; every decoder
layer and the root are sharded with `fully_shard`, so each rank holds 1/N of every weight, adapter
and optimiser state. Half of the training sequences follow a simple rule (each token is the
previous plus a per-sequence step, mod the vocabulary); the other half are corrupted (uniformly
random tokens). A DDP-wrapped weight net maps each sequence's loss (through `sama_ext.frozen`) to a
weight; `sama_ext.meta_step(..., base_module=model, meta_module=ddp_wnet)` learns it from a small
clean meta set. The script prints each rank's bytes of shards and SAMA's buffers, and the mean
learned weight of clean and corrupted sequences.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import sama_ext
from sama_ext import distributed as sdist

VOCAB, SEQ = 32, 16


def sequences(n: int, corrupt: float, seed: int):
    """(tokens, corrupted mask): clean rows are t, t+k, t+2k, ... mod VOCAB; corrupted rows random."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    clean = (start + step * torch.arange(SEQ)) % VOCAB
    bad = torch.rand(n, generator=g) < corrupt
    noise = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return torch.where(bad[:, None], noise, clean), bad


def build_model(device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # identical weights on every rank before sharding
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(cfg).to(device)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                                            "down_proj"]))


def per_sequence(model, toks):
    logits = model(input_ids=toks).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), toks[:, 1:].reshape(-1),
                           reduction="none").reshape(toks.shape[0], -1).mean(1)


def local_bytes(tensors) -> int:
    with torch.no_grad():
        return sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else t.numel() * t.element_size()
                   for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="a few steps, for smoke tests")
    ap.add_argument("--corrupt", type=float, default=0.5)
    args = ap.parse_args()
    steps = 10 if args.quick else args.steps

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model = build_model(device)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    lora = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    wnet = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).to(device)
    ddp_wnet = DDP(wnet)
    comm = sdist.register_comm_hook(ddp_wnet)
    opt = torch.optim.AdamW(lora, lr=3e-3)
    meta_opt = torch.optim.Adam(wnet.parameters(), lr=1e-2)

    def weights(per):  # per-sequence weights in (0, 1)
        return torch.sigmoid(ddp_wnet(per.unsqueeze(1))).squeeze(1)

    x_all, bad_all = sequences(2048, args.corrupt, seed=0)
    x_all, bad_all = x_all[rank::world].to(device), bad_all[rank::world]  # each rank its own shard of the data
    xm_all, _ = sequences(64, 0.0, seed=1)
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (16,), generator=gen)
        xb = x_all[idx]
        xm = xm_all[torch.randint(0, len(xm_all), (16,), generator=gen)].to(device)

        opt.zero_grad()  # base step: an ordinary FSDP step, weights held fixed
        per = per_sequence(model, xb)
        with torch.no_grad():
            w = weights(per.detach())
        ((w * per).sum() / w.sum()).backward()
        opt.step()

        def base_loss():
            per = per_sequence(model, xb)
            w = weights(sama_ext.frozen(per))
            return (w * per).sum() / w.sum()

        meta_opt.zero_grad()
        info = sama_ext.meta_step(lora, opt, list(wnet.parameters()), base_loss,
                                  lambda: per_sequence(model, xm).mean(), base_module=model, meta_module=ddp_wnet)
        meta_opt.step()
        if rank == 0 and (step + 1) % max(1, steps // 5) == 0:
            print(f"step {step + 1:4d}  meta loss {float(info.meta_loss):.3f}  λ all-reduces {comm.allreduces}",
                  flush=True)

    # what each rank holds (bytes of its shards) and what SAMA adds: v and the backup, one adapter shard each
    frozen = [p for p in model.parameters() if not p.requires_grad]
    state = [v for p in lora for v in opt.state[p].values() if torch.is_tensor(v) and v.dim() > 0]
    mem = torch.tensor([local_bytes(lora), local_bytes(frozen), local_bytes(state), 2 * local_bytes(lora)],
                       dtype=torch.float64)
    gathered = [torch.zeros_like(mem) for _ in range(world)]
    dist.all_gather(gathered, mem)
    with torch.no_grad():  # learned weights of this rank's clean and corrupted sequences, averaged over ranks
        per = torch.cat([per_sequence(model, x_all[i:i + 128]) for i in range(0, len(x_all), 128)])
        w = weights(per).cpu()
    stats = torch.tensor([w[~bad_all].sum(), (~bad_all).sum(), w[bad_all].sum(), bad_all.sum()], dtype=torch.float64)
    dist.all_reduce(stats)
    if rank == 0:
        for r, m in enumerate(gathered):
            print(f"rank {r}: shards of LoRA adapters {int(m[0]):,} B, frozen weights {int(m[1]):,} B, "
                  f"AdamW state {int(m[2]):,} B; SAMA's v + backup {int(m[3]):,} B")
        print(f"learned weight: clean sequences {stats[0] / stats[1]:.3f}, corrupted {stats[2] / stats[3]:.3f} "
              f"({world} ranks on {device.type})")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
