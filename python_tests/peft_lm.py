"""A tiny HF Llama built from a config in code (random init, no download) with PEFT LoRA adapters
on q_proj and v_proj: base params = the adapters only, every other weight frozen. Shared by
test_fsdp.py (single process, and the oracle) and fsdp_worker.py --mode peft (FSDP2).

The losses are written once, as functions of the adapters' values (torch.func.functional_call),
so the oracle evaluates exactly the network the meta step ran."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPE = torch.float64
VOCAB, SEQ = 48, 8


def build(seed: int = 0) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(DTYPE)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # PEFT starts B at 0: give the adapters a generic starting point
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def layers(model) -> list[torch.nn.Module]:
    return list(model.base_model.model.model.layers)


def tokens(rank: int, step: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 * rank + step)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


def per_sequence(model, toks: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=toks).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), toks[:, 1:].reshape(-1),
                           reduction="none").reshape(toks.shape[0], -1).mean(1)


def losses(model, wnet, x, xm, stop):
    """base: per-sequence losses weighted by the weight net of their frozen values; meta: the
    LM loss on the meta batch plus a direct λ term."""
    def base_loss():
        per = per_sequence(model, x)
        w = wnet(stop(per))
        return (w * per).sum() / w.sum()

    def meta_loss():
        return per_sequence(model, xm).mean() + 0.05 * wnet(per_sequence(model, xm).detach()).mean()

    return base_loss, meta_loss
