"""Building blocks shared by the generator, the discriminator and the encoder.

Equalised learning rate
    Weights are stored as ``N(0, 1) / lr_mul`` and multiplied at run time by
    ``lr_mul / sqrt(fan_in)``; biases are multiplied by ``lr_mul``. The optimiser then sees
    parameters of unit scale in every layer, so Adam's per-parameter step is the same fraction of
    every weight, whatever the layer's fan-in.

Resampling convolutions
    ``down=2``: low-pass with the FIR filter, then a stride-2 convolution.
    ``up=2``: a stride-2 transposed convolution, then the FIR filter. Both keep the sampling grid
    centred: a pixel of the coarse grid sits between the 2x2 fine pixels it covers.

Modulation
    ``ModulatedConv2d`` scales the input channels of the weight per sample by a style ``s`` and,
    optionally, divides each output filter by its L2 norm (demodulation), so the output of a
    unit-variance input has unit variance again. The whole batch runs as one grouped convolution.

All resampling and all bias/activation steps go through :mod:`stylex.ops`, so they pick up the
fused kernels where those exist.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stylex.ops import bias_act, downsample2d, setup_filter, upfirdn2d

DEFAULT_RESAMPLE_FILTER = (1, 3, 3, 1)
NOISE_MODES = ("random", "const", "none")


def normalize_2nd_moment(
    x: torch.Tensor,  # [batch, features]
    dim: int = 1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``x`` scaled so that ``mean(x ** 2)`` along ``dim`` is one."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _check_resampling(up: int, down: int, kernel_size: int, where: str) -> None:
    if up not in (1, 2) or down not in (1, 2):
        raise ValueError(f"{where}: up and down must be 1 or 2, got up={up}, down={down}")
    if up > 1 and down > 1:
        raise ValueError(f"{where}: a layer either upsamples or downsamples, not both (up={up}, down={down})")
    if kernel_size % 2 != 1:
        raise ValueError(f"{where}: kernel_size must be odd so that padding keeps the grid centred, got {kernel_size}")


def conv2d_resample(
    x: torch.Tensor,  # [batch, in_channels, height, width]
    weight: torch.Tensor,  # [out_channels, in_channels // groups, k, k], k odd
    f: torch.Tensor,  # FIR filter from setup_filter (1-D separable or 2-D)
    up: int = 1,  # 1 or 2
    down: int = 1,  # 1 or 2
    groups: int = 1,
) -> torch.Tensor:
    """Convolution with "same" padding, optionally resampling by two.

    Returns ``[batch, out_channels, H * up // down, W * up // down]``. ``up=2`` is
    ``upsample2d(x, f)`` followed by ``conv2d(., weight, padding=k // 2)`` away from the borders
    (the transposed form does not zero the filter's spill-over at the border first).
    """
    k = weight.shape[-1]
    fw = f.shape[-1]
    if up == 1 and down == 1:
        return F.conv2d(x, weight, padding=k // 2, groups=groups)

    if down == 2:
        if k == 1:
            # A 1x1 conv commutes with the decimation, so filter-and-decimate first (4x less work).
            return F.conv2d(downsample2d(x, f), weight, groups=groups)
        # Blurred length H + p - fw + 1, then a stride-2 "valid" conv: p = fw + k - 3 gives H / 2
        # outputs, and splitting it evenly centres each output between its two fine pixels.
        p = fw + k - 3
        x = upfirdn2d(x, f, padding=((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
        return F.conv2d(x, weight, stride=2, groups=groups)

    # up == 2. conv_transpose2d computes zero insertion followed by a full *true* convolution with
    # its kernel, so the kernel is flipped to match conv2d's correlation. Its weight layout is
    # [in_channels, out_channels // groups, k, k].
    out_channels, in_per_group = weight.shape[:2]
    wt = weight.reshape(groups, out_channels // groups, in_per_group, k, k)
    wt = wt.transpose(1, 2).reshape(groups * in_per_group, out_channels // groups, k, k).flip([2, 3])
    x = F.conv_transpose2d(x, wt, stride=2, groups=groups)  # [B, O, 2H + k - 2, 2W + k - 2]
    # Filtering that with padding p = fw + 1 - k gives exactly 2H samples, centred at fine-grid
    # positions n / 2 - 1 / 4 of the input; gain 4 makes up for the inserted zeros.
    p = fw + 1 - k
    return upfirdn2d(x, f, padding=((p + 1) // 2, p // 2, (p + 1) // 2, p // 2), gain=4.0)


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalised learning rate; ``[B, in] -> [B, out]``.

    ``bias_init`` is the bias the layer starts with (stored as ``bias_init / lr_mul``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str = "linear",  # a name from stylex.ops.ACTIVATIONS
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"EqualizedLinear needs positive sizes, got in={in_features}, out={out_features}")
        if lr_mul <= 0:
            raise ValueError(f"lr_mul must be > 0, got {lr_mul}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.lr_mul = float(lr_mul)
        self.weight_gain = self.lr_mul / math.sqrt(in_features)
        self.bias_gain = self.lr_mul
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / self.lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / self.lr_mul)) if bias else None

    def effective_weight(self) -> torch.Tensor:
        """The weight actually applied, ``[out, in]``."""
        return self.weight * self.weight_gain

    def effective_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias * self.bias_gain

    def forward(
        self,
        x: torch.Tensor,  # [batch, in_features]
    ) -> torch.Tensor:  # [batch, out_features]
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"EqualizedLinear expects [batch, {self.in_features}], got {tuple(x.shape)}")
        x = F.linear(x, self.effective_weight().to(x.dtype))
        b = self.effective_bias()
        return bias_act(x, None if b is None else b.to(x.dtype), dim=1, act=self.activation)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.activation}, lr_mul={self.lr_mul}"


class EqualizedConv2d(nn.Module):
    """Convolution with equalised learning rate, "same" padding and optional 2x resampling.

    ``[B, in, H, W] -> [B, out, H * up // down, W * up // down]``; bias, activation (with its
    default gain) and the optional ``conv_clamp`` are applied through ``bias_act``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,  # clamp outputs to [-conv_clamp, conv_clamp]
    ) -> None:
        super().__init__()
        _check_resampling(up, down, kernel_size, "EqualizedConv2d")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("resample_filter", setup_filter(resample_filter))

    def effective_weight(self) -> torch.Tensor:
        """The weight actually applied, ``[out, in, k, k]``."""
        return self.weight * self.weight_gain

    def forward(
        self,
        x: torch.Tensor,  # [batch, in_channels, height, width]
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"EqualizedConv2d expects [batch, {self.in_channels}, H, W], got {tuple(x.shape)}")
        w = self.effective_weight().to(x.dtype)
        x = conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return bias_act(x, b, dim=1, act=self.activation, clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, "
            f"act={self.activation}, up={self.up}, down={self.down}"
        )


class ModulatedConv2d(nn.Module):
    """Per-sample modulated (and optionally demodulated) convolution, without bias.

    For sample b: ``w'[o, i, k] = s[b, i] * w[o, i, k]`` and, with ``demodulate``,
    ``w''[o, i, k] = w'[o, i, k] / sqrt(sum_{i, k} w'[o, i, k] ** 2 + 1e-8)``. ``w`` carries the
    equalised-learning-rate gain ``1 / sqrt(in * k * k)``, so styles near one give unit-scale
    outputs even without demodulation (the toRGB case).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        demodulate: bool = True,
        up: int = 1,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        grouped: bool = False,  # one grouped conv with per-sample weights (else scale activations)
    ) -> None:
        super().__init__()
        _check_resampling(up, 1, kernel_size, "ModulatedConv2d")
        self.grouped = grouped
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.up = up
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("resample_filter", setup_filter(resample_filter))

    def modulated_weight(
        self,
        s: torch.Tensor,  # [batch, in_channels] styles
    ) -> torch.Tensor:  # [batch, out_channels, in_channels, k, k]
        """The per-sample weight ``w'`` (or ``w''`` with demodulation)."""
        w = (self.weight * self.weight_gain).to(s.dtype)
        w = w.unsqueeze(0) * s[:, None, :, None, None]
        if self.demodulate:
            w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
        return w

    def forward(
        self,
        x: torch.Tensor,  # [batch, in_channels, height, width]
        s: torch.Tensor,  # [batch, in_channels]
    ) -> torch.Tensor:  # [batch, out_channels, height * up, width * up]
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ModulatedConv2d expects x of shape [batch, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if s.shape != (batch, self.in_channels):
            raise ValueError(
                f"ModulatedConv2d expects styles of shape [{batch}, {self.in_channels}], got {tuple(s.shape)}"
            )
        s = s.to(x.dtype)
        if not self.grouped:
            return self._forward_scaled(x, s)
        w = self.modulated_weight(s)
        k = self.kernel_size
        # Folding the batch into the channel axis turns B different convolutions into one
        # grouped convolution with B groups.
        y = conv2d_resample(
            x.reshape(1, batch * self.in_channels, *x.shape[2:]),
            w.reshape(batch * self.out_channels, self.in_channels, k, k),
            self.resample_filter,
            up=self.up,
            groups=batch,
        )
        return y.reshape(batch, self.out_channels, *y.shape[2:])

    def _forward_scaled(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The same maths with one shared weight: since the conv is linear,
        ``conv(x, s_i w_oi) = conv(s_i x_i, w_oi)``, and demodulation is a per-(sample, output
        channel) factor ``d[b, o] = rsqrt(sum_i s[b, i]^2 sum_k w[o, i, k]^2 + 1e-8)`` applied after
        the conv. One ordinary batched conv is much faster than B groups on CPUs and for large
        batches, at the cost of one more elementwise pass."""
        w = (self.weight * self.weight_gain).to(x.dtype)
        y = conv2d_resample(x * s[:, :, None, None], w, self.resample_filter, up=self.up)
        if self.demodulate:
            d = (s.square() @ w.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()  # [batch, out_channels]
            y = y * d[:, :, None, None]
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, "
            f"demodulate={self.demodulate}, up={self.up}, grouped={self.grouped}"
        )


class NoiseInjection(nn.Module):
    """Adds ``strength * n`` with per-pixel Gaussian noise ``n`` shared by all channels.

    ``strength`` is one number (StyleGAN2) or, with ``channels``, one per channel (StyleGAN1's
    per-feature scaling). Per channel, the generator can route a noise map into some channels
    only; the next layer's style then scales those channels, so a style coordinate (and through
    the affines, the class) can decide whether what the map marks is drawn.

    ``noise_mode``: ``"random"`` draws fresh noise per call; ``"const"`` uses a fixed noise map
    drawn at construction (stored in the state dict, so renders are reproducible across runs);
    ``"none"`` adds nothing. A ``noise`` map passed to :meth:`forward` replaces all three (an
    encoder's maps, see :class:`~stylex.networks.encoder.NoiseMapEncoder`). ``strength`` starts at
    ``init`` (StyleGAN2: zero, so noise only matters once learnt).
    """

    def __init__(
        self,
        resolution: int,  # height and width of the feature maps this layer sees
        init: float = 0.0,  # the starting strength
        channels: int | None = None,  # one strength per channel; None: one for all
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.strength = nn.Parameter(torch.full([] if channels is None else [int(channels)], float(init)))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))

    def forward(
        self,
        x: torch.Tensor,  # [batch, channels, resolution, resolution]
        noise_mode: str = "random",
        noise: torch.Tensor | None = None,  # [batch or 1, 1, resolution, resolution]: this map instead
    ) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        if x.shape[2:] != (self.resolution, self.resolution):
            raise ValueError(f"NoiseInjection built for {self.resolution}x{self.resolution} got {tuple(x.shape)}")
        strength = self.strength.to(x.dtype)
        if strength.ndim:
            strength = strength.view(1, -1, 1, 1)
        if noise is not None:
            return x + noise.to(x.dtype) * strength
        if noise_mode == "none":
            return x
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
        else:
            noise = self.noise_const.to(x.dtype)
        return x + noise * strength
