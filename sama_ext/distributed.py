"""Distributed SAMA on PyTorch's own DDP (DESIGN §5).

Passes 1 and 2 of a meta step run locally on every rank, inside `no_sync()` so neither
reducer is armed. Pass 3 (the loss at θ−εv) is an ordinary backward through the DDP-wrapped
meta module: as each gradient bucket becomes ready, the hook registered here fuses the
central difference, 1/world_size and optional bf16/fp16 compression into one kernel
(`combine_`) and starts that bucket's all-reduce at once — overlapping communication with
the rest of the backward. One all-reduce per bucket per meta step; λ.grad ends up as the
average over ranks of each rank's meta-gradient plus whatever λ.grad held before.

Outside a meta step the hook is a plain averaging all-reduce (with the same compression), so
the meta module also trains normally.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from . import ops

__all__ = ["register_comm_hook", "SamaCommState", "check_modules"]

_COMPRESSION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SamaCommState:
    """What the hook needs during pass 3 of a meta step (set by meta_step, cleared after)."""
    process_group: object = None
    compression: torch.dtype | None = None
    g_plus: dict = field(default_factory=dict)   # id(param) -> ∂L_base(θ⁺)/∂λ (None: no gradient)
    prior: dict = field(default_factory=dict)    # id(param) -> copy of λ.grad before pass 3 (averaged too)
    direct: dict = field(default_factory=dict)   # id(param) -> ∂L_meta/∂λ at θ (averaged too)
    eps: Tensor | None = None                     # armed when set
    allreduces: int = 0                           # all-reduces started (counted for tests/benchmarks)
    bytes_sent: int = 0
    events: list = field(default_factory=list)    # (bucket index, time.perf_counter()) when recording

    @property
    def armed(self) -> bool:
        return self.eps is not None

    record_times: bool = False


def _world(state: SamaCommState) -> int:
    return dist.get_world_size(state.process_group)


def _sama_hook(state: SamaCommState, bucket) -> torch.futures.Future:
    buf = bucket.buffer()
    wire_dtype = state.compression or buf.dtype
    world = _world(state)
    if state.record_times:
        import time

        state.events.append((bucket.index(), time.perf_counter()))
    if state.armed:
        params = bucket.parameters()
        prior = [(state.prior.get(id(p)), state.direct.get(id(p))) for p in params]
        accumulate = any(a is not None or b is not None for a, b in prior)
        # with a prior to add, combine in the bucket's dtype and round to the wire dtype once, after
        out = torch.empty(buf.numel(), dtype=buf.dtype if accumulate else wire_dtype, device=buf.device)
        offsets = _offsets(buf, bucket.gradients())
        # Everything below is in the bucket's own layout (see _slot), so the fused combine may
        # treat each slot as flat memory and DDP unpacks `out` exactly as it packed g⁻.
        g_minus = [_slot(buf, p, off) for p, off in zip(params, offsets)]
        views = [_slot(out, p, off) for p, off in zip(params, offsets)]
        g_plus = []
        for p, gm in zip(params, g_minus):
            gp = state.g_plus.get(id(p))
            g_plus.append(torch.zeros_like(gm) if gp is None else _in_layout_of(gp, gm))
        if accumulate:  # (λ.grad's old value + λ's direct gradient) / world; combine adds the difference
            for vw, (old, direct) in zip(views, prior):
                if old is None and direct is None:
                    vw.zero_()
                else:
                    total = old if direct is None else direct if old is None else old + direct
                    vw.copy_(total / world)  # copy_ writes logical values into the slot's layout
        ops.combine_(views, g_minus, g_plus, state.eps, 1.0 / world, accumulate)
        if out.dtype != wire_dtype:
            out = out.to(wire_dtype)
    else:
        out = buf.div(world) if wire_dtype == buf.dtype else buf.to(wire_dtype).div_(world)
    state.allreduces += 1
    state.bytes_sent += out.numel() * out.element_size()
    fut = dist.all_reduce(out, group=state.process_group, async_op=True).get_future()

    def finish(f):
        res = f.value()[0]
        if res.dtype != buf.dtype:
            buf.copy_(res)
            return buf
        return res

    return fut.then(finish)


# DDP checks the hook's annotations as objects (this module's are strings, from __future__).
_sama_hook.__annotations__ = {"state": SamaCommState, "bucket": dist.GradBucket,
                              "return": torch.futures.Future[torch.Tensor]}


def _offsets(buf: Tensor, flat_views: list[Tensor]) -> list[int]:
    """Where each param's slot starts in the bucket. `bucket.gradients()` are row-major views of
    those slots, which is NOT how the data inside is laid out (see _slot): only their offsets
    are used."""
    out = []
    for t in flat_views:
        if t.dtype != buf.dtype or t.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
            raise RuntimeError("sama_ext.distributed: a DDP bucket's gradients are not views of its buffer "
                               "(this PyTorch's GradBucket is not the one sama_ext was written for)")
        out.append(t.storage_offset() - buf.storage_offset())
    return out


def _slot(flat: Tensor, param: Tensor, offset: int) -> Tensor:
    """param's slot in a bucket-sized flat tensor, in the layout DDP's reducer packs it
    (Reducer::initialize_bucket_views): the param's own strides when it is dense and
    non-overlapping (a transposed weight, a channels_last conv), row-major otherwise."""
    strides = param.stride() if _dense(param) else torch.empty(param.shape, device="meta").stride()
    return flat.as_strided(param.shape, strides, flat.storage_offset() + offset)


def _dense(t: Tensor) -> bool:
    """Tensor::is_non_overlapping_and_dense: the strides, sorted, are a row-major layout of the
    sizes (size-1 dims, whose stride never matters, ignored)."""
    need = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != need:
            return False
        need *= size
    return True


def _in_layout_of(g: Tensor, like: Tensor) -> Tensor:
    """g with like's strides (autograd may return another layout, e.g. an expanded gradient)."""
    if g.stride() == like.stride():
        return g
    return torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device).copy_(g)


def register_comm_hook(ddp_meta_module: DDP, compression: str | None = None,
                       process_group=None) -> SamaCommState:
    """Register SAMA's communication hook on a DDP-wrapped meta module (once, before training).

    compression: None (communicate in the gradients' dtype), "bf16" or "fp16" (the combined
    meta-gradient is rounded once to 16 bits for the all-reduce, then widened back).
    Returns the hook's state (its counters say how many all-reduces and bytes were sent)."""
    if not isinstance(ddp_meta_module, DDP):
        raise TypeError(f"sama_ext.distributed.register_comm_hook: expected a DistributedDataParallel module, got "
                        f"{type(ddp_meta_module).__name__}")
    if compression not in _COMPRESSION:
        raise ValueError(f"sama_ext.distributed.register_comm_hook: compression must be None, 'bf16' or 'fp16', not "
                         f"{compression!r}")
    if getattr(ddp_meta_module, "_sama_state", None) is not None:
        raise RuntimeError("sama_ext.distributed.register_comm_hook: this module already has SAMA's hook")
    state = SamaCommState(process_group=process_group if process_group is not None else ddp_meta_module.process_group,
                          compression=_COMPRESSION[compression])
    ddp_meta_module.register_comm_hook(state, _sama_hook)
    ddp_meta_module._sama_state = state
    return state


def check_modules(base_module, meta_module) -> None:
    """Refuse setups that would silently break synchronisation (DESIGN §5 hazards)."""
    for name, m in (("base_module", base_module), ("meta_module", meta_module)):
        if m is not None and not isinstance(m, DDP):
            raise TypeError(f"sama_ext.meta_step: {name} must be a DistributedDataParallel module (or None), got "
                            f"{type(m).__name__}")
        if m is not None and getattr(m, "static_graph", False):
            raise ValueError(
                f"sama_ext.meta_step: {name} was built with static_graph=True; DDP's static graph stops syncing "
                "after the meta step's autograd.grad passes (silently). Wrap it with static_graph=False.")
    if meta_module is not None and getattr(meta_module, "_sama_state", None) is None:
        raise RuntimeError("sama_ext.meta_step: call sama_ext.distributed.register_comm_hook(meta_module) once after "
                           "wrapping it in DDP; without it the meta-gradient would not be combined and averaged")


def check_coverage(meta_module: DDP, lam: list[Tensor]) -> None:
    """Pass 3 is backward(inputs=λ): λ must be exactly the DDP module's trainable params,
    or its reducer would wait for gradients that never come."""
    mine = {id(p) for p in meta_module.parameters() if p.requires_grad}
    given = {id(q) for q in lam}
    if mine != given:
        raise ValueError(
            f"sama_ext.meta_step: meta_params must be exactly meta_module's trainable parameters "
            f"({len(mine)}), got {len(given)} tensors of which {len(given & mine)} belong to it")


@contextmanager
def local_passes(base_module, meta_module):
    """Passes without communication: neither reducer is armed."""
    with ExitStack() as stack:
        for m in (base_module, meta_module):
            if m is not None:
                stack.enter_context(m.no_sync())
        yield


@contextmanager
def communicating_pass(base_module, meta_module: DDP, g_plus: list, lam: list[Tensor], eps: Tensor,
                       direct: list):
    """Pass 3: arm the hook with g⁺, ε, λ's direct gradient ∂L_meta/∂λ (`direct`, None where
    there is none) and λ.grad's prior values. λ.grad is emptied so that DDP's buckets hold g⁻
    alone, and receives the average over ranks of prior + direct + (g⁻ − g⁺)/(2ε).

    Nothing is written into λ.grad before the pass succeeds; on any exception each λ.grad is
    again the tensor it was, holding the values it had."""
    if not (len(g_plus) == len(direct) == len(lam)):
        raise ValueError(f"sama_ext.distributed.communicating_pass: {len(lam)} meta params but {len(g_plus)} "
                         f"g_plus and {len(direct)} direct gradients")
    state: SamaCommState = meta_module._sama_state
    old = [q.grad for q in lam]
    # The hook reads copies: with gradient_as_bucket_view=True an old λ.grad is a view into a
    # DDP bucket, which this backward overwrites with g⁻.
    with torch.no_grad():
        saved = [None if g is None else g.detach().clone() for g in old]
    state.g_plus = {id(q): g for q, g in zip(lam, g_plus)}
    state.prior = {id(q): s for q, s in zip(lam, saved) if s is not None}
    state.direct = {id(q): g for q, g in zip(lam, direct) if g is not None}
    for q in lam:
        q.grad = None
    state.eps = eps
    outcome = _PassOutcome()
    try:
        with (base_module.no_sync() if base_module is not None else nullcontext()):
            yield outcome
        # A non-finite g± on any rank reaches every rank through the all-reduce (identically), so
        # each rank can decide alone, without another collective: such a step changes nothing.
        with torch.no_grad():
            new = [q.grad for q in lam if q.grad is not None]
            flags = [torch.isfinite(g).all() for g in new]
            finite = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=eps.device)
            for q, s in zip(lam, saved):
                if q.grad is not None:
                    q.grad.copy_(torch.where(finite, q.grad, s if s is not None else torch.zeros_like(q.grad)))
        outcome.finite = finite.to(eps.device)
    except BaseException:
        with torch.no_grad():
            for q, g, s in zip(lam, old, saved):
                if g is not None:
                    g.copy_(s)  # bit for bit (a bucket view may have been overwritten)
                q.grad = g
        raise
    finally:
        state.eps = None
        state.g_plus = {}
        state.prior = {}
        state.direct = {}


class _PassOutcome:
    """What pass 3 found: `finite` (0-dim bool tensor) is False when the averaged result was not
    finite and λ.grad was given its old values back."""
    finite: Tensor | None = None


def sync_params(params: list[Tensor], process_group=None) -> None:
    """Make params bit-identical on all ranks: rank 0's values are broadcast."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                           group=process_group)
