"""Property-based tests of `sama_ext.meta_step` (issue 13): random small training setups, each
meta step checked against an independent float64 oracle (python_tests/sama_oracle.py) and the
state guarantees of meta_step's docstring.

    CI (derandomized, a few minutes at most on two cores):
        python -m pytest python_tests/test_properties.py -q
    soak (random seeds, many more draws; SAMA_EXT_SOAK_EXAMPLES overrides the count):
        SAMA_EXT_SOAK=1 python -m pytest python_tests/test_properties.py -q -x

Each draw picks an optimiser (Adam, AdamW, SGD, RMSprop, Adagrad) with its options per param
group (weight decay, AMSGrad, maximize, momentum/dampening/Nesterov, centered, lr_decay, a tensor
lr, foreach), an LR scheduler stepped between opt.step() and meta_step (StepLR, OneCycleLR with
cycled betas/momentum, LinearLR warm-up) or none, a resume from a checkpoint (state_dict → fresh
model/optimiser/scheduler → load_state_dict) or not, layouts (a transposed Linear weight, a
channels_last conv weight), BatchNorm (train or eval mode, momentum or cumulative) and dropout,
float64 (oracle) or float32 (invariants only), and meta_step's own options (sama / sama_na,
restore / descend, α, safeguard, frozen_at, a prior λ.grad).

Two problems: "ridge" — L_base = CE(net(x), y) + β Σ‖θ_j − λ_j‖² over a drawn subset of θ, so
∇λL_base is linear in θ, the central difference is exact: the oracle's own difference is checked
against 2βv to rounding; "wnet" — a Meta-Weight-Net reweighting with `sama_ext.frozen` inputs.
Both compare meta_step with the oracle at V_RTOL (the diagonals' own cancellation, see there).

Properties:
  * λ.grad = prior + direct + (g⁻ − g⁺)/(2ε), ε = α/‖v‖, v from optim_oracle.oracle_diagonal of the
    step that produced θ (captured before the scheduler step); info.eps / v_norm / skipped agree;
  * θ bit-identical after "restore", θ − εv after "descend"; module buffers bit-identical (and the
    same objects); optimiser state and param groups unchanged; θ's .grad unchanged; every
    evaluation of base_loss sees the same RNG state;
  * a closure raising at its k-th call: the error propagates, λ.grad (bitwise, None included), θ,
    buffers, optimiser state unchanged; a non-finite L_base at θ±εv or L_meta: a no-op with
    info.skipped (λ.grad's values as before, θ as before even with "descend");
  * a real SIGINT sent at the k-th line executed inside sama_ext (KeyboardInterrupt at the next
    bytecode boundary, as Ctrl-C): θ and buffers bit-identical, λ.grad exactly as before or exactly
    the uninterrupted result, no hook or lock left behind, and the next meta_step unaffected —
    at a random line (test_interrupt_at_a_random_moment) and at every line of the guards
    (test_interrupt_at_every_line_of).
Plus failing tests for library bugs found by this suite (section 4).
"""
from __future__ import annotations

import copy
import gc
import io
import math
import linecache
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import sama_ext
from sama_ext import _backend
from optim_oracle import StepRecord, _clone_state, oracle_diagonal, stepped_optimizer
from sama_oracle import (F64, clone_tree, cosine, detach, meta_step_oracle, same_bits, same_tree, unseen_mask)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                                        "ignore:.*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`:UserWarning")

SOAK = os.environ.get("SAMA_EXT_SOAK", "") not in ("", "0")
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)  # no "explain": it traces
# (the only function-scoped fixture used with @given, unlock_after, holds no per-example state)
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("sama-ci", deadline=None, derandomize=True, print_blob=True, phases=_PHASES,
                          suppress_health_check=_QUIET)
settings.register_profile("sama-soak", deadline=None, derandomize=False, print_blob=True, phases=_PHASES,
                          suppress_health_check=_QUIET)
_SOAK_N = int(os.environ.get("SAMA_EXT_SOAK_EXAMPLES", "2000"))


def examples(ci: int) -> settings:
    """ci draws in CI; the soak count under SAMA_EXT_SOAK=1."""
    if SOAK:
        return settings(settings.get_profile("sama-soak"), max_examples=_SOAK_N)
    return settings(settings.get_profile("sama-ci"), max_examples=ci)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    yield
    torch.set_num_threads(n)


@contextmanager
def using_backend(name: str):
    """The kernels of one backend ("torch": the reference, patched like test_adapt's fixture)."""
    if name == "compiled" and _backend.requested() == "torch":
        pytest.skip("SAMA_EXT_BACKEND=torch selects the reference backend for the whole run")
    old = _backend._choice
    if name == "torch":
        _backend._choice = "torch"
    try:
        assert sama_ext.backend() == name
        yield
    finally:
        _backend._choice = old


# ----------------------------------------------------------------------------- the drawn setup
OPTIMIZERS = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad")
PARAM_NAMES_BN = ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc1.weight", "fc1.bias", "fc2.weight",
                  "fc2.bias")


@st.composite
def group_hparams(draw, opt: str, foreach: bool):
    b = st.booleans()
    wd = draw(st.sampled_from([0.0, 0.0, 0.05]))
    maximize = draw(st.sampled_from([False, False, False, True]))
    if opt in ("Adam", "AdamW"):
        hp = dict(lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
                  betas=draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)])),
                  eps=draw(st.sampled_from([1e-8, 1e-3])), weight_decay=wd if opt == "Adam" else
                  draw(st.sampled_from([0.0, 0.01, 0.1])), amsgrad=draw(b), maximize=maximize)
    elif opt == "SGD":
        mom = draw(st.sampled_from([0.0, 0.5, 0.9]))
        damp = draw(st.sampled_from([0.0, 0.3])) if mom else 0.0
        hp = dict(lr=draw(st.sampled_from([1e-2, 0.1])), momentum=mom, dampening=damp,
                  nesterov=bool(mom and not damp and draw(b)), weight_decay=wd, maximize=maximize)
    elif opt == "RMSprop":
        hp = dict(lr=draw(st.sampled_from([1e-3, 1e-2])), alpha=draw(st.sampled_from([0.99, 0.5])),
                  eps=draw(st.sampled_from([1e-8, 1e-2])), weight_decay=wd,
                  momentum=draw(st.sampled_from([0.0, 0.5])), centered=draw(b), maximize=maximize)
    else:
        hp = dict(lr=draw(st.sampled_from([1e-2, 0.1])), lr_decay=draw(st.sampled_from([0.0, 0.1])),
                  weight_decay=wd, initial_accumulator_value=draw(st.sampled_from([0.0, 0.0, 0.1])),
                  eps=draw(st.sampled_from([1e-8, 1e-3])), maximize=maximize)  # (1e-10: see V_RTOL)
    if opt in ("Adam", "AdamW", "SGD") and not foreach and draw(st.sampled_from([False, False, True])):
        hp["lr"] = torch.tensor(hp["lr"], dtype=F64)  # a tensor lr (schedulers fill_ it in place)
    return hp


@dataclass
class Setup:
    problem: str                 # "ridge" | "wnet"
    dtype: torch.dtype
    opt: str
    foreach: bool
    groups: list                 # hyperparameters per param group
    group_of: list               # group index per θ name (in PARAM_NAMES order)
    sched: str | None
    steps: int
    resume_after: int | None     # checkpoint and resume after this many steps
    bn: str | None               # None | "momentum" | "cumulative"
    bn_eval: bool
    dropout: float
    channels_last: bool
    transposed: bool
    method: str
    base_update: str
    alpha: float
    safeguard: str
    frozen_at: str
    prior: bool
    seed: int
    ridge_names: list = field(default_factory=list)
    beta: float = 0.7
    gamma: float = 0.0           # direct term γ‖λ‖² in L_meta
    two_frozen: bool = False
    resume_channels_last: bool | None = None  # the resumed model's conv layout, if not channels_last's

    @property
    def names(self):
        return [n for n in PARAM_NAMES_BN if self.bn or not n.startswith("bn.")]


@st.composite
def setups(draw, float32=True, method=None):
    opt = draw(st.sampled_from(OPTIMIZERS))
    foreach = draw(st.sampled_from([False, False, True]))
    bn = draw(st.sampled_from([None, "momentum", "cumulative"]))
    names = [n for n in PARAM_NAMES_BN if bn or not n.startswith("bn.")]
    raw = draw(st.lists(st.integers(0, 2), min_size=len(names), max_size=len(names)))
    used = sorted(set(raw))
    group_of = [used.index(r) for r in raw]
    groups = [draw(group_hparams(opt, foreach)) for _ in used]
    steps = draw(st.integers(1, 3))
    resume_after = draw(st.sampled_from([None, None] + list(range(1, steps))))
    problem = draw(st.sampled_from(["ridge", "wnet"]))
    s = Setup(
        problem=problem, dtype=draw(st.sampled_from([F64] * 4 + ([torch.float32] if float32 else []))),
        opt=opt, foreach=foreach, groups=groups, group_of=group_of,
        sched=draw(st.sampled_from([None, None, "step", "onecycle", "linear"])), steps=steps,
        resume_after=resume_after, bn=bn, bn_eval=bool(bn) and draw(st.sampled_from([False, False, True])),
        dropout=draw(st.sampled_from([0.0, 0.3])), channels_last=draw(st.booleans()),
        transposed=draw(st.booleans()),
        method=method or draw(st.sampled_from(["sama", "sama", "sama", "sama_na"])),
        base_update=draw(st.sampled_from(["restore", "restore", "descend"])),
        alpha=draw(st.sampled_from([0.1, 1.0, 3.0])), safeguard=draw(st.sampled_from(["zero_unseen", "none"])),
        frozen_at=draw(st.sampled_from(["theta", "theta", "theta", "theta_plus"])), prior=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)))
    if problem == "ridge":
        s.ridge_names = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        s.gamma = draw(st.sampled_from([0.0, 0.3]))
    else:
        s.two_frozen = draw(st.booleans())
        s.gamma = draw(st.sampled_from([0.0, 0.0, 0.1]))
    return s


# ----------------------------------------------------------------------------- the problems
class Net(nn.Module):
    """conv (channels_last?) → BatchNorm? → tanh → fc1 (transposed weight?) → dropout? → fc2."""

    def __init__(self, s: Setup, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        if s.bn:
            self.bn = nn.BatchNorm2d(3, momentum=0.1 if s.bn == "momentum" else None)
        self.fc1 = nn.Linear(27, 5)
        self.drop = nn.Dropout(s.dropout)
        self.fc2 = nn.Linear(5, 3)
        self.to(s.dtype)
        if s.channels_last:
            self.conv.to(memory_format=torch.channels_last)
        if s.transposed:
            self.fc1.weight = nn.Parameter(self.fc1.weight.detach().t().contiguous().t())
        if s.bn and s.bn_eval:
            self.bn.eval()
        for n, p in self.named_parameters():
            assert n in PARAM_NAMES_BN

    def forward(self, x):
        h = self.conv(x)
        if hasattr(self, "bn"):
            h = self.bn(h)
        h = torch.tanh(self.fc1(torch.tanh(h).flatten(1)))
        return self.fc2(self.drop(h))


class Problem:
    def __init__(self, s: Setup):
        self.s = s
        g = torch.Generator().manual_seed(s.seed)
        self.x = torch.randn(6, 2, 3, 3, generator=g, dtype=F64).to(s.dtype)
        self.y = torch.randint(0, 3, (6,), generator=g)
        self.xm = torch.randn(8, 2, 3, 3, generator=g, dtype=F64).to(s.dtype)
        self.ym = torch.randint(0, 3, (8,), generator=g)

    def make_meta(self, net: Net) -> nn.Module:
        s = self.s
        torch.manual_seed(s.seed + 1)
        if s.problem == "ridge":
            params = {}
            for n in s.ridge_names:
                t = net.get_parameter(n).detach().clone()  # same layout as θ_j
                t.add_(0.3 * torch.randn_like(t))
                params[n.replace(".", "_")] = nn.Parameter(t)
            return nn.ParameterDict(params)
        wnet = nn.Sequential(nn.Linear(2 if s.two_frozen else 1, 4), nn.Tanh(), nn.Linear(4, 1)).to(s.dtype)
        if s.transposed:
            wnet[0].weight = nn.Parameter(wnet[0].weight.detach().t().contiguous().t())
        return wnet

    def base_loss(self, net, meta, hold):
        s = self.s
        logits = net(self.x)
        if s.problem == "ridge":
            reg = sum(((net.get_parameter(n) - meta[n.replace(".", "_")]) ** 2).sum() for n in s.ridge_names)
            return F.cross_entropy(logits, self.y) + s.beta * reg
        per = F.cross_entropy(logits, self.y, reduction="none")
        inp = hold(per).unsqueeze(1)
        if s.two_frozen:
            conf = hold(logits.softmax(1).amax(1))
            inp = torch.cat([inp, conf.unsqueeze(1)], 1)
        w = torch.sigmoid(meta(inp)).squeeze(1)
        return (w * per).sum() / w.sum()

    def meta_loss(self, net, meta):
        out = F.cross_entropy(net(self.xm), self.ym)
        if self.s.gamma:
            out = out + self.s.gamma * sum((q ** 2).sum() for q in meta.parameters())
        return out


# ----------------------------------------------------------------------------- training
OPT_CLS = {n: getattr(torch.optim, n) for n in OPTIMIZERS}


def make_optimizer(s: Setup, net: Net):
    named = dict(net.named_parameters())
    groups = [{"params": [named[n] for n, gi in zip(s.names, s.group_of) if gi == k], **clone_tree(hp)}
              for k, hp in enumerate(s.groups)]
    return OPT_CLS[s.opt](groups, foreach=True if s.foreach else None)


def make_scheduler(s: Setup, opt):
    if s.sched is None:
        return None
    if s.sched == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    if s.sched == "linear":
        return torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
    cycle = s.opt != "Adagrad"  # betas (Adam*) or momentum (SGD, RMSprop) cycle too
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[float(g["lr"]) for g in s.groups],
                                               total_steps=s.steps + 3, pct_start=0.5, cycle_momentum=cycle)


@dataclass
class Trained:
    net: Net
    meta: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    prob: Problem
    record: StepRecord          # the last step, with a copy of the optimiser taken before the scheduler stepped
    state_post: list            # per param (param_groups order), the state right after the last step
    order: list                 # θ names in param_groups order


def train(s: Setup) -> Trained:
    prob = Problem(s)
    net = Net(s, s.seed + 2)
    meta = prob.make_meta(net)
    opt = make_optimizer(s, net)
    sched = make_scheduler(s, opt)
    record = state_post = None
    for k in range(s.steps):
        if s.resume_after is not None and k == s.resume_after:
            buf = io.BytesIO()
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict() if sched else None}, buf)
            buf.seek(0)
            ck = torch.load(buf, weights_only=False)
            s2 = s if s.resume_channels_last is None else Setup(**{**vars(s), "channels_last": s.resume_channels_last})
            net = Net(s2, s.seed + 3)  # fresh model, optimiser and scheduler, then load
            opt = make_optimizer(s, net)
            sched = make_scheduler(s, opt)
            net.load_state_dict(ck["net"])
            opt.load_state_dict(ck["opt"])
            if sched:
                sched.load_state_dict(ck["sched"])
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.zero_grad(set_to_none=True)
        prob.base_loss(net, meta, detach).backward()
        last = k == s.steps - 1
        if last:
            theta_pre = [p.detach().clone() for p in params]
            state_pre = [_clone_state(opt.state[p]) for p in params]
        opt.step()
        if last:
            frozen_opt = copy.deepcopy(opt)  # the hyperparameters this step used
            vars(frozen_opt).pop("step", None)  # (a scheduler's wrapper of the original's step)
            record = StepRecord(optimizer=frozen_opt, params=params, theta_pre=theta_pre, state_pre=state_pre,
                                grads=[p.grad.detach().clone() for p in params])
            state_post = [_clone_state(opt.state[p]) for p in params]
        if sched:
            sched.step()
    names = {id(p): n for n, p in net.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    return Trained(net, meta, opt, sched, prob, record, state_post, order)


def oracle_diag(s: Setup, t: Trained) -> list[torch.Tensor] | None:
    """The adaptation diagonal aligned with net.named_parameters() (None for sama_na)."""
    if s.method == "sama_na":
        return None
    diag = oracle_diagonal(t.record)
    out = {}
    for i, (n, dg) in enumerate(zip(t.order, diag)):
        gi = s.group_of[s.names.index(n)]
        mask = unseen_mask(s.opt, t.record.optimizer.param_groups[gi], t.state_post[i])
        if s.safeguard == "zero_unseen" and mask is not None:
            dg = torch.where(mask, torch.zeros_like(dg), dg)
        out[n] = dg
    return [out[n] for n, _ in t.net.named_parameters()]


# ----------------------------------------------------------------------------- running a meta step
class Injected(Exception):
    pass


@dataclass
class Before:
    theta: dict
    theta_objs: list
    grads: list
    lam: dict
    lam_grad: list
    buffers: dict
    buffer_objs: dict
    opt_state: list
    opt_groups: list
    rng: torch.Tensor


def snapshot(t: Trained) -> Before:
    params = list(t.net.parameters())
    return Before(
        theta={n: p.detach().clone() for n, p in t.net.named_parameters()}, theta_objs=params,
        grads=[(p.grad, clone_tree(p.grad)) for p in params],
        lam={n: q.detach().clone() for n, q in t.meta.named_parameters()},
        lam_grad=[clone_tree(q.grad) for q in t.meta.parameters()],
        buffers={n: b.detach().clone() for n, b in t.net.named_buffers()},
        buffer_objs=dict(t.net.named_buffers()),
        opt_state=[clone_tree(t.opt.state[p]) for p in params],
        opt_groups=[clone_tree({k: v for k, v in g.items() if k != "params"}) for g in t.opt.param_groups],
        rng=torch.get_rng_state())


def reset(t: Trained, b: Before) -> None:
    """Back to the state before the meta step (θ after "descend", λ.grad, RNG)."""
    with torch.no_grad():
        for n, p in t.net.named_parameters():
            p.copy_(b.theta[n])
    for q, g in zip(t.meta.parameters(), b.lam_grad):
        q.grad = clone_tree(g)
    torch.set_rng_state(b.rng)


class Hung(Exception):
    pass


@contextmanager
def watchdog(seconds: float):
    """Turns a hang (e.g. a lock left held) into an error: SIGALRM interrupts a blocked acquire."""
    def fire(signum, frame):
        raise Hung(f"no progress in {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_meta_step(s: Setup, t: Trained, calls: list, inject=None):
    """meta_step with closures that log the RNG state they see; inject(kind, n) may raise or
    return a factor for the loss (n: 1-based index over all closure calls)."""
    def call(kind, fn):
        calls.append((kind, torch.get_rng_state()))
        out = fn()
        if inject is not None:
            f = inject(kind, len(calls))
            if f is not None:
                out = out * f
        return out

    with watchdog(10.0):
        return sama_ext.meta_step(
            list(t.net.parameters()), t.opt, list(t.meta.parameters()),
            lambda: call("base", lambda: t.prob.base_loss(t.net, t.meta, sama_ext.frozen)),
            lambda: call("meta", lambda: t.prob.meta_loss(t.net, t.meta)),
            alpha=s.alpha, method=s.method, base_update=s.base_update, safeguard=s.safeguard, frozen_at=s.frozen_at)


def set_prior(s: Setup, t: Trained) -> None:
    torch.manual_seed(s.seed + 4)
    for q in t.meta.parameters():
        q.grad = torch.randn_like(q) if s.prior else None


# ----------------------------------------------------------------------------- invariants
def assert_state_kept(t: Trained, b: Before, theta_too: bool = True) -> None:
    params = list(t.net.parameters())
    assert all(p is q for p, q in zip(params, b.theta_objs))
    if theta_too:
        for n, p in t.net.named_parameters():
            assert same_bits(p.detach(), b.theta[n]), f"θ {n} changed"
    for n, buf in t.net.named_buffers():
        assert buf is b.buffer_objs[n], f"buffer {n} replaced"
        assert same_bits(buf, b.buffers[n]), f"buffer {n} changed: {b.buffers[n]} -> {buf}"
    for i, p in enumerate(params):
        assert same_tree(t.opt.state[p], b.opt_state[i]), f"optimiser state of θ[{i}] changed"
        obj, val = b.grads[i]
        assert p.grad is obj and same_bits(p.grad, val), f"θ[{i}].grad changed"
    assert same_tree([{k: v for k, v in g.items() if k != "params"} for g in t.opt.param_groups], b.opt_groups)


def assert_lam_grad_bits(t: Trained, expected: list) -> None:
    for i, (q, g) in enumerate(zip(t.meta.parameters(), expected)):
        assert same_bits(q.grad, g), f"λ[{i}].grad changed: {g} -> {q.grad}"


def assert_lam_grad_values_kept(t: Trained, b: Before) -> None:
    """A skipped step: λ.grad's values as before (a None may have become zeros)."""
    for i, (q, g) in enumerate(zip(t.meta.parameters(), b.lam_grad)):
        if g is None:
            assert q.grad is None or not q.grad.any(), f"λ[{i}].grad: None -> {q.grad}"
        else:
            assert q.grad is not None and torch.equal(q.grad, g), f"λ[{i}].grad changed: {g} -> {q.grad}"


def flat(ts) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).to(F64) for x in ts])


# The diagonals' formulas lose digits to cancellation where the exact value is tiny (a first step:
# Adam's lr·eps/(|g|+eps)² computed as a difference of two ≈lr/|g| terms), about ulp·|g|/eps
# relative: ≤ 2e-7 in float64 for the eps ≥ 1e-8 drawn here. Everything derived from v gets this
# tolerance; float32 is test_float32_diagonal_is_accurate's business.
V_RTOL = 1e-6


def check_against_oracle(s: Setup, t: Trained, b: Before, calls: list, info) -> None:
    metas = [rng for kind, rng in calls if kind == "meta"]
    bases = [rng for kind, rng in calls if kind == "base"]
    assert len(metas) == 1 and bases, calls
    for rng in bases[1:]:
        assert torch.equal(rng, bases[0]), "base_loss evaluations saw different RNG states (dropout masks)"
    assert_state_kept(t, b, theta_too=s.base_update == "restore")
    if s.dtype != F64:  # float32: invariants only
        assert all(q.grad is None or torch.isfinite(q.grad).all() for q in t.meta.parameters())
        return
    o = meta_step_oracle(t.net, t.meta, b.theta, b.lam, b.buffers, b.lam_grad, t.prob.base_loss,
                         t.prob.meta_loss, oracle_diag(s, t), alpha=s.alpha, frozen_at=s.frozen_at,
                         rng_meta=metas[0], rng_base=bases[0])
    assert bool(info.skipped) == o.skipped
    assert math.isclose(float(info.v_norm), o.norm, rel_tol=V_RTOL), (float(info.v_norm), o.norm)
    if not o.skipped:
        assert math.isclose(float(info.eps), o.eps, rel_tol=V_RTOL), (float(info.eps), o.eps)
    if s.problem == "ridge" and not o.skipped:  # the oracle's own central difference is exact here
        vs = dict(zip([n for n, _ in t.net.named_parameters()], o.v))
        closed = [2 * s.beta * vs[key.replace("_", ".", 1)] for key, _ in t.meta.named_parameters()]
        torch.testing.assert_close(flat(o.fd), flat(closed), rtol=1e-9, atol=1e-12 * o.fd_noise)
    # Rounding alone separates the two: relative to the terms' size, plus what an ulp of θ± or g±
    # becomes after the division by 2ε (a few thousand ulps of margin).
    terms = [x for x in (*b.lam_grad, *o.direct, *o.fd) if x is not None]
    scale = float(flat(terms).abs().max()) if terms else 1.0
    rtol = V_RTOL
    atol = rtol * scale + 1e-12 * o.fd_noise
    got = [q.grad for q in t.meta.parameters()]
    for i, (g, e) in enumerate(zip(got, o.lam_grad)):
        if e is None:
            assert g is None or not g.any(), f"λ[{i}].grad set although L_meta and L_base ignore it"
            continue
        assert g is not None, f"λ[{i}].grad missing"
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m: f"λ[{i}].grad: {m}")
    if s.base_update == "descend":
        for (n, p), vi in zip(t.net.named_parameters(), o.v):
            step = -o.eps * vi
            ulps = 1e-13 * float(b.theta[n].abs().max())  # θ − εv is rounded to θ's ulp
            torch.testing.assert_close(p.detach() - b.theta[n], step, rtol=V_RTOL,
                                       atol=V_RTOL * float(step.abs().max()) + ulps, msg=lambda m: f"θ {n}: {m}")


# ----------------------------------------------------------------------------- 1. the oracle
def _meta_step_matches_oracle(s: Setup, backend: str) -> None:
    with using_backend(backend):
        t = train(s)
        set_prior(s, t)
        b = snapshot(t)
        calls = []
        info = run_meta_step(s, t, calls)
        check_against_oracle(s, t, b, calls, info)


@examples(ci=60)
@given(s=setups())
def test_meta_step_matches_oracle(s):
    _meta_step_matches_oracle(s, "compiled")


@examples(ci=15)
@given(s=setups())
def test_meta_step_matches_oracle_reference_backend(s):
    _meta_step_matches_oracle(s, "torch")


# ----------------------------------------------------------------------------- 2. errors
@examples(ci=40)
@given(s=setups(), kind=st.sampled_from(["raise", "raise", "nonfinite_base", "nonfinite_meta"]),
       at=st.integers(1, 4), bad=st.sampled_from([float("nan"), float("inf")]),
       backend=st.sampled_from(["compiled", "compiled", "torch"]))
def test_errors_change_nothing(s, kind, at, bad, backend):
    with using_backend(backend):
        t = train(s)
        set_prior(s, t)
        b = snapshot(t)
        n_base = 3 if s.frozen_at == "theta" else 2
        if kind == "raise":
            def inject(what, n):
                if n == 1 + (at - 1) % (1 + n_base):  # one of the calls meta_step makes
                    raise Injected(f"closure call {n} ({what})")
        elif kind == "nonfinite_base":
            target = n_base - (at % 2)  # the base evaluation at θ+εv or at θ−εv (its last two calls)

            def inject(what, n):
                return bad if n == 1 + target else None
        else:
            def inject(what, n):
                return bad if what == "meta" else None
        calls = []
        if kind == "raise":
            with pytest.raises(Injected):
                run_meta_step(s, t, calls, inject)
            assert_lam_grad_bits(t, b.lam_grad)
            assert_state_kept(t, b)
            return
        info = run_meta_step(s, t, calls, inject)
        event(f"{kind}: skipped={bool(info.skipped)}")
        assert bool(info.skipped)
        assert_lam_grad_values_kept(t, b)
        assert_state_kept(t, b)  # θ as before even with "descend"


# ----------------------------------------------------------------------------- 3. interrupts
_SAMA_DIR = os.path.dirname(os.path.abspath(sama_ext.__file__)) + os.sep


class LineTrigger:
    """Counts the 'line' events executed in sama_ext's own code (in one of its files, with `only`);
    at the `at`-th one, sends SIGINT to this process: Python's default handler raises
    KeyboardInterrupt at the next bytecode boundary, as Ctrl-C would. at=None only counts."""

    def __init__(self, at: int | None = None, only: str | None = None):
        self.at, self.count, self.fired = at, 0, False
        self.prefix = _SAMA_DIR + (only or "")

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.startswith(_SAMA_DIR) else None

    def _local(self, frame, event, arg):
        if event == "line" and frame.f_code.co_filename.startswith(self.prefix) \
                and "# no-signal-check" not in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            # (lines so marked hold no call or backward jump, where CPython runs signal handlers:
            # a real signal cannot be raised there, only this tracer's)
            self.count += 1
            if self.count == self.at:
                self.fired = True
                self.where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
                os.kill(os.getpid(), signal.SIGINT)
        return self._local

    def __enter__(self):
        self._old = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._old)
        return False


@contextmanager
def ctrl_c_raises():
    assert threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.fixture
def unlock_after():
    """Contain a lock that an interrupt left held (frozen's bookkeeping): released after the test
    that found it, so that one failure does not hang every later meta_step of the session."""
    yield
    lock = getattr(sys.modules["sama_ext.frozen_inputs"], "_active_lock", None)
    if lock is not None and lock.locked():
        lock.release()
        sys.modules["sama_ext.frozen_inputs"]._active.clear()


def _lam_grads(t):
    return [clone_tree(q.grad) for q in t.meta.parameters()]


class Interrupts:
    """One setup, stepped once without interruption (its result and line count), then re-run
    from the same state with a SIGINT at a chosen line (`check(at)`)."""

    def __init__(self, s: Setup, raise_at: int | None, only: str | None = None):
        from torch.nn.modules import module as nn_module

        self.s, self.only, self.raise_at = s, only, raise_at
        self.t = train(s)
        set_prior(s, self.t)
        self.b = snapshot(self.t)
        self._hooks = nn_module._global_forward_pre_hooks
        self.n_hooks = len(self._hooks)
        with LineTrigger(only=only) as counter:
            try:
                run_meta_step(s, self.t, [], self.inject)
                self.failed = False
            except Injected:
                self.failed = True
        self.lines = counter.count
        self.result = None if self.failed else _lam_grads(self.t)
        self.theta_after = {n: p.detach().clone() for n, p in self.t.net.named_parameters()}
        reset(self.t, self.b)

    def inject(self, what, n):
        if self.raise_at is not None and n == self.raise_at:
            raise Injected(f"closure call {n}")

    def check(self, at: int) -> str:
        s, t, b = self.s, self.t, self.b
        outcome = "returned"
        with LineTrigger(at, self.only) as trigger:
            try:
                run_meta_step(s, t, [], self.inject)
            except KeyboardInterrupt:
                outcome = "interrupted"
            except Injected:
                outcome = "raised"
        where = f"SIGINT at line event {at} of {self.lines} ({getattr(trigger, 'where', '?')})"
        assert trigger.fired, where
        assert outcome != "returned" or not self.failed, where
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, where
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)  # (so that one failure here does not spill into later tests)
        assert grad_mode, f"autograd left disabled ({where})"
        if len(self._hooks) != self.n_hooks:
            gc.collect()  # (a context manager abandoned by the interrupt is closed when collected)
        assert len(self._hooks) == self.n_hooks, f"a forward hook was left registered ({where})"
        now = _lam_grads(t)
        as_before = all(same_bits(x, y) for x, y in zip(now, b.lam_grad))
        as_result = self.result is not None and all(same_bits(x, y) for x, y in zip(now, self.result))
        assert as_before or as_result, f"λ.grad neither as before nor the uninterrupted result ({where})"
        assert outcome != "returned" or as_result, where
        if as_before or s.base_update == "restore":
            try:
                assert_state_kept(t, b)
            except AssertionError as e:
                raise AssertionError(f"{e} ({where})") from None
        else:  # the step completed and the interrupt came after it: θ is the descended one
            assert_state_kept(t, b, theta_too=False)
            for n, p in t.net.named_parameters():
                assert same_bits(p.detach(), self.theta_after[n]), f"θ {n} (descend, {where})"
        # nothing left behind: the next (uninterrupted) step gives the same result, without hanging
        reset(t, b)
        try:
            run_meta_step(s, t, [], self.inject)
            assert not self.failed, where
            assert all(same_bits(x, y) for x, y in zip(_lam_grads(t), self.result)), where
        except Injected:
            assert self.failed, where
        except Hung:
            pytest.fail(f"the meta step after an interrupt hung ({where}): a lock left held?")
        reset(t, b)
        return ("λ.grad as before" if as_before else "λ.grad the uninterrupted result") + \
            (" (after an injected error)" if self.failed else "")


@examples(ci=30)
@given(s=setups(float32=True),
       where=st.one_of(st.floats(0.0, 1.0, exclude_max=True), st.floats(0.9, 1.0, exclude_max=True)),
       raise_at=st.sampled_from([None, None, None, 1, 2, 3]),
       backend=st.sampled_from(["compiled", "compiled", "torch"]))
def test_interrupt_at_a_random_moment(unlock_after, s, where, raise_at, backend):
    """A SIGINT at the k-th line of sama_ext code (k drawn over the lines an uninterrupted step
    executes); with raise_at, a closure also raises at that call (Ctrl-C during the clean-up)."""
    with using_backend(backend), ctrl_c_raises():
        runs = Interrupts(s, raise_at)
        event(runs.check(1 + int(where * runs.lines)))


# The guards themselves (signal deferral, buffer restore, frozen's bookkeeping, the perturbation)
# are where a badly placed interrupt does harm, and a small share of the lines: every one of them.
SWEEP = Setup(problem="wnet", dtype=F64, opt="Adam", foreach=False, groups=[dict(lr=1e-2)], group_of=[0] * 8,
              sched="step", steps=2, resume_after=None, bn="momentum", bn_eval=False, dropout=0.3,
              channels_last=False, transposed=False, method="sama", base_update="restore", alpha=1.0,
              safeguard="zero_unseen", frozen_at="theta", prior=True, seed=11, two_frozen=True)


# (module, backend): the reference backend's kernels are Python loops over the tensors, so an
# interrupt can land between two tensors of one kernel there.
SWEPT = [("frozen_inputs.py", "compiled"), ("frozen_inputs.py", "torch"), ("state_guard.py", "compiled"),
         ("state_guard.py", "torch"), ("sama_step.py", "compiled"), ("reference.py", "torch")]


@pytest.mark.parametrize("raise_at", [None, 3], ids=["clean", "error-at-theta-plus"])
@pytest.mark.parametrize("module,backend", SWEPT, ids=[f"{m}-{b}" for m, b in SWEPT])
def test_interrupt_at_every_line_of(unlock_after, module, backend, raise_at):
    with using_backend(backend), ctrl_c_raises():
        runs = Interrupts(SWEEP, raise_at, only=module)
        assert runs.lines > 0
        for at in range(1, runs.lines + 1):
            runs.check(at)


# ----------------------------------------------------------------------------- 4. fixed regressions
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_resume_into_a_model_of_another_layout(opt_name):
    """A checkpoint of a contiguous model resumed into a channels_last one (a usual switch):
    torch's optimisers keep the loaded state's layout and step fine; so must meta_step."""
    hp = {"Adam": dict(lr=1e-2), "AdamW": dict(lr=1e-2), "SGD": dict(lr=0.1, momentum=0.9, dampening=0.3),
          "RMSprop": dict(lr=1e-2, centered=True), "Adagrad": dict(lr=0.1)}[opt_name]
    s = Setup(problem="ridge", dtype=F64, opt=opt_name, foreach=False, groups=[hp], group_of=[0] * 6, sched=None,
              steps=2, resume_after=1, bn=None, bn_eval=False, dropout=0.0, channels_last=False, transposed=False,
              method="sama", base_update="restore", alpha=1.0, safeguard="none", frozen_at="theta", prior=False,
              seed=5, ridge_names=["conv.weight"], resume_channels_last=True)
    t = train(s)
    assert t.net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    set_prior(s, t)
    b = snapshot(t)
    calls = []
    info = run_meta_step(s, t, calls)
    check_against_oracle(s, t, b, calls, info)


@examples(ci=25)
@given(opt=st.sampled_from(["Adam", "AdamW", "RMSprop", "Adagrad"]), steps=st.integers(1, 3),
       seed=st.integers(0, 2**16), data=st.data())
def test_float32_diagonal_is_accurate(opt, steps, seed, data):
    """adapt() on float32 state against the float64 oracle at that state: the direction of v and
    ‖v‖ (all that meta_step uses) to float32 accuracy, also on a first step, where the exact
    diagonal (Adam: lr·eps/(|g|+eps)²) is far smaller than the terms it is the difference of."""
    hp = data.draw(group_hparams(opt, foreach=False))
    hp["lr"] = float(hp["lr"])
    rec = stepped_optimizer(OPT_CLS[opt], hp, [(64,), (8, 4)], n_steps=steps, seed=seed, dtype=torch.float32)
    want = oracle_diagonal(rec, compute_dtype=F64)
    gen = torch.Generator().manual_seed(seed + 1)
    d = [torch.randn(p.shape, generator=gen) for p in rec.params]
    v_true = flat([w.double() * di.double() for w, di in zip(want, d)])
    for backend in ("compiled", "torch"):
        with using_backend(backend):
            v, norm = sama_ext.adapt(rec.optimizer, rec.params, d)
        _check_float32_v(hp, opt, rec, flat(v), float(norm), v_true)


@pytest.mark.parametrize("opt", ["Adam", "AdamW", "RMSprop", "Adagrad"])
@pytest.mark.parametrize("backend_name", ["compiled", "torch"])
def test_bfloat16_first_step_norm(opt, backend_name):
    """bf16 params and state at the optimiser's first step: ‖v‖ (hence ε) within 1% of the float64
    oracle's. The difference form of the diagonal left only bf16 rounding noise there (found under
    FSDP2: ε 17× off at AdamW's first step)."""
    hp = {"Adam": dict(lr=1e-3), "AdamW": dict(lr=1e-3, weight_decay=0.01), "RMSprop": dict(lr=1e-3),
          "Adagrad": dict(lr=1e-2)}[opt]
    rec = stepped_optimizer(OPT_CLS[opt], hp, [(256,), (16, 16)], n_steps=1, seed=0, dtype=torch.bfloat16)
    want = oracle_diagonal(rec, compute_dtype=F64)
    gen = torch.Generator().manual_seed(1)
    d = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in rec.params]
    with using_backend(backend_name):
        v, norm = sama_ext.adapt(rec.optimizer, rec.params, d)
    v_true = flat([w * di.double() for w, di in zip(want, d)])
    assert abs(float(norm) / float(v_true.norm()) - 1) < 1e-2, (float(norm), float(v_true.norm()))
    assert cosine(flat(v), v_true) > 0.999


def _check_float32_v(hp, opt, rec, got, norm, v_true):
    cos = cosine(got, v_true)  # v's norm is ~1e-9 at a first step: F.cosine_similarity would clamp it
    rel_norm = abs(norm - float(v_true.norm())) / float(v_true.norm())
    # Coupled decay: the float32 step itself rounded g_e = g + wd·θ, whose relative error is
    # 2⁻²⁴·κ with κ = (|g| + wd·|θ|)/|g_e|; the diagonal depends on g_e through D (twice).
    wd = float(hp.get("weight_decay", 0.0)) if opt != "AdamW" else 0.0
    sign = -1.0 if hp.get("maximize") else 1.0
    kappa = max(float(((g.double().abs() + wd * t.double().abs()) / (sign * g.double() + wd * t.double()).abs()).max())
                for g, t in zip(rec.grads, rec.theta_pre)) if wd else 1.0
    tol = 1e-4 + 4 * 2.0**-24 * kappa
    assert cos > 1 - tol and rel_norm < tol, (cos, rel_norm, float(v_true.norm()), kappa)
