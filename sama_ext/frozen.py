"""`frozen(x)`: a stop-gradient input that stays fixed across SAMA's finite difference.

In ordinary code `frozen(x)` is `x.detach()`. Inside a meta step the base loss is evaluated at
θ+εv and at θ−εv; a stop-gradient input computed from θ (a weight net's per-sample-loss input)
would otherwise move with θ, and the central difference would then estimate a different, wrong
quantity (DESIGN §2). So the value recorded at the first evaluation is replayed, in call order,
at the second.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

from torch import Tensor

__all__ = ["frozen"]

_state = threading.local()


def frozen(x: Tensor) -> Tensor:
    """`x.detach()`, held at one value across the two perturbed evaluations of a meta step."""
    rec = getattr(_state, "recorder", None)
    if rec is None:
        return x.detach()
    return rec.take(x)


class _Recorder:
    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.replaying = False
        self.pos = 0

    def take(self, x: Tensor) -> Tensor:
        if not self.replaying:
            v = x.detach()
            self.values.append(v)
            return v
        if self.pos >= len(self.values):
            raise RuntimeError(
                f"sama_ext.frozen: base_loss called frozen() more often than when the values were recorded "
                f"({self.pos + 1} > {len(self.values)}); the closure must make the same frozen() calls each time")
        v = self.values[self.pos]
        if v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            raise RuntimeError(
                f"sama_ext.frozen: call #{self.pos + 1} got {tuple(x.shape)} {x.dtype}, but "
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


@contextmanager
def recording():
    """Active during a meta step's evaluations of base_loss (record, then replay)."""
    prev = getattr(_state, "recorder", None)
    rec = _Recorder()
    _state.recorder = rec
    try:
        yield rec
    finally:
        _state.recorder = prev
