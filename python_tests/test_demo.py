"""The demo (`python -m sama_ext.demo`): a fast end-to-end smoke run, the pieces its numbers
rest on (label-noise injection, the normalised weighting, early stopping, memorisation), and the
README's demo section against the demo.

What is checked cheaply about the README's table: that it is exactly what `demo.table` prints for
runs with its means and standard deviations, that the README's configuration is the demo's
default one, and that the numbers quoted in the prose are the table's. Whether this code
reproduces the table's values needs the demo itself (3 seeds × 6 methods × 60 epochs, about 2 min
on a busy 2-core VM): test_readme_table_holds_seed_0 runs one seed of it (about a third of that;
54 s on 2026-12-03) when SAMA_EXT_SLOW_TESTS=1, and is skipped otherwise.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

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
    for m in demo.DEFAULT_METHODS:
        assert demo.METHODS[m] in out
    assert "fine-tuned" in out and "strongest simple baseline" in out
    # the verdict follows from the numbers (paired gain of SAMA's final accuracy over plain's)
    res = json.loads((tmp_path / "results.json").read_text())
    gain = res["runs"]["sama"][0]["final"] - res["runs"]["plain"][0]["final"]
    (line,) = [x for x in out.splitlines() if "Target (SAMA's final accuracy" in x]
    assert ("MET" if gain >= res["config"]["target"] else "MISSED") in line and f"({gain:+.1f})" in line
    assert res["facts"]["target_met"] == (gain >= res["config"]["target"])
    png = tmp_path / "accuracy.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["runs"]) == {"plain", "plain_meta", "small_loss", "sama_na", "sama", "sama_pe"}
    for runs in res["runs"].values():
        (run,) = runs
        assert len(run["test_acc"]) == len(run["meta_acc"]) == 2
        assert 0 <= run["final"] <= 100 and 0 <= run["memorised"] <= 100 and 0 <= run["finetuned"] <= 100
        assert run["final"] == run["test_acc"][-1]
    for m in ("sama", "sama_na", "sama_pe"):
        assert res["runs"][m][0]["meta_steps"] == 2 * 3  # 160 samples / batch 64 = 3 steps per epoch
    # the strongest simple baseline is the best of plain / small-loss at final, early-stopped or fine-tuned
    best = max(res["runs"][m][0][k] for m in ("plain", "small_loss") for k in ("final", "early_stopped", "finetuned"))
    assert res["facts"]["strongest_baseline"]["mean"] == best
    for m in ("sama", "sama_na", "sama_pe"):
        vs = res["facts"][m]["vs_strongest"]
        own = max(res["runs"][m][0][k] for k in ("final", "early_stopped", "finetuned"))
        assert vs["gain"] == pytest.approx(own - best) and vs["gain_std"] == 0.0
    assert res["runs"]["plain"][0]["meta_steps"] == 0
    assert "target_met" in res["facts"]


def test_demo_unroll_and_meta_batch(tmp_path):
    assert demo.main(["--seeds", "1", "--epochs", "1", "--train-size", "256", "--test-size", "50", "--meta-size", "40",
                      "--methods", "sama", "--unroll", "2", "--meta-batch", "16", "--out", str(tmp_path),
                      "--no-progress"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["runs"]["sama"][0]["meta_steps"] == 2  # 4 base steps, a meta step after every second


def test_asymmetric_noise_moves_to_the_next_class():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=gen)
    noisy, changed = demo.add_asymmetric_noise(labels, 0.4, 10, gen)
    assert changed.sum().item() == 400
    assert torch.equal(noisy[changed], (labels[changed] + 1) % 10)
    assert torch.equal(noisy[~changed], labels[~changed])
    d = demo.load_split(0, 0.4, 500, 100, 0, torch.device("cpu"), noise_kind="asymmetric")
    assert torch.equal(d.y_train[d.noisy], (d.y_true[d.noisy] + 1) % 10)


def test_small_loss_trains_on_the_smallest_losses_only():
    """The small-loss row's loss is the mean of the kept share of the batch: its gradient vanishes on
    the dropped (largest-loss) samples — checked against per-sample gradients."""
    torch.manual_seed(0)
    model = demo.base_model()
    x, y = torch.rand(10, 64), torch.randint(0, 10, (10,))
    per = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    from sama_ext.noisy_label_baselines import small_loss_mean
    kept = per.detach().argsort()[:4]
    g = torch.autograd.grad(small_loss_mean(per, 0.4), list(model.parameters()), retain_graph=True)
    want = torch.autograd.grad(per[kept].mean(), list(model.parameters()))
    for a, b in zip(g, want):
        assert torch.allclose(a, b, atol=1e-7)


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


def test_synthetic50_dataset():
    x, y, classes = demo.load_data("synthetic50")
    assert x.shape == (4000, 64) and classes == 50 and sorted(set(y.tolist())) == list(range(50))
    assert torch.allclose(x.mean(0), torch.zeros(64), atol=1e-4) and torch.allclose(x.std(0), torch.ones(64), atol=1e-4)
    d = demo.load_split(0, 0.6, 500, 100, 0, torch.device("cpu"), dataset="synthetic50")
    assert d.num_classes == 50 and len(d.y_train) == 3400 and d.noisy.sum().item() == round(0.6 * 3400)
    assert torch.all(d.y_train[d.noisy] != d.y_true[d.noisy]) and int(d.y_train.max()) < 50
    assert demo.base_model(64, 50)[-1].out_features == 50
    with pytest.raises(ValueError, match="unknown dataset"):
        demo.load_data("mnist")


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


# ----------------------------------------------------------------------------- the README's demo section
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
_SECTION = README[README.index("## The demo"):README.index("## A minimal meta-learning loop")]
_PROSE = " ".join(_SECTION.split())  # line breaks as spaces
_KEYS = ("final", "early_stopped", "finetuned", "memorised")


def _readme_table() -> tuple[str, dict]:
    """The README's demo table (text) and its values: {method: {key: (mean, std)}, "s/epoch": …}."""
    text = re.search(r"```\n(method .*?)\n```", _SECTION, re.S).group(1)
    labels = {label: m for m, label in demo.METHODS.items()}
    values = {}
    for row in text.splitlines()[3:]:
        label = next(lb for lb in labels if row.startswith(lb))
        nums = re.findall(r"(\d+\.\d+) ± (\d+\.\d+)", row)
        assert len(nums) == len(_KEYS), row
        values[labels[label]] = {k: (float(m), float(sd)) for k, (m, sd) in zip(_KEYS, nums)}
        values[labels[label]]["sec_per_epoch"] = float(row.split()[-1])
    return text, values


def _runs_with(values: dict) -> dict:
    """Three runs per method whose mean and sample std are the given ones: m − s, m, m + s."""
    runs = {}
    for m, v in values.items():
        runs[m] = []
        for k in (-1, 0, 1):
            kw = {key: v[key][0] + k * v[key][1] for key in _KEYS}
            runs[m].append(demo.Run(m, k + 1, [], [], kw["final"], kw["early_stopped"], kw["finetuned"], 1,
                                    kw["memorised"], v["sec_per_epoch"], 0.0))
    return runs


def test_readme_table_is_the_demo_table():
    text, values = _readme_table()
    assert list(values) == demo.DEFAULT_METHODS
    assert demo.table(_runs_with(values)) == text


def test_readme_describes_the_demo_defaults():
    args = demo.parse_args([])
    assert (args.seeds, args.noise, args.epochs, args.batch_size, args.lr) == (3, 0.6, 60, 64, 1e-3)
    assert (args.test_size, args.meta_size, args.methods) == (500, 100, demo.DEFAULT_METHODS)
    assert "500 test, 100 clean \"meta\" and 1,197 training samples, 60% of the training labels" in _PROSE
    assert "(64→256→256→10, Adam 1e-3, batch 64, 60 epochs)" in _PROSE and "(1→100→1, sigmoid)" in _PROSE
    sizes = [(m.in_features, m.out_features) for m in demo.base_model() if isinstance(m, torch.nn.Linear)]
    assert sizes == [(64, 256), (256, 256), (256, 10)]
    wnet = demo.weight_net()
    assert [(m.in_features, m.out_features) for m in wnet if isinstance(m, torch.nn.Linear)] == [(1, 100), (100, 1)]
    assert isinstance(wnet[-1], torch.nn.Sigmoid)
    total = 1797  # scikit-learn's digits
    assert total - args.test_size - args.meta_size == 1197


def test_readme_prose_quotes_the_table():
    _, v = _readme_table()
    gain = v["sama"]["final"][0] - v["plain"]["final"][0]       # a paired mean is the difference of means
    gain_es = v["sama"]["early_stopped"][0] - v["plain"]["early_stopped"][0]
    assert f"SAMA beats plain training by +{gain:.1f} ±" in _PROSE
    assert f"reaches {v['plain']['early_stopped'][0]:.1f}% — above SAMA's final accuracy" in _PROSE
    assert v["plain"]["early_stopped"][0] > v["sama"]["final"][0]
    # (the prose quotes the paired mean of unrounded values: within rounding of the table's difference)
    quoted = float(re.search(r"SAMA gains only \+(\d+\.\d) ±", _PROSE).group(1))
    assert abs(quoted - gain_es) <= 0.1 + 1e-9, (quoted, gain_es)
    assert f"wrong label on {v['plain']['memorised'][0]:.0f}% of the mislabeled samples" in _PROSE
    assert f"SAMA on {v['sama']['memorised'][0]:.0f}%" in _PROSE
    # the strongest simple baselines, as the table has them
    assert (f"gives {v['plain']['finetuned'][0]:.1f}% after plain training "
            f"({v['sama']['finetuned'][0]:.1f}% after SAMA)") in _PROSE
    assert (f"small-loss selection reaches {v['small_loss']['final'][0]:.1f}% final, "
            f"{v['small_loss']['finetuned'][0]:.1f}% fine-tuned") in _PROSE
    assert f"ends at {v['sama']['final'][0]:.1f}% where plain training ends at {v['plain']['final'][0]:.1f}%" in _PROSE
    best = max((v[m][k][0], m, k) for m in v for k in ("final", "early_stopped", "finetuned") if m != "plain_meta")
    assert best[1:] == ("sama", "early_stopped") and f"best row of the table by +{gain_es:.1f} points" in _PROSE
    assert "{:.1f} ± {:.1f}".format(*v["sama_pe"]["early_stopped"]) in _PROSE
    assert f"weaker here ({v['sama_pe']['final'][0]:.1f}% final)" in _PROSE
    # the prose's per-seed claim: the most stable meta learner early-stopped
    assert v["sama_pe"]["early_stopped"][1] == min(v[m]["early_stopped"][1] for m in ("sama", "sama_na", "sama_pe"))
    knobs = " ".join(README[README.index("On the demo (3 seeds"):README.index("## Distributed training")].split())
    sama = "{:.1f} ± {:.1f}".format(*v["sama"]["final"])
    assert f'"sama" (+{gain:.1f} ± ' in knobs and f"instead of {sama}" in knobs
    assert f", +{gain:.1f})" in knobs  # alpha 1, the default


@pytest.mark.skipif(os.environ.get("SAMA_EXT_SLOW_TESTS") != "1",
                    reason="runs seed 0 of the README's demo (30 s-2 min); set SAMA_EXT_SLOW_TESTS=1")
def test_readme_table_holds_seed_0(tmp_path):
    """Of n = 3 values with mean m and sample std s, each lies within m ± s·(n−1)/√n: seed 0 of the
    demo with its defaults must fall inside every interval of the README's table (plus rounding),
    if this code produced the table in this environment. The training is deterministic on one
    machine (two runs gave identical curves), but 60 epochs amplify any difference in the CPU
    kernels or library versions: a failure means the table does not describe this environment —
    rerun the demo and update the README (the table of 2026-11-25 failed it on 2026-12-02, on the
    project's 2-core VM with torch 2.14.1; the table re-measured that day passes)."""
    _, v = _readme_table()
    assert demo.main(["--seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    half = 2 / math.sqrt(3)
    for m, stats in v.items():
        (run,) = res["runs"][m]
        for key in _KEYS:
            mean, sd = stats[key]
            assert abs(run[key] - mean) <= half * sd + 0.1, (m, key, run[key], stats[key])
