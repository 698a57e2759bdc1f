"""SAMA with θ sharded by PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), λ a DDP module
with SAMA's comm hook or an FSDP2 module too (docs/distributed.md, "FSDP2").

θ's parameters are DTensors; each rank owns one shard of each, and of its optimiser state. Every
element-wise piece of SAMA (the adaptation diagonal, θ ± εv, the restore) therefore runs unchanged
on the local shards, and the sharded model is one global θ:

    1. L_meta at θ, an ordinary FSDP backward: θ.grad ← the rank average of ∂L_meta/∂θ, sharded
       (one reduce-scatter per FSDP group); λ's direct gradient kept aside (λ under no_sync).
       The consumed gradient in θ.grad is set aside first and put back after.
    2. v = diag ⊙ d on the local shards, Σv² all-reduced (one float64 scalar), ε = α/‖v‖.
    3. θ ± εv written into the local shards: the next all-gather gives every rank θ±.
    4. g⁺ by autograd.grad w.r.t. λ only; g⁻ by backward(inputs=λ) through the DDP meta module,
       whose hook averages prior + direct + (g⁻ − g⁺)/(2ε) (sama_ext.distributed); for an FSDP λ,
       see _ShardedMeta. θ's FSDP gradient sync is off in these passes, so θ's gradients are never
       reduce-scattered or accumulated.
    5. θ's local shards restored bit for bit (or θ − εv: the same global θ on every rank).

Every forward of an FSDP module may leave parameters unsharded (the root keeps them after
forward; `reshard_after_forward=False`); an unsharded copy would hide a perturbation written into
the shards. So all groups are resharded before θ changes.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed as ddp
from . import ops, precision
from .adaptation import adapt_sumsq
from .frozen_inputs import current_recorder, recording, reset_recorder
from .state_guard import BufferGuard, signals_deferred
from .step_common import MetaStepInfo, finish_theta, meta_grads, rng_states, scalar_loss, set_rng_states

try:  # FSDP2 and DTensor (absent from builds without torch.distributed)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = None

__all__ = ["is_fsdp", "meta_step"]


def is_fsdp(module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


def _groups(root) -> list:
    """Every FSDP parameter group under `root` (FSDP2's own objects: their gradient-sync flags
    and resharding are what this module drives)."""
    out = []
    for m in root.modules():
        if isinstance(m, FSDPModule):
            out.extend(m._get_fsdp_state()._fsdp_param_groups)
    return out


def _check(theta: list[Tensor], lam: list[Tensor], base_module, meta_module, groups: list) -> None:
    """Refuse what would give a wrong meta-gradient silently, or leave ranks waiting on each other."""
    if meta_module is None:
        raise ValueError(
            "sama_ext.meta_step: with an FSDP2 base_module, pass meta_module= (a DDP-wrapped meta module with "
            "sama_ext.distributed.register_comm_hook, or an FSDP2 one): λ's meta-gradient must be averaged over ranks")
    if is_fsdp(meta_module):
        _check_sharded(lam, meta_module, _groups(meta_module), "meta_params", "meta_module")
        if any(p.dtype in precision.STOCHASTIC_DTYPES for p in theta):
            # its pass 2 is seeded with 1/(2ε) before the realized ε of 16-bit θ± is known
            raise NotImplementedError("sama_ext.meta_step: 16-bit base params with an FSDP2 meta_module are not "
                                      "supported; use a DDP meta module (register_comm_hook) or float32 θ")
    else:
        ddp.check_modules(None, meta_module)
        ddp.check_coverage(meta_module, lam)
        if not meta_module.require_backward_grad_sync:
            raise RuntimeError("sama_ext.meta_step: called inside meta_module.no_sync(); pass 3 must all-reduce λ's "
                               "meta-gradient (call meta_step outside no_sync)")
    _check_sharded(theta, base_module, groups, "base_params", "base_module")


def _check_sharded(params: list[Tensor], module, groups: list, what: str, name: str) -> None:
    """params must be exactly the trainable parameters of the FSDP2 module `module`, all sharded."""
    _reshard(groups)  # a module holding gathered parameters (after a forward) lists those instead (local op)
    sharded = {id(fp.sharded_param): fp for g in groups for fp in g.fsdp_params}
    mine = [p for p in module.parameters() if p.requires_grad]
    plain = [i for i, p in enumerate(params) if id(p) not in sharded]
    if plain:
        raise ValueError(
            f"sama_ext.meta_step: {what} {plain[:5]} are not sharded by fully_shard under {name} (partly sharded "
            f"and partly replicated, or not {name}'s parameters); apply fully_shard so that it covers every "
            "trainable parameter of the model (e.g. fully_shard(model) on the root as well)")
    if {id(p) for p in params} != {id(p) for p in mine}:
        raise ValueError(
            f"sama_ext.meta_step: {what} must be exactly {name}'s trainable parameters ({len(mine)}), got "
            f"{len(params)}; FSDP's backward writes the gradient of all of them (freeze the others with "
            "requires_grad_(False))")
    mesh = params[0].device_mesh
    if mesh.ndim != 1 or any(p.device_mesh != mesh for p in params):
        raise NotImplementedError(f"sama_ext.meta_step: {what} must be sharded over one 1-D device mesh (HSDP, 2-D "
                                  "meshes and several meshes are not supported)")
    if any(getattr(g, "gradient_divide_factor", None) is not None for g in groups):
        raise NotImplementedError(
            f"sama_ext.meta_step: {name} has a custom gradient divide factor (set_gradient_divide_factor); SAMA "
            "needs the rank average of the gradients FSDP reduces (d in pass 1, λ's meta-gradient). Reset it to "
            "the default (None) around meta_step")
    if any(not g.reduce_grads for g in groups):
        raise RuntimeError(
            f"sama_ext.meta_step: called with FSDP gradient sync off (set_requires_gradient_sync(False), FSDP2's "
            f"no_sync) on {name}; the meta step must reduce-scatter its gradients. Turn it back on before meta_step")
    if any(_pending(fp) for g in groups for fp in g.fsdp_params):
        raise RuntimeError(f"sama_ext.meta_step: {name} holds gradients accumulated without sync (a backward under "
                           "set_requires_gradient_sync(False)); finish that accumulation before meta_step")


def _pending(fp) -> bool:
    """An FSDP parameter holds an unsharded gradient not yet reduce-scattered."""
    unsharded = getattr(fp, "_unsharded_param", None)
    return fp.unsharded_accumulated_grad is not None or (unsharded is not None and unsharded.grad is not None)


def _drop_unsharded_grads(groups: list) -> None:
    for g in groups:
        for fp in g.fsdp_params:
            fp.unsharded_accumulated_grad = None
            if getattr(fp, "_unsharded_param", None) is not None:
                fp._unsharded_param.grad = None


def _reshard(groups: list) -> None:
    """Free every unsharded copy, so that the next forward all-gathers the shards as they are now
    (FSDPModule.reshard, group by group; a no-op for a sharded group)."""
    for g in groups:
        g.reshard()


@contextmanager
def _last_backward(*modules):
    """Every backward of the meta step is a last backward for FSDP (its default): with
    `set_is_last_backward(False)` (gradient accumulation) FSDP would not wait for pass 1's
    reduce-scatter before d is read, nor finalise the passes. The user's setting is put back."""
    ctxs = [m._get_fsdp_state()._state_ctx for m in modules if is_fsdp(m)]
    old = [c.is_last_backward for c in ctxs]
    for c in ctxs:
        c.is_last_backward = True
    try:
        yield
    finally:
        for c, flag in zip(ctxs, old):
            c.is_last_backward = flag


@contextmanager
def _no_grad_sync(groups: list):
    """FSDP's gradient reduction off: a backward that reaches θ's modules leaves θ.grad alone."""
    flags = [(g.reduce_grads, g.all_reduce_grads) for g in groups]
    for g in groups:
        g.reduce_grads = g.all_reduce_grads = False
    try:
        yield
    finally:
        for g, (r, a) in zip(groups, flags):
            g.reduce_grads, g.all_reduce_grads = r, a


class _LocalOptimizer:
    """The base optimiser as one rank sees it: its class, the hyperparameters its last step used,
    and its state with every DTensor replaced by the local shard (no copies), keyed by θ's local
    shards — what sama_ext.adapt needs to compute the diagonal shard by shard."""

    @staticmethod
    def build(opt: torch.optim.Optimizer, theta: list[Tensor], local: list[Tensor]) -> torch.optim.Optimizer:
        from . import step_record

        view = object.__new__(type(opt))  # the real class (the diagonal is looked up by it); no __init__
        by_id = {id(p): t for p, t in zip(theta, local)}
        view.param_groups = [{**step_record.hyperparameters(opt, g),
                              "params": [by_id[id(p)] for p in g["params"] if id(p) in by_id]}
                             for g in opt.param_groups]
        view.state = {by_id[id(p)]: {k: _local(v) for k, v in opt.state[p].items()}
                      for p in theta if p in opt.state}
        for p, t in zip(theta, local):  # SGD with dampening: whether the last step was the first
            first = step_record.sgd_first_step(p)
            if first is not None:
                step_record._sgd_first[t] = first
        return view


def _local(x):
    return x.to_local() if DTensor is not None and isinstance(x, DTensor) else x


class _ReplicatedMeta:
    """λ a DDP module with SAMA's hook: passes 1-2 under no_sync (λ's direct gradient set aside,
    g⁺ by autograd.grad), pass 3 through the hook (sama_ext.distributed)."""

    def __init__(self, module, lam):
        self.module, self.lam = module, lam

    def quiet(self):  # a pass that must not communicate λ's gradients
        return self.module.no_sync()

    def pass_2(self, base_loss, scale) -> None:
        with self.module.no_sync():
            self.g_plus = meta_grads(base_loss, self.lam)

    @contextmanager
    def pass_3(self, base_loss, scale, eps_r, direct):
        with ddp.communicating_pass(None, self.module, self.g_plus, self.lam, eps_r, direct) as out:
            with torch.enable_grad():
                scalar_loss(base_loss(), "base_loss").backward(inputs=self.lam)
            yield
        self.finite = out.finite

    def close(self) -> None:
        self.g_plus = None


class _ShardedMeta:
    """λ sharded by FSDP2 as well (a large λ, e.g. a label corrector): autograd cannot differentiate
    w.r.t. its sharded parameters, so each rank accumulates λ's unsharded gradient over the three
    passes without sync — direct ∂L_meta/∂λ, then −g⁺/(2ε) and +g⁻/(2ε) (backward seeds scaled) —
    and FSDP reduce-scatters the sum once, at the end of pass 3, into λ.grad (averaged over ranks,
    added to its old value). λ.grad is put back if pass 3 fails or the result is not finite anywhere
    (one all-reduce of a flag)."""

    def __init__(self, module, lam):
        self.module, self.lam, self.groups = module, lam, _groups(module)

    def quiet(self):
        return _no_grad_sync(self.groups)

    def _backward(self, loss, seed) -> None:
        inputs = [fp._unsharded_param for g in self.groups for fp in g.fsdp_params
                  if fp.sharded_param.requires_grad and getattr(fp, "_unsharded_param", None) is not None]
        if not inputs:
            raise ValueError("sama_ext.meta_step: base_loss() does not run the FSDP meta module, so the "
                             "meta-gradient would be 0")
        (loss * seed).backward(inputs=inputs)

    def pass_2(self, base_loss, scale) -> None:
        with torch.enable_grad(), self.quiet():
            self._backward(scalar_loss(base_loss(), "base_loss"), -scale)

    @contextmanager
    def pass_3(self, base_loss, scale, eps_r, direct):
        old = [q.grad for q in self.lam]
        with torch.no_grad():
            saved = [None if g is None else g.to_local().clone() for g in old]
        try:
            with torch.enable_grad():
                self._backward(scalar_loss(base_loss(), "base_loss"), scale)
            yield
            with torch.no_grad():
                bad = sum((~torch.isfinite(q.grad.to_local())).sum().double() for q in self.lam if q.grad is not None)
                bad = torch.as_tensor(bad, dtype=torch.float64, device=self.groups[0].device)
                dist.all_reduce(bad, group=self.lam[0].device_mesh.get_group())
                self.finite = (bad == 0).to(scale.device)
                for q, s in zip(self.lam, saved):  # not finite on some rank: old values back (zeros where None)
                    if q.grad is not None:
                        t = q.grad.to_local()
                        t.copy_(torch.where(self.finite.to(t.device), t, s if s is not None else torch.zeros_like(t)))
        except BaseException:
            with torch.no_grad():
                for q, g, s in zip(self.lam, old, saved):
                    if g is not None:
                        g.to_local().copy_(s)
                    q.grad = g
            raise

    def close(self) -> None:
        _drop_unsharded_grads(self.groups)  # whatever an aborted pass left unreduced


def meta_step(theta: list[Tensor], opt: torch.optim.Optimizer, lam: list[Tensor], base_loss: Callable[[], Tensor],
              meta_loss: Callable[[], Tensor], *, alpha: float, method: str, last_grads, stepped: list[int],
              base_update: str, base_module, meta_module, safeguard: str, frozen_at: str,
              restore_buffers: bool) -> MetaStepInfo:
    """sama_step.meta_step for an FSDP2 base module (inputs already validated there)."""
    groups = _groups(base_module)
    _check(theta, lam, base_module, meta_module, groups)
    meta = (_ShardedMeta if is_fsdp(meta_module) else _ReplicatedMeta)(meta_module, lam)
    group = theta[0].device_mesh.get_group()
    with torch.no_grad():
        local = [p.to_local() for p in theta]  # the shards themselves (to_local without grad: no copy)
        if last_grads is not None:
            last_grads = [None if g is None else _local(g) for g in last_grads]
    dev, comm_dev = local[0].device, groups[0].device

    buffers = BufferGuard() if restore_buffers else None
    grad_mode, recorder = torch.is_grad_enabled(), current_recorder()
    backup: list[Tensor] = []
    saved = done = False
    try:
        with ExitStack() as stack:
            if buffers is not None:
                stack.enter_context(buffers.watch())
            stack.enter_context(_last_backward(base_module, meta_module))
            _reshard(groups)
            # 1. d = rank average of ∂L_meta/∂θ, sharded, through FSDP's own backward
            lm, d, direct = _pass_1(meta_loss, theta, lam, local, meta)
            _reshard(groups)

            # 2-3. v (in place in d) on the local shards, ‖v‖² summed over ranks, ε
            if method == "sama":
                if stepped:
                    view = _LocalOptimizer.build(opt, theta, local)
                    _, sumsq = adapt_sumsq(view, [local[i] for i in stepped], [d[i] for i in stepped],
                                           grads=[last_grads[i] for i in stepped], out=[d[i] for i in stepped],
                                           safeguard=safeguard)
                else:
                    sumsq = torch.zeros((), dtype=torch.float64, device=dev)
                rest = [d[i] for i in range(len(theta)) if i not in set(stepped)]
                if rest:
                    torch._foreach_zero_(rest)
            else:
                sumsq = ops.const_adapt(d, d, lr=1.0, factor=1.0)
            v = d
            # on FSDP's compute device: with CPU offload the shards are on the host, the group may be NCCL's
            sumsq = sumsq.to(device=comm_dev, dtype=torch.float64).clone()
            dist.all_reduce(sumsq, group=group)  # the one scalar all-reduce
            sumsq = sumsq.to(dev)
            norm = sumsq.sqrt()
            ok = torch.isfinite(norm) & (norm > 0)
            eps = torch.where(ok, alpha / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))

            def half_inv(e):  # 1/(2ε), 0 for a skipped step (ε = 0): the seed of an FSDP λ's passes 2-3
                return torch.where(e > 0, 0.5 / torch.where(e > 0, e, torch.ones_like(e)), torch.zeros_like(e))

            # 4-5. central difference on the global θ ± εv
            backup = [torch.empty_like(t) for t in local]
            measure = any(t.dtype in precision.STOCHASTIC_DTYPES for t in local)
            rng = rng_states({dev, *(q.device for q in lam)})
            no_sync = stack.enter_context(_no_grad_sync(groups))  # noqa: F841 (passes 2-3: θ's grads never synced)
            with recording() as rec:
                if frozen_at == "theta":
                    with torch.no_grad(), meta.quiet():
                        base_loss()
                    rec.replay()
                    set_rng_states(rng)
                    _reshard(groups)
                with signals_deferred():  # the same pass measures what rounding left of εv on this shard
                    dot_p, moved_p = precision.perturb_save_(local, v, backup, eps)
                    saved = True
                meta.pass_2(base_loss, half_inv(eps))
                _reshard(groups)
                rec.replay()
                set_rng_states(rng)
                dot_m, moved_m = precision.perturb_from_(local, backup, v, -eps)
                if measure:  # what rounding left of ±εv, summed over the shards (one more small all-reduce)
                    sums = torch.stack([dot_p, dot_m, moved_p.double(), moved_m.double()]).to(comm_dev)
                    dist.all_reduce(sums, group=group)
                    sums = sums.to(dev)
                    eps_r, lost = precision.realized_eps(sums[0], -sums[1], sumsq, sums[2], sums[3], eps)
                    moved_p = sums[2].long()
                else:
                    eps_r, lost, moved_p = eps, torch.zeros_like(ok), None
                with meta.pass_3(base_loss, half_inv(eps_r), eps_r, direct):
                    rec.check_consumed()
                _reshard(groups)
                rec.check_consumed()

        valid = meta.finite & ~lost
        eps_used = torch.where(valid, eps, torch.zeros_like(eps))
        with signals_deferred():
            finish_theta(local, backup, v, eps_used, base_update)
            if buffers is not None:
                buffers.restore()
            done = True
        return MetaStepInfo(meta_loss=lm.detach(), eps=eps_used, v_norm=norm, skipped=~(ok & valid),
                            eps_realized=torch.where(valid, eps_r, torch.zeros_like(eps_r)), moved=moved_p, lost=lost)
    finally:
        with signals_deferred():
            torch.set_grad_enabled(grad_mode)
            reset_recorder(recorder)
            if buffers is not None:
                buffers.close()
            meta.close()
            if not done:
                _recover(base_module, groups)
                if is_fsdp(meta_module):
                    _recover(meta_module, meta.groups)
                if saved:
                    with torch.no_grad():
                        torch._foreach_copy_(local, backup)
                if buffers is not None:
                    buffers.restore()


def _pass_1(meta_loss, theta, lam, local, meta):
    """L_meta and its FSDP backward. θ.grad and λ.grad are set aside for it and put back (the same
    tensors): the consumed gradient is still needed, and λ.grad changes only with pass 3."""
    held_t, held_l = [p.grad for p in theta], [q.grad for q in lam]
    for p in theta:
        p.grad = None
    for q in lam:
        q.grad = None
    try:
        with torch.enable_grad(), meta.quiet():
            lm = scalar_loss(meta_loss(), "meta_loss")
            lm.backward()
        with torch.no_grad():
            d = [torch.zeros_like(t) if p.grad is None else _local(p.grad) for p, t in zip(theta, local)]
        direct = [q.grad for q in lam]
    finally:
        for p, g in zip(theta, held_t):
            p.grad = g
        for q, g in zip(lam, held_l):
            q.grad = g
    d = [x if x.stride() == t.stride() and x.dtype == t.dtype else torch.empty_like(t).copy_(x)
         for x, t in zip(d, local)]
    return lm, d, direct


def _recover(base_module, groups) -> None:
    """After an error inside a pass: FSDP's per-iteration state reset (in-flight collectives
    waited on, every group resharded), as FSDP2 documents for an aborted forward or backward."""
    root = base_module
    try:
        root.reset_iter_state()
    except RuntimeError:  # base_module is not the root (another fully_shard above it)
        _reshard(groups)


