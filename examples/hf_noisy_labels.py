"""Noisy labels with `sama_ext.hf.SamaTrainer(weighting="sample")`: the reweighting of
examples/reweight_transformer.py, written as a few lines of Trainer code instead of a loop.

The same data (synthetic keyword sequences, 40% of the training labels replaced by a wrong class,
64 clean meta sequences) and the same tiny BertForSequenceClassification (config in code, random
init). Compared: plain `transformers.Trainer` and `SamaTrainer` with a weight net on each
example's loss; then the learned weights of correctly labeled vs mislabeled examples
(`trainer.learned_weights()`, aligned with the training set) and a retraining on
`trainer.prune(keep=0.6)`.

    PYTHONPATH=. python examples/hf_noisy_labels.py [--quick] [--seed N]
    PYTHONPATH=. torchrun --nproc_per_node=2 examples/hf_noisy_labels.py --quick   # DDP (gloo on CPUs)

Measured results (3 seeds, machine, command): docs/huggingface.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from reweight_transformer import CLASSES, make_data, tiny_bert  # examples/ (the script's folder) is on sys.path
from sama_ext.demo import add_symmetric_noise

try:
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise SystemExit(f"this example needs transformers and accelerate (pip install '.[hf]'): {e}")

from sama_ext.hf import SamaTrainer


def rows(x, y):
    return [{"input_ids": x[i], "labels": y[i]} for i in range(len(y))]


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return 100 * (model(input_ids=x).logits.argmax(1) == y).float().mean().item()


def fit(train, args, out_dir, **sama):
    model = tiny_bert(args.seed, args.hidden, 0.0)   # the same initial weights for every run
    targs = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=args.batch_size,
                              num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.01,
                              lr_scheduler_type="constant", optim="adamw_torch", save_strategy="no",
                              logging_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
                              disable_tqdm=args.quick)
    cls = SamaTrainer if sama else Trainer
    trainer = cls(model=model, args=targs, train_dataset=train, **sama)
    t0 = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and epochs (a smoke run)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--keep", type=float, default=0.6, help="fraction kept by prune() for the retraining")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train = 2, 128
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    # under torchrun every rank runs all of this (learned_weights() and prune() gather over ranks); rank 0 prints
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)

    gen = torch.Generator().manual_seed(args.seed)
    x, y_true = make_data(args.n_train, gen)
    y, noisy = add_symmetric_noise(y_true, args.noise, CLASSES, gen)
    x_meta, y_meta = make_data(64, gen)
    x_test, y_test = make_data(512, gen)
    train = rows(x, y)
    say(f"tiny BERT, AdamW; {args.n_train} training sequences with {args.noise:.0%} wrong labels, 64 clean meta "
          f"sequences, {args.epochs} epochs (transformers.Trainer)")
    with tempfile.TemporaryDirectory() as tmp:
        plain, t_plain = fit(train, args, tmp)
        sama, t_sama = fit(train, args, tmp, meta_dataset=rows(x_meta, y_meta), weighting="sample",
                           meta_lr=args.meta_lr)
        w = sama.learned_weights()
        kept = sama.prune(keep=args.keep)
        retrained, t_re = fit(kept, args, tmp)
    kept_noisy = noisy[torch.tensor(kept.indices)].float().mean().item()
    say(f"  plain Trainer                        : test accuracy {accuracy(plain.model, x_test, y_test):5.1f}%  "
          f"({t_plain:.1f}s)")
    say(f"  SamaTrainer(weighting='sample')      : test accuracy {accuracy(sama.model, x_test, y_test):5.1f}%  "
          f"({t_sama:.1f}s)")
    say(f"  plain Trainer on prune(keep={args.keep})  : test accuracy "
          f"{accuracy(retrained.model, x_test, y_test):5.1f}%  ({t_re:.1f}s; {kept_noisy:.0%} of the kept examples "
          f"mislabeled, {noisy.float().mean().item():.0%} before)")
    say(f"  learned weight (learned_weights(), mean over the training examples): correctly labeled "
          f"{w[~noisy].mean().item():.3f}, mislabeled {w[noisy].mean().item():.3f}")
    if args.quick:
        say("  (--quick is a smoke run: far too short for the accuracies or weights to mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
