"""Bias, activation, gain and clamp in one call.

``bias_act`` computes ``y = clamp(act(x + b) * gain, -clamp, clamp)`` where ``b`` is broadcast
along dimension ``dim`` of ``x``. Each activation has a default gain that keeps the second
moment of unit-Gaussian inputs near one (sqrt(2) for the rectifiers and swish).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from stylex.ops.dispatch import use_cuda


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
    if use_cuda(x, impl, "bias_act"):
        from stylex.ops import cuda_build

        return cuda_build.bias_act(x, b, dim, spec.code, alpha, gain, clamp)
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
