"""sama_ext: scalable meta learning (SAMA, Choe et al., NeurIPS 2023) as a PyTorch extension.

Fused C++/CUDA kernels (JIT-built on first use) for the element-wise work of a SAMA meta step,
and a thin Python layer. See README.md.
"""
from __future__ import annotations

from ._backend import backend
from ._build import BuildError
from .adaptation import SAFEGUARDS, AdaptCall, adapt, register_diagonal
from .frozen_inputs import frozen
from .sama_step import METHODS, MetaStepInfo, meta_step
from .ops import perturb_
from .per_example import PerExampleWeights
from . import distributed  # noqa: E402  (public namespace: sama_ext.distributed.register_comm_hook)

__all__ = ["meta_step", "MetaStepInfo", "METHODS", "frozen", "adapt", "perturb_", "backend", "register_diagonal",
           "AdaptCall", "SAFEGUARDS", "BuildError", "distributed", "PerExampleWeights"]
__version__ = "0.1.0"
