"""A whole meta_step captured in a CUDA graph and replayed, against the same step run eagerly.

meta_step promises no host-device synchronisation; a graph capture is where that promise is
checked for real (a sync, a pageable host copy or an allocation the capture cannot record is an
error during capture). Needs a GPU and the CUDA kernels; skipped otherwise (with the reason).
Run by `python -m cuda_bench.gpu_check` on a GPU machine.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sama_ext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).to(dev)
    wnet = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1)).to(dev)
    # capturable Adam: its step counts live on the GPU, as a captured training loop needs
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    data = [(torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g),
             torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)]
    return model, wnet, opt, [tuple(t.to(dev) for t in d) for d in data]


def _losses(model, wnet, batch):
    x, y, xm, ym = batch

    def base_loss():
        per = F.cross_entropy(model(x), y, reduction="none")
        w = torch.sigmoid(wnet(sama_ext.frozen(per).unsqueeze(1))).squeeze(1)
        return (w * per).sum() / w.sum()

    def meta_loss():
        return F.cross_entropy(model(xm), ym)

    return base_loss, meta_loss


def _base_step(model, wnet, opt, batch):
    base_loss, _ = _losses(model, wnet, batch)
    opt.zero_grad(set_to_none=False)
    base_loss().backward()
    opt.step()


@pytest.mark.parametrize("method", ["sama", "sama_na"])
def test_meta_step_replayed_from_a_cuda_graph_equals_eager(method):
    if sama_ext.backend() != "compiled":
        pytest.skip("the compiled backend is not in use")
    from sama_ext import _backend

    if not _backend.compiled().with_cuda:
        pytest.skip(f"the extension has no CUDA kernels: {_backend.compiled().why_no_cuda}")
    torch.manual_seed(0)
    model, wnet, opt, data = _problem()
    theta, lam = list(model.parameters()), list(wnet.parameters())
    for b in data[:2]:  # some optimiser state first
        _base_step(model, wnet, opt, b)
    for p in lam:
        p.grad = torch.zeros_like(p)

    # static inputs the graph reads; new batches are copied into them before each replay
    static = tuple(t.clone() for t in data[2])
    base_loss, meta_loss = _losses(model, wnet, static)

    def step():
        for p in lam:
            p.grad.zero_()
        return sama_ext.meta_step(theta, opt, lam, base_loss, meta_loss, alpha=1.0, method=method)

    # eager reference, on the same state and batch
    theta_before = [p.detach().clone() for p in theta]
    info_eager = step()
    eager = [p.grad.clone() for p in lam]
    eager_loss = info_eager.meta_loss.clone()
    assert all(torch.equal(a, b) for a, b in zip(theta, theta_before)), "eager restore not exact"

    # warm up on a side stream (as torch.cuda.graphs asks), then capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        info_graph = step()
    for a, b in zip(theta, theta_before):  # capture itself must not have moved θ
        a.data.copy_(b)

    for rep in range(2):
        graph.replay()
        torch.cuda.synchronize()
        got = [p.grad.clone() for p in lam]
        for e, g in zip(eager, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=f"replay {rep}")
        torch.testing.assert_close(info_graph.meta_loss, eager_loss)
        assert not bool(info_graph.skipped)
        assert all(torch.equal(a, b) for a, b in zip(theta, theta_before)), f"replay {rep} did not restore θ"

    # a new batch through the same graph: equal to eager on that batch
    new = data[0]
    for dst, src in zip(static, new):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    got = [p.grad.clone() for p in lam]
    step()
    torch.cuda.synchronize()
    for g, p in zip(got, lam):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(got, eager)), "the new batch changed nothing"
