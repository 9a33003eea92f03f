"""Bias, activation, gain and clamp in one call.

``bias_act`` computes ``y = clamp(act(x + b) * gain, -clamp, clamp)`` where ``b`` is broadcast
along dimension ``dim`` of ``x``. Each activation has a default gain that keeps the second
moment of unit-Gaussian inputs near one (sqrt(2) for the rectifiers and swish).

Two implementations with one contract, side by side: :func:`bias_act_ref`, a composition of
differentiable torch functions, and the fused CUDA kernel of ``custom_ops/`` behind autograd
Functions (:func:`_bias_act_cuda`). :func:`bias_act` checks the arguments and lets
:func:`stylex.ops.dispatch.use_cuda` pick one. The kernel also computes the first and second
derivatives (R1 and path-length regularisation differentiate twice), so both run fused; a
third derivative falls back to autograd of the reference (:func:`_act_derivative_ref`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from stylex.ops import dispatch


@dataclass(frozen=True)
class Activation:
    fn: Callable[[torch.Tensor, float], torch.Tensor]  # (x, alpha) -> act(x)
    default_alpha: float
    default_gain: float
    code: int  # index shared with the CUDA kernel


def _lrelu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.leaky_relu(x, alpha)


ACTIVATIONS: dict[str, Activation] = {
    "linear": Activation(lambda x, a: x, 0.0, 1.0, 0),
    "relu": Activation(lambda x, a: F.relu(x), 0.0, math.sqrt(2), 1),
    "lrelu": Activation(_lrelu, 0.2, math.sqrt(2), 2),
    "tanh": Activation(lambda x, a: torch.tanh(x), 0.0, 1.0, 3),
    "sigmoid": Activation(lambda x, a: torch.sigmoid(x), 0.0, 1.0, 4),
    "elu": Activation(lambda x, a: F.elu(x), 0.0, 1.0, 5),
    "selu": Activation(lambda x, a: F.selu(x), 0.0, 1.0, 6),
    "softplus": Activation(lambda x, a: F.softplus(x), 0.0, 1.0, 7),
    "swish": Activation(lambda x, a: x * torch.sigmoid(x), 0.0, math.sqrt(2), 8),
}


def resolve(act: str, alpha: float | None, gain: float | None) -> tuple[Activation, float, float]:
    """The activation spec with its default alpha and gain filled in."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    spec = ACTIVATIONS[act]
    return spec, float(spec.default_alpha if alpha is None else alpha), float(spec.default_gain if gain is None else gain)


def bias_act(
    x: torch.Tensor,  # any shape
    b: torch.Tensor | None = None,  # [x.shape[dim]] or None
    dim: int = 1,  # the dimension of x that b runs along
    act: str = "linear",  # one of ACTIVATIONS
    alpha: float | None = None,  # slope of lrelu's negative part (default 0.2)
    gain: float | None = None,  # output scale; None = the activation's default
    clamp: float | None = None,  # clamp the output to [-clamp, clamp]; None = no clamp
    impl: str | None = None,  # "auto" | "cuda" | "ref"; None = process default
) -> torch.Tensor:
    """``clamp(act(x + b) * gain)``; see the module docstring."""
    spec, alpha, gain = resolve(act, alpha, gain)
    if b is not None:
        if b.ndim != 1 or not (-x.ndim <= dim < x.ndim) or b.shape[0] != x.shape[dim]:
            raise ValueError(
                f"bias of shape {tuple(b.shape)} does not fit dimension {dim} of x with shape {tuple(x.shape)}"
            )
    if clamp is not None and clamp < 0:
        raise ValueError(f"clamp must be >= 0 or None, got {clamp}")
    if dispatch.use_cuda(x, impl, "bias_act"):
        return _bias_act_cuda(x, b, dim, spec.code, alpha, gain, clamp)
    return bias_act_ref(x, b, dim, act, alpha, gain, clamp)


def bias_act_ref(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
) -> torch.Tensor:
    """Reference implementation, a composition of differentiable torch functions."""
    if b is not None:
        dim = dim % x.ndim
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.to(x.dtype).reshape(shape)
    x = ACTIVATIONS[act].fn(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


# ---------------------------------------------------------------------------------------------
# The fused CUDA path
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ActConfig:
    """The non-tensor arguments of the kernel, as it takes them."""

    dim: int  # in [0, x.ndim)
    code: int  # Activation.code
    alpha: float
    gain: float
    clamp: float  # < 0: none

    @property
    def curved(self) -> bool:
        """Whether act'' is nonzero somewhere (linear, relu and lrelu are piecewise linear)."""
        return self.code not in (0, 1, 2)


def _sum_except(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.ndim) if d != dim])


def _kernel(order: int, x, b, g1, g2, cfg: _ActConfig) -> torch.Tensor:
    """The kernel's ``order``-th derivative (0: the value), times the incoming gradients g1, g2."""
    return dispatch.extension().bias_act(x, b, g1, g2, order, cfg.dim, cfg.code, cfg.alpha, cfg.gain, cfg.clamp)


class _BiasAct(torch.autograd.Function):
    """y = clamp(act(x + b) * gain)."""

    @staticmethod
    def forward(ctx, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.save_for_backward(x, b)
        return _kernel(0, x, b, None, None, cfg)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, b = ctx.saved_tensors
        cfg = ctx.cfg
        dz = _BiasActGrad.apply(dy, x, b, cfg)
        dx = dz if ctx.needs_input_grad[0] else None
        db = _sum_except(dz, cfg.dim).to(b.dtype) if b is not None and ctx.needs_input_grad[1] else None
        return dx, db, None


class _BiasActGrad(torch.autograd.Function):
    """dL/dz = dy * gain * act'(x + b), zero where the clamp was active."""

    @staticmethod
    def forward(ctx, dy, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.save_for_backward(dy, x, b)
        return _kernel(1, x, b, dy, None, cfg)

    @staticmethod
    def backward(ctx, ddz):  # noqa: D102
        dy, x, b = ctx.saved_tensors
        cfg = ctx.cfg
        need_dy, need_x, need_b = ctx.needs_input_grad[:3]
        g_dy = _BiasActGrad.apply(ddz, x, b, cfg) if need_dy else None  # linear in dy
        g_x = g_b = None
        if (need_x or (need_b and b is not None)) and cfg.curved:
            d2 = _BiasActGrad2.apply(ddz, dy, x, b, cfg)
            g_x = d2 if need_x else None
            g_b = _sum_except(d2, cfg.dim).to(b.dtype) if need_b and b is not None else None
        return g_dy, g_x, g_b, None


def _act_derivative_ref(z: torch.Tensor, cfg: _ActConfig, order: int) -> torch.Tensor:
    """The ``order``-th derivative of the activation at ``z`` by autograd of the reference.

    Only the third derivative comes here (differentiating the fused second-order kernel), which
    no training step of this project takes; it keeps higher orders correct, not fast.
    """
    fn = next(spec.fn for spec in ACTIVATIONS.values() if spec.code == cfg.code)
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_()
        d = fn(zz, cfg.alpha)
        for _ in range(order):
            (d,) = torch.autograd.grad(d.sum(), zz, create_graph=True)
    return d


class _BiasActGrad2(torch.autograd.Function):
    """ddz * dy * gain * act''(x + b), zero where the clamp was active."""

    @staticmethod
    def forward(ctx, ddz, dy, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.save_for_backward(ddz, dy, x, b)
        return _kernel(2, x, b, dy, ddz, cfg)

    @staticmethod
    def backward(ctx, gout):  # noqa: D102
        ddz, dy, x, b = ctx.saved_tensors
        cfg = ctx.cfg
        need_ddz, need_dy, need_x, need_b = ctx.needs_input_grad[:4]
        g_ddz = _BiasActGrad2.apply(gout, dy, x, b, cfg) if need_ddz else None
        g_dy = _BiasActGrad2.apply(ddz, gout, x, b, cfg) if need_dy else None
        g_x = g_b = None
        if need_x or (need_b and b is not None):
            z = x
            if b is not None:
                shape = [1] * x.ndim
                shape[cfg.dim] = -1
                z = x + b.to(x.dtype).reshape(shape)
            value = _act_derivative_ref(z.detach(), cfg, 0).detach() * cfg.gain
            inside = (value.abs() <= cfg.clamp) if cfg.clamp >= 0 else torch.ones_like(value, dtype=torch.bool)
            g_x = gout * ddz * dy * cfg.gain * _act_derivative_ref(z, cfg, 3) * inside
            g_b = _sum_except(g_x, cfg.dim).to(b.dtype) if need_b and b is not None else None
            g_x = g_x if need_x else None
        return g_ddz, g_dy, g_x, g_b, None


class _LinearBiasAct(torch.autograd.Function):
    """(x + b) * gain, saving nothing for backward."""

    @staticmethod
    def forward(ctx, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.has_bias = b is not None
        ctx.bias_dtype = b.dtype if b is not None else None
        return _kernel(0, x, b, None, None, cfg)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        cfg = ctx.cfg
        dz = dy * cfg.gain
        db = _sum_except(dz, cfg.dim).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (dz if ctx.needs_input_grad[0] else None), db, None


def _bias_act_cuda(
    x: torch.Tensor,  # any shape, CUDA
    b: torch.Tensor | None,  # [x.shape[dim]] or None
    dim: int,  # the dimension of x that b runs along
    act_code: int,  # ACTIVATIONS[name].code
    alpha: float,
    gain: float,
    clamp: float | None,  # None: no clamp
) -> torch.Tensor:
    """The fused path of :func:`bias_act` (arguments checked); first and second derivatives are fused too.

    Float64 inputs take the reference path (the kernels cover float32, float16, bfloat16).
    """
    if x.dtype not in dispatch.KERNEL_DTYPES:
        name = next(n for n, spec in ACTIVATIONS.items() if spec.code == act_code)
        return bias_act_ref(x, b, dim, name, alpha, gain, clamp)
    cfg = _ActConfig(
        dim=dim % x.ndim if x.ndim else 0,
        code=int(act_code),
        alpha=float(alpha),
        gain=float(gain),
        clamp=-1.0 if clamp is None else float(clamp),
    )
    if cfg.code == 0 and cfg.clamp < 0:
        # Linear and unclamped: the gradient is dy * gain, which needs neither x nor a kernel.
        return _LinearBiasAct.apply(x, b, cfg)
    return _BiasAct.apply(x, b, cfg)
