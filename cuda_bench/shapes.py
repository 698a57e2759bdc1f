"""Parameter-shape lists of real transformers, and scaled-down versions of them.

`bert-base` and `gpt2-medium` are the exact parameter lists of the Hugging Face models
(BERT-base: embeddings, 12 encoder layers with attention/FFN weights, biases and LayerNorms,
pooler; GPT-2 medium: token/position embeddings, 24 blocks, final LayerNorm, tied LM head).
A scaled version keeps the architecture (same tensor count and layout) and shrinks the hidden
size and vocabulary by √s so the total is about s times the original.
"""
from __future__ import annotations

import math
import re

Shapes = list[tuple[int, ...]]


def bert_shapes(hidden: int = 768, layers: int = 12, vocab: int = 30522, positions: int = 512,
                ffn_mult: int = 4) -> Shapes:
    h, f = hidden, ffn_mult * hidden
    s: Shapes = [(vocab, h), (positions, h), (2, h), (h,), (h,)]  # word/pos/type embeddings, LayerNorm
    for _ in range(layers):
        s += [(h, h), (h,)] * 4                   # query, key, value, attention output
        s += [(h,), (h,)]                         # attention LayerNorm
        s += [(f, h), (f,), (h, f), (h,)]         # intermediate, output
        s += [(h,), (h,)]                         # output LayerNorm
    s += [(h, h), (h,)]                           # pooler
    return s


def gpt2_shapes(hidden: int = 1024, layers: int = 24, vocab: int = 50257, positions: int = 1024) -> Shapes:
    h = hidden
    s: Shapes = [(vocab, h), (positions, h)]      # wte (tied with lm_head), wpe
    for _ in range(layers):
        s += [(h,), (h,)]                         # ln_1
        s += [(h, 3 * h), (3 * h,)]               # attn.c_attn
        s += [(h, h), (h,)]                       # attn.c_proj
        s += [(h,), (h,)]                         # ln_2
        s += [(h, 4 * h), (4 * h,)]               # mlp.c_fc
        s += [(4 * h, h), (h,)]                   # mlp.c_proj
    s += [(h,), (h,)]                             # ln_f
    return s


MODELS = {
    "bert": (bert_shapes, dict(hidden=768, vocab=30522, positions=512)),
    "gpt2": (gpt2_shapes, dict(hidden=1024, vocab=50257, positions=1024)),
}
FULL_NAMES = {"bert": "bert-base", "gpt2": "gpt2-medium"}


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def scaled(model: str, target: int | None) -> Shapes:
    """The model's parameter list, or a version scaled to about `target` elements."""
    fn, base = MODELS[model]
    full = fn()
    if target is None:
        return full
    r = math.sqrt(target / numel(full))
    hidden = max(16, int(round(base["hidden"] * r / 16)) * 16)
    kw = dict(hidden=hidden, vocab=max(16, int(round(base["vocab"] * r))),
              positions=max(16, int(round(base["positions"] * r))))
    # The hidden size moves in steps of 16: refine the vocabulary to land near the target.
    s = fn(**kw)
    extra = target - numel(s)
    kw["vocab"] = max(16, kw["vocab"] + int(round(extra / hidden)))
    return fn(**kw)


_SIZE = re.compile(r"^(bert|gpt2):(full|\d+(?:\.\d+)?[kKmM]?)$")


def parse_size(spec: str) -> tuple[str, Shapes]:
    """'bert:full', 'gpt2:32M', 'bert:1.5M', 'bert:250k' -> (label, shapes)."""
    m = _SIZE.match(spec.strip())
    if not m:
        raise ValueError(f"bad size {spec!r}: expected MODEL:full or MODEL:N[k|M] with MODEL in bert, gpt2 "
                         "(e.g. bert:full, gpt2:32M, bert:1M)")
    model, amount = m.groups()
    if amount == "full":
        return FULL_NAMES[model], scaled(model, None)
    mult = {"k": 1e3, "m": 1e6}.get(amount[-1].lower(), 1)
    n = int(float(amount.rstrip("kKmM")) * mult)
    return f"{model}-{amount}", scaled(model, n)
