"""Label correction: a meta learner that rewrites noisy labels, alone and next to the weight net.

As in the SAMA paper (after Meta Label Correction, Zheng et al. 2021), a small corrector network
reads the model's current prediction (a stop-gradient input, so it goes through
`sama_ext.frozen`) and the given — possibly wrong — label, and outputs a soft label: here a
learned per-sample mix q = (1 − β)·onehot(ỹ) + β·p of the given label and the model's belief.
The base model trains on the corrected labels; one `sama_ext.meta_step` per base step fills the
meta-gradient of the corrector, or of the corrector *and* a Meta-Weight-Net at once (meta_params
is simply their combined parameter list). Data: the demo's noisy digits (60% wrong labels, 100
clean meta samples). Four runs on the same split and initial weights: plain, reweighting,
correction, reweighting + correction.

    PYTHONPATH=. python examples/label_correction.py [--quick] [--noise 0.4]

Measured (seed 0, 60% noise, ~35 s on a 2-core CPU): plain 61.8%, reweighting 86.2%, correction
93.8% (it fixes 88% of the wrong labels and breaks 1.5% of the right ones), both 85.0% — with the
weight net alongside, the corrector learns to trust the given labels (see the printed reason).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import sama_ext
from sama_ext.demo import accuracy, base_model, load_split, weight_net, weighted_mean

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


def base_loss(model, wnet, corrector, x, y):
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")             # w.r.t. the given label
    if corrector is not None:
        soft = corrector(sama_ext.frozen(F.softmax(logits, 1)), y)   # frozen, like the weight net's input
        losses = -(soft * F.log_softmax(logits, 1)).sum(1)           # CE against the corrected label
    if wnet is None:
        return losses.mean()
    weights = wnet(sama_ext.frozen(losses).unsqueeze(1)).squeeze(1)
    return weighted_mean(losses, weights)


def train(kind: str, data, args) -> dict:
    torch.manual_seed(args.seed)
    model = base_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    wnet = weight_net() if "reweight" in kind else None
    corrector = LabelCorrector() if "correct" in kind else None
    meta_params = [p for m in (wnet, corrector) if m is not None for p in m.parameters()]
    meta_opt = torch.optim.Adam(meta_params, lr=1e-3) if meta_params else None

    def meta_loss():
        return F.cross_entropy(model(data.x_meta), data.y_meta)

    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(data.y_train), generator=gen).split(64):
            xb, yb = data.x_train[idx], data.y_train[idx]
            loss = base_loss(model, wnet, corrector, xb, yb)
            opt.zero_grad()
            loss.backward(inputs=params)
            opt.step()
            if meta_opt is not None:
                meta_opt.zero_grad()
                sama_ext.meta_step(params, opt, meta_params,
                                   base_loss=lambda: base_loss(model, wnet, corrector, xb, yb),
                                   meta_loss=meta_loss, alpha=args.alpha)
                meta_opt.step()
    out = {"test_acc": 100 * float(accuracy(model, data.x_test, data.y_test)), "seconds": time.perf_counter() - t0}
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
    ap.add_argument("--quick", action="store_true", help="few samples and epochs (a smoke run)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.6)
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
    print(f"digits, {len(data.y_train)} training samples with {args.noise:.0%} wrong labels, 100 clean meta samples, "
          f"{args.epochs} epochs, seed {args.seed}")
    results = {}
    for kind in ("plain", "reweight", "correct", "reweight+correct"):
        results[kind] = r = train(kind, data, args)
        print(f"  {kind:<18} final test accuracy {r['test_acc']:5.1f}%   ({r['seconds']:.1f}s)")
    for kind in ("correct", "reweight+correct"):
        r = results[kind]
        print(f"  {kind}: the corrected labels (argmax) are {r['corrected_right']:.1f}% right vs {r['given_right']:.1f}% "
              f"of the given ones — {r['fixed_wrong']:.1f}% of the wrong labels fixed, {r['broke_right']:.1f}% of the "
              f"right ones broken; mean gate β {r['beta_noisy']:.2f} on mislabeled, {r['beta_clean']:.2f} on "
              f"correctly labeled samples")
    both, alone = results["reweight+correct"], results["correct"]
    if both["beta_noisy"] < 0.5 <= alone["beta_noisy"]:
        best = max(results, key=lambda k: results[k]["test_acc"])
        print("  With the weight net alongside, the mislabeled samples get weights near 0, so their labels hardly "
              "enter the loss and the corrector gets almost no meta-gradient from them: here the two meta learners "
              f"compete rather than add up (best final accuracy: {best}).")
    if args.quick:
        print("  (--quick is a smoke run: far too short for these numbers to mean anything)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
