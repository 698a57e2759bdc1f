"""Label correction: a meta learner that rewrites noisy labels, alone and next to the weight net.

As in the SAMA paper (after Meta Label Correction, Zheng et al. 2021), a small corrector network
reads the model's current prediction (a stop-gradient input, so it goes through
`sama_ext.frozen`) and the given — possibly wrong — label, and outputs a soft label: here a
learned per-sample mix q = (1 − β)·onehot(ỹ) + β·p of the given label and the model's belief.
The base model trains on the corrected labels; one `sama_ext.meta_step` per base step fills the
meta-gradient of the corrector, or of the corrector *and* a Meta-Weight-Net at once (meta_params
is simply their combined parameter list). Data: the demo's noisy digits (60% wrong labels, 100
clean meta samples). Per seed, on the same split and initial weights: plain training, small-loss
selection (given the true noise rate), reweighting by a weight net, per-example weights
(`sama_ext.PerExampleWeights`), correction, reweighting + correction — each also followed by
fine-tuning its last layer on the clean meta set (`sama_ext.noisy_label_baselines`, configuration
fixed in advance), the strongest simple baseline. Mean ± std over seeds, paired differences, wall
time. Measured figures: docs/results.md.

    PYTHONPATH=. python examples/label_correction.py [--quick] [--noise 0.4] [--seeds 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import sama_ext
from sama_ext.demo import accuracy, base_model, best_epoch, load_split, mean_std, weight_net, weighted_mean
from sama_ext.noisy_label_baselines import finetune_last_layer, small_loss_fraction, small_loss_mean

C = 10


class LabelCorrector(nn.Module):
    """(model's predicted distribution p, given label ỹ) → corrected soft label
    q = (1 − β)·onehot(ỹ) + β·p, with a learned per-sample gate β ∈ (0, 1).

    β is a small net of how much the model believes the given label, p[ỹ], and how sure it is at
    all, max p: it learns *when* to replace the given label by the model's own belief. Where
    β > 1/2 and the model disagrees, the argmax of q differs from ỹ. It starts by trusting ỹ (β ≈ 0.12)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.gate_net = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.constant_(self.gate_net[-1].bias, -2.0)

    def gate(self, probs: torch.Tensor, noisy_label: torch.Tensor) -> torch.Tensor:
        features = torch.stack([probs.gather(1, noisy_label[:, None]).squeeze(1), probs.amax(1)], 1)
        return torch.sigmoid(self.gate_net(features))

    def forward(self, probs: torch.Tensor, noisy_label: torch.Tensor) -> torch.Tensor:
        beta = self.gate(probs, noisy_label)
        return (1 - beta) * F.one_hot(noisy_label, C).float() + beta * probs


KINDS = ("plain", "small-loss", "reweight", "per-example", "correct", "reweight+correct")


def base_loss(model, wnet, corrector, x, y, idx=None, pe=None):
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")             # w.r.t. the given label
    if corrector is not None:
        soft = corrector(sama_ext.frozen(F.softmax(logits, 1)), y)   # frozen, like the weight net's input
        losses = -(soft * F.log_softmax(logits, 1)).sum(1)           # CE against the corrected label
    if pe is not None:                                               # per-example weights: no frozen input
        return weighted_mean(losses, pe(idx))
    if wnet is None:
        return losses.mean()
    weights = wnet(sama_ext.frozen(losses).unsqueeze(1)).squeeze(1)
    return weighted_mean(losses, weights)


def train(kind: str, data, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model = base_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    wnet = weight_net() if "reweight" in kind else None
    corrector = LabelCorrector() if "correct" in kind else None
    pe = sama_ext.PerExampleWeights(len(data.y_train)) if kind == "per-example" else None
    meta_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (wnet, corrector) if m is not None]
    if pe is not None:
        meta_opts.append(torch.optim.Adam(pe.parameters(), lr=1e-2))  # the demo's --pe-meta-lr default
    meta_params = [p for m in (wnet, corrector, pe) if m is not None for p in m.parameters()]

    def meta_loss():
        return F.cross_entropy(model(data.x_meta), data.y_meta)

    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    test_acc, meta_acc = [], []
    for epoch in range(args.epochs):
        keep = small_loss_fraction(epoch, args.noise)
        for idx in torch.randperm(len(data.y_train), generator=gen).split(64):
            xb, yb = data.x_train[idx], data.y_train[idx]
            if kind == "small-loss":
                loss = small_loss_mean(F.cross_entropy(model(xb), yb, reduction="none"), keep)
            else:
                loss = base_loss(model, wnet, corrector, xb, yb, idx, pe)
            opt.zero_grad()
            loss.backward(inputs=params)
            opt.step()
            if meta_params:
                for o in meta_opts:
                    o.zero_grad()
                sama_ext.meta_step(params, opt, meta_params,
                                   base_loss=lambda: base_loss(model, wnet, corrector, xb, yb, idx, pe),
                                   meta_loss=meta_loss, alpha=args.alpha)
                for o in meta_opts:
                    o.step()
        test_acc.append(100 * float(accuracy(model, data.x_test, data.y_test)))
        meta_acc.append(100 * float(accuracy(model, data.x_meta, data.y_meta)))
    seconds = time.perf_counter() - t0
    tuned = finetune_last_layer(model, data.x_meta, data.y_meta)
    out = {"test_acc": test_acc[-1], "early_stopped": test_acc[best_epoch(meta_acc)], "seconds": seconds,
           "finetuned": 100 * float(accuracy(tuned, data.x_test, data.y_test))}
    if corrector is not None:
        with torch.no_grad():
            probs = F.softmax(model(data.x_train), 1)
            fixed = corrector(probs, data.y_train).argmax(1)
            beta = corrector.gate(probs, data.y_train).squeeze(1)
        out["beta_noisy"], out["beta_clean"] = float(beta[data.noisy].mean()), float(beta[~data.noisy].mean())
        out["given_right"] = 100 * float((data.y_train == data.y_true).float().mean())
        out["corrected_right"] = 100 * float((fixed == data.y_true).float().mean())
        out["fixed_wrong"] = 100 * float((fixed == data.y_true)[data.noisy].float().mean())
        out["broke_right"] = 100 * float((fixed != data.y_true)[~data.noisy].float().mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few samples and epochs, 2 seeds (a smoke run)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.6)
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
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = {kind: [] for kind in KINDS}
    t_all = time.perf_counter()
    for seed in seeds:
        data = load_split(seed, args.noise, 500, 100, train_size, torch.device("cpu"))
        print(f"seed {seed}: digits, {len(data.y_train)} training samples with {args.noise:.0%} wrong labels, "
              f"100 clean meta samples, {args.epochs} epochs")
        for kind in KINDS:
            results[kind].append(r := train(kind, data, seed, args))
            print(f"  {kind:<18} final {r['test_acc']:5.1f}%, early-stopped {r['early_stopped']:5.1f}%, "
                  f"fine-tuned {r['finetuned']:5.1f}%   ({r['seconds']:.1f}s)")
    print(f"\nTest accuracy over {len(seeds)} seed(s), mean ± std; 'early-stopped' = at the epoch of best clean-meta "
          f"accuracy; 'fine-tuned' = the final model with its last layer fitted to the clean meta set; wall time per "
          f"run (total {time.perf_counter() - t_all:.0f}s):")
    fmt = lambda xs: "{:5.1f} ± {:4.1f}".format(*mean_std(xs))  # noqa: E731
    col = {"final": "test_acc", "early-stopped": "early_stopped", "fine-tuned": "finetuned"}
    print(f"  {'':<18} " + " ".join(f"{c:>13}" for c in col) + f" {'s/run':>7}")
    for kind in KINDS:
        rs = results[kind]
        print(f"  {kind:<18} " + " ".join(f"{fmt([r[k] for r in rs]):>13}" for k in col.values())
              + f" {mean_std([r['seconds'] for r in rs])[0]:7.1f}")
    # the strongest simple baseline (no meta learning): plain or small-loss, final, early-stopped or fine-tuned
    avg = lambda k, c: mean_std([r[col[c]] for r in results[k]])[0]  # noqa: E731
    bk, bc = max(((k, c) for k in ("plain", "small-loss") for c in col), key=lambda kc: avg(*kc))
    print(f"Paired differences against the strongest simple baseline, {bk} {bc} ({avg(bk, bc):.1f}%):")
    for kind in KINDS[2:]:
        parts = []
        for c in col:
            d = [a[col[c]] - b[col[bc]] for a, b in zip(results[kind], results[bk])]
            parts.append(f"{c} {'{:+.1f} ± {:.1f}'.format(*mean_std(d))} (per seed {', '.join(f'{x:+.1f}' for x in d)})")
        print(f"  {kind:<18} " + "; ".join(parts))
    for kind in ("correct", "reweight+correct"):
        m = lambda key: mean_std([r[key] for r in results[kind]])[0]  # noqa: E731,B023
        print(f"  {kind}: the corrected labels (argmax) are {m('corrected_right'):.1f}% right vs {m('given_right'):.1f}% "
              f"of the given ones — {m('fixed_wrong'):.1f}% of the wrong labels fixed, {m('broke_right'):.1f}% of the "
              f"right ones broken; mean gate β {m('beta_noisy'):.2f} on mislabeled, {m('beta_clean'):.2f} on "
              f"correctly labeled samples (means over seeds)")
    both = mean_std([r["beta_noisy"] for r in results["reweight+correct"]])[0]
    alone = mean_std([r["beta_noisy"] for r in results["correct"]])[0]
    if both < 0.5 <= alone:
        print("  With the weight net alongside, the mislabeled samples get weights near 0, so their labels hardly "
              "enter the loss and the corrector gets almost no meta-gradient from them: here the two meta learners "
              "compete rather than add up.")
    if args.quick:
        print("  (--quick is a smoke run: far too short for these numbers to mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
