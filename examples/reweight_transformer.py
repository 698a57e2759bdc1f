"""Noisy-label reweighting with a HuggingFace transformer, trained with AdamW.

The point: `sama_ext.meta_step` works on a `transformers` model unchanged — it only needs the
parameter list, the optimiser that trains them and two closures. The model is a tiny, randomly
initialised BertForSequenceClassification built from a config in code (no download); the data is
synthetic: sequences of filler tokens with class "keywords", where the label is the class whose
keywords occur most often. 40% of the training labels are replaced by a wrong class; a clean meta
set of 64 sequences guides a Meta-Weight-Net (per-sample loss → weight, through `sama_ext.frozen`).

    PYTHONPATH=. python examples/reweight_transformer.py [--quick] [--seed N] [--dropout 0.1]

Measured on a 2-core CPU (about 30-40 s): plain AdamW 67.6% → 91.2% with SAMA reweighting on seed 0,
74.2% → 86.5% on seed 2; on seed 1 (70.5% → 70.3%) the weight net did not learn to separate the
mislabeled sequences. Dropout works too (meta_step replays the same masks at θ+εv and θ−εv).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import sama_ext
from sama_ext.demo import add_symmetric_noise, weight_net, weighted_mean

try:
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise SystemExit(f"this example needs `transformers` (pip install transformers): {e}")

CLASSES, VOCAB, SEQ, KEYWORDS = 4, 64, 16, 4   # tokens 0..15 are keywords (4 per class), 16..63 filler


def make_data(n: int, gen: torch.Generator, own: int = 6, other: int = 1):
    """Sequences of filler with `own` keywords of the true class and `other` of another class."""
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    tokens = torch.randint(CLASSES * KEYWORDS, VOCAB, (n, SEQ), generator=gen)
    distractor = (y + torch.randint(1, CLASSES, (n,), generator=gen)) % CLASSES
    owners = torch.cat([y[:, None].expand(n, own), distractor[:, None].expand(n, other)], 1)  # whose keyword goes where
    words = owners * KEYWORDS + torch.randint(0, KEYWORDS, (n, own + other), generator=gen)
    pos = torch.rand(n, SEQ, generator=gen).argsort(1)[:, :own + other]        # distinct positions
    tokens.scatter_(1, pos, words)
    return tokens, y


def tiny_bert(seed: int, hidden: int = 32, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=SEQ, type_vocab_size=1,
                     num_labels=CLASSES, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def per_sample_loss(model, tokens, labels):
    return F.cross_entropy(model(input_ids=tokens).logits, labels, reduction="none")


def train(reweight: bool, data: dict, args) -> dict:
    model = tiny_bert(args.seed, args.hidden, args.dropout)   # same initial weights for both runs
    model.train()   # with --dropout > 0, meta_step replays the same dropout masks at θ+εv and θ−εv
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if reweight:
        torch.manual_seed(args.seed + 100)
        wnet = weight_net()
        meta_opt = torch.optim.Adam(wnet.parameters(), lr=args.meta_lr)

    def base_loss(tokens, labels):
        losses = per_sample_loss(model, tokens, labels)
        if not reweight:
            return losses.mean()
        weights = wnet(sama_ext.frozen(losses).unsqueeze(1)).squeeze(1)   # held fixed across θ ± εv
        return weighted_mean(losses, weights)

    def meta_loss():
        return per_sample_loss(model, data["x_meta"], data["y_meta"]).mean()

    x, y = data["x_train"], data["y_train"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(y), generator=gen).split(args.batch_size):
            loss = base_loss(x[idx], y[idx])
            opt.zero_grad()
            loss.backward(inputs=params)
            opt.step()
            if reweight:
                meta_opt.zero_grad()
                sama_ext.meta_step(params, opt, list(wnet.parameters()),
                                   base_loss=lambda: base_loss(x[idx], y[idx]), meta_loss=meta_loss,
                                   alpha=args.alpha, safeguard=args.safeguard)
                meta_opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(input_ids=data["x_test"]).logits.argmax(1) == data["y_test"]).float().mean().item()
        out = {"test_acc": 100 * acc, "seconds": seconds}
        if reweight:
            w = wnet(per_sample_loss(model, x, y).unsqueeze(1)).squeeze(1)
            out["w_clean"] = w[~data["noisy"]].mean().item()
            out["w_noisy"] = w[data["noisy"]].mean().item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and epochs (a smoke run)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--safeguard", default="zero_unseen", choices=list(sama_ext.SAFEGUARDS),
                    help="embedding rows a batch has not used yet have Adam second moment 0 and a huge exact "
                         "diagonal; zero_unseen keeps them from dominating ‖v‖")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train = 2, 256
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_true = make_data(args.n_train, gen)
    y_train, noisy = add_symmetric_noise(y_true, args.noise, CLASSES, gen)
    x_meta, y_meta = make_data(64, gen)
    x_test, y_test = make_data(512, gen)
    data = dict(x_train=x_train, y_train=y_train, noisy=noisy, x_meta=x_meta, y_meta=y_meta,
                x_test=x_test, y_test=y_test)
    n_params = sum(p.numel() for p in tiny_bert(0, args.hidden).parameters())
    print(f"tiny BERT ({n_params:,} params, random init), AdamW; {args.n_train} training sequences with "
          f"{args.noise:.0%} wrong labels, 64 clean meta sequences, {args.epochs} epochs")

    plain = train(False, data, args)
    sama = train(True, data, args)
    print(f"  plain AdamW                : test accuracy {plain['test_acc']:5.1f}%   ({plain['seconds']:.1f}s)")
    print(f"  AdamW + SAMA reweighting   : test accuracy {sama['test_acc']:5.1f}%   ({sama['seconds']:.1f}s)")
    print(f"  learned weight, mean over training samples: correctly labeled {sama['w_clean']:.3f}, "
          f"mislabeled {sama['w_noisy']:.3f}")
    if args.quick:
        print("  (--quick is a smoke run: far too short for the accuracies or weights to mean anything)")
    elif sama["w_noisy"] < 0.5 * sama["w_clean"]:
        print("  the weight net learned to down-weight the mislabeled sequences.")
    else:
        print("  on this seed the weight net did not separate mislabeled from correct sequences (it happens on "
              "some seeds: early on, hard samples look useful, and the net can lock in that preference).")
    print("meta_step ran on the transformers model unchanged (its parameters, the AdamW optimiser, two closures).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
