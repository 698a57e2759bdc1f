"""Data pruning by averaged learned weights (the SAMA paper's third application).

1. Train once with SAMA reweighting (the demo's Meta-Weight-Net setup) and record every training
   sample's learned weight w(ℓ) after each epoch.
2. Drop the samples with the lowest weight averaged over training.
3. Retrain a fresh model, plainly (no meta learning), on what is left — and compare with the full
   data and with random pruning of the same size.

On the demo's digits with 40% wrong labels the low-weight samples are mostly the mislabeled ones,
so pruning them helps; random pruning only throws data away.

    PYTHONPATH=. python examples/data_pruning.py [--quick]

Measured (seed 0, ~20 s on a 2-core CPU): 96.9% of the 479 pruned samples were mislabeled;
retraining on the rest reaches 94.0% test accuracy, vs 82.2% on the full noisy set and 79.8%
after random pruning of the same size.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import sama_ext
from sama_ext.demo import accuracy, base_model, load_split, reweighted_loss, weight_net


def loader(n: int, epochs: int, seed: int, batch_size: int = 64):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield from torch.randperm(n, generator=gen).split(batch_size)
        yield None  # end of epoch


def learn_weights(data, args) -> torch.Tensor:
    """Train with SAMA reweighting; return each training sample's weight averaged over epochs."""
    torch.manual_seed(args.seed)
    model, wnet = base_model(), weight_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta_opt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
    params = list(model.parameters())
    x, y = data.x_train, data.y_train
    total = torch.zeros(len(y))
    for idx in loader(len(y), args.epochs, args.seed + 1):
        if idx is None:  # end of an epoch: score every training sample with the current weight net
            with torch.no_grad():
                total += wnet(F.cross_entropy(model(x), y, reduction="none").unsqueeze(1)).squeeze(1)
            continue
        loss = reweighted_loss(model, wnet, x[idx], y[idx])
        opt.zero_grad()
        loss.backward(inputs=params)
        opt.step()
        meta_opt.zero_grad()
        sama_ext.meta_step(params, opt, list(wnet.parameters()),
                           base_loss=lambda: reweighted_loss(model, wnet, x[idx], y[idx]),
                           meta_loss=lambda: F.cross_entropy(model(data.x_meta), data.y_meta), alpha=args.alpha)
        meta_opt.step()
    return total / args.epochs


def plain_train(data, keep: torch.Tensor, args) -> float:
    """Ordinary training on the kept samples; final test accuracy (%)."""
    torch.manual_seed(args.seed)
    model = base_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.x_train[keep], data.y_train[keep]
    for idx in loader(len(y), args.epochs, args.seed + 1):
        if idx is None:
            continue
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 100 * float(accuracy(model, data.x_test, data.y_test))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few samples and epochs (a smoke run)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--prune", type=float, default=0.4, help="fraction of the training set to drop")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    train_size = 0
    if args.quick:
        args.epochs, train_size = 2, 256
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = load_split(args.seed, args.noise, 500, 100, train_size, torch.device("cpu"))
    n = len(data.y_train)
    n_drop = round(args.prune * n)
    print(f"digits, {n} training samples with {args.noise:.0%} wrong labels, 100 clean meta samples; "
          f"pruning {args.prune:.0%} ({n_drop}) of the training set; {args.epochs} epochs, seed {args.seed}")

    weights = learn_weights(data, args)
    order = weights.argsort()                                   # lowest averaged weight first
    keep_sama = order[n_drop:]
    keep_random = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 7))[n_drop:]
    dropped = order[:n_drop]
    print(f"  averaged learned weight: correctly labeled {weights[~data.noisy].mean():.3f}, "
          f"mislabeled {weights[data.noisy].mean():.3f}")
    print(f"  of the {n_drop} pruned samples {100 * data.noisy[dropped].float().mean():.1f}% were mislabeled "
          f"(random pruning: {100 * args.noise:.0f}% expected)")

    for name, keep in (("full noisy training set", torch.arange(n)), ("pruned by learned weights", keep_sama),
                       ("pruned at random", keep_random)):
        acc = plain_train(data, keep, args)
        share = 100 * data.noisy[keep].float().mean()
        print(f"  plain training on the {name:<26} ({len(keep):4d} samples, {share:4.1f}% mislabeled): "
              f"final test accuracy {acc:5.1f}%")
    if args.quick:
        print("  (--quick is a smoke run: far too short for these numbers to mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
