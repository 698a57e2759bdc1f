"""sama_ext.hf.SamaTrainer against a hand-written loop (the README's: base step, meta_step, meta
optimiser step) on the same batches, written here without the trainer's code: per-example losses
from the logits, the weights, gradient clipping, AdamW with the step's learning rate. A tiny BERT
(sequence classification, weighting="sample") and a tiny GPT-2 (causal LM, weighting="domain"),
both random-init from configs in code."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import sama_ext  # noqa: E402
from sama_ext.hf import SamaTrainer  # noqa: E402

hf_logging.set_verbosity_error()
VOCAB, SEQ, CLASSES, BATCH = 40, 8, 3, 8


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


class Recorded(torch.utils.data.Dataset):
    """A list of examples that logs which ones were read, in order (the Trainer's batches)."""

    def __init__(self, rows):
        self.rows, self.seen = rows, []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.seen.append(i)
        return self.rows[i]


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=SEQ, num_labels=CLASSES,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def wnet():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())


def cls_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


def lm_rows(n, seed, domains=("code", "prose", "legal")):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    rows = []
    for i in range(n):
        labels = x[i].clone()
        labels[SEQ - i % 3:] = -100      # some sequences end in ignored (padding) positions
        rows.append({"input_ids": x[i], "labels": labels, "domain": domains[i % len(domains)]})
    return rows


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, use_cpu=True, report_to=[],
                save_strategy="no", disable_tqdm=True, optim="adamw_torch", learning_rate=1e-2,
                lr_scheduler_type="constant", logging_steps=1, seed=0, max_grad_norm=1.0)
    base.update(kw)
    return TrainingArguments(**base)


# ----- the oracle: a hand-written loop ------------------------------------------------------------
def cls_losses(model, rows):
    x = torch.stack([r["input_ids"] for r in rows])
    y = torch.stack([r["labels"] for r in rows])
    return F.cross_entropy(model(input_ids=x).logits, y, reduction="none")


def lm_losses(model, rows):
    x = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    logp = model(input_ids=x).logits.float().log_softmax(-1)[:, :-1]
    nxt = labels[:, 1:]
    tok = -logp.gather(2, nxt.clamp_min(0).unsqueeze(2)).squeeze(2)
    out = []
    for i in range(len(rows)):     # per sequence: mean over its positions with a label
        keep = nxt[i] != -100
        out.append(tok[i][keep].mean())
    return torch.stack(out)


def hand_loop(model, rows, meta_rows, steps, lrs, losses, weights, lam, *, clip=1.0, meta_lr=1e-3, alpha=1.0):
    """steps[s]: the micro-batches (lists of row indices) of optimiser step s; lrs[s] its lr."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lrs[0], weight_decay=0.0)
    meta_opt = torch.optim.Adam(lam, lr=meta_lr)

    def wloss(batch):
        per = losses(model, batch)
        w = weights(sama_ext.frozen(per), batch)
        return (w * per).sum() / w.sum()

    infos = []
    for micro, lr in zip(steps, lrs):
        batches = [[rows[i] for i in mb] for mb in micro]
        opt.zero_grad(set_to_none=True)
        for b in batches:
            per = losses(model, b)
            with torch.no_grad():
                w = weights(per.detach(), b)
            ((w * per).sum() / w.sum() / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        meta_opt.zero_grad(set_to_none=True)
        infos.append(sama_ext.meta_step(params, opt, lam, lambda: sum(wloss(b) for b in batches) / len(batches),
                                        lambda: losses(model, meta_rows).mean(), alpha=alpha))
        meta_opt.step()
    return model, infos


def batches_read(ds, n_steps, ga):
    seen = ds.seen
    micro = [seen[k * BATCH:(k + 1) * BATCH] for k in range(n_steps * ga)]
    return [micro[s * ga:(s + 1) * ga] for s in range(n_steps)]


def assert_lambda_equal(trainer_params, hand_params, rtol=1e-5, atol=1e-7):
    for a, b in zip(trainer_params, hand_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


# ----- tests ----------------------------------------------------------------------------------------
def test_first_meta_step_equals_hand_loop_bert(tmp_path):
    train, meta = Recorded(cls_rows(32, 0)), cls_rows(16, 1)
    net = wnet()
    t = SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1), train_dataset=train, meta_dataset=meta,
                    weighting="sample", weight_net=copy.deepcopy(net))
    train.seen.clear()
    t.train()
    steps = batches_read(train, 1, 1)
    hand_net = copy.deepcopy(net)
    hand_model, infos = hand_loop(bert(), train.rows, meta, steps, [1e-2], cls_losses,
                                  lambda z, b: hand_net(z.unsqueeze(1)).squeeze(1), list(hand_net.parameters()))
    assert not bool(infos[0].skipped) and float(infos[0].v_norm) > 0
    assert any(float(p.grad.abs().max()) > 0 for p in hand_net.parameters())
    assert_lambda_equal(t.meta_params, list(hand_net.parameters()))
    for p, q in zip(t.model.parameters(), hand_model.parameters()):   # the same base step
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    log = [h for h in t.state.log_history if "meta_loss" in h][0]
    assert math.isclose(log["meta_loss"], float(infos[0].meta_loss), rel_tol=1e-5)
    assert math.isclose(log["meta_v_norm"], float(infos[0].v_norm), rel_tol=1e-4)
    assert {"weight_mean", "weight_std", "meta_eps"} <= set(log)


def test_domain_weights_gpt2_accumulation_and_warmup(tmp_path):
    """Causal LM, weighting="domain", gradient accumulation 2, linear warm-up: every step's λ.grad
    and λ as in the hand-written loop with the lr the scheduler gave that step."""
    train, meta = Recorded(lm_rows(48, 0)), [{k: v for k, v in r.items() if k != "domain"} for r in lm_rows(12, 5)]
    n_steps, ga, warm, lr = 3, 2, 2, 1e-2
    t = SamaTrainer(model=gpt2(), train_dataset=train, meta_dataset=meta, weighting="domain", meta_lr=0.1,
                    args=targs(tmp_path, max_steps=n_steps, gradient_accumulation_steps=ga, warmup_steps=warm,
                               lr_scheduler_type="linear"))
    train.seen.clear()
    t.train()
    assert t.domain_names == ["code", "legal", "prose"]
    steps = batches_read(train, n_steps, ga)
    # HF's linear schedule with warm-up, written out: lr·s/warm, then lr·(T−s)/(T−warm)
    lrs = [lr * s / warm if s < warm else lr * (n_steps - s) / (n_steps - warm) for s in range(n_steps)]
    logits = nn.Parameter(torch.zeros(3))
    names = {"code": 0, "legal": 1, "prose": 2}

    def weights(z, batch):
        d = torch.tensor([names[r["domain"]] for r in batch])
        return torch.softmax(logits, 0)[d] * 3

    _, infos = hand_loop(gpt2(), train.rows, meta, steps, lrs, lm_losses, weights, [logits], meta_lr=0.1)
    assert bool(infos[0].skipped) and not bool(infos[1].skipped)   # lr 0 at step 0: θ did not move
    assert float(logits.grad.abs().max()) > 0
    assert_lambda_equal(t.meta_params, [logits], rtol=1e-4, atol=1e-7)
    w = t.learned_weights()
    assert list(w) == ["code", "legal", "prose"] and math.isclose(sum(w.values()), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(torch.tensor(list(w.values())), torch.softmax(logits.detach(), 0))
    assert [s for s, _ in t.domain_weight_history] == [1, 2, 3]
    assert any("domain_weight/code" in h for h in t.state.log_history)


def test_resume_equals_uninterrupted(tmp_path):
    meta = cls_rows(16, 1)
    kw = dict(weighting="sample", meta_batch_size=4)   # random meta batches: drawn by meta-step number
    a = SamaTrainer(model=bert(), args=targs(tmp_path / "a", max_steps=4, lr_scheduler_type="linear"),
                    train_dataset=cls_rows(16, 0), meta_dataset=meta, weight_net=wnet(), **kw)
    a.train()
    half = SamaTrainer(model=bert(), train_dataset=cls_rows(16, 0), meta_dataset=meta, weight_net=wnet(), **kw,
                       args=targs(tmp_path / "b", max_steps=4, lr_scheduler_type="linear", save_strategy="steps",
                                  save_steps=2))
    half.train()   # saves checkpoint-2 (and -4)
    b = SamaTrainer(model=bert(), train_dataset=cls_rows(16, 0), meta_dataset=meta, weight_net=wnet(), **kw,
                    args=targs(tmp_path / "b", max_steps=4, lr_scheduler_type="linear"))
    b.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for p, q in zip(a.weight_net.parameters(), b.weight_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(a.learned_weights(), b.learned_weights(), equal_nan=True)
    # and the resumed run did learn something in its second half (not a copy of checkpoint-2)
    saved = torch.load(tmp_path / "b" / "checkpoint-2" / "sama_meta.pt", weights_only=False)["weight_net"]
    assert any(not torch.equal(p, saved[k]) for k, p in b.weight_net.state_dict().items())


def test_bf16_autocast_runs(tmp_path):
    t = SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=2, bf16=True), train_dataset=cls_rows(16, 0),
                    meta_dataset=cls_rows(8, 1), weight_net=wnet())
    seen = []
    t.model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    t.train()
    # every forward — 2 base steps, and per meta step 1 meta + 3 base passes — ran under bf16 autocast
    assert seen == [torch.bfloat16] * 10
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in t.meta_params)
    assert any(float(p.grad.abs().max()) > 0 for p in t.meta_params)
    logs = [h for h in t.state.log_history if "meta_loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["meta_loss"]) for h in logs)


def test_learned_weights_aligned_and_prune(tmp_path):
    """θ and the weight net held fixed (lr 0, meta lr 0): each example's learned weight must be
    the weight net's output on that example's loss, computed here independently."""
    rows, net = Recorded(cls_rows(24, 0)), wnet()
    t = SamaTrainer(model=bert(), train_dataset=rows, meta_dataset=cls_rows(8, 1), weight_net=copy.deepcopy(net),
                    meta_lr=0.0, args=targs(tmp_path, num_train_epochs=2, learning_rate=0.0))
    rows.seen.clear()
    t.train()
    batches = [rows.seen[k:k + BATCH] for k in range(0, len(rows.seen), BATCH)]
    rows = rows.rows
    model = bert()
    with torch.no_grad():
        expect = net(cls_losses(model, rows).unsqueeze(1)).squeeze(1).double()
    got = t.learned_weights()
    assert got.shape == (24,) and not torch.isnan(got).any()
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    logs = [h for h in t.state.log_history if "weight_mean" in h]   # one log per step (logging_steps=1)
    assert len(logs) == len(batches) == 6
    for h, idx in zip(logs, batches):
        w = expect[idx]
        assert math.isclose(h["weight_mean"], w.mean().item(), rel_tol=1e-6)
        assert math.isclose(h["weight_std"], w.std().item(), rel_tol=1e-4, abs_tol=1e-9)
        assert (h["weight_min"], h["weight_max"]) == pytest.approx((w.min().item(), w.max().item()), rel=1e-6)
    kept = t.prune(keep=0.5)
    assert sorted(kept.indices) == sorted(torch.topk(expect, 12).indices.tolist())
    assert list(kept.indices) == sorted(kept.indices)


def test_errors(tmp_path):
    rows = cls_rows(8, 0)
    with pytest.raises(ValueError, match="'domain' field"):
        SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1), train_dataset=rows, meta_dataset=rows,
                    weighting="domain")
    with pytest.raises(ValueError, match="format of train_dataset.*missing: \\['input_ids'\\]"):
        SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1), train_dataset=rows,
                    meta_dataset=[{"text": "a b c", "labels": 0}])
    with pytest.raises(TypeError, match="meta_dataset must be map-style"):
        SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1), train_dataset=rows, meta_dataset=iter(rows))
    with pytest.raises(ValueError, match="weighting must be"):
        SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1), train_dataset=rows, meta_dataset=rows,
                    weighting="token")

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 4)

        def forward(self, input_ids, labels=None):
            return {"hidden": self.emb(input_ids)}

    model = NoLogits()
    before = [p.detach().clone() for p in model.parameters()]
    t = SamaTrainer(model=model, args=targs(tmp_path, max_steps=1), train_dataset=rows, meta_dataset=rows)
    with pytest.raises(TypeError, match="no 'logits'.*per_example_loss_fn"):
        t.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="needs weighting='sample'"):
        SamaTrainer(model=gpt2(), args=targs(tmp_path, max_steps=1), train_dataset=lm_rows(6, 0),
                    meta_dataset=lm_rows(3, 1), weighting="domain").prune(0.5)


def test_meta_every(tmp_path):
    t = SamaTrainer(model=gpt2(), args=targs(tmp_path, max_steps=4), train_dataset=lm_rows(32, 0),
                    meta_dataset=lm_rows(8, 1), weighting="domain", meta_every=2, meta_batch_size=4,
                    meta_optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    assert isinstance(t.meta_optimizer, torch.optim.SGD) and t.meta_optimizer.param_groups[0]["params"] == t.meta_params
    t.train()
    assert [s for s, _ in t.domain_weight_history] == [2, 4]
    assert len([h for h in t.state.log_history if "meta_loss" in h]) == 2   # logged at steps 2 and 4 only


def test_per_example_loss_fn(tmp_path):
    """A user-supplied per-example loss replaces the one from the logits (here: twice the
    cross-entropy), in the base and the meta losses; θ fixed (lr 0) to check the logged meta loss."""
    meta = cls_rows(8, 1)
    t = SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1, learning_rate=0.0), train_dataset=cls_rows(8, 0),
                    meta_dataset=meta, per_example_loss_fn=lambda out, y: 2 * F.cross_entropy(out.logits, y, reduction="none"))
    t.train()
    with torch.no_grad():
        expect = 2 * cls_losses(bert(), meta).mean().item()
    log = [h for h in t.state.log_history if "meta_loss" in h][0]
    assert math.isclose(log["meta_loss"], expect, rel_tol=1e-5)
    assert math.isclose(t.state.log_history[0]["loss"], 2 * cls_losses(bert(), cls_rows(8, 0)).mean().item(), rel_tol=0.05)


# ----- review fixes: compute_loss_func, problem_type, failed steps, label smoothing, optimisers -------
def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_compute_loss_func_refused_and_ga_divides_once(tmp_path):
    """compute_loss_func= would be ignored (and turns off the Trainer's division by the GA steps): refused.
    Under GA=2 the θ update equals GA=1 on the concatenated batch (SGD, no clipping: Δθ = -lr·∇ of
    the mean of the two micro-batch losses, each with its own weights)."""
    rows = cls_rows(8, 0)
    with pytest.raises(ValueError, match="compute_loss_func.*per_example_loss_fn"):
        SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1), train_dataset=rows, meta_dataset=rows,
                    compute_loss_func=lambda out, y, num_items_in_batch=None: out.logits.sum())
    net = wnet()
    model = bert()
    t = SamaTrainer(model=model, args=targs(tmp_path, max_steps=1, per_device_train_batch_size=4,
                                            gradient_accumulation_steps=2, optim="sgd", max_grad_norm=0.0),
                    train_dataset=Recorded(rows), meta_dataset=cls_rows(4, 1), weight_net=copy.deepcopy(net),
                    method="sama_na")
    t.train()
    seen = t.train_dataset.data.seen[-8:]   # (the constructor reads example 0 to check the format)
    hand = bert()
    loss = 0
    for mb in (seen[:4], seen[4:8]):
        per = cls_losses(hand, [rows[i] for i in mb])
        with torch.no_grad():
            w = net(per.detach().unsqueeze(1)).squeeze(1)
        loss = loss + (w * per).sum() / w.sum() / 2
    grads = torch.autograd.grad(loss, list(hand.parameters()), allow_unused=True)
    with torch.no_grad():
        for p, g in zip(hand.parameters(), grads):
            if g is not None:
                p -= 1e-2 * g
    torch.testing.assert_close(flat(model), flat(hand), rtol=1e-5, atol=1e-7)


def _cls_model(num_labels, problem_type=None):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=SEQ, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, problem_type=problem_type)
    return BertForSequenceClassification(cfg)


def _logged_meta_loss(tmp_path, model, train, meta, **kw):
    """θ fixed (lr 0): the logged meta loss is the mean per-example loss of the initial model on meta."""
    t = SamaTrainer(model=model, args=targs(tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=4,
                                            **kw), train_dataset=train, meta_dataset=meta, weight_net=wnet())
    t.train()
    return [h for h in t.state.log_history if "meta_loss" in h][0]["meta_loss"]


@pytest.mark.parametrize("num_labels,problem_type,label_kind", [
    (CLASSES, "multi_label_classification", "multi_hot"),
    (CLASSES, None, "multi_hot"),              # inferred: float labels, > 1 output
    (1, None, "scalar"),                       # inferred: regression
    (2, "regression", "vector"),               # regression over 2 outputs
    (CLASSES, None, "class"),                  # inferred: single label
])
def test_problem_type_loss_equals_model_loss(tmp_path, num_labels, problem_type, label_kind):
    """Per-example losses by problem_type, against the model's own (mean) loss on the same batch."""
    g = torch.Generator().manual_seed(3)

    def rows(n):
        out = []
        for _ in range(n):
            y = {"multi_hot": lambda: (torch.rand(num_labels, generator=g) > 0.5).float(),
                 "scalar": lambda: torch.randn((), generator=g),
                 "vector": lambda: torch.randn(num_labels, generator=g),
                 "class": lambda: torch.randint(0, num_labels, (), generator=g)}[label_kind]()
            out.append({"input_ids": torch.randint(0, VOCAB, (SEQ,), generator=g), "labels": y})
        return out

    train, meta = rows(8), rows(6)
    x, y = torch.stack([r["input_ids"] for r in meta]), torch.stack([r["labels"] for r in meta])
    with torch.no_grad():
        expect = _cls_model(num_labels, problem_type)(input_ids=x, labels=y).loss.item()
    got = _logged_meta_loss(tmp_path, _cls_model(num_labels, problem_type), train, meta)
    assert math.isclose(got, expect, rel_tol=1e-5), (got, expect)


def test_problem_type_errors(tmp_path):
    logits = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="regression.*float labels"):
        sama_ext.hf.per_example_loss(logits, torch.zeros(4, dtype=torch.long), "classification")
    with pytest.raises(ValueError, match="unknown problem_type 'ranking'"):
        sama_ext.hf.per_example_loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), "classification",
                                     problem_type="ranking")
    with pytest.raises(ValueError, match="label_smoothing_factor applies to single-label"):
        sama_ext.hf.per_example_loss(torch.zeros(4, 3), torch.ones(4, 3), "classification", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing_factor is not applied to a per_example_loss_fn"):
        SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1, label_smoothing_factor=0.1),
                    train_dataset=cls_rows(8, 0), meta_dataset=cls_rows(4, 1),
                    per_example_loss_fn=lambda out, y: F.cross_entropy(out.logits, y, reduction="none"))


def test_label_smoothing_classification_and_lm(tmp_path):
    """label_smoothing_factor is applied as the Trainer applies it: against transformers' LabelSmoother
    (classification) and a hand-written smoothed token loss averaged per sequence (causal LM)."""
    from transformers.trainer_pt_utils import LabelSmoother

    eps = 0.3
    meta = cls_rows(6, 1)
    x, y = torch.stack([r["input_ids"] for r in meta]), torch.stack([r["labels"] for r in meta])
    with torch.no_grad():
        expect = LabelSmoother(epsilon=eps)(bert()(input_ids=x), y).item()
    got = _logged_meta_loss(tmp_path, bert(), cls_rows(8, 0), meta, label_smoothing_factor=eps)
    plain = cls_losses(bert(), meta).mean().item()   # (a random-init head: smoothing moves the loss by ~4e-4)
    assert math.isclose(got, expect, rel_tol=1e-6) and not math.isclose(got, plain, rel_tol=1e-4)
    lm_meta = [{k: v for k, v in r.items() if k != "domain"} for r in lm_rows(6, 1)]
    lm_train = [{k: v for k, v in r.items() if k != "domain"} for r in lm_rows(8, 0)]
    xs, labels = torch.stack([r["input_ids"] for r in lm_meta]), torch.stack([r["labels"] for r in lm_meta])
    with torch.no_grad():
        logp = gpt2()(input_ids=xs).logits.double().log_softmax(-1)[:, :-1]
    nxt = labels[:, 1:]
    tok = (1 - eps) * -logp.gather(2, nxt.clamp_min(0).unsqueeze(2)).squeeze(2) + eps * -logp.mean(-1)
    expect = torch.stack([tok[i][nxt[i] != -100].mean() for i in range(len(lm_meta))]).mean().item()
    got = _logged_meta_loss(tmp_path, gpt2(), lm_train, lm_meta, label_smoothing_factor=eps)
    assert math.isclose(got, expect, rel_tol=1e-5)


def test_failed_step_leaves_nothing(tmp_path):
    """An exception in backward (a simulated OOM) with auto_find_batch_size: the retry's first step
    re-runs only its own micro-batch in the meta step, and each trained example is counted once."""
    model, fired = bert(), []

    def boom(mod, gin, gout):
        if not fired:
            fired.append(1)
            raise RuntimeError("CUDA out of memory. (simulated)")

    model.classifier.register_full_backward_hook(boom)
    t = SamaTrainer(model=model, args=targs(tmp_path, max_steps=1, auto_find_batch_size=True),
                    train_dataset=cls_rows(16, 0), meta_dataset=cls_rows(4, 1), weight_net=wnet())
    sizes, orig = [], t._meta_step
    t._meta_step = lambda step, inputs: (sizes.append([int(b["input_ids"].shape[0]) for b in inputs]),
                                         orig(step, inputs))[1]
    t.train()
    b = t._train_batch_size
    assert fired and b < BATCH
    assert sizes == [[b]]
    w = t.learned_weights()
    assert int((~torch.isnan(w)).sum()) == b
    assert [h["weight_mean"] for h in t.state.log_history if "weight_mean" in h] and int(t._w_count.sum()) == b


def test_optimizer_without_diagonal_refused_before_training(tmp_path):
    model = bert()
    before = flat(model).clone()
    t = SamaTrainer(model=model, args=targs(tmp_path, max_steps=1, optim="adafactor"), train_dataset=cls_rows(8, 0),
                    meta_dataset=cls_rows(4, 1), weight_net=wnet())
    with pytest.raises(NotImplementedError, match="no adaptation diagonal for .*Adafactor.*sama_na"):
        t.train()
    assert torch.equal(flat(model), before) and t.state.global_step == 0
    t = SamaTrainer(model=bert(), args=targs(tmp_path, max_steps=1, optim="adafactor"), train_dataset=cls_rows(8, 0),
                    meta_dataset=cls_rows(4, 1), weight_net=wnet(), method="sama_na")
    t.train()
    assert t.state.global_step == 1
