"""Choice between the reference and the fused CUDA implementation of an op, and the extension
that holds the fused ones.

:func:`use_cuda` decides per call: CPU tensors and ``impl="ref"`` take the reference; otherwise
the fused path when the extension is available. ``impl=None`` means the process-wide default
(:func:`set_default_impl`, else ``$STYLEX_OPS_IMPL``, else ``"auto"``). ``auto`` falls back to
the reference with one warning per process when the extension cannot be built; ``cuda`` raises
the cause instead.

The one compiled extension of this project is declared here (:data:`SPEC`, built lazily by
:data:`EXTENSION`, see :mod:`stylex.ops._build`) with the ops it provides (:data:`OPS`) and
the dtypes its kernels take (:data:`KERNEL_DTYPES`). The op modules reach the compiled module
through :func:`extension` and never through each other; nothing is built at import.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from stylex.ops._build import ExtensionSpec, JitExtension

IMPLS = ("auto", "cuda", "ref")
OPS = ("upfirdn2d", "bias_act")  # the ops with a fused kernel in the extension
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # others take the reference path
SPEC = ExtensionSpec(
    prefix="stylex_fused_ops",
    sources=("stylex_ops.cpp", "bias_act.cu", "upfirdn2d.cu"),
    headers=("stylex_ops.h", "dtype_io.cuh", "host_kernels.h"),
    title="the fused CUDA ops",
)
EXTENSION = JitExtension(SPEC)
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


def extension() -> ModuleType:
    """The compiled module, built on first use; raises :class:`~stylex.ops._build.BuildError`."""
    return EXTENSION.load()


def load_host_kernels() -> ModuleType:
    """The same kernels compiled for CPU tensors (tests; see :func:`stylex.ops._build.host_config`)."""
    return EXTENSION.load_host()


def available(op: str, strict: bool = False) -> bool:
    """Whether the fused kernel for ``op`` can run; builds the extension on first use.

    ``strict`` (``impl="cuda"``) raises :class:`~stylex.ops._build.BuildError` with the cause;
    otherwise a failure warns once per process and the caller takes the reference path.
    """
    if op not in OPS:
        raise ValueError(f"no fused CUDA kernel for {op!r}; the fused ops are {', '.join(OPS)}")
    return EXTENSION.available(strict, f"the fused CUDA kernel for {op}")


_warned_cpu = False


def _warn_cpu_once(op: str) -> None:
    global _warned_cpu
    if not _warned_cpu:
        _warned_cpu = True
        warnings.warn(
            f"ops impl 'cuda' was asked for (ops_impl=cuda or STYLEX_OPS_IMPL=cuda), but {op} got a CPU tensor: "
            "the fused kernels run only on the GPU, so CPU tensors take the reference implementation. "
            "Train on a GPU (trainer=gpu), or use ops_impl=auto to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )


def use_cuda(x: torch.Tensor, impl: str | None, op: str) -> bool:
    """Whether a call on ``x`` takes the fused CUDA path.

    CPU tensors always take the reference path (under ``cuda`` too, with one warning per
    process: the kernels only run on the GPU). ``auto`` falls back to the reference (with one
    warning per process) when the extension cannot be built; ``cuda`` raises instead.
    """
    impl = _check(impl, "impl") if impl is not None else get_default_impl()
    if impl == "ref":
        return False
    if not x.is_cuda:
        if impl == "cuda":
            _warn_cpu_once(op)
        return False
    return available(op, strict=(impl == "cuda"))
