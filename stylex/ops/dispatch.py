"""Choice between the reference and the fused CUDA implementation of an op."""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "cuda", "ref")
_default_impl: str | None = None


def _check(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{source}={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


def set_default_impl(impl: str) -> None:
    """Set the implementation used when an op is called with ``impl=None``."""
    global _default_impl
    _default_impl = _check(impl, "ops.impl")


def get_default_impl() -> str:
    if _default_impl is not None:
        return _default_impl
    return _check(os.environ.get("STYLEX_OPS_IMPL", "auto"), "STYLEX_OPS_IMPL")


def use_cuda(x: torch.Tensor, impl: str | None, op: str) -> bool:
    """Whether a call on ``x`` takes the fused CUDA path.

    CPU tensors always take the reference path. ``auto`` falls back to the reference (with one
    warning per process) when the extension cannot be built; ``cuda`` raises instead.
    """
    impl = _check(impl, "impl") if impl is not None else get_default_impl()
    if impl == "ref" or not x.is_cuda:
        return False
    from stylex.ops import cuda_build

    return cuda_build.available(op, strict=(impl == "cuda"))
