"""DDP meta steps on gloo, 2–3 processes on loopback (ddp_worker.py), against an independent
float64 SAMA averaged over ranks, with collectives counted from outside sama_ext."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sama_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_worker  # noqa: E402
from optim_oracle import StepRecord, oracle_diagonal  # noqa: E402

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
PARAM_NAMES = ("A (transposed)", "b", "K (channels_last)", "kb", "s (expanded grad)", "u", "B (float32, transposed)")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, world: int, timeout: float = 240, worker: Path = WORKER, **kw) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    extra = []
    for k, v in kw.items():
        if v is True:
            extra.append(f"--{k}")
        elif v is not False:
            extra += [f"--{k}", str(v)]
    procs = [subprocess.Popen([sys.executable, str(worker), "--rank", str(r), "--world", str(world), "--port",
                               str(port), "--out", str(tmp_path), *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a DDP rank hung past the test's time limit")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


# ----------------------------------------------------------------------------- the oracle
# A float64 SAMA written out by hand for ddp_worker's models (the conv as the matmul it is on a
# 2×2 image), with the Adam diagonal from torch.func on torch's own Adam (optim_oracle); nothing
# here calls sama_ext. Per rank: d and λ's direct gradient at θ, v = diag ⊙ d, ε = α/‖v‖,
# g± = ∂L_base(θ ± εv, λ)/∂λ with the frozen per-sample loss taken at θ; then averaged.

def _mlp(th, x):
    w1, b1, w2, b2 = th
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _layout_net(lam, c):
    a, b, k, kb, s, u, bb = lam
    feat = torch.stack([c, c * c / 4], 1)
    h1 = torch.tanh(feat @ a + b)
    h2 = torch.tanh(h1 @ k.reshape(3, 8).T + kb) * (1 + 0.1 * s.sum())
    return torch.sigmoid(h2 @ u), torch.sigmoid(feat @ bb).mean(1)


def _base_loss(th, lam, x, y, c):
    per = F.cross_entropy(_mlp(th, x), y, reduction="none")
    w, side = _layout_net(lam, c)
    return (w * per).sum() / w.sum() + (per * side).mean()


def _meta_loss(th, lam, xm, ym):
    return F.cross_entropy(_mlp(th, xm), ym) + 0.05 * _layout_net(lam, xm[:, 0].abs())[0].mean()


def _adam_diagonal(rec) -> list[torch.Tensor]:
    params = [t.clone().requires_grad_(True) for t in rec["theta"]]
    step = StepRecord(optimizer=torch.optim.Adam(params, lr=ddp_worker.LR), params=params,
                      theta_pre=rec["theta_pre"], state_pre=rec["state_pre"], grads=rec["grads"])
    return oracle_diagonal(step)


def _local_sama(rec) -> list[torch.Tensor]:
    """One rank's meta-gradient (including λ's direct gradient), float64."""
    th = [t.double() for t in rec["theta"]]
    lam = [q.double() for q in rec["lam"]]
    d, direct = torch.func.grad(_meta_loss, argnums=(0, 1))(th, lam, rec["xm"], rec["ym"])
    v = [a * b for a, b in zip(_adam_diagonal(rec), d)]
    eps = ddp_worker.ALPHA / torch.sqrt(sum((t * t).sum() for t in v))
    c = F.cross_entropy(_mlp(th, rec["x"]), rec["y"], reduction="none")  # frozen() input, at θ
    grad_lam = torch.func.grad(_base_loss, argnums=1)
    g_p = grad_lam([t + eps * w for t, w in zip(th, v)], lam, rec["x"], rec["y"], c)
    g_m = grad_lam([t - eps * w for t, w in zip(th, v)], lam, rec["x"], rec["y"], c)
    return [(m - p) / (2 * eps) + dl for m, p, dl in zip(g_m, g_p, direct)]


def _expected(recs) -> list[torch.Tensor]:
    """λ.grad after the step: its value before (the same on every rank) + the ranks' mean."""
    local = [_local_sama(r) for r in recs]
    return [pr.double() + sum(ts) / len(ts) for pr, *ts in zip(recs[0]["prior"], *local)]


def _launch_check(tmp_path_factory, world):
    out = tmp_path_factory.mktemp(f"ddp{world}")
    res = _launch(out, world, mode="check")
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    return _load(out, world)


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def check_run(request, tmp_path_factory):
    """One launch of every case of ddp_worker's check mode per world size, shared by the tests."""
    return request.param, _launch_check(tmp_path_factory, request.param)


def _load(tmp_path, world):
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _bits(t):
    return t.detach().contiguous().view(torch.uint8)


def _n_buckets(sizes: str) -> int:
    return len(sizes.split(","))


@pytest.mark.parametrize("case", ["plain", "bucket_view"])
def test_ddp_meta_gradient_equals_hand_written_float64_sama(check_run, case):
    """Every λ layout (transposed, channels_last, expanded gradient, a float32 param beside float64
    ones, several buckets), gradient_as_bucket_view off and on, λ.grad set before the call (by
    hand; from DDP's own backward), a meta loss with a direct λ term: λ.grad equals λ.grad before
    + the mean over ranks of the hand-written local SAMA, identically on every rank."""
    world, data = check_run
    for step in range(2):
        recs = [d[case]["steps"][step] for d in data]
        for r in recs[1:]:  # identical state on all ranks before the step
            for key in ("theta", "lam", "prior"):
                assert all(torch.equal(a, b) for a, b in zip(r[key], recs[0][key])), key
        assert any(p.abs().max() > 0 for p in recs[0]["prior"])
        want = _expected(recs)
        for r in recs:
            for name, got, w, prior in zip(PARAM_NAMES, r["lam_grad"], want, r["prior"]):
                # relative to the step's own contribution. float64: rounding only (measured ≤ 2e-15).
                # B is float32: g± computed in float32 (measured ≤ 5e-5 of the contribution, most of it
                # the float32 rounding of prior + contribution, allowed for by the second term)
                err, scale = float((got.double() - w).abs().max()), float((w - prior.double()).abs().max())
                if got.dtype == torch.float64:
                    limit = 1e-9 * scale
                else:
                    limit = 1e-4 * scale + 4 * torch.finfo(torch.float32).eps * float(w.abs().max())
                assert err <= limit, f"{name} (step {step}, {r['prior_from']} prior): max error {err:.3g}, " \
                                     f"max |meta-gradient| {scale:.3g}"
            assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(r["lam_grad"], recs[0]["lam_grad"]))
            assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(r["theta_after"], r["theta"]))  # restore


@pytest.mark.parametrize("case", ["plain", "bucket_view", "bf16"])
def test_ddp_passes_1_2_communicate_nothing_and_pass_3_once_per_bucket(check_run, case):
    """Collectives counted outside sama_ext: torch.distributed's functions wrapped in the worker,
    and the process group's sequence number (which also counts DDP's own C++ collectives). And
    which DDP reducers each evaluation of the closures armed."""
    world, data = check_run
    for d in data:
        c = d[case]
        n_buckets = [_n_buckets(c["bucket_sizes"]), _n_buckets(c["rebuilt_bucket_sizes"])]
        assert n_buckets[1] >= 3  # several buckets, one of them float32 ...
        assert any(" " in b.strip() for b in c["rebuilt_per_bucket_param_indices"].split(","))  # ... shared ones
        for step, rec in enumerate(c["steps"]):
            last_base = max(i for i, t in enumerate(rec["calls"]) if t == "base")  # pass 3's evaluation
            early = [e for e in rec["events"] if e[0] <= last_base]
            assert early == [], f"collectives in passes 1-2: {early}"
            assert rec["seq_at_call"][last_base] == rec["seq_start"], "a collective in passes 1-2 (seen by the group)"
            # DDP arms a module's reducer in a forward iff require_backward_grad_sync (no_sync()
            # clears it): only pass 3's meta module may be armed
            want_sync = [(False, False)] * last_base + [(False, True)]
            assert rec["sync_at_call"] == want_sync, f"(base, meta) reducers armed: {rec['sync_at_call']}"
            late = [name for i, name in rec["events"] if i > last_base]
            assert late == ["all_reduce"] * n_buckets[step]
            assert rec["seq_end"] - rec["seq_at_call"][last_base] == n_buckets[step]


@pytest.mark.parametrize("how", ["forward", "backward", "frozen"])
@pytest.mark.parametrize("case", ["plain", "bucket_view"])
def test_ddp_failing_pass_3_leaves_lambda_grad_as_it_was(check_run, case, how):
    """Pass 3 raises (in the forward; in the backward after some buckets were written, which with
    gradient_as_bucket_view overwrites the old λ.grad's storage), or the frozen() consistency check
    right after a successful pass 3 does: λ.grad is the same tensors with the same bits, θ is
    restored, the hook is disarmed."""
    world, data = check_run
    for d in data:
        f = d[case][f"fail_{how}"]
        if how == "frozen":
            assert f["raised"].startswith("sama_ext.frozen: base_loss called frozen() 1 times") and f["calls"] == 3
        else:
            assert f["raised"] == f"injected pass-3 failure ({how})" and f["calls"] == 3
        assert f["same_objects"] and f["same_bits"] and f["theta_restored"] and f["hook_disarmed"], f
        if case == "bucket_view" and how == "backward":
            assert f["clobbered"]  # the case really overwrote the old λ.grad in place


@pytest.mark.parametrize("case", ["plain", "bucket_view"])
def test_ddp_nonfinite_on_one_rank_skips_the_step_on_all(check_run, case):
    """Rank 1's L_base is not finite at θ+εv: every rank reports a skipped step, keeps λ.grad's
    bits and θ (the all-reduce makes the result non-finite everywhere, so no extra collective)."""
    world, data = check_run
    for d in data:
        f = d[case]["nonfinite"]
        assert f["skipped"] and f["same_bits"] and f["theta_restored"], f


def test_ddp_compression_bf16_within_tolerance(check_run):
    world, data = check_run
    for step in range(2):
        recs = [d["bf16"]["steps"][step] for d in data]
        want = _expected(recs)
        exact = [d["plain"]["steps"][step]["lam_grad"] for d in data][0]
        for name, got, w in zip(PARAM_NAMES, recs[0]["lam_grad"], want):
            # each rank's (prior + meta-gradient)/world rounded once to bf16 (2⁻⁹ relative), then summed
            err, scale = float((got.double() - w).abs().max()), float(w.abs().max())
            assert err <= 1e-2 * scale, f"{name} (step {step}): max error {err:.3g}, max |λ.grad| {scale:.3g}"
        assert any(not torch.equal(a, b) for a, b in zip(recs[0]["lam_grad"], exact))  # really compressed


def test_ddp_many_steps_keep_ranks_identical_and_base_trains(tmp_path):
    """50 meta steps with 'descend' (ranks re-synchronised) and ordinary DDP base steps between."""
    res = _launch(tmp_path, 2, mode="train", steps=50, base_update="descend", timeout=400)
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-3000:] for r in res)
    a, b = _load(tmp_path, 2)
    assert all(torch.equal(x, y) for x, y in zip(a["final_theta"], b["final_theta"]))
    assert all(torch.equal(x, y) for x, y in zip(a["final_lam"], b["final_lam"]))
    first, last = a["first_theta"], a["final_theta"]
    assert any(not torch.equal(x, y) for x, y in zip(first, last))  # the base model did train


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    res = _launch(tmp_path, 2, mode="train", steps=2, fail_rank=1, timeout=180)
    assert res[1].returncode != 0 and "injected failure" in res[1].stderr
    assert res[0].returncode != 0  # rank 0 gave up (collective timeout / peer gone) instead of hanging


def test_meta_step_refuses_missing_hook_partial_coverage_and_static_graph():
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    port = _free_port()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        base, wnet = ddp_worker.make_base(), ddp_worker.WeightNet()
        dw = DDP(wnet)
        opt = torch.optim.SGD(base.parameters(), lr=0.1)
        with pytest.raises(RuntimeError, match="register_comm_hook"):
            sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters()), lambda: None, lambda: None,
                               meta_module=dw)
        sama_ext.distributed.register_comm_hook(dw)
        with pytest.raises(ValueError, match="exactly meta_module's trainable parameters"):
            sama_ext.meta_step(list(base.parameters()), opt, list(wnet.parameters())[:2], lambda: None,
                               lambda: None, meta_module=dw)
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            sama_ext.distributed.register_comm_hook(wnet)
        static = DDP(ddp_worker.WeightNet(), static_graph=True)
        sama_ext.distributed.register_comm_hook(static)
        with pytest.raises(ValueError, match="static_graph=True"):  # checked before anything runs
            sama_ext.meta_step(list(base.parameters()), opt, list(static.parameters()), lambda: None,
                               lambda: None, meta_module=static)
    finally:
        torch.distributed.destroy_process_group()
