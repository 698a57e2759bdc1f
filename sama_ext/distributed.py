"""Distributed SAMA (DDP communication hooks): not implemented yet — see the distributed issue.

`meta_step(..., base_module=..., meta_module=...)` refuses DDP modules with a clear error until
then, rather than running a silently unsynchronised meta step.
"""
from __future__ import annotations

__all__ = ["register_comm_hook", "check_modules"]


def register_comm_hook(ddp_meta_module, compression=None):
    raise NotImplementedError("sama_ext.distributed.register_comm_hook is not implemented yet")


def check_modules(base_module, meta_module) -> None:
    raise NotImplementedError(
        "sama_ext.meta_step: distributed meta steps (base_module=/meta_module=) are not implemented yet; "
        "run meta_step on a single process for now")
