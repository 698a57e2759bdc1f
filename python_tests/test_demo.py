"""The demo (`python -m sama_ext.demo`): a fast end-to-end smoke run, and the pieces its numbers
rest on (label-noise injection, the normalised weighting, early stopping, memorisation)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo uses scikit-learn's bundled digits")
pytest.importorskip("matplotlib", reason="the demo saves a matplotlib plot")
pytest.importorskip("tqdm", reason="the demo shows tqdm progress bars")

from sama_ext import demo  # noqa: E402


def test_demo_main_tiny_run(tmp_path, capsys):
    rc = demo.main(["--seeds", "1", "--epochs", "2", "--train-size", "160", "--test-size", "100",
                    "--meta-size", "40", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "final test acc" in out and "early-stopped" in out and "memorised" in out
    for label in ("plain (noisy data)", "plain (noisy + meta set)", "SAMA-NA reweighting", "SAMA reweighting"):
        assert label in out
    assert "Target" in out and ("MET" in out or "MISSED" in out)
    png = tmp_path / "accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == {"plain", "plain_meta", "sama_na", "sama"}
    for runs in res["runs"].values():
        (run,) = runs
        assert len(run["test_acc"]) == len(run["meta_acc"]) == 2
        assert 0 <= run["final"] <= 100 and 0 <= run["memorised"] <= 100
        assert run["final"] == run["test_acc"][-1]
    assert res["runs"]["sama"][0]["meta_steps"] == 2 * 3  # 160 samples / batch 64 = 3 steps per epoch
    assert res["runs"]["plain"][0]["meta_steps"] == 0
    assert "target_met" in res["facts"]


def test_demo_unroll_and_meta_batch(tmp_path):
    assert demo.main(["--seeds", "1", "--epochs", "1", "--train-size", "256", "--test-size", "50", "--meta-size", "40",
                      "--methods", "sama", "--unroll", "2", "--meta-batch", "16", "--out", str(tmp_path),
                      "--no-progress"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["runs"]["sama"][0]["meta_steps"] == 2  # 4 base steps, a meta step after every second


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.6, 1.0])
def test_symmetric_noise_exact_rate_and_always_wrong(rate):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1197,), generator=gen)
    original = labels.clone()
    noisy, changed = demo.add_symmetric_noise(labels, rate, 10, gen)
    assert changed.sum().item() == round(rate * 1197)            # exact noise rate
    assert torch.all(noisy[changed] != labels[changed])         # a changed label is a *different* class
    assert torch.equal(noisy[~changed], labels[~changed])       # the rest is untouched
    assert noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(labels, original)                        # input not modified in place


def test_symmetric_noise_uses_every_other_class():
    gen = torch.Generator().manual_seed(1)
    labels = torch.zeros(9000, dtype=torch.long)
    noisy, changed = demo.add_symmetric_noise(labels, 1.0, 10, gen)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0
    assert counts[1:].min() > 850 and counts[1:].max() < 1150    # ≈ 1000 each: uniform over the other 9


def test_split_sizes_and_noise():
    d = demo.load_split(0, 0.6, 500, 100, 0, torch.device("cpu"))
    assert (len(d.y_test), len(d.y_meta), len(d.y_train)) == (500, 100, 1197)
    assert d.noisy.sum().item() == round(0.6 * 1197)
    assert torch.all(d.y_train[d.noisy] != d.y_true[d.noisy])
    assert float(d.x_train.max()) == 1.0 and float(d.x_train.min()) == 0.0   # x/16
    d2 = demo.load_split(1, 0.6, 500, 100, 0, torch.device("cpu"))
    assert not torch.equal(d.x_test, d2.x_test)                 # the split depends on the seed


def test_weighted_mean_is_normalised():
    losses = torch.tensor([1.0, 2.0, 4.0])
    w = torch.tensor([0.5, 0.25, 0.25])
    assert torch.allclose(demo.weighted_mean(losses, w), (w * losses).sum() / w.sum())
    assert torch.allclose(demo.weighted_mean(losses, 7 * w), demo.weighted_mean(losses, w))   # scale-free
    assert torch.allclose(demo.weighted_mean(losses, torch.ones(3)), losses.mean())
    # the gradient w.r.t. the weights is (ℓ_i − L)/Σw: raising a weight helps only a below-average loss
    wg = w.clone().requires_grad_()
    demo.weighted_mean(losses, wg).backward()
    L = (w * losses).sum() / w.sum()
    assert torch.allclose(wg.grad, (losses - L) / w.sum())


def test_reweighted_loss_uses_frozen_input():
    torch.manual_seed(0)
    model, wnet = demo.base_model(), demo.weight_net()
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    loss = demo.reweighted_loss(model, wnet, x, y)
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    w = wnet(losses.detach().unsqueeze(1)).squeeze(1)
    assert torch.allclose(loss, (w * losses).sum() / w.sum())
    # no gradient flows into θ through the weight net's input
    g_theta = torch.autograd.grad(loss, list(model.parameters()))
    want = torch.autograd.grad((w.detach() * losses).sum() / w.detach().sum(), list(model.parameters()))
    for a, b in zip(g_theta, want):
        assert torch.allclose(a, b, atol=1e-6)


def test_early_stopping_rule_and_memorisation():
    assert demo.best_epoch([10.0, 30.0, 20.0, 30.0]) == 1      # first epoch with the best meta accuracy
    pred = torch.tensor([1, 2, 3, 4])
    noisy = torch.tensor([1, 0, 3, 0])
    changed = torch.tensor([True, True, False, False])
    assert float(demo.memorised_share(pred, noisy, changed)) == 0.5
    assert float(demo.memorised_share(pred, noisy, torch.zeros(4, dtype=torch.bool))) == 0.0
