"""Noisy labels with `sama_ext.hf.SamaTrainer(weighting="sample")`: the reweighting of
examples/reweight_transformer.py, written as a few lines of Trainer code instead of a loop, against
the simple baselines that use the same clean set (issue #17).

The same data (synthetic keyword sequences, 40% of the training labels replaced by a wrong class,
64 clean meta sequences) and the same tiny BertForSequenceClassification (config in code, random
init). Trained: plain `transformers.Trainer`, `SamaTrainer` with a weight net on each example's
loss, and plain training again on `trainer.prune(keep=0.6)`. Each is reported three ways, all using
only the clean meta set (never the test set) to decide anything:
  final          the model after the last epoch;
  early-stopped  the epoch with the best clean-set accuracy (ties: lower clean-set loss, then the
                 earlier epoch), evaluated at the end of every epoch;
  fine-tuned     the final model with its classifier head refitted on the clean set, the encoder
                 frozen — `sama_ext.noisy_label_baselines.finetune_last_layer` with its
                 configuration fixed in advance (Adam lr 1e-2, 100 full-batch steps), not tuned here.
With several seeds, the SamaTrainer rows are compared per seed (paired) with the strongest of the
three plain-Trainer rows.

    PYTHONPATH=. python examples/hf_noisy_labels.py [--quick] [--seeds 0 1 2]
    PYTHONPATH=. torchrun --nproc_per_node=2 examples/hf_noisy_labels.py --quick   # DDP (gloo on CPUs)

Measured results (3 seeds, machine, command): docs/huggingface.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from reweight_transformer import CLASSES, make_data, tiny_bert  # examples/ (the script's folder) is on sys.path
from sama_ext.demo import add_symmetric_noise
from sama_ext.noisy_label_baselines import FINETUNE, finetune_last_layer

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise SystemExit(f"this example needs transformers and accelerate (pip install '.[hf]'): {e}")

from sama_ext.hf import SamaTrainer

VIEWS = ("final", "early-stopped", "fine-tuned")


def rows(x, y):
    return [{"input_ids": x[i], "labels": y[i]} for i in range(len(y))]


@torch.no_grad()
def acc_and_loss(forward, x, y) -> tuple[float, float]:
    logits = forward(x)
    return 100 * (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def bert_logits(model):
    model.eval()
    return lambda x: model(input_ids=x).logits


class CleanSetEarlyStopping(TrainerCallback):
    """At the end of every epoch: the clean-set accuracy and loss (the stopping criterion) and the
    test accuracy (only recorded, to report the chosen epoch's)."""

    def __init__(self, clean, test):
        self.clean, self.test, self.records = clean, test, []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        c_acc, c_loss = acc_and_loss(bert_logits(model), *self.clean)
        t_acc, _ = acc_and_loss(bert_logits(model), *self.test)
        model.train(was_training)
        self.records.append((round(state.epoch), c_acc, c_loss, t_acc))

    def chosen(self) -> tuple[int, float]:
        """(epoch, test accuracy) of the best clean-set accuracy, ties to the lower clean-set loss."""
        epoch, _, _, t_acc = max(self.records, key=lambda r: (r[1], -r[2]))
        return epoch, t_acc


class PooledFeatures(nn.Module):
    """BERT's pooled output: what BertForSequenceClassification's classifier head reads."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, x):
        return self.bert(input_ids=x).pooler_output


def finetuned_accuracy(model, clean, test) -> float:
    """Test accuracy after refitting the classifier head on the clean set (the model is not changed)."""
    as_seq = nn.Sequential(PooledFeatures(model.bert), model.classifier).eval()
    # the head reads the pooled output through a dropout of p = 0 (tiny_bert(..., 0.0)); check the split is exact
    assert torch.allclose(as_seq(clean[0]), bert_logits(model)(clean[0]), atol=1e-5)
    tuned = finetune_last_layer(as_seq, *clean)   # FINETUNE's lr and steps, fixed in advance
    return acc_and_loss(tuned, *test)[0]


def fit(train, args, seed, out_dir, clean, test, **sama):
    model = tiny_bert(seed, args.hidden, 0.0)   # the same initial weights for every run of a seed
    targs = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=args.batch_size,
                              num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.01,
                              lr_scheduler_type="constant", optim="adamw_torch", save_strategy="no",
                              logging_strategy="no", report_to=[], use_cpu=True, seed=seed,
                              disable_tqdm=args.quick)
    stopper = CleanSetEarlyStopping(clean, test)
    cls = SamaTrainer if sama else Trainer
    trainer = cls(model=model, args=targs, train_dataset=train, callbacks=[stopper], **sama)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    epoch, es_acc = stopper.chosen()
    views = {"final": acc_and_loss(bert_logits(trainer.model), *test)[0], "early-stopped": es_acc,
             "fine-tuned": finetuned_accuracy(trainer.model, clean, test)}
    return trainer, views, epoch, seconds


def run_seed(seed, args, say) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x, y_true = make_data(args.n_train, gen)
    y, noisy = add_symmetric_noise(y_true, args.noise, CLASSES, gen)
    clean = make_data(64, gen)
    test = make_data(512, gen)
    train = rows(x, y)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, res["plain"], e_plain, t_plain = fit(train, args, seed, tmp, clean, test)
        sama, res["sama"], e_sama, t_sama = fit(train, args, seed, tmp, clean, test, meta_dataset=rows(*clean),
                                                weighting="sample", meta_lr=args.meta_lr)
        w = sama.learned_weights()
        kept = sama.prune(keep=args.keep)
        _, res["pruned"], e_re, t_re = fit(kept, args, seed, tmp, clean, test)
    kept_noisy = noisy[torch.tensor(kept.indices)].float().mean().item()
    say(f"seed {seed}: test accuracy (%)          final  early-stopped (epoch)  fine-tuned   train time")
    for key, name, epoch, t in (("plain", "plain Trainer", e_plain, t_plain),
                                ("sama", "SamaTrainer(weighting='sample')", e_sama, t_sama),
                                ("pruned", f"plain Trainer on prune(keep={args.keep})", e_re, t_re)):
        v = res[key]
        say(f"  {name:<36} {v['final']:5.1f}  {v['early-stopped']:7.1f} ({epoch:2d})   "
            f"{v['fine-tuned']:10.1f}   {t:7.1f}s")
    say(f"  prune(keep={args.keep}) kept {kept_noisy:.0%} mislabeled examples ({noisy.float().mean().item():.0%} "
        f"before); learned weight (mean over the training examples): correctly labeled "
        f"{w[~noisy].mean().item():.3f}, mislabeled {w[noisy].mean().item():.3f}")
    return res


def spread(values) -> str:
    m = statistics.mean(values)
    return f"{m:+5.1f} ± {statistics.stdev(values):3.1f}" if len(values) > 1 else f"{m:+5.1f}"


def summarise(results: list[dict], say) -> None:
    say(f"\nover seeds (mean ± sample std, n = {len(results)}):" + "".join(v.rjust(15) for v in VIEWS))
    for key, name in (("plain", "plain Trainer"), ("sama", "SamaTrainer"), ("pruned", "plain on prune()")):
        say(f"  {name:<39}" + "".join(spread([r[key][v] for r in results]).replace("+", " ").rjust(15)
                                          for v in VIEWS))
    # the strongest simple baseline: the plain-Trainer view with the highest mean test accuracy (chosen
    # with the test set, which only favours the baseline)
    best = max(VIEWS, key=lambda v: statistics.mean(r["plain"][v] for r in results))
    say(f"paired differences (points) against the strongest simple baseline, plain Trainer {best}:")
    for key, name in (("sama", "SamaTrainer"), ("pruned", "plain on prune()")):
        for v in VIEWS:
            d = [r[key][v] - r["plain"][best] for r in results]
            say(f"  {name + ', ' + v:<33} {spread(d)}   per seed: " + ", ".join(f"{x:+.1f}" for x in d))


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
    ap.add_argument("--seed", type=int, default=0, help="one seed (ignored if --seeds is given)")
    ap.add_argument("--seeds", type=int, nargs="+", help="several seeds, then a paired summary")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train = 2, 128
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    # under torchrun every rank runs all of this (learned_weights() and prune() gather over ranks); rank 0 prints
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    say(f"tiny BERT, AdamW; {args.n_train} training sequences with {args.noise:.0%} wrong labels, 64 clean meta "
        f"sequences, {args.epochs} epochs (transformers.Trainer); early stopping and head fine-tuning "
        f"(lr {FINETUNE['lr']}, {FINETUNE['steps']} steps) on the clean meta set")
    results = [run_seed(s, args, say) for s in (args.seeds or [args.seed])]
    if len(results) > 1:
        summarise(results, say)
    if args.quick:
        say("  (--quick is a smoke run: far too short for the accuracies or weights to mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
