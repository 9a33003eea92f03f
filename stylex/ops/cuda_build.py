"""Lazy build of the fused CUDA kernels in ``custom_ops/``.

Placeholder until the fused kernels land: reports them unavailable, so every call takes the
reference path (``impl="cuda"`` raises).
"""

from __future__ import annotations


def available(op: str, strict: bool = False) -> bool:
    if strict:
        raise RuntimeError(f"the fused CUDA kernel for {op} is not built into this version")
    return False
