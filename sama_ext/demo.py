"""`python -m sama_ext.demo` — learning to reweight noisy labels with SAMA.

A Meta-Weight-Net-style experiment on scikit-learn's bundled handwritten digits (no download):

* 60% of the training labels are replaced by a wrong class (symmetric noise);
* a small *clean* meta set (100 samples) says what "good" looks like;
* a weight net w(ℓ; λ) (1→100→1, sigmoid) maps each training sample's loss ℓ to a weight, the
  base model θ (MLP 64→256→256→10) trains on the weighted loss Σ w·ℓ / Σ w with Adam, and after
  every base step `sama_ext.meta_step` fills λ.grad with an estimate of d L_meta / dλ, the
  gradient of the clean meta loss through the base step;
* the weight net sees ℓ through `sama_ext.frozen(ℓ)`: a stop-gradient input (`ℓ.detach()` in the
  base step) that meta_step holds at its value at θ while it evaluates the loss at θ ± εv
  (re-computing it there would estimate a different, wrong quantity).

Baselines, trained on the same splits, initial weights and batch order: plain training on the noisy
data, plain training on noisy data + the clean meta set, and small-loss selection (given the true
noise rate; `sama_ext.noisy_label_baselines`). Every method is reported at the final epoch,
early-stopped (the test accuracy at the epoch of best clean-meta-set accuracy) and after fine-tuning
its final model's last layer on the clean meta set (a configuration fixed in advance). Besides the
weight net, `sama_pe` learns one logit per training example (`sama_ext.PerExampleWeights`). Results
go to --out (JSON and a PNG plot); docs/results.md has the measured tables.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sama_ext
from sama_ext.noisy_label_baselines import FINETUNE, finetune_last_layer, small_loss_fraction, small_loss_mean

METHODS = {  # --methods name → label in the table
    "plain": "plain (noisy data)",
    "plain_meta": "plain (noisy + meta set)",
    "small_loss": "small-loss (given noise rate)",
    "sama_na": "SAMA-NA reweighting",
    "sama": "SAMA reweighting",
    "sama_pe": "SAMA per-example weights",
    "neumann": "Neumann reweighting",
    "cg": "CG reweighting",
}
META_METHODS = ("sama", "sama_na", "sama_pe", "neumann", "cg")
DEFAULT_METHODS = ["plain", "plain_meta", "small_loss", "sama_na", "sama", "sama_pe"]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def add_symmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, gen: torch.Generator):
    """Replace exactly round(rate·n) labels, chosen at random, by a *different* class drawn
    uniformly from the other num_classes − 1. Returns (noisy labels, bool mask of changed ones)."""
    n = labels.numel()
    flip = torch.randperm(n, generator=gen)[: round(rate * n)]
    noisy = labels.clone()
    offset = torch.randint(1, num_classes, (flip.numel(),), generator=gen)  # 1 … C−1: never the same class
    noisy[flip] = (labels[flip] + offset) % num_classes
    changed = torch.zeros(n, dtype=torch.bool)
    changed[flip] = True
    return noisy, changed


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor   # noisy
    y_true: torch.Tensor    # clean labels of the training set (only for the memorisation metric)
    noisy: torch.Tensor     # bool: this training label was changed
    x_meta: torch.Tensor
    y_meta: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10


def add_asymmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, gen: torch.Generator):
    """Class-dependent noise: exactly round(rate·n) labels, chosen at random, become the next class
    (i → i+1 mod C). Returns (noisy labels, bool mask of changed ones)."""
    n = labels.numel()
    flip = torch.randperm(n, generator=gen)[: round(rate * n)]
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + 1) % num_classes
    changed = torch.zeros(n, dtype=torch.bool)
    changed[flip] = True
    return noisy, changed


NOISE_KINDS = {"symmetric": add_symmetric_noise, "asymmetric": add_asymmetric_noise}


DATASETS = ("digits", "synthetic50")


def load_data(dataset: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y, number of classes). digits: scikit-learn's 1797 × 8×8 images, pixel values 0…16 → x/16.
    synthetic50: a fixed draw of scikit-learn's make_classification — 4000 samples, 64 features (32
    informative), 50 classes of one Gaussian cluster each, class_sep 1.5 — standardised per feature;
    a task with many classes, where a small clean set has few samples per class."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target, dtype=torch.long), 10
    if dataset == "synthetic50":
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=4000, n_features=64, n_informative=32, n_redundant=0, n_classes=50,
                                   n_clusters_per_class=1, class_sep=1.5, flip_y=0.0, random_state=0)
        x = torch.tensor(x, dtype=torch.float32)
        return (x - x.mean(0)) / x.std(0), torch.tensor(y, dtype=torch.long), 50
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def load_split(seed: int, noise: float, test_size: int, meta_size: int, train_size: int, device,
               noise_kind: str = "symmetric", dataset: str = "digits") -> Split:
    """The dataset (load_data), split per seed into test / clean meta / noisy train (train_size ≤ 0:
    all the rest)."""
    x, y, classes = load_data(dataset)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    test, meta, rest = order[:test_size], order[test_size:test_size + meta_size], order[test_size + meta_size:]
    train = rest if train_size <= 0 else rest[:train_size]
    y_noisy, changed = NOISE_KINDS[noise_kind](y[train], noise, classes, gen)
    t = lambda a: a.to(device)  # noqa: E731
    return Split(t(x[train]), t(y_noisy), t(y[train]), t(changed), t(x[meta]), t(y[meta]), t(x[test]), t(y[test]),
                 classes)


# ----------------------------------------------------------------------------------------------
# Models and the reweighted loss
# ----------------------------------------------------------------------------------------------

def base_model(in_features: int = 64, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, num_classes))


def weight_net() -> nn.Module:
    """Meta-Weight-Net: per-sample loss → weight in (0, 1)."""
    return nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·ℓ / Σ w — normalised, so the weight net cannot lower the loss by shrinking all weights."""
    return (weights * losses).sum() / weights.sum().clamp_min(1e-12)


def reweighted_loss(model: nn.Module, wnet: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(model(x), y, reduction="none")
    # The weight net's input is a stop-gradient copy of the loss, held fixed across θ ± εv:
    weights = wnet(sama_ext.frozen(losses).unsqueeze(1)).squeeze(1)
    return weighted_mean(losses, weights)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).argmax(1) == y).float().mean()  # a device tensor: no host sync per epoch


# ----------------------------------------------------------------------------------------------
# One training loop for every method
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    method: str
    seed: int
    test_acc: list          # per epoch, %
    meta_acc: list          # per epoch, %
    final: float            # test accuracy after the last epoch, %
    early_stopped: float    # test accuracy at the epoch of best meta accuracy, %
    finetuned: float        # test accuracy of the final model after fine-tuning its last layer on the meta set, %
    best_epoch: int         # 1-based
    memorised: float        # % of mislabeled training samples predicted as their noisy label
    sec_per_epoch: float    # median wall time of an epoch (robust to a busy machine's spikes)
    seconds: float          # the whole run
    meta_steps: int = 0
    skipped_meta_steps: int = 0     # meta steps with zero or non-finite ‖v‖ (no-ops)


def train(method: str, data: Split, seed: int, args, bar=None) -> Run:
    device = data.x_train.device
    torch.manual_seed(seed)  # same initial θ for every method of a seed
    model = base_model(data.x_train.shape[1], data.num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    params = list(model.parameters())
    meta = method in META_METHODS
    x, y = data.x_train, data.y_train
    if method == "plain_meta":  # the clean meta set simply joins the training data
        x, y = torch.cat([x, data.x_meta]), torch.cat([y, data.y_meta])
    n = len(y)
    if method == "sama_pe":  # λ: one logit per training example (no weight net, no frozen input)
        wnet = sama_ext.PerExampleWeights(n, device=device)
        meta_opt = torch.optim.Adam(wnet.parameters(), lr=args.pe_meta_lr)
    else:
        wnet = weight_net().to(device) if meta else None
        meta_opt = torch.optim.Adam(wnet.parameters(), lr=args.meta_lr) if meta else None
    extra = {} if args.safeguard is None else {"safeguard": args.safeguard}
    if args.frozen_at is not None:
        extra["frozen_at"] = args.frozen_at
    gen = torch.Generator().manual_seed(seed + 1)  # batch order: same for every method of a seed
    meta_gen = torch.Generator().manual_seed(seed + 2)

    def meta_loss():
        if args.meta_batch and args.meta_batch < len(data.y_meta):  # a random meta batch
            i = torch.randperm(len(data.y_meta), generator=meta_gen)[:args.meta_batch].to(device)
            return F.cross_entropy(model(data.x_meta[i]), data.y_meta[i])
        return F.cross_entropy(model(data.x_meta), data.y_meta)

    test_acc = torch.zeros(args.epochs, device=device)
    meta_acc = torch.zeros(args.epochs, device=device)
    skipped = torch.zeros((), dtype=torch.long, device=device)
    steps = meta_steps = 0
    epoch_times = []
    t0 = time.perf_counter()
    def base_loss(xb, yb, idx):
        if method == "sama_pe":
            return weighted_mean(F.cross_entropy(model(xb), yb, reduction="none"), wnet(idx))
        return reweighted_loss(model, wnet, xb, yb)

    for epoch in range(args.epochs):
        t_epoch = time.perf_counter()
        model.train()
        keep = small_loss_fraction(epoch, args.noise) if method == "small_loss" else 1.0
        for idx in torch.randperm(n, generator=gen).to(device).split(args.batch_size):
            xb, yb = x[idx], y[idx]
            # base step: ordinary training on the (re)weighted loss
            if meta:
                loss = base_loss(xb, yb, idx)
            elif method == "small_loss":
                loss = small_loss_mean(F.cross_entropy(model(xb), yb, reduction="none"), keep)
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward(inputs=params)
            opt.step()
            steps += 1
            # meta step: right after opt.step(), while p.grad still holds the gradient it consumed
            if meta and steps % args.unroll == 0:
                meta_opt.zero_grad()
                info = sama_ext.meta_step(params, opt, list(wnet.parameters()),
                                          base_loss=lambda: base_loss(xb, yb, idx),
                                          meta_loss=meta_loss, alpha=args.alpha,
                                          method="sama" if method == "sama_pe" else method, **extra)
                meta_opt.step()
                skipped += info.skipped
                meta_steps += 1
        model.eval()
        test_acc[epoch] = accuracy(model, data.x_test, data.y_test)
        meta_acc[epoch] = accuracy(model, data.x_meta, data.y_meta)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # one sync per epoch, for its time; none per step
        epoch_times.append(time.perf_counter() - t_epoch)
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        memorised = memorised_share(model(data.x_train).argmax(1), data.y_train, data.noisy)
    finetuned = accuracy(finetune_last_layer(model, data.x_meta, data.y_meta), data.x_test, data.y_test)

    test, val = (test_acc * 100).tolist(), (meta_acc * 100).tolist()
    best = best_epoch(val)
    return Run(method, seed, test, val, final=test[-1], early_stopped=test[best], finetuned=100 * float(finetuned),
               best_epoch=best + 1,
               memorised=100 * float(memorised), sec_per_epoch=sorted(epoch_times)[len(epoch_times) // 2],
               seconds=seconds, meta_steps=meta_steps,
               skipped_meta_steps=int(skipped))


def best_epoch(meta_acc: list) -> int:
    """Early stopping on the clean meta set: the first epoch (0-based) with the best meta accuracy."""
    return max(range(len(meta_acc)), key=lambda e: (meta_acc[e], -e))


def memorised_share(pred: torch.Tensor, noisy_labels: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Fraction of the mislabeled training samples on which the model predicts the (wrong) noisy label."""
    if not bool(changed.any()):
        return torch.zeros((), device=pred.device)
    return (pred == noisy_labels)[changed].float().mean()


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def mean_std(xs) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((v - m) ** 2 for v in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0  # sample std
    return m, s


def fmt(xs) -> str:
    m, s = mean_std(xs)
    return f"{m:5.1f} ± {s:3.1f}"


def summarise(runs: dict[str, list[Run]]) -> dict:
    out = {}
    for m, rs in runs.items():
        out[m] = {k: dict(zip(("mean", "std"), mean_std([getattr(r, k) for r in rs])))
                  for k in ("final", "early_stopped", "finetuned", "memorised", "sec_per_epoch")}
        out[m]["best_epoch"] = [r.best_epoch for r in rs]
    return out


def paired_gain(runs, a: str, b: str, key: str):
    """Gain of method a over method b on the same seeds (mean ± sample std of the differences)."""
    return mean_std([getattr(ra, key) - getattr(rb, key) for ra, rb in zip(runs[a], runs[b])])


def table(runs: dict[str, list[Run]]) -> str:
    head = (f"{'method':<30} {'final test acc':>15} {'early-stopped':>15} {'final, then':>15} {'noisy labels':>13} "
            f"{'s/epoch':>8}")
    sub = f"{'':<30} {'(%)':>15} {'test acc (%)':>15} {'fine-tuned (%)':>15} {'memorised (%)':>13} {'(median)':>8}"
    lines = [head, sub, "-" * len(head)]
    for m, rs in runs.items():
        lines.append(f"{METHODS[m]:<30} {fmt([r.final for r in rs]):>15} {fmt([r.early_stopped for r in rs]):>15} "
                     f"{fmt([r.finetuned for r in rs]):>15} {fmt([r.memorised for r in rs]):>13} "
                     f"{mean_std([r.sec_per_epoch for r in rs])[0]:8.3f}")
    return "\n".join(lines)


def verdict(runs: dict[str, list[Run]], target: float) -> tuple[list[str], dict]:
    """A plain-language reading of the numbers, computed from them (nothing here is canned)."""
    lines, facts = [], {}
    if "plain" not in runs:
        return lines, facts
    s = summarise(runs)
    final = lambda m: s[m]["final"]["mean"]          # noqa: E731
    stopped = lambda m: s[m]["early_stopped"]["mean"]  # noqa: E731
    metas = [m for m in META_METHODS if m in runs]
    for m in metas:
        g, gs = paired_gain(runs, m, "plain", "final")
        ge, ges = paired_gain(runs, m, "plain", "early_stopped")
        per_seed = ", ".join(f"{ra.final - rb.final:+.1f}" for ra, rb in zip(runs[m], runs["plain"]))
        facts[m] = {"gain_final": g, "gain_final_std": gs, "gain_early_stopped": ge, "gain_early_stopped_std": ges}
        unstable = " — unstable: it works on some seeds and not on others" if gs > 8 else ""
        lines.append(f"{METHODS[m]}: final {final(m):.1f}% vs plain {final('plain'):.1f}%, a paired gain of "
                     f"{g:+.1f} ± {gs:.1f} points (per seed: {per_seed}){unstable}; the final model predicts "
                     f"the wrong label on {s[m]['memorised']['mean']:.0f}% of the mislabeled training samples "
                     f"(plain: {s['plain']['memorised']['mean']:.0f}%).")
    if "sama" in runs:
        g = facts["sama"]["gain_final"]
        facts["target_points"], facts["target_met"] = target, bool(g >= target)
        lines.append(f"Target (SAMA's final accuracy ≥ plain's + {target:g} points): "
                     f"{'MET' if g >= target else 'MISSED'} ({g:+.1f}).")
    if "plain_meta" in runs:
        lines.append(f"Adding the 100 clean meta samples to the training data instead: final "
                     f"{final('plain_meta'):.1f}% ({final('plain_meta') - final('plain'):+.1f} over plain).")
    ref = "sama" if "sama" in runs else (metas[0] if metas else None)
    if ref is None:
        return lines, facts
    name, gap = METHODS[ref], stopped("plain") - final(ref)
    if gap > -3:
        lines.append(f"A simple baseline comes close: plain training early-stopped on the clean meta set reaches "
                     f"{stopped('plain'):.1f}%, {abs(gap):.1f} points {'above' if gap > 0 else 'below'} "
                     f"{name}'s final accuracy.")
    else:
        lines.append(f"Plain training early-stopped on the clean meta set reaches {stopped('plain'):.1f}%, "
                     f"{-gap:.1f} points below {name}'s final accuracy.")
    lines.append(f"With the same early stopping for both, {name} gains {facts[ref]['gain_early_stopped']:+.1f} ± "
                 f"{facts[ref]['gain_early_stopped_std']:.1f} points over plain.")
    drop_plain, drop_ref = stopped("plain") - final("plain"), stopped(ref) - final(ref)
    if drop_ref < 0.5 * drop_plain:
        lines.append(f"So the noise hurts plain training mostly late, by memorising wrong labels (it falls "
                     f"{drop_plain:.1f} points from its early-stopped accuracy); {name} falls only {drop_ref:.1f}: "
                     f"reweighting removes the need to pick the stopping epoch more than it raises the peak.")
    else:
        lines.append(f"Both lose accuracy late in training: plain falls {drop_plain:.1f} points from its "
                     f"early-stopped accuracy, {name} {drop_ref:.1f}.")
    cost = s[ref]["sec_per_epoch"]["mean"] / max(s["plain"]["sec_per_epoch"]["mean"], 1e-9)
    facts["cost_vs_plain"] = cost
    how = (" (per base step, one meta step: a meta-loss forward/backward, two base-loss forward/backward "
           "passes differentiated w.r.t. λ only, one no-grad forward and fused element-wise kernels)"
           if ref in ("sama", "sama_na") else "")
    lines.append(f"Cost: a {name} epoch takes {cost:.1f}× a plain one here{how}.")
    lines += against_strongest_baseline(runs, facts)
    return lines, facts


SIMPLE = ("plain", "small_loss")  # the simple baselines (plain_meta trains on the meta set: not comparable)
_KEY_NAMES = {"final": "final", "early_stopped": "early-stopped", "finetuned": "final + fine-tuned"}


def against_strongest_baseline(runs: dict[str, list[Run]], facts: dict) -> list[str]:
    """Every meta-learning row against the best simple baseline that uses the same clean set (plain or
    small-loss; final, early-stopped on the meta set, or fine-tuned on it), paired over seeds."""
    simple = [(m, k) for m in SIMPLE if m in runs for k in _KEY_NAMES]
    metas = [m for m in META_METHODS if m in runs]
    if not simple or not metas:
        return []
    avg = lambda m, k: mean_std([getattr(r, k) for r in runs[m]])[0]  # noqa: E731
    bm, bk = max(simple, key=lambda mk: avg(*mk))
    facts["strongest_baseline"] = {"method": bm, "key": bk, "mean": avg(bm, bk)}
    lines = [f"The strongest simple baseline here is {METHODS[bm]}, {_KEY_NAMES[bk]}: {avg(bm, bk):.1f}% "
             f"(the fine-tuning fits the last layer on the clean meta set: Adam lr {FINETUNE['lr']:g}, "
             f"{FINETUNE['steps']} full-batch steps, fixed in advance)."]
    for m in metas:
        best_k = max(_KEY_NAMES, key=lambda k: avg(m, k))
        d = [getattr(ra, best_k) - getattr(rb, bk) for ra, rb in zip(runs[m], runs[bm])]
        g, gs = mean_std(d)
        facts[m]["vs_strongest"] = {"key": best_k, "gain": g, "gain_std": gs}
        verdict_word = "above" if g - gs > 0 else ("below" if g + gs < 0 else "within the seed spread of")
        lines.append(f"{METHODS[m]} at its best ({_KEY_NAMES[best_k]}, {avg(m, best_k):.1f} ± "
                     f"{mean_std([getattr(r, best_k) for r in runs[m]])[1]:.1f}%) vs that baseline: paired "
                     f"{g:+.1f} ± {gs:.1f} points (per seed: {', '.join(f'{x:+.1f}' for x in d)}) — {verdict_word} it.")
    if "sama" in runs and "sama_pe" in runs:
        sw, sp = (mean_std([r.final for r in runs[m]])[1] for m in ("sama", "sama_pe"))
        g, gs = paired_gain(runs, "sama_pe", "sama", "final")
        lines.append(f"Per-example weights vs the weight net (final accuracy): paired {g:+.1f} ± {gs:.1f} points; "
                     f"spread over seeds {sp:.1f} vs {sw:.1f}.")
    return lines


def plot(runs: dict[str, list[Run]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rs in runs.items():
        curves = torch.tensor([r.test_acc for r in rs])
        mean, epochs = curves.mean(0), range(1, curves.shape[1] + 1)
        ax.plot(epochs, mean, label=METHODS[m])
        if len(rs) > 1:
            std = curves.std(0)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    if "plain" in runs:  # the simple baseline: plain training, early-stopped on the clean meta set
        stopped = mean_std([r.early_stopped for r in runs["plain"]])[0]
        ax.axhline(stopped, color="gray", ls="--", lw=1, label="plain, early-stopped on the meta set")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sama_ext.demo",
                                 description="Learning to reweight noisy labels with SAMA (Meta-Weight-Net style) "
                                             "on scikit-learn's digits, against plain and early-stopped training.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, …")
    ap.add_argument("--methods", "--method", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                    help="what to train (plain early-stopping is reported for every method)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, …)")
    ap.add_argument("--noise", type=float, default=0.6, help="label-noise rate on the training set")
    ap.add_argument("--dataset", default="digits", choices=list(DATASETS),
                    help="digits (the default) or synthetic50 (50 classes, a fixed make_classification draw)")
    ap.add_argument("--noise-kind", default="symmetric", choices=list(NOISE_KINDS),
                    help="symmetric: a uniformly drawn wrong class; asymmetric: class i → i+1")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64, help="base batch size")
    ap.add_argument("--lr", type=float, default=1e-3, help="base Adam learning rate")
    ap.add_argument("--meta-lr", type=float, default=1e-3, help="weight-net Adam learning rate")
    ap.add_argument("--pe-meta-lr", type=float, default=1e-2,
                    help="Adam learning rate of the per-example logits (sama_pe; fixed in advance, not tuned)")
    ap.add_argument("--meta-batch", type=int, default=0, help="meta batch size (0: the whole meta set)")
    ap.add_argument("--alpha", type=float, default=1.0, help="SAMA's finite-difference step, ε = α/‖v‖")
    ap.add_argument("--unroll", type=int, default=1, help="base steps between meta steps")
    ap.add_argument("--safeguard", default=None, choices=list(sama_ext.SAFEGUARDS),
                    help="Adam diagonal safeguard passed to meta_step (default: meta_step's own default)")
    ap.add_argument("--frozen-at", default=None, choices=["theta", "theta_plus"],
                    help="where meta_step records frozen() inputs (default: meta_step's own default)")
    ap.add_argument("--test-size", type=int, default=500, help="test samples per seed")
    ap.add_argument("--meta-size", type=int, default=100, help="clean meta samples per seed")
    ap.add_argument("--train-size", type=int, default=0, help="noisy training samples (0: all the rest, 1197)")
    ap.add_argument("--target", type=float, default=15.0, help="points SAMA's final accuracy should gain over plain")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default). The models are tiny: extra threads only add "
                         "synchronisation, and on a busy 2-core machine 2 threads ran 12× slower than 1")
    ap.add_argument("--out", default="demo_results", help="where results.json and accuracy.png go")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.unroll < 1 or args.seeds < 1 or args.epochs < 1:
        ap.error("--unroll, --seeds and --epochs must be ≥ 1")
    if "small_loss" in args.methods and not 0 <= args.noise < 1:
        ap.error("small-loss selection assumes the noise rate --noise, which must be in [0, 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        from tqdm import tqdm
    except ImportError as e:
        raise SystemExit(f"the demo needs scikit-learn, matplotlib and tqdm ({e}): "
                         "pip install scikit-learn matplotlib tqdm  (or: pip install '.[demo]')")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sama_ext demo: noisy-label reweighting on {args.dataset}, {args.noise:.0%} {args.noise_kind} noise, "
          f"{args.epochs} epochs × {args.seeds} seeds on {device} (backend: {sama_ext.backend()})")

    t_start = time.perf_counter()
    splits = {seed: load_split(seed, args.noise, args.test_size, args.meta_size, args.train_size, device,
                               args.noise_kind, args.dataset)
              for seed in range(args.seeds)}
    runs: dict[str, list[Run]] = {}
    for m in args.methods:
        with tqdm(total=args.seeds * args.epochs, desc=f"{METHODS[m]:<26}", unit="epoch", file=sys.stdout,
                  disable=args.no_progress, mininterval=0.5) as bar:
            runs[m] = [train(m, data, seed, args, bar) for seed, data in splits.items()]
            bar.set_postfix_str(f"final test acc {fmt([r.final for r in runs[m]])}")
    total = time.perf_counter() - t_start

    n_train = len(splits[0].y_train)
    print(f"\nTest accuracy over {args.seeds} seed(s), mean ± std ({args.test_size} test / {args.meta_size} clean meta / "
          f"{n_train} noisy train samples; early-stopped = test accuracy at the epoch of best clean-meta accuracy):\n")
    print(table(runs))
    if "plain_meta" in runs:
        print("(plain (noisy + meta set) trains on the meta set, so early stopping on it is optimistic for that row.)")
    lines, facts = verdict(runs, args.target)
    if lines:
        print("\nWhat the numbers show:")
        for line in lines:
            print("  - " + line)
    print(f"\nTotal time {total:.0f}s.")

    title = (f"{args.dataset}, {args.noise:.0%} {args.noise_kind} label noise, {n_train} train / {args.meta_size} clean meta; "
             f"mean ± std over {args.seeds} seed(s)")
    png = out / "accuracy.png"
    plot(runs, png, title)
    results = {
        "config": {k: v for k, v in vars(args).items() if k not in ("no_progress",)},
        "backend": sama_ext.backend(), "torch": torch.__version__, "total_seconds": total,
        "summary": summarise(runs), "verdict": lines, "facts": facts,
        "runs": {m: [asdict(r) for r in rs] for m, rs in runs.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"Wrote {out / 'results.json'} and {png}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
