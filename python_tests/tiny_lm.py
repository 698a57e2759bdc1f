"""A small decoder LM set up for meta steps in 16-bit precision (issue 18), shared by
python_tests/test_precision.py and python_tests/precision_sweep.py.

`setup(...)` builds a GPT-style decoder from a config in code (random init, no downloads), trains it
a few AdamW steps in the given parameter dtype with a weight net on the per-sequence loss (through
`sama_ext.frozen`), and returns the pieces of one meta step. `as_float64(run)` casts every value
(θ, λ, optimiser state, last gradients) to float64 for the oracles: the meta step in float64 at the
same α, and the exact SAMA quantity −∂/∂λ[∇θL_base · v] by double backward.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sama_ext
from sama_oracle import cosine  # noqa: F401  (re-exported for precision_sweep)

# GPT-2's vocabulary and context; name: (width, layers, heads) -> parameter count
VOCAB, CTX = 50257, 1024
SIZES = {
    "1M": (16, 2, 2),       # 0.83M, nearly all of it the embedding
    "15M": (256, 2, 4),     # 14.7M
    "100M": (768, 8, 12),   # 96.6M
}
SEQ = 32      # tokens per sequence: most position rows of the context never train
BATCH = 16


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)  # explicit: double backward needs it
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        a = att.softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int = CTX):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head


def per_sequence_loss(model, tokens):
    logits = model(tokens[:, :-1]).float()  # the loss in float32, as mixed-precision training does
    ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return ce.mean(1)


def weight_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))


def weighted_loss(model, wnet, tokens):
    per = per_sequence_loss(model, tokens).to(next(wnet.parameters()).dtype)
    z = sama_ext.frozen(per)
    z = (z - z.mean()) / (z.std() + 1e-3)  # standardised: the weights (and their λ-gradients) differ per sequence
    w = torch.sigmoid(wnet(z.unsqueeze(1))).squeeze(1)
    return (w * per).mean()


def zipf_tokens(g: torch.Generator, vocab: int, n: int) -> torch.Tensor:
    """Zipf-distributed tokens (exponent 1.1): most of the vocabulary is rare, as in text."""
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    return torch.multinomial(p / p.sum(), n * (SEQ + 1), replacement=True, generator=g).view(n, SEQ + 1)


@dataclass
class Run:
    model: nn.Module
    wnet: nn.Module
    opt: torch.optim.Optimizer
    base_batch: torch.Tensor
    meta_batch: torch.Tensor

    @property
    def theta(self):
        return list(self.model.parameters())

    @property
    def lam(self):
        return list(self.wnet.parameters())

    def base_loss(self):
        return weighted_loss(self.model, self.wnet, self.base_batch)

    def meta_loss(self):
        return per_sequence_loss(self.model, self.meta_batch).mean()


def setup(size: str, dtype: torch.dtype, seed: int = 0, steps: int = 5, lr: float = 1e-3, batch: int = BATCH) -> Run:
    """Random-init model in `dtype` (params and AdamW state), `steps` weighted AdamW steps; the
    weight net stays float32. Deterministic given (size, dtype, seed, steps)."""
    vocab, (d, layers, heads) = VOCAB, SIZES[size]
    torch.manual_seed(seed)
    model = TinyLM(vocab, d, layers, heads).to(dtype)
    wnet = weight_net()
    # float16 cannot hold Adam's usual eps = 1e-8 (it rounds to 0 and 0/0 appears): 1e-4 there
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-4 if dtype == torch.float16 else 1e-8)
    g = torch.Generator().manual_seed(seed + 1000)
    for _ in range(steps):
        tokens = zipf_tokens(g, vocab, batch)
        opt.zero_grad()
        weighted_loss(model, wnet, tokens).backward()
        opt.step()
    return Run(model, wnet, opt, zipf_tokens(g, vocab, batch), zipf_tokens(g, vocab, batch))


def as_float64(run: Run) -> Run:
    """The same values (θ, λ, last gradients, AdamW state) cast to float64."""
    model, wnet = copy.deepcopy(run.model).double(), copy.deepcopy(run.wnet).double()
    opt = torch.optim.AdamW(model.parameters(), **{k: v for k, v in run.opt.defaults.items()
                                                  if k != "decoupled_weight_decay"})
    for p, q in zip(run.model.parameters(), model.parameters()):
        q.grad = p.grad.double()
        opt.state[q] = {k: (t.double() if t.is_floating_point() and t.dim() > 0 else t.clone())
                        for k, t in run.opt.state[p].items()}
    return Run(model, wnet, opt, run.base_batch, run.meta_batch)


def meta_grad(run: Run, **kw) -> tuple[torch.Tensor, sama_ext.MetaStepInfo]:
    """λ's meta-gradient from one sama_ext.meta_step (flattened, float64) and its info."""
    for q in run.lam:
        q.grad = None
    info = sama_ext.meta_step(run.theta, run.opt, run.lam, run.base_loss, run.meta_loss, **kw)
    return torch.cat([q.grad.flatten().double() for q in run.lam]), info


def exact(run64: Run, safeguard: str = "zero_unseen") -> torch.Tensor:
    """The quantity SAMA's central difference estimates, −∂/∂λ[∇θL_base · v] with
    v = diag ⊙ dL_meta/dθ, by double backward (frozen inputs held at θ, as in meta_step)."""
    th, lam = run64.theta, run64.lam
    d = torch.autograd.grad(run64.meta_loss(), th)
    v, _ = sama_ext.adapt(run64.opt, th, d, safeguard=safeguard)
    g_th = torch.autograd.grad(run64.base_loss(), th, create_graph=True)
    mixed = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g_th, v)), lam)
    return -torch.cat([m.flatten() for m in mixed])


