"""Data pruning by averaged learned weights (the SAMA paper's third application).

1. Train once with SAMA reweighting (the demo's Meta-Weight-Net setup) and record every training
   sample's learned weight w(ℓ) after each epoch.
2. Drop the samples with the lowest weight averaged over training.
3. Retrain a fresh model, plainly (no meta learning), on what is left — and compare with the full
   data, with random pruning of the same size, and with the simple baseline that needs no meta
   learning: drop the samples with the highest loss averaged over the epochs of a plain training
   run (the small-loss criterion). Every retrained model is also reported after fine-tuning its last
   layer on the clean meta set (`sama_ext.noisy_label_baselines`, configuration fixed in advance).

Mean ± std over seeds, paired differences, wall time. Measured figures: docs/results.md.

    PYTHONPATH=. python examples/data_pruning.py [--quick] [--seeds 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import sama_ext
from sama_ext.demo import accuracy, base_model, best_epoch, load_split, mean_std, reweighted_loss, weight_net
from sama_ext.noisy_label_baselines import finetune_last_layer


def loader(n: int, epochs: int, seed: int, batch_size: int = 64):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield from torch.randperm(n, generator=gen).split(batch_size)
        yield None  # end of epoch


def learn_weights(data, seed, args) -> torch.Tensor:
    """Train with SAMA reweighting; return each training sample's weight averaged over epochs."""
    torch.manual_seed(seed)
    model, wnet = base_model(), weight_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta_opt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
    params = list(model.parameters())
    x, y = data.x_train, data.y_train
    total = torch.zeros(len(y))
    for idx in loader(len(y), args.epochs, seed + 1):
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


def plain_train(data, keep: torch.Tensor, seed, args, score_losses: bool = False):
    """Ordinary training on the kept samples: (final test accuracy, early-stopped on the clean meta
    set, final after fine-tuning the last layer on the clean meta set, all %, and — with
    score_losses — each kept sample's loss averaged over the epochs)."""
    torch.manual_seed(seed)
    model = base_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.x_train[keep], data.y_train[keep]
    total = torch.zeros(len(y))
    test_acc, meta_acc = [], []
    for idx in loader(len(y), args.epochs, seed + 1):
        if idx is None:
            test_acc.append(100 * float(accuracy(model, data.x_test, data.y_test)))
            meta_acc.append(100 * float(accuracy(model, data.x_meta, data.y_meta)))
            if score_losses:
                with torch.no_grad():
                    total += F.cross_entropy(model(x), y, reduction="none")
            continue
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = finetune_last_layer(model, data.x_meta, data.y_meta)
    return (test_acc[-1], test_acc[best_epoch(meta_acc)], 100 * float(accuracy(tuned, data.x_test, data.y_test)),
            total / args.epochs)


SETS = ("full noisy training set", "pruned by learned weights", "pruned by plain-run loss", "pruned at random")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few samples and epochs, 2 seeds (a smoke run)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--prune", type=float, default=0.4, help="fraction of the training set to drop")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    train_size = 0
    if args.quick:
        args.epochs, args.seeds, train_size = 2, 2, 256
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = {name: [] for name in SETS}   # per seed: (final, early-stopped, fine-tuned, share of mislabeled pruned)
    secs = {"SAMA weights": [], "plain-run losses": []}
    t_all = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        data = load_split(seed, args.noise, 500, 100, train_size, torch.device("cpu"))
        n = len(data.y_train)
        n_drop = round(args.prune * n)
        print(f"seed {seed}: digits, {n} training samples with {args.noise:.0%} wrong labels, 100 clean meta samples; "
              f"pruning {args.prune:.0%} ({n_drop}); {args.epochs} epochs")
        t0 = time.perf_counter()
        weights = learn_weights(data, seed, args)
        secs["SAMA weights"].append(time.perf_counter() - t0)
        print(f"  averaged learned weight: correctly labeled {weights[~data.noisy].mean():.3f}, "
              f"mislabeled {weights[data.noisy].mean():.3f}")
        t0 = time.perf_counter()
        full_final, full_es, full_tuned, losses = plain_train(data, torch.arange(n), seed, args, score_losses=True)
        secs["plain-run losses"].append(time.perf_counter() - t0)
        keeps = {"pruned by learned weights": weights.argsort()[n_drop:],        # lowest averaged weight dropped
                 "pruned by plain-run loss": losses.argsort(descending=True)[n_drop:],  # highest averaged loss dropped
                 "pruned at random": torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))[n_drop:]}
        for name in SETS:
            if name == SETS[0]:
                final, es, tuned, keep = full_final, full_es, full_tuned, torch.arange(n)
            else:
                keep = keeps[name]
                final, es, tuned, _ = plain_train(data, keep, seed, args)
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[keep] = False
            hit = 100 * float(data.noisy[dropped].float().mean()) if bool(dropped.any()) else float("nan")
            res[name].append((final, es, tuned, hit))
            print(f"  plain training on the {name:<26} ({len(keep):4d} samples, "
                  f"{100 * data.noisy[keep].float().mean():4.1f}% mislabeled): final {final:5.1f}%, "
                  f"early-stopped {es:5.1f}%, fine-tuned {tuned:5.1f}%")
    print(f"\nOver {args.seeds} seed(s), mean ± std (total {time.perf_counter() - t_all:.0f}s; scoring run: SAMA "
          f"{mean_std(secs['SAMA weights'])[0]:.1f}s, plain {mean_std(secs['plain-run losses'])[0]:.1f}s per seed):")
    fmt = lambda xs: "{:5.1f} ± {:4.1f}".format(*mean_std(xs))  # noqa: E731
    cols = ("final", "early-stopped", "fine-tuned")
    print(f"  {'retrained on':<28} " + " ".join(f"{c:>13}" for c in cols) + f" {'pruned: mislabeled %':>21}")
    for name in SETS:
        rs = res[name]
        hit = fmt([r[3] for r in rs]) if name != SETS[0] else "-"
        print(f"  {name:<28} " + " ".join(f"{fmt([r[i] for r in rs]):>13}" for i in range(3)) + f" {hit:>21}")
    base = "pruned by plain-run loss"
    print(f"Paired differences, pruned by learned weights − {base} (the simple baseline):")
    for col, c in enumerate(cols):
        d = [a[col] - b[col] for a, b in zip(res["pruned by learned weights"], res[base])]
        print(f"  {c:<13} {'{:+.1f} ± {:.1f}'.format(*mean_std(d))} (per seed {', '.join(f'{x:+.1f}' for x in d)})")
    avg = lambda name, i: mean_std([r[i] for r in res[name]])[0]  # noqa: E731
    bn, bi = max(((nm, i) for nm in SETS if nm != "pruned by learned weights" for i in range(3)), key=lambda t: avg(*t))
    si = max(range(3), key=lambda i: avg("pruned by learned weights", i))
    d = [a[si] - b[bi] for a, b in zip(res["pruned by learned weights"], res[bn])]
    print(f"Best of pruning by learned weights ({cols[si]}, {avg('pruned by learned weights', si):.1f}%) − the strongest "
          f"simple baseline ({bn}, {cols[bi]}, {avg(bn, bi):.1f}%): {'{:+.1f} ± {:.1f}'.format(*mean_std(d))} "
          f"(per seed {', '.join(f'{x:+.1f}' for x in d)})")
    if args.quick:
        print("  (--quick is a smoke run: far too short for these numbers to mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
