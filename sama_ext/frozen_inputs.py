"""`frozen(x)`: a stop-gradient input that stays fixed across SAMA's finite difference.

In ordinary code `frozen(x)` is `x.detach()`. Inside a meta step the base loss is evaluated at
θ+εv and at θ−εv; a stop-gradient input computed from θ (a weight net's per-sample-loss input)
would otherwise move with θ, and the central difference would then estimate a different,
wrong quantity (DESIGN §2). So the values of one recording evaluation are replayed, in call
order, at the later ones.

Replay is checked, because a mismatch would be silent: each recorded value is a copy (a closure
that later overwrites the storage it passed cannot change it), each call must come from the same
line of code as when recorded (catches swapped calls of equal shapes), and a call from another
thread while a meta step records or replays is an error (it would see no recorder and detach).
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["frozen"]

_state = threading.local()
# thread id -> (thread name, its recorder), for threads inside a meta step. No lock: single dict
# operations are atomic under the GIL, and a lock held when an interrupt lands would deadlock.
_active: dict = {}


def frozen(x: Tensor) -> Tensor:
    """`x.detach()`, held at one value across the two perturbed evaluations of a meta step."""
    rec = getattr(_state, "recorder", None)
    while rec is not None and rec.closed:  # its meta step ended (an interrupt skipped the reset)
        rec = _state.recorder = rec.prev
    if rec is None:
        if _active:
            _refuse_other_thread()
        return x.detach()
    return rec.take(x, _call_site())


def _refuse_other_thread() -> None:
    live = list(_active.items())
    for tid, (_, rec) in live:
        if rec.closed:  # left behind by an interrupted exit
            _active.pop(tid, None)
    others = [f"{name!r}" for tid, (name, rec) in live if tid != threading.get_ident() and not rec.closed]
    if others:
        raise RuntimeError(
            f"sama_ext.frozen: called from thread {threading.current_thread().name!r} while a meta step runs in "
            f"thread {', '.join(others)}; frozen() must be called in the thread that calls meta_step (the value "
            "would not be held fixed here). nn.DataParallel runs forwards in worker threads: use DDP instead.")


def _call_site() -> tuple[str, int]:
    f = sys._getframe(2)  # the caller of frozen()
    return f.f_code.co_filename, f.f_lineno


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Recorder:
    def __init__(self, prev: "_Recorder | None" = None) -> None:
        self.prev = prev
        self.values: list[Tensor] = []
        self.sites: list[tuple[str, int]] = []
        self.replaying = False
        self.pos = 0
        self.closed = False

    def take(self, x: Tensor, site: tuple[str, int]) -> Tensor:
        if _in_backward():
            raise RuntimeError(
                "sama_ext.frozen: called during a backward pass — activation checkpointing "
                "(torch.utils.checkpoint) recomputes the forward there, and the recomputed value cannot be held "
                "fixed. Compute frozen() inputs outside the checkpointed region.")
        if not self.replaying:
            v = x.detach().clone()  # a copy: later writes to x's storage must not reach the replay
            self.values.append(v)
            self.sites.append(site)
            return v
        n = self.pos + 1
        if self.pos >= len(self.values):
            raise RuntimeError(
                f"sama_ext.frozen: base_loss called frozen() more often than when the values were recorded "
                f"({n} > {len(self.values)}); the closure must make the same frozen() calls each time")
        v = self.values[self.pos]
        if site != self.sites[self.pos]:
            raise RuntimeError(
                f"sama_ext.frozen: call #{n} comes from {site[0]}:{site[1]}, but from "
                f"{self.sites[self.pos][0]}:{self.sites[self.pos][1]} when recorded; the closure must make the "
                "same frozen() calls in the same order each time")
        if v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            raise RuntimeError(
                f"sama_ext.frozen: call #{n} got {tuple(x.shape)} {x.dtype}, but "
                f"{tuple(v.shape)} {v.dtype} when recorded; the closure must make the same frozen() calls each time")
        self.pos += 1
        return v

    def replay(self) -> None:
        """Switch from recording to replaying (or rewind for the next evaluation), after checking
        that the evaluation just finished consumed every recorded value."""
        self.check_consumed()
        self.replaying = True
        self.pos = 0

    def check_consumed(self) -> None:
        if self.replaying and self.pos != len(self.values):
            raise RuntimeError(
                f"sama_ext.frozen: base_loss called frozen() {len(self.values)} times when recording but "
                f"{self.pos} in a later evaluation; the closure must make the same frozen() calls each time")


def current_recorder():
    return getattr(_state, "recorder", None)


def reset_recorder(rec) -> None:
    """Put back the recorder a meta step found (after an interrupt inside recording()'s exit)."""
    _state.recorder = rec


@contextmanager
def recording():
    """Active during a meta step's evaluations of base_loss (record, then replay)."""
    prev = getattr(_state, "recorder", None)
    rec = _Recorder(prev)
    _state.recorder = rec
    tid = threading.get_ident()
    outer = _active.get(tid)
    _active[tid] = (threading.current_thread().name, rec)
    try:
        yield rec
    finally:
        rec.closed = True
        _state.recorder = prev
        if outer is not None:
            _active[tid] = outer
        else:
            _active.pop(tid, None)
