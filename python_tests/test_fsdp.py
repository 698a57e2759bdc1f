"""FSDP2 (fully_shard) meta steps on gloo, 2 and 4 processes on loopback (fsdp_worker.py), against
an independent float64 SAMA on the unsharded model with the rank-averaged meta and base losses,
with collectives counted from outside sama_ext."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_worker as fw  # noqa: E402
from optim_oracle import StepRecord, oracle_diagonal  # noqa: E402
from test_distributed import _free_port, _launch  # noqa: E402  (the same subprocess launcher)

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _run(tmp_path, world: int, timeout: float = 300, **kw):
    return _launch(tmp_path, world, timeout=timeout, worker=WORKER, **kw)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def check_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fsdp{request.param}")
    res = _run(out, request.param, mode="check")
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    return request.param, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(request.param)]


# ----------------------------------------------------------------------------- the oracle
# SAMA written out by hand in float64 on the unsharded network (fsdp_worker.base_forward /
# weight_net), nothing from sama_ext: d and λ's direct gradient of the rank-averaged meta loss,
# the diagonal from torch.func on torch's own optimiser (optim_oracle) at the full state, ε = α/‖v‖,
# g± of the rank-averaged base loss at θ ± εv with each rank's frozen per-sample loss taken at θ.

def _diagonal(rec, opt_name):
    cls, hp = fw.OPTS[opt_name]
    params = [t.clone().requires_grad_(True) for t in rec["theta"]]
    step = StepRecord(optimizer=cls(params, **hp), params=params, theta_pre=rec["theta_pre"],
                      state_pre=rec["state_pre"], grads=rec["grads"])
    return [torch.where(u, 0.0, dg) if u is not None else dg  # the default safeguard "zero_unseen"
            for dg, u in zip(oracle_diagonal(step), rec["unseen"])]


def _up(x):
    """A record in float64 (the oracle of a bf16 run is float64 at the same values)."""
    if torch.is_tensor(x):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _up(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_up(v) for v in x]
    return x


def _oracle(recs, opt_name, through, method="sama", frozen_at="theta"):
    """(expected λ.grad, v, ε) for one meta step, from every rank's record."""
    th, lam = recs[0]["theta"], recs[0]["lam"]

    def meta_avg(th, lam):
        return sum(F.cross_entropy(fw.base_forward(th, r["xm"]), r["ym"])
                   + 0.05 * fw.weight_net(lam, r["xm"][:, 0].abs()).mean() for r in recs) / len(recs)

    def frozen_at_(th):  # each rank's per-sample loss, held fixed (frozen()) in every evaluation
        return [F.cross_entropy(fw.base_forward(th, r["x"]), r["y"], reduction="none").detach() for r in recs]

    def base_avg(th, lam):
        total = 0
        for r, c in zip(recs, per):
            w = fw.weight_net(lam, c)
            total = total + (w * F.cross_entropy(fw.base_forward(th, r["x"]), r["y"], reduction="none")).sum() / w.sum()
            if through:
                total = total + 0.1 * F.cross_entropy(fw.base_forward(th, r["x"] * (1 + 0.1 * w[:, None])), r["y"])
        return total / len(recs)

    d, direct = torch.func.grad(meta_avg, argnums=(0, 1))(th, lam)
    v = d if method == "sama_na" else [a * b for a, b in zip(_diagonal(recs[0], opt_name), d)]
    eps = fw.ALPHA / torch.sqrt(sum((t * t).sum() for t in v))
    per = frozen_at_(th if frozen_at == "theta" else [t + eps * w for t, w in zip(th, v)])
    g_lam = torch.func.grad(base_avg, argnums=1)
    g_p = g_lam([t + eps * w for t, w in zip(th, v)], lam)
    g_m = g_lam([t - eps * w for t, w in zip(th, v)], lam)
    want = [pr + dl + (m - p) / (2 * eps) for pr, dl, m, p in zip(recs[0]["prior"], direct, g_m, g_p)]
    return want, v, float(eps.detach())


def _bits(t):
    return t.detach().contiguous().view(torch.uint8)


def _same(a, b):
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("config", fw.EXACT)
def test_fsdp_meta_gradient_equals_float64_sama_on_rank_averaged_losses(check_run, config):
    """Two nestings (per layer + root; root only) × Adam/AdamW/SGD, three consecutive rounds of
    base step, meta step and λ step, λ.grad set before each: λ.grad equals the oracle to 1e-9 of
    the step's contribution, bit-identical on every rank; θ's shards bit-identical after the call
    (restore), θ.grad the same tensors with the same bits."""
    world, data = check_run
    _, opt_name, through, opts = fw.CONFIGS[config]
    step_kw = {k: opts[k] for k in fw.STEP_OPTIONS if k in opts}
    worst = 0.0
    for step in range(fw.STEPS):
        recs = [d[config]["steps"][step] for d in data]
        for r in recs[1:]:  # one global θ, λ, prior on all ranks
            for key in ("theta", "lam", "prior"):
                assert _same(r[key], recs[0][key]), key
        assert sum(r["shard_shapes"][0][0] for r in recs) == 16  # θ really is split over the ranks
        want, _, eps = _oracle(recs, opt_name, through, **step_kw)
        for r in recs:
            assert not r["skipped"] and r["eps"] == pytest.approx(eps, rel=1e-9)
            for i, (got, w, prior) in enumerate(zip(r["lam_grad"], want, r["prior"])):
                err, scale = float((got - w).abs().max()), float((w - prior).abs().max())
                assert scale > 0
                worst = max(worst, err / scale)
                assert err <= 1e-9 * scale, f"λ[{i}] step {step}: max error {err:.3g}, max |meta-gradient| {scale:.3g}"
            assert _same(r["lam_grad"], recs[0]["lam_grad"])
            assert _same(r["shards_after"], r["shards_before"])  # restore, bit for bit, on every shard
            assert _same(r["theta_after"], r["theta"])
            assert r["grad_same_objects"] and r["grad_same_bits"]
    assert worst < 1e-9


def test_fsdp_mixed_precision_bf16_compute_close_to_float64(check_run):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): forwards and backwards in bf16
    over float64 shards. The oracle (float64 throughout, at the same θ) differs by bf16 rounding
    only: measured cosine ≥ 0.9999998, max error ≤ 5.8e-4 of the contribution (2 and 4 ranks)."""
    world, data = check_run
    for step in range(fw.STEPS):
        recs = [d["bf16-compute"]["steps"][step] for d in data]
        want, _, _ = _oracle(recs, "adam", True)
        for r in recs:
            got = torch.cat([(g - p).flatten() for g, p in zip(r["lam_grad"], r["prior"])])
            w = torch.cat([(g - p).flatten() for g, p in zip(want, r["prior"])])
            assert float(got @ w / (got.norm() * w.norm())) >= 0.999
            assert float((got - w).abs().max()) <= 1e-2 * float(w.abs().max())
            assert _same(r["shards_after"], r["shards_before"]) and r["grad_same_bits"]


def test_fsdp_bf16_parameters_end_to_end(check_run):
    """Base model, AdamW state and λ in bfloat16 (θ± rounded stochastically on each shard, the
    realized ε summed over shards): λ.grad against a float64 SAMA at the same values. Measured
    cosine ≥ 0.99996, max error ≤ 1.3e-2 of the contribution (2 and 4 ranks); θ's shards restored
    bit for bit."""
    world, data = check_run
    for step in range(fw.STEPS):
        recs = [d["bf16-params"]["steps"][step] for d in data]
        want, _, _ = _oracle([_up(r) for r in recs], "adamw", True)
        for r in recs:
            assert not r["skipped"] and r["lam_grad"][0].dtype == torch.bfloat16
            got = torch.cat([(g.double() - p.double()).flatten() for g, p in zip(r["lam_grad"], r["prior"])])
            w = torch.cat([(g - p.double()).flatten() for g, p in zip(want, r["prior"])])
            assert float(got @ w / (got.norm() * w.norm())) >= 0.999
            assert _same(r["shards_after"], r["shards_before"]) and r["grad_same_bits"]
            assert _same(r["lam_grad"], recs[0]["lam_grad"])


@pytest.mark.parametrize("config", list(fw.CONFIGS))
def test_fsdp_collectives_per_meta_step(check_run, config):
    """Counted outside sama_ext. Pass 1 (meta_loss): FSDP's all-gathers and one reduce-scatter per
    FSDP group, then the one scalar all-reduce of Σv²; the frozen() record at θ and pass 2: only
    all-gathers (plus, for bf16 θ, one all-reduce of 4 numbers after it); pass 3: all-gathers and
    λ's all-reduce (one DDP bucket) — or, for an FSDP λ, its reduce-scatters and one all-reduce of
    a finiteness flag —, nothing else. In particular passes 2 and 3 never reduce-scatter θ."""
    world, data = check_run
    opts = fw.CONFIGS[config][3]
    record = opts.get("frozen_at", "theta") == "theta"  # theta_plus: no record evaluation
    p2, p3 = (3, 4) if record else (2, 3)
    for d in data:
        n_groups = d[config]["n_groups"]
        assert n_groups == (3 if fw.CONFIGS[config][0] == "layers" else 1)
        for rec in d[config]["steps"]:
            assert rec["calls"] == ["meta"] + ["base"] * p2
            by_pass = {k: [name for tag, name in rec["events"] if tag == k] for k in range(p3 + 1)}
            assert by_pass[0] == []
            p1 = by_pass[1]
            assert p1.count("reduce_scatter_single") == n_groups and p1[-1] == "all_reduce"
            assert set(p1[:-1]) == {"all_gather_single", "reduce_scatter_single"}
            sixteen = "dtype" in opts
            if sixteen:  # bf16 θ: what rounding left of ±εv, summed over shards (4 numbers), before pass 3
                assert by_pass[p2][-1] == "all_reduce"
                by_pass[p2] = by_pass[p2][:-1]
            for k in range(2, p2 + 1):  # record, pass 2: no reduce-scatter, no all-reduce
                assert by_pass[k] and set(by_pass[k]) == {"all_gather_single"}, by_pass[k]
            if "lam" in opts:  # FSDP λ: one reduce-scatter per λ group, then a finiteness flag
                assert by_pass[p3].count("reduce_scatter_single") == d[config]["n_lam_groups"] == 2
                assert set(by_pass[p3][:-1]) == {"all_gather_single", "reduce_scatter_single"}
            else:  # DDP λ: its all-reduce (one bucket)
                assert set(by_pass[p3][:-1]) == {"all_gather_single"}
            assert by_pass[p3][-1] == "all_reduce"
            assert sum(name == "all_reduce" for _, name in rec["events"]) == 2 + sixteen


def test_fsdp_descend_moves_the_global_theta_consistently(check_run):
    """base_update="descend": every rank's shards hold θ − εv of the oracle (no broadcast: θ± is
    global), so the gathered θ is bit-identical on all ranks."""
    world, data = check_run
    for step in range(fw.STEPS):
        recs = [d["descend"]["steps"][step] for d in data]
        _, v, eps = _oracle(recs, "adam", True)
        for r in recs:
            assert _same(r["theta_after"], recs[0]["theta_after"])
            for t0, t1, vi in zip(r["theta"], r["theta_after"], v):
                want = t0 - eps * vi
                assert float((t1 - want).abs().max()) <= 1e-12 * max(1.0, float(want.abs().max()))
            assert any(not torch.equal(a, b) for a, b in zip(r["theta_after"], r["theta"]))
        assert sum(name == "all_reduce" for _, name in recs[0]["events"]) == 2  # and no broadcast
        assert not any(name == "broadcast" for _, name in recs[0]["events"])


BAD = {"subset": "ValueError: sama_ext.meta_step: base_params must be exactly base_module's trainable parameters",
       "no_hook": "RuntimeError: sama_ext.meta_step: call sama_ext.distributed.register_comm_hook",
       "no_meta_module": "ValueError: sama_ext.meta_step: with an FSDP2 base_module, pass meta_module=",
       "partial": "ValueError: sama_ext.meta_step: base_params [2, 3, 4, 5] are not sharded by fully_shard",
       "partial_root": "TypeError: sama_ext.meta_step: base_module must be a DistributedDataParallel module",
       "fsdp_no_sync": "RuntimeError: sama_ext.meta_step: called with FSDP gradient sync off",
       "ddp_no_sync": "RuntimeError: sama_ext.meta_step: called inside meta_module.no_sync()",
       "neumann": "NotImplementedError: sama_ext.meta_step: method='neumann' is single-process only",
       "fsdp_lambda_subset": "ValueError: sama_ext.meta_step: meta_params must be exactly meta_module's trainable",
       "fsdp_lambda_no_sync": "RuntimeError: sama_ext.meta_step: called with FSDP gradient sync off",
       "fsdp_lambda_16bit": "NotImplementedError: sama_ext.meta_step: 16-bit base params with an FSDP2 meta_module",
       "divide_factor": "NotImplementedError: sama_ext.meta_step: base_module has a custom gradient divide factor"}


def test_fsdp_bad_inputs_raise_before_any_collective_and_change_nothing(check_run):
    world, data = check_run
    for d in data:
        bad = d["bad"]
        for name, start in BAD.items():
            assert bad[name]["raised"] is not None and bad[name]["raised"].startswith(start), (name, bad[name])
            assert bad[name]["unchanged"] and bad[name]["collectives"] == [], (name, bad[name])
        assert bad["ok"]["raised"] is None  # and a correct call afterwards works on every rank
        assert bad["ok"]["last_backward_kept"]  # set_is_last_backward(False) put back after the meta step


def test_fsdp_failing_pass_3_leaves_everything_and_fsdp_usable(check_run):
    """Pass 3 raises on every rank (in its forward; in the frozen() check right after it), λ a DDP
    module and an FSDP module (whose reduce-scatter has then already written λ.grad): θ's shards,
    θ.grad and λ.grad as they were (same tensors, same bits); the next meta step succeeds and
    agrees on every rank."""
    world, data = check_run
    for d in data:
        for case in ("fail3", "fail3-fsdp-lambda"):
            f = d[case]
            assert f["forward"]["raised"] == "injected pass-3 failure"
            assert f["frozen"]["raised"].startswith("sama_ext.frozen: base_loss called frozen() 1 times")
            for how in ("forward", "frozen"):
                assert f[how]["theta"] and f[how]["theta_grad"] and f[how]["lam_grad"], (case, how, f[how])
            assert not f["after"]["skipped"]
            assert _same(f["after"]["lam_grad"], data[0][case]["after"]["lam_grad"])


def test_fsdp_nonfinite_on_one_rank_skips_the_step_on_all(check_run):
    """Rank 1's L_base is infinite at θ+εv, λ a DDP and an FSDP module: every rank reports a
    skipped step and keeps λ.grad's bits and θ's shards."""
    world, data = check_run
    for d in data:
        for kind in ("ddp", "fsdp"):
            f = d["nonfinite"][kind]
            assert f["skipped"] and f["theta"] and f["lam_grad"], (kind, f)


def test_fsdp_a_failing_rank_does_not_hang_the_others(tmp_path):
    res = _run(tmp_path, 2, mode="fail", fail_rank=1, timeout=180)
    assert res[1].returncode != 0 and "injected failure on rank 1" in res[1].stderr
    assert "theta restored: True" in res[1].stderr
    assert res[0].returncode != 0  # rank 0 gave up at the collective timeout instead of hanging


# ----------------------------------------------------------------------------- PEFT LoRA adapters
# base params = only the LoRA adapters of an HF Llama built from a config (peft_lm); the oracle
# evaluates the same unsharded network with the adapters' values substituted (functional_call).

class _At:
    """The PEFT model with its adapters replaced by the given values."""

    def __init__(self, model, names, values):
        self.model, self.params = model, dict(zip(names, values))

    def __call__(self, input_ids):
        return torch.func.functional_call(self.model, self.params, (), {"input_ids": input_ids})


def _peft_oracle(recs, model):
    import peft_lm

    names, th, lam = recs[0]["names"], recs[0]["theta"], recs[0]["lam"]

    def per(th, x):
        return peft_lm.per_sequence(_At(model, names, th), x)

    def meta_avg(th, lam):
        return sum(per(th, r["xm"]).mean() + 0.05 * fw.weight_net(lam, per(th, r["xm"]).detach()).mean()
                   for r in recs) / len(recs)

    with torch.no_grad():
        frozen = [per(th, r["x"]) for r in recs]

    def base_avg(th, lam):
        total = 0
        for r, c in zip(recs, frozen):
            w = fw.weight_net(lam, c)
            total = total + (w * per(th, r["x"])).sum() / w.sum()
        return total / len(recs)

    d, direct = torch.func.grad(meta_avg, argnums=(0, 1))(th, lam)
    v = [a * b for a, b in zip(_diagonal(recs[0], "adam"), d)]
    eps = fw.ALPHA / torch.sqrt(sum((t * t).sum() for t in v))
    g_lam = torch.func.grad(base_avg, argnums=1)
    g_p = g_lam([t + eps * w for t, w in zip(th, v)], lam)
    g_m = g_lam([t - eps * w for t, w in zip(th, v)], lam)
    return [pr + dl + (m - p) / (2 * eps) for pr, dl, m, p in zip(recs[0]["prior"], direct, g_m, g_p)]


def _check_lam_grad(got, want, prior, what):
    for i, (g, w, p) in enumerate(zip(got, want, prior)):
        err, scale = float((g - w).abs().max()), float((w - p).abs().max())
        assert scale > 0 and err <= 1e-9 * scale, f"{what} λ[{i}]: max error {err:.3g}, max |meta-gradient| {scale:.3g}"


def test_peft_lora_adapters_as_base_params_single_process():
    """Without FSDP: the adapters are θ, the frozen Llama weights untouched bit for bit, λ.grad equal
    to the float64 oracle to 1e-9 of the step's contribution, two consecutive rounds."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import peft_lm
    import sama_ext

    model = peft_lm.build()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(lora) == 8 and len(frozen) > len(lora)
    frozen_before = [p.detach().clone() for p in frozen]
    wnet = fw.WeightNet()
    lam = list(wnet.parameters())
    opt = torch.optim.Adam(lora, lr=1e-2)
    for step in range(2):
        x, xm = peft_lm.tokens(0, step), peft_lm.tokens(0, 1000 + step)
        opt.zero_grad()
        per = peft_lm.per_sequence(model, x)
        with torch.no_grad():
            w = wnet(per.detach())
        ((w * per).sum() / w.sum()).backward()
        rec = {"theta_pre": [p.detach().clone() for p in lora], "grads": [p.grad.clone() for p in lora],
               "state_pre": [{k: v.clone() for k, v in opt.state[p].items()} for p in lora]}
        opt.step()
        rec["unseen"] = [opt.state[p]["exp_avg_sq"] == 0 for p in lora]
        for q in lam:
            q.grad = torch.full_like(q, 0.01 * (step + 1))
        rec.update(names=names, theta=[p.detach().clone() for p in lora], lam=[q.detach().clone() for q in lam],
                   x=x, xm=xm, prior=[q.grad.clone() for q in lam])
        base_loss, meta_loss = peft_lm.losses(model, wnet, x, xm, sama_ext.frozen)
        info = sama_ext.meta_step(lora, opt, lam, base_loss, meta_loss, alpha=fw.ALPHA)
        assert not bool(info.skipped)
        _check_lam_grad([q.grad for q in lam], _peft_oracle([rec], model), rec["prior"], f"step {step}")
        assert _same(lora, rec["theta"]) and _same(frozen, frozen_before)


def test_peft_lora_adapters_under_fsdp2(tmp_path):
    """fully_shard on each decoder layer and the root of the PEFT model (frozen and LoRA weights in
    the same FSDP groups), 2 ranks: λ.grad equals the float64 oracle on the unsharded model with the
    rank-averaged losses, identically on both ranks; adapters' shards restored and frozen weights'
    shards untouched bit for bit."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import peft_lm

    res = _run(tmp_path, 2, mode="peft")
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    data = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = peft_lm.build()
    for step in range(2):
        recs = [d[step] for d in data]
        assert _same(recs[0]["theta"], recs[1]["theta"])
        want = _peft_oracle(recs, model)
        for r in recs:
            _check_lam_grad(r["lam_grad"], want, r["prior"], f"step {step}")
            assert _same(r["lam_grad"], recs[0]["lam_grad"])
            assert _same(r["shards_after"], r["shards_before"]) and r["frozen_same"]


def test_fsdp_example_runs_with_torchrun_quick():
    """examples/fsdp_reweighting.py as the README runs it (torchrun, 2 ranks, --quick)."""
    import os
    import subprocess

    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(_free_port()), str(repo / "examples" / "fsdp_reweighting.py"),
                           "--quick"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1: shards of LoRA adapters" in proc.stdout and "learned weight: clean sequences" in proc.stdout
