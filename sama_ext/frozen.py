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
                f"sama_ext.frozen: base_loss called frozen() more often at θ−εv than at θ+εv "
                f"({self.pos + 1} > {len(self.values)}); the closure must make the same frozen() calls each time")
        v = self.values[self.pos]
        if v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            raise RuntimeError(
                f"sama_ext.frozen: call #{self.pos + 1} got {tuple(x.shape)} {x.dtype} at θ−εv but "
                f"{tuple(v.shape)} {v.dtype} at θ+εv; the closure must make the same frozen() calls each time")
        self.pos += 1
        return v

    def replay(self) -> None:
        self.replaying = True
        self.pos = 0

    def check_consumed(self) -> None:
        if self.replaying and self.pos != len(self.values):
            raise RuntimeError(
                f"sama_ext.frozen: base_loss called frozen() {len(self.values)} times at θ+εv but {self.pos} at "
                "θ−εv; the closure must make the same frozen() calls each time")


@contextmanager
def recording():
    """Active during a meta step's two perturbed evaluations (record, then replay)."""
    prev = getattr(_state, "recorder", None)
    rec = _Recorder()
    _state.recorder = rec
    try:
        yield rec
    finally:
        _state.recorder = prev
