"""Shared fixtures. `python_tests/` is on sys.path (pytest's rootdir-relative import), so helper
modules (optim_oracle, sync_guard) import by name."""
from __future__ import annotations

import pytest
import torch

import sama_ext
from sama_ext import _backend
from sync_guard import guarded


@pytest.fixture
def guard_syncs(monkeypatch):
    """Every call of sama_ext.meta_step and sama_ext.adapt made through the package namespace
    runs under sync_guard.no_host_reads: a device->host read inside it (bool(ok), float(norm),
    .item(), .tolist(), a boolean mask, ...) fails the test. Host tensors: the optimiser's CPU
    step counters and tensor hyperparameters (what stays on the host in a GPU run)."""
    monkeypatch.setattr(sama_ext, "meta_step", guarded(sama_ext.meta_step, (1, "base_optimizer"), "sama_ext.meta_step"))
    monkeypatch.setattr(sama_ext, "adapt", guarded(sama_ext.adapt, (0, "optimizer"), "sama_ext.adapt"))


@pytest.fixture(params=["compiled", "torch"])
def backend(request, monkeypatch):
    """Runs the test on one backend. "torch" patches the cached choice (restored afterwards)."""
    if request.param == "torch":
        monkeypatch.setattr(_backend, "_choice", "torch")
    elif _backend.requested() == "torch":
        pytest.skip("SAMA_EXT_BACKEND=torch selects the reference backend for the whole run")
    assert sama_ext.backend() == request.param
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
