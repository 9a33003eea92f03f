"""Upsample, FIR-filter, downsample: the resampling primitive of StyleGAN2.

``upfirdn2d`` computes, per channel and in this order:

1. zero insertion: ``u[i * up] = x[i]``, zeros elsewhere (the output is ``up`` times larger,
   the trailing zeros included);
2. padding by ``(pad_x0, pad_x1, pad_y0, pad_y1)`` zeros (a negative value crops);
3. a true 2-D convolution with the filter ``f`` (``flip_filter=True`` gives correlation
   instead), keeping only the positions where the filter fits inside the padded signal;
4. decimation: keep every ``down``-th sample, starting at the first;
5. multiplication by ``gain`` (applied to the filter, so separable filters get
   ``gain ** 0.5`` per axis).

Two implementations with one contract, side by side: :func:`upfirdn2d_ref`, written with
differentiable PyTorch operations (its first- and second-order gradients come from autograd),
and the fused CUDA kernel of ``custom_ops/`` behind the autograd Function :class:`_Upfirdn2d`
(:func:`_upfirdn2d_cuda`). :func:`upfirdn2d` checks the arguments and lets
:func:`stylex.ops.dispatch.use_cuda` pick one. The fused path's gradient is itself an
``upfirdn2d``, with swapped factors and the flipped filter (:func:`adjoint_padding`), so
gradients of any order run on the kernel.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from stylex.ops import dispatch

IntPair = int | Sequence[int]


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        out = (v, v)
    else:
        out = tuple(int(a) for a in v)
    if len(out) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return out  # type: ignore[return-value]


def _pad4(pad: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    pad = [int(p) for p in pad]
    if len(pad) == 2:
        return (pad[0], pad[0], pad[1], pad[1])
    if len(pad) == 4:
        return tuple(pad)  # type: ignore[return-value]
    raise ValueError(f"padding must be an int, (px, py) or (px0, px1, py0, py1), got {pad!r}")


def setup_filter(
    f: Sequence[float] | torch.Tensor | None,
    normalize: bool = True,
    separable: bool | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A float32 FIR filter for :func:`upfirdn2d`.

    A 1-D filter of taps ``[k]`` stands for the separable 2-D filter ``outer(f, f)``.
    ``normalize`` scales it so that the 2-D filter sums to one (unit DC gain).
    ``separable=False`` expands a 1-D filter to its explicit 2-D form ``[k, k]``.
    """
    f = torch.as_tensor([1.0] if f is None else f, dtype=torch.float32, device=device)
    if f.ndim == 0:
        f = f[None]
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f"a filter must be a non-empty 1-D or 2-D tensor, got shape {tuple(f.shape)}")
    if normalize:
        total = f.sum() ** 2 if f.ndim == 1 else f.sum()
        f = f / total.sqrt() if f.ndim == 1 else f / total
    if separable is False and f.ndim == 1:
        f = torch.outer(f, f)
    return f


def filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """(width, height) of a filter; 1-D filters are square."""
    if f is None:
        return 1, 1
    if f.ndim == 1:
        return f.shape[0], f.shape[0]
    return f.shape[1], f.shape[0]


def upfirdn2d(
    x: torch.Tensor,  # [batch, channels, height, width]
    f: torch.Tensor | None,  # [taps] (separable) or [taps_y, taps_x]; None = identity
    up: IntPair = 1,  # upsampling factor, int or (x, y)
    down: IntPair = 1,  # downsampling factor, int or (x, y)
    padding: int | Sequence[int] = 0,  # int, (px, py) or (px0, px1, py0, py1)
    flip_filter: bool = False,  # True: correlate instead of convolve
    gain: float = 1.0,  # overall scale of the output
    impl: str | None = None,  # "auto" | "cuda" | "ref"; None = process default
) -> torch.Tensor:
    """Upsample, pad, filter and downsample ``x``; see the module docstring for the maths."""
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects x of shape [N, C, H, W], got {tuple(x.shape)}")
    upx, upy = _pair(up, "up")
    downx, downy = _pair(down, "down")
    if min(upx, upy, downx, downy) < 1:
        raise ValueError(f"up and down must be >= 1, got up={up!r}, down={down!r}")
    px0, px1, py0, py1 = _pad4(padding)
    if f is None:
        f = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    if f.ndim not in (1, 2):
        raise ValueError(f"the filter must be 1-D or 2-D, got shape {tuple(f.shape)}")
    fw, fh = filter_size(f)
    out_w = (x.shape[3] * upx + px0 + px1 - fw) // downx + 1
    out_h = (x.shape[2] * upy + py0 + py1 - fh) // downy + 1
    if out_w < 1 or out_h < 1:
        raise ValueError(
            f"upfirdn2d output would be empty: input {tuple(x.shape[2:])}, up=({upx},{upy}), "
            f"down=({downx},{downy}), padding={(px0, px1, py0, py1)}, filter {fh}x{fw}"
        )
    if dispatch.use_cuda(x, impl, "upfirdn2d"):
        return _upfirdn2d_cuda(x, f, (upx, upy), (downx, downy), (px0, px1, py0, py1), flip_filter, gain)
    return upfirdn2d_ref(x, f, (upx, upy), (downx, downy), (px0, px1, py0, py1), flip_filter, gain)


def upfirdn2d_ref(
    x: torch.Tensor,
    f: torch.Tensor,
    up: tuple[int, int],
    down: tuple[int, int],
    pad: tuple[int, int, int, int],
    flip_filter: bool,
    gain: float,
) -> torch.Tensor:
    """Reference implementation with plain PyTorch ops (any device, any float dtype)."""
    n, c, h, w = x.shape
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = pad

    # 1. zero insertion: place each sample at a multiple of `up`.
    if upx > 1 or upy > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
        x = x.reshape(n, c, h * upy, w * upx)

    # 2. pad (positive) and crop (negative) separately: F.pad accepts both, but cropping first
    #    keeps the intermediate small.
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]

    # 3. convolution. conv2d correlates, so a true convolution flips the filter first.
    f = f.to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 1:
        scale = gain ** 0.5 if gain != 1 else 1.0
        fx = (f * scale).view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        fy = (f * scale).view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        x = F.conv2d(x, fx, groups=c)
        x = F.conv2d(x, fy, groups=c)
    else:
        f2 = (f * gain).view(1, 1, *f.shape).repeat(c, 1, 1, 1)
        x = F.conv2d(x, f2, groups=c)

    # 4. decimation.
    if downx > 1 or downy > 1:
        x = x[:, :, ::downy, ::downx]
    return x


# ---------------------------------------------------------------------------------------------
# The fused CUDA path
# ---------------------------------------------------------------------------------------------

_force_generic = False


@contextlib.contextmanager
def force_generic_upfirdn2d() -> Iterator[None]:
    """Route the fused path through the generic kernel even where a specialised one applies (tests)."""
    global _force_generic
    saved, _force_generic = _force_generic, True
    try:
        yield
    finally:
        _force_generic = saved


def upfirdn2d_path(
    f: torch.Tensor,  # [taps] or [taps_y, taps_x]
    up: tuple[int, int],  # (x, y)
    down: tuple[int, int],  # (x, y)
) -> str:
    """Name of the kernel a configuration takes: ``generic``, ``k4``, ``k4_up2`` or ``k4_down2``."""
    fw, fh = filter_size(f)
    if _force_generic:
        return "generic"
    return dispatch.extension().upfirdn2d_path(fw, fh, up[0], up[1], down[0], down[1])


def adjoint_padding(
    in_size: tuple[int, int],  # (height, width) of upfirdn2d's input
    out_size: tuple[int, int],  # (height, width) of its output
    f: torch.Tensor,
    up: tuple[int, int],
    down: tuple[int, int],
    pad: tuple[int, int, int, int],  # (x0, x1, y0, y1)
) -> tuple[int, int, int, int]:
    """Padding that makes ``upfirdn2d(dy, f, up=down, down=up, flip_filter=not flip)`` the adjoint.

    The adjoint of the valid convolution is a full correlation (``taps - 1`` of padding, less
    the forward's leading padding); the trailing side is cut so that the result, decimated by
    ``up``, is exactly the input's size.
    """
    fw, fh = filter_size(f)
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    upx, upy = up
    downx, downy = down
    px0, _, py0, _ = pad
    return (
        fw - px0 - 1,
        in_w * upx - out_w * downx + px0 - upx + 1,
        fh - py0 - 1,
        in_h * upy - out_h * downy + py0 - upy + 1,
    )


class _Upfirdn2d(torch.autograd.Function):
    """The fused kernel; its gradient is the fused kernel again (see :func:`adjoint_padding`)."""

    @staticmethod
    def forward(ctx, x, f, up, down, pad, flip_filter, gain):  # noqa: D102
        y = dispatch.extension().upfirdn2d(x, f, *up, *down, *pad, flip_filter, gain, _force_generic)
        ctx.save_for_backward(f)
        ctx.config = (up, down, pad, flip_filter, gain, tuple(x.shape[2:]), tuple(y.shape[2:]))
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        (f,) = ctx.saved_tensors
        up, down, pad, flip_filter, gain, in_size, out_size = ctx.config
        dx = None
        if ctx.needs_input_grad[0]:
            gpad = adjoint_padding(in_size, out_size, f, up, down, pad)
            dx = _Upfirdn2d.apply(dy, f, down, up, gpad, not flip_filter, gain)
        return dx, None, None, None, None, None, None


def _upfirdn2d_cuda(
    x: torch.Tensor,  # [batch, channels, height, width], CUDA
    f: torch.Tensor,  # [taps] or [taps_y, taps_x]
    up: tuple[int, int],  # (x, y)
    down: tuple[int, int],  # (x, y)
    pad: tuple[int, int, int, int],  # (x0, x1, y0, y1); negative crops
    flip_filter: bool,
    gain: float,
) -> torch.Tensor:
    """The fused path of :func:`upfirdn2d` (arguments checked); differentiable to any order in ``x``.

    Float64 inputs (gradcheck) and filters that need a gradient take the reference path: the
    kernels cover float32, float16 and bfloat16 and differentiate with respect to ``x`` only.
    """
    if x.dtype not in dispatch.KERNEL_DTYPES or (f.requires_grad and torch.is_grad_enabled()):
        return upfirdn2d_ref(x, f, up, down, pad, flip_filter, gain)
    return _Upfirdn2d.apply(x, f, tuple(up), tuple(down), tuple(pad), bool(flip_filter), float(gain))


# ---------------------------------------------------------------------------------------------
# Resampling built on upfirdn2d
# ---------------------------------------------------------------------------------------------


def _resample_padding(f: torch.Tensor | None, up: int, down: int, padding: int) -> tuple[int, int, int, int]:
    fw, fh = filter_size(f)
    if up > 1:
        return (
            padding + (fw + up - 1) // 2,
            padding + (fw - up) // 2,
            padding + (fh + up - 1) // 2,
            padding + (fh - up) // 2,
        )
    return (
        padding + (fw - down + 1) // 2,
        padding + (fw - down) // 2,
        padding + (fh - down + 1) // 2,
        padding + (fh - down) // 2,
    )


def upsample2d(
    x: torch.Tensor, f: torch.Tensor | None, up: int = 2, padding: int = 0, gain: float = 1.0, impl: str | None = None
) -> torch.Tensor:
    """Upsample by ``up`` with the (unit-DC) filter ``f``; the output is exactly ``up`` times larger
    (plus ``2 * padding``). The gain ``up ** 2`` makes up for the inserted zeros."""
    return upfirdn2d(x, f, up=up, padding=_resample_padding(f, up, 1, padding), gain=gain * up * up, impl=impl)


def downsample2d(
    x: torch.Tensor, f: torch.Tensor | None, down: int = 2, padding: int = 0, gain: float = 1.0, impl: str | None = None
) -> torch.Tensor:
    """Low-pass with ``f`` and keep every ``down``-th sample; the output is ``down`` times smaller."""
    return upfirdn2d(x, f, down=down, padding=_resample_padding(f, 1, down, padding), gain=gain, impl=impl)


def filter2d(
    x: torch.Tensor, f: torch.Tensor | None, padding: int = 0, gain: float = 1.0, impl: str | None = None
) -> torch.Tensor:
    """Filter with ``f`` keeping the size (``padding=0``) or growing it by ``2 * padding``."""
    fw, fh = filter_size(f)
    pad = (padding + fw // 2, padding + (fw - 1) // 2, padding + fh // 2, padding + (fh - 1) // 2)
    return upfirdn2d(x, f, padding=pad, gain=gain, impl=impl)
