"""What keeps a meta step from leaving state changed: θ, module buffers, λ.grad.

* `signals_deferred()`: a section that an asynchronous signal handler (Ctrl-C's
  KeyboardInterrupt, a timer) cannot split. Python runs signal handlers between bytecodes, so
  "θ perturbed" and "the backup is valid" could otherwise be observed half-done — e.g. an interrupt
  right after the perturbation kernel returned but before the step noted that θ needs restoring.
  Handlers are swapped for recorders and the signals are re-delivered after the section.
* `BufferGuard`: the extra forwards of a meta step run in the model's current mode, so BatchNorm
  in train mode would move its running statistics four more times per step. Every module that runs
  during the step has its buffers copied on first use (a global forward pre-hook) and put back.
* `check_disjoint`: two parameters that share memory would be perturbed twice and restored wrong.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn.modules.module import register_module_forward_pre_hook

__all__ = ["signals_deferred", "BufferGuard", "check_disjoint"]

_ASYNC_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGALRM", "SIGVTALRM", "SIGPROF",
                                                     "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGBREAK")
                       if hasattr(signal, n))


@contextmanager
def signals_deferred():
    """Run the body without Python signal handlers; handle what arrived afterwards, in order.
    Signal handlers run only in the main thread, so elsewhere there is nothing to defer. Keep the
    body short and non-blocking (no collectives): Ctrl-C waits for it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    saved: dict = {}

    def record(signum, frame):
        pending.append((signum, frame))

    try:
        for sig in _ASYNC_SIGNALS:
            handler = signal.getsignal(sig)
            if callable(handler):  # only Python-level handlers can raise between bytecodes
                saved[sig] = handler
                signal.signal(sig, record)
        yield
    finally:
        first = None
        for sig, handler in saved.items():  # every handler goes back, even if one raises meanwhile
            try:
                signal.signal(sig, handler)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
        for signum, frame in pending:
            try:
                saved[signum](signum, frame)
            except BaseException as e:  # noqa: BLE001
                first = first or e
        if first is not None:
            raise first


class BufferGuard:
    """Copies the buffers of every module run (in this thread) while `watch()` is active, on the
    module's first call, and puts them back — values and objects — with `restore()`."""

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self._saved: dict[int, tuple[torch.nn.Module, list]] = {}
        self._active = False

    def _first_call(self, module: torch.nn.Module, args) -> None:
        if not self._active:  # watch() ended but an interrupt skipped the removal: remove now
            self.close()
            return
        if threading.get_ident() != self._thread or id(module) in self._saved:
            return
        # the whole subtree: a wrapper (torch.compile's OptimizedModule, DDP) may be the only
        # module whose call this hook sees
        with torch.no_grad():
            for m in module.modules():
                if id(m) not in self._saved:
                    bufs = [(name, b, b.detach().clone()) for name, b in m._buffers.items() if b is not None]
                    self._saved[id(m)] = (m, bufs)

    @contextmanager
    def watch(self):
        self._active = True
        try:
            register_module_forward_pre_hook(self._first_call)
            yield self
        finally:
            self._active = False
            self.close()

    def close(self) -> None:
        """Unregister the hook (idempotent). Found by identity in torch's global hook table, so it
        also works when an interrupt landed before the registration's handle was stored."""
        from torch.nn.modules import module as nn_module

        hooks = nn_module._global_forward_pre_hooks
        for key, fn in list(hooks.items()):
            if fn == self._first_call:
                hooks.pop(key, None)

    def restore(self) -> None:
        with torch.no_grad():
            for module, bufs in self._saved.values():
                for name, original, copy in bufs:
                    original.copy_(copy)
                    module._buffers[name] = original  # also undoes a replaced buffer


def _span(t: Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) that t can reach (for a DTensor, such
    as an FSDP2 parameter: this rank's shard, the memory it owns)."""
    if hasattr(t, "to_local") and hasattr(t, "device_mesh"):
        with torch.no_grad():
            t = t.to_local()
    size = t.element_size()
    start = t.storage_offset() * size
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
    return t.untyped_storage().data_ptr(), start, start + extent * size


def check_disjoint(tensors: list[Tensor], names: list[str]) -> None:
    """Refuse tensors whose memory overlaps (a view of another param, two params on one buffer)."""
    spans = sorted((*_span(t), i) for i, t in enumerate(tensors) if t.numel() > 0 and t.layout == torch.strided
                   and t.device.type != "meta")
    last_ptr, last_end, last_i = None, 0, -1
    for ptr, start, end, i in spans:
        if ptr == last_ptr and start < last_end:
            a, b = sorted((last_i, i))
            raise ValueError(
                f"sama_ext.meta_step: {names[a]} and {names[b]} share memory (one is a view of the other, or both "
                "view one buffer); perturbing and restoring them separately would corrupt both. Pass each storage "
                "once (e.g. the base parameter, not a view of it).")
        if ptr != last_ptr or end > last_end:
            last_ptr, last_end, last_i = ptr, max(end, last_end if ptr == last_ptr else 0), i
