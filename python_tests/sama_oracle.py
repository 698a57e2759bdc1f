"""An independent float64 oracle for one `sama_ext.meta_step`, and state snapshots to compare.

Nothing here calls sama_ext. The meta-gradient is rebuilt from its definition (DESIGN §2):

    d  = dL_meta/dθ (and the direct dL_meta/dλ)      autograd on deep copies of the modules
    v  = diag(du/dg) ⊙ d                              diag: optim_oracle.oracle_diagonal (torch.func
                                                      on torch's own functional update), "sama_na": v = d
    ε  = α/‖v‖
    g± = dL_base(θ ± εv, λ)/dλ                        our own perturbation of the copies' params
    λ.grad = prior + direct + (g⁻ − g⁺)/(2ε)

with `frozen()` inputs held at their values at θ (or at θ+εv for frozen_at="theta_plus") by a
record/replay stand-in, and each closure run under the RNG state the real call observed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two flat tensors in float64. Not F.cosine_similarity: it clamps each norm at 1e-8,
    so two identical vectors of norm 1e-9 come out with cosine 0.01 (a first-step Adam diagonal
    times d has norm ~1e-9)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))

# Which optimiser state is "the second moment" for the safeguard "zero_unseen" (README: Adam's
# exp_avg_sq — its running maximum under AMSGrad —, RMSprop's square_avg, Adagrad's sum).
_SECOND_MOMENT = {"Adam": ("max_exp_avg_sq", "exp_avg_sq"), "AdamW": ("max_exp_avg_sq", "exp_avg_sq"),
                  "RMSprop": ("square_avg",), "Adagrad": ("sum",), "SGD": ()}


def unseen_mask(opt_name: str, group: dict, state_post: dict) -> Tensor | None:
    """Where the post-step second moment is exactly 0 (None: the optimiser has none)."""
    for key in _SECOND_MOMENT[opt_name]:
        if key == "max_exp_avg_sq" and not group.get("amsgrad"):
            continue
        if key in state_post:
            return state_post[key] == 0
    return None


class Hold:
    """A stand-in for `sama_ext.frozen`: `x.detach()` while recording (a copy), then the recorded
    values in call order."""

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.replaying = False
        self.pos = 0

    def __call__(self, x: Tensor) -> Tensor:
        if not self.replaying:
            self.values.append(x.detach().clone())
            return self.values[-1]
        v = self.values[self.pos]
        assert v.shape == x.shape, "the closure made different frozen() calls"
        self.pos += 1
        return v

    def replay(self) -> None:
        assert not self.replaying or self.pos == len(self.values)
        self.replaying, self.pos = True, 0


def detach(x: Tensor) -> Tensor:
    return x.detach()


@dataclass
class OracleResult:
    lam_grad: list[Tensor | None]   # expected λ.grad (float64)
    v: list[Tensor]                 # v, aligned with θ
    d: list[Tensor]
    norm: float                     # ‖v‖
    eps: float                      # ε (0 when the step is skipped)
    skipped: bool
    fd: list[Tensor | None]         # (g⁻ − g⁺)/(2ε) per λ (None where λ is unused by L_base)
    direct: list[Tensor | None]
    fd_noise: float = 0.0           # (max|g±| + max|θ±|)/(2ε): what one rounding of θ± or g± becomes in fd


def meta_step_oracle(net: torch.nn.Module, meta: torch.nn.Module, theta0: dict[str, Tensor],
                     lam0: dict[str, Tensor], buffers0: dict[str, Tensor], prior: list[Tensor | None],
                     base_loss, meta_loss, diag: list[Tensor] | None, *, alpha: float,
                     frozen_at: str, rng_meta: Tensor, rng_base: Tensor) -> OracleResult:
    """base_loss(net, meta, hold) and meta_loss(net, meta) are the problem's closures; theta0 / lam0
    / buffers0 the values before the meta step (by parameter / buffer name); diag (aligned with
    net's parameters) None for "sama_na". Runs on float64 deep copies; the live modules are untouched."""
    net_c, meta_c = copy.deepcopy(net).to(F64), copy.deepcopy(meta).to(F64)
    with torch.no_grad():
        for name, p in net_c.named_parameters():
            p.copy_(theta0[name])
        for name, b in net_c.named_buffers():
            b.copy_(buffers0[name])
        for name, q in meta_c.named_parameters():
            q.copy_(lam0[name])
    theta = list(net_c.parameters())
    lam = list(meta_c.parameters())
    rng_after = torch.get_rng_state()
    try:
        torch.set_rng_state(rng_meta)
        with torch.enable_grad():
            lm = meta_loss(net_c, meta_c)
            grads = torch.autograd.grad(lm, theta + lam, allow_unused=True)
        d = [torch.zeros_like(p) if g is None else g.detach().to(F64) for g, p in zip(grads[:len(theta)], theta)]
        direct = [None if g is None else g.detach().to(F64) for g in grads[len(theta):]]
        v = d if diag is None else [dg.detach().to(F64) * di for dg, di in zip(diag, d)]
        norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in v)))
        with_direct = [_add(p, g) for p, g in zip(prior, direct)]
        if not (norm > 0 and norm < float("inf")):
            return OracleResult(with_direct, v, d, norm, 0.0, True, [None] * len(lam), direct)
        eps = alpha / norm

        hold = Hold()
        if frozen_at == "theta":
            torch.set_rng_state(rng_base)
            with torch.no_grad():
                base_loss(net_c, meta_c, hold)
            hold.replay()

        def g_at(sign: float):
            with torch.no_grad():
                for p, p0, vi in zip(theta, (theta0[n] for n, _ in net_c.named_parameters()), v):
                    p.copy_(p0.to(F64) + sign * eps * vi)
            torch.set_rng_state(rng_base)
            with torch.enable_grad():
                out = torch.autograd.grad(base_loss(net_c, meta_c, hold), lam, allow_unused=True)
            return out

        g_plus = g_at(+1.0)
        hold.replay()
        g_minus = g_at(-1.0)
        if all(torch.equal(a, b) for a, b in zip(g_plus, g_minus) if a is not None and b is not None) \
                and all((a is None) == (b is None) for a, b in zip(g_plus, g_minus)):
            # the perturbation did not reach the base loss: the documented rule is a skipped step
            # (the direct term still counts), never a silent 0 from the difference
            return OracleResult(with_direct, v, d, norm, 0.0, True, [None] * len(lam), direct)
        fd = [None if gp is None and gm is None else (_z(gm, q) - _z(gp, q)) / (2 * eps)
              for gp, gm, q in zip(g_plus, g_minus, lam)]
        big_g = max(float(g.abs().max()) for g in (*g_plus, *g_minus) if g is not None)
        big_theta = max(float(p.detach().abs().max()) + eps * float(vi.abs().max()) for p, vi in zip(theta, v))
        return OracleResult([_add(w, f) for w, f in zip(with_direct, fd)], v, d, norm, eps, False, fd, direct,
                            (big_g + big_theta) / (2 * eps))
    finally:
        torch.set_rng_state(rng_after)


def _z(g, like):
    return torch.zeros_like(like, dtype=F64) if g is None else g.to(F64)


def _add(a, b):
    if a is None:
        return None if b is None else b.to(F64).clone()
    return a.to(F64) + (0 if b is None else b.to(F64))


# ----------------------------------------------------------------------------- state snapshots
def bits(t: Tensor) -> Tensor:
    """The raw bit pattern (−0.0 ≠ 0.0, NaN payloads count)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.detach().reshape(-1).contiguous().view(as_int).cpu().clone() if t.is_floating_point() \
        else t.detach().reshape(-1).cpu().clone()


def same_bits(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def clone_tree(x):
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tree(v) for v in x)
    return copy.deepcopy(x)


def same_tree(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and same_bits(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b
