"""Learned data-mixture weights for a small language model with `sama_ext.hf.SamaTrainer`.

Real text that every Python installation has (found at run time, nothing downloaded), cut into
byte-level sequences and grouped by source into domains:
  code     — standard-library source files (*.py)
  docs     — installed packages' descriptions (the METADATA of each distribution)
  licenses — license texts (the interpreter's LICENSE.txt, packages' LICENSE/COPYING files)
  target   — docstrings of standard-library functions and classes (English prose about code),
             from other files than `code`'s; NOT in the training mixture except through a small
             slice (--target-train sequences), plus held-out validation and test slices.
A GPT-2-style LM (config in code, random init, byte vocabulary) is trained on the mixture and
judged by its loss on the target test slice (mean next-byte cross-entropy, nats). Compared, each
early-stopped on the same target validation slice:
  uniform        — the uniform mixture (plain transformers.Trainer)
  uniform + ft   — then fine-tuned on the target slice (a configuration fixed in advance)
  target only    — trained on the target slice alone
  SAMA mixture   — SamaTrainer(weighting="domain", meta_dataset=the target slice): the mixture
                   weights are learned online towards a lower loss on the target slice
  SAMA + ft      — then the same fine-tuning
A plot of the learned domain weights over training goes to --out (hf_domain_mixing.png).

    PYTHONPATH=. python examples/hf_domain_mixing.py [--quick] [--seeds 0 1] [--steps 1000]

Measured results (machine, command, the negative outcome on three seeds): docs/huggingface.md.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib.metadata as md
import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import torch

try:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise SystemExit(f"this example needs transformers and accelerate (pip install '.[hf]'): {e}")

from sama_ext.hf import SamaTrainer, per_example_loss

DOMAINS = ("code", "docs", "licenses")
TARGET = "target"


# ----- data: text of the local Python installation ------------------------------------------------
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def _docstrings(source: str, min_len: int = 200) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_len:
                out.append(doc)
    return out


def collect_texts(max_bytes: int) -> dict[str, list[str]]:
    """Documents per domain, each domain capped at about max_bytes. Standard-library files are
    split by a hash of their path between `code` and `target`, so no text is in both."""
    texts = {d: [] for d in DOMAINS + (TARGET,)}
    size = dict.fromkeys(texts, 0)

    def add(domain, text):
        if size[domain] < max_bytes and text.strip():
            texts[domain].append(text)
            size[domain] += len(text.encode("utf-8", "replace"))

    for path in _stdlib_files():
        if size["code"] >= max_bytes and size[TARGET] >= max_bytes:
            break
        try:
            src = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if zlib.crc32(str(path.name).encode()) % 2:
            add("code", src)
        else:
            for doc in _docstrings(src):
                add(TARGET, doc)
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.is_file():
        add("licenses", lic.read_text(encoding="utf-8", errors="replace"))
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        meta = dist.read_text("METADATA") or ""
        body = meta.split("\n\n", 1)[1] if "\n\n" in meta else ""
        add("docs", body)
        for f in dist.files or []:
            name = f.name.upper()
            if name.startswith(("LICENSE", "LICENCE", "COPYING")) and f.suffix.lower() in ("", ".txt", ".md", ".rst"):
                try:
                    add("licenses", f.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    pass
    return texts


def blocks(docs: list[str], length: int, limit: int, rng: random.Random) -> list[torch.Tensor]:
    """Non-overlapping byte blocks of `length` from the documents (joined by blank lines), at most
    `limit`, drawn at random."""
    data = "\n\n".join(docs).encode("utf-8", "replace")
    n = len(data) // length
    t = torch.frombuffer(bytearray(data[: n * length]), dtype=torch.uint8).long().view(n, length)
    idx = rng.sample(range(n), min(limit, n))
    return [t[i] for i in idx]


def rows(blks, domain=None):
    out = [{"input_ids": b, "labels": b} for b in blks]   # full blocks: no padding, no -100
    if domain is not None:
        for r in out:
            r["domain"] = domain
    return out


# ----- model and training -----------------------------------------------------------------------
def make_model(seed: int, args) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                     n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


@torch.no_grad()
def target_loss(model, data, batch: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over the sequences: the metric, computed the same way
    for every method (sama_ext.hf.per_example_loss, causal LM)."""
    model.eval()
    losses = []
    for i in range(0, len(data), batch):
        x = torch.stack([r["input_ids"] for r in data[i:i + batch]])
        losses.append(per_example_loss(model(input_ids=x).logits, x, "causal_lm"))
    return torch.cat(losses).mean().item()


class EarlyStop(TrainerCallback):
    """Every `every` steps: the target validation loss (target_loss, the same definition for every
    method — not the Trainer's eval_loss, which for causal LMs divides by the unshifted label
    count); keeps the best weights in memory and stops after `patience` checks without improvement."""

    def __init__(self, model, val, every: int, patience: int):
        self.model, self.val, self.every, self.patience = model, val, every, patience
        self.best, self.best_step, self.state, self.bad, self.curve = math.inf, 0, None, 0, []

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return control
        loss = target_loss(self.model, self.val)   # (the next training step puts the model back in train mode)
        self.curve.append((state.global_step, loss))
        if loss < self.best:
            self.best, self.best_step, self.bad = loss, state.global_step, 0
            self.state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True
        return control


def train(model, train_rows, val, args, *, steps, lr, out_dir, sama=None):
    """Trains until `steps` or early stopping on `val`; returns the best model and its record."""
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(50, steps // 10), weight_decay=0.01,
        optim="adamw_torch", save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        disable_tqdm=args.quick)
    stop = EarlyStop(model, val, args.eval_every, args.patience)
    common = dict(model=model, args=targs, train_dataset=train_rows, callbacks=[stop])
    trainer = SamaTrainer(**common, **sama) if sama is not None else Trainer(**common)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    if stop.state is not None:
        model.load_state_dict(stop.state)
    return model, {"best_step": stop.best_step, "best_val": stop.best, "seconds": seconds,
                   "steps": trainer.state.global_step}, trainer


def run_seed(seed: int, data: dict, args) -> dict:
    args.seed = seed
    res = {}
    tmp = tempfile.mkdtemp(prefix="hf_mix_")
    mix, tgt, val, test = data["mix"], data["target_train"], data["target_val"], data["target_test"]
    plain_mix = [{k: v for k, v in r.items() if k != "domain"} for r in mix]

    def record(name, model, info):
        info["test"] = target_loss(model, test)
        res[name] = info
        print(f"  seed {seed} {name:14s} target test loss {info['test']:.4f}  (best val {info['best_val']:.4f} at "
              f"step {info['best_step']}/{info['steps']}, {info['seconds']:.0f}s)", flush=True)

    model, info, _ = train(make_model(seed, args), plain_mix, val, args, steps=args.steps, lr=args.lr, out_dir=tmp)
    record("uniform", copy.deepcopy(model), info)
    model, info, _ = train(model, tgt, val, args, steps=args.ft_steps, lr=args.ft_lr, out_dir=tmp)
    record("uniform + ft", model, info)
    model, info, _ = train(make_model(seed, args), tgt, val, args, steps=args.steps, lr=args.lr, out_dir=tmp)
    record("target only", model, info)
    sama = dict(meta_dataset=tgt, weighting="domain", meta_lr=args.meta_lr, meta_every=args.meta_every,
                meta_batch_size=args.meta_batch)
    model, info, trainer = train(make_model(seed, args), mix, val, args, steps=args.steps, lr=args.lr,
                                 out_dir=tmp, sama=sama)
    info["domain_weights"] = trainer.learned_weights()
    info["history"] = [(s, w.tolist()) for s, w in trainer.domain_weight_history]
    record("SAMA mixture", copy.deepcopy(model), info)
    model, info, _ = train(model, tgt, val, args, steps=args.ft_steps, lr=args.ft_lr, out_dir=tmp)
    record("SAMA + ft", model, info)
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def plot(results, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, res in enumerate(results):
        hist = res["SAMA mixture"]["history"]
        steps = [s for s, _ in hist]
        for j, name in enumerate(names):
            ax.plot(steps, [w[j] for _, w in hist], color=f"C{j}", alpha=1.0 if k == 0 else 0.4,
                    label=name if k == 0 else None)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("learned mixture weight")
    ax.set_title("SamaTrainer(weighting='domain'), target: docstrings", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps (a smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=1000, help="max optimiser steps per training run")
    ap.add_argument("--ft-steps", type=int, default=300, help="max fine-tuning steps on the target slice")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64, help="bytes per sequence")
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--per-domain", type=int, default=4000, help="training sequences per mixture domain")
    ap.add_argument("--target-train", type=int, default=128, help="target sequences for meta set / fine-tuning")
    ap.add_argument("--target-val", type=int, default=256)
    ap.add_argument("--target-test", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    ap.add_argument("--meta-lr", type=float, default=0.05)
    ap.add_argument("--meta-every", type=int, default=4)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default hf_mixing_results; a temporary one with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.ft_steps, args.width, args.layers, args.heads = 12, 6, 32, 1, 2
        args.per_domain, args.target_train, args.target_val, args.target_test = 48, 16, 16, 16
        args.eval_every, args.seq, args.meta_batch = 4, 32, 8
    scratch = args.out is None and args.quick   # a smoke run's results go to a temporary folder, deleted after
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="hf_mixing_quick_") if args.quick else "hf_mixing_results"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.perf_counter()
    need = (args.per_domain + args.target_train + args.target_val + args.target_test) * args.seq
    texts = collect_texts(max_bytes=4 * need)
    rng = random.Random(1234)   # one split for all seeds
    data, sizes = {"mix": []}, {}
    for d in DOMAINS:
        b = blocks(texts[d], args.seq, args.per_domain, rng)
        if not b:
            raise SystemExit(f"no text found for domain {d!r} on this machine")
        sizes[d] = len(b)
        data["mix"] += rows(b, d)
    tb = blocks(texts[TARGET], args.seq, args.target_train + args.target_val + args.target_test, rng)
    if len(tb) < args.target_train + args.target_val + args.target_test:
        raise SystemExit(f"only {len(tb)} target sequences found")
    data["target_train"] = rows(tb[:args.target_train])
    data["target_val"] = rows(tb[args.target_train:args.target_train + args.target_val])
    data["target_test"] = rows(tb[args.target_train + args.target_val:])
    n_params = sum(p.numel() for p in make_model(0, args).parameters())
    print(f"GPT-2-style byte LM ({n_params:,} params, {args.layers} layers, width {args.width}, random init), "
          f"{args.seq}-byte sequences; mixture {sizes} (uniform: equal counts); target (stdlib docstrings): "
          f"{args.target_train} train / {args.target_val} val / {args.target_test} test; "
          f"data collected in {time.perf_counter() - t0:.1f}s", flush=True)

    results = [run_seed(s, data, args) for s in args.seeds]
    methods = list(results[0])
    print(f"\ntarget-domain test loss (nats/byte; lower is better), {len(args.seeds)} seed(s): mean ± std")
    for m in methods:
        mu, sd = mean_std([r[m]["test"] for r in results])
        secs = mean_std([r[m]["seconds"] for r in results])[0]
        print(f"  {m:14s} {mu:.4f} ± {sd:.4f}   ({secs:.0f}s per run)")
    for m in ("uniform", "uniform + ft", "target only"):
        d = [r["SAMA + ft"]["test"] - r[m]["test"] for r in results]
        mu, sd = mean_std(d)
        print(f"  SAMA + ft − {m:13s}: {mu:+.4f} ± {sd:.4f} (paired)")
    print("  learned domain weights (seed %d): %s" % (args.seeds[0], ", ".join(
        f"{k} {v:.3f}" for k, v in results[0]["SAMA mixture"]["domain_weights"].items())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    try:
        plot(results, list(results[0]["SAMA mixture"]["domain_weights"]), out / "hf_domain_mixing.png")
        print(f"  plot: {out / 'hf_domain_mixing.png'}")
    except ImportError:
        print("  (no matplotlib: no plot)")
    print(f"total {time.perf_counter() - t0:.0f}s")
    if scratch:
        shutil.rmtree(out, ignore_errors=True)
    if args.quick:
        print("  (--quick is a smoke run: far too short for the losses to mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
