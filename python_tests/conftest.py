"""Shared fixtures. `python_tests/` is on sys.path (pytest's rootdir-relative import), so helper
modules (optim_oracle, sync_guard) import by name."""
from __future__ import annotations

import pytest

import sama_ext
from sync_guard import guarded


@pytest.fixture
def guard_syncs(monkeypatch):
    """Every call of sama_ext.meta_step and sama_ext.adapt made through the package namespace
    runs under sync_guard.no_host_reads: a device->host read inside it (bool(ok), float(norm),
    .item(), .tolist(), a boolean mask, ...) fails the test. Host tensors: the optimiser's CPU
    step counters and tensor hyperparameters (what stays on the host in a GPU run)."""
    monkeypatch.setattr(sama_ext, "meta_step", guarded(sama_ext.meta_step, (1, "base_optimizer"), "sama_ext.meta_step"))
    monkeypatch.setattr(sama_ext, "adapt", guarded(sama_ext.adapt, (0, "optimizer"), "sama_ext.adapt"))
