"""The residual StyleGAN2 discriminator with projection conditioning on the class vector.

Layout::

    fromrgb: 1x1 conv, lrelu                          [B, C_R, R, R]
    b{r} for r = R, R/2, ..., 8:                      [B, C_r, r, r] -> [B, C_{r/2}, r/2, r/2]
        x = (skip(x) + conv1(conv0(x))) / sqrt(2)
        conv0: 3x3, lrelu; conv1: 3x3 down=2, lrelu; skip: 1x1 down=2, no bias, linear
    epilogue at 4x4: minibatch std, 3x3 conv, fc -> C_4, out -> cmap_dim (or 1)

Projection conditioning: ``logit = <h, cmap(c)> / sqrt(cmap_dim)`` where ``h`` is the output
head's ``cmap_dim`` features and ``cmap`` embeds the class vector ``c``. With ``c_dim = 0`` the
head has one output, the unconditional logit.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from stylex.networks.layers import DEFAULT_RESAMPLE_FILTER, EqualizedConv2d, EqualizedLinear, normalize_2nd_moment
from stylex.networks.synthesis import block_resolutions, channels_at


class DiscriminatorBlock(nn.Module):
    """Residual block ``[B, C_in, r, r] -> [B, C_out, r/2, r/2]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        conv_clamp: float | None,
        resample_filter: Sequence[float],
    ) -> None:
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = EqualizedConv2d(
            in_channels,
            out_channels,
            3,
            activation="lrelu",
            down=2,
            conv_clamp=conv_clamp,
            resample_filter=resample_filter,
        )
        self.skip = EqualizedConv2d(in_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter)

    def forward(
        self,
        x: torch.Tensor,  # [batch, in_channels, r, r]
    ) -> torch.Tensor:  # [batch, out_channels, r / 2, r / 2]
        # The 1/sqrt(2) keeps the variance of the sum of two unit-variance branches at one.
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class ResidualTrunk(nn.Module):
    """fromRGB and the residual blocks: ``[B, img_channels, R, R] -> [B, C_4, 4, 4]``.

    Shared by the discriminator and the encoder.
    """

    def __init__(
        self,
        resolution: int,
        channel_base: int = 16384,
        channel_max: int = 512,
        img_channels: int = 3,
        conv_clamp: float | None = None,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.img_channels = img_channels
        resolutions = block_resolutions(resolution)[::-1][:-1]  # R, R/2, ..., 8
        self.fromrgb = EqualizedConv2d(
            img_channels,
            channels_at(resolution, channel_base, channel_max),
            1,
            activation="lrelu",
            conv_clamp=conv_clamp,
        )
        self.blocks = nn.ModuleDict(
            {
                f"b{r}": DiscriminatorBlock(
                    channels_at(r, channel_base, channel_max),
                    channels_at(r // 2, channel_base, channel_max),
                    conv_clamp,
                    resample_filter,
                )
                for r in resolutions
            }
        )
        self.out_channels = channels_at(4, channel_base, channel_max)

    def forward(
        self,
        img: torch.Tensor,  # [batch, img_channels, resolution, resolution]
    ) -> torch.Tensor:  # [batch, C_4, 4, 4]
        expected = (self.img_channels, self.resolution, self.resolution)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape [batch, {', '.join(map(str, expected))}], got {tuple(img.shape)}"
            )
        x = self.fromrgb(img)
        for block in self.blocks.values():
            x = block(x)
        return x


class MinibatchStd(nn.Module):
    """Appends ``num_features`` channels holding the standard deviation across a group.

    Grouping rule: the batch is split into consecutive groups of ``G = min(group_size, batch)``
    samples, so the batch size must be divisible by G (always true when batch < group_size).
    For each group and each of ``num_features`` channel slices, the per-pixel std over the group
    members is averaged over channels and pixels; every member of the group gets that value as
    a constant extra feature map. It lets D see the diversity of a batch (against mode collapse),
    so D's output for one sample depends on the other members of its group.
    """

    def __init__(
        self,
        group_size: int = 4,
        num_features: int = 1,
    ) -> None:
        super().__init__()
        if group_size < 1 or num_features < 1:
            raise ValueError(
                f"minibatch std needs group_size >= 1 and num_features >= 1, got {group_size}, {num_features}"
            )
        self.group_size = group_size
        self.num_features = num_features

    def forward(
        self,
        x: torch.Tensor,  # [batch, channels, h, w]
    ) -> torch.Tensor:  # [batch, channels + num_features, h, w]
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        f = self.num_features
        if n % g != 0:
            raise ValueError(
                f"minibatch std: the batch size {n} is not divisible by the group size {g}; "
                f"use a batch size that is a multiple of mbstd_group_size={self.group_size} "
                "(or set mbstd_group_size to a divisor of it)"
            )
        if c % f != 0:
            raise ValueError(f"minibatch std: {c} channels cannot be split into num_features={f} slices")
        y = x.reshape(n // g, g, f, c // f, h, w)
        y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1)  # [groups, f, c/f, h, w] variance
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [groups, f]
        y = y.repeat_interleave(g, dim=0)[:, :, None, None].expand(n, f, h, w)
        return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """``D(img [B, img_channels, R, R], c [B, c_dim]) -> logits [B, 1]`` (no sigmoid)."""

    def __init__(
        self,
        resolution: int,
        c_dim: int,  # number of classes; 0 = unconditional
        channel_base: int = 16384,
        channel_max: int = 512,
        mbstd_group_size: int = 4,
        mbstd_num_features: int = 1,
        cmap_dim: int | None = None,  # projection features; None = channels at 4x4
        conv_clamp: float | None = None,
        img_channels: int = 3,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
    ) -> None:
        super().__init__()
        if c_dim < 0:
            raise ValueError(f"c_dim must be >= 0 (the number of classes), got {c_dim}")
        self.resolution = resolution
        self.c_dim = c_dim
        self.img_channels = img_channels
        self.trunk = ResidualTrunk(resolution, channel_base, channel_max, img_channels, conv_clamp, resample_filter)
        c4 = self.trunk.out_channels
        self.cmap_dim = (cmap_dim or c4) if c_dim > 0 else 0
        self.mbstd = MinibatchStd(mbstd_group_size, mbstd_num_features)
        self.conv = EqualizedConv2d(c4 + mbstd_num_features, c4, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = EqualizedLinear(c4 * 16, c4, activation="lrelu")
        self.out = EqualizedLinear(c4, self.cmap_dim if c_dim > 0 else 1)
        if c_dim > 0:
            self.embed = EqualizedLinear(c_dim, self.cmap_dim)
            self.cmap = EqualizedLinear(self.cmap_dim, self.cmap_dim, activation="lrelu")

    def forward(
        self,
        img: torch.Tensor,  # [batch, img_channels, R, R], about [-1, 1]
        c: torch.Tensor | None,  # [batch, c_dim] class probabilities; None when c_dim == 0
    ) -> torch.Tensor:  # [batch, 1] logits
        x = self.mbstd(self.trunk(img))
        x = self.conv(x)
        h = self.out(self.fc(x.flatten(1)))
        if self.c_dim == 0:
            if c is not None and c.numel() > 0:
                raise ValueError(f"this discriminator is unconditional (c_dim=0) but got c of shape {tuple(c.shape)}")
            return h
        if c is None or c.shape != (img.shape[0], self.c_dim):
            got = None if c is None else tuple(c.shape)
            raise ValueError(f"c must have shape [{img.shape[0]}, {self.c_dim}] (class probabilities), got {got}")
        # Normalising the embedding keeps the projection's scale independent of how peaked c is.
        cmap = self.cmap(normalize_2nd_moment(self.embed(c.to(h.dtype))))
        return (h * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
