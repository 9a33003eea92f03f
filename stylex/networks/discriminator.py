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

Optionally (``feature_channels``), D also reads the frozen classifier's intermediate features of
the same image through small heads of its own (:class:`FeatureHeads`), and its logit is the sum
of the two. The idea is that of projected GANs (Sauer et al., NeurIPS 2021), a discriminator on
the features of a fixed, trained network. Here the fixed network is the classifier being
explained, so D compares generated and real images, class by class, in exactly the features the
classifier uses: a render that gets its class from features real images of that class do not
have (a global darkening instead of haemorrhages) can be told apart. What it did in measured
runs is in the README ("How it fits together").
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


def _projection(h: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
    """``<h, cmap> / sqrt(dim)`` per sample, or ``h`` itself when unconditional (cmap None)."""
    if cmap is None:
        return h
    return (h * cmap).sum(dim=1, keepdim=True) / math.sqrt(h.shape[1])


class ClassEmbedding(nn.Module):
    """``c [B, c_dim] -> cmap [B, dim]``: the projection's class map."""

    def __init__(self, c_dim: int, dim: int) -> None:
        super().__init__()
        self.embed = EqualizedLinear(c_dim, dim)
        self.cmap = EqualizedLinear(dim, dim, activation="lrelu")

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        # Normalising the embedding keeps the projection's scale independent of how peaked c is.
        return self.cmap(normalize_2nd_moment(self.embed(c)))


class FeatureHeads(nn.Module):
    """Discriminator heads on a fixed network's feature maps: ``([f_1, ..., f_S], c) -> [B, 1]``.

    Each map ``f_s [B, C_s, H_s, W_s]`` goes through a 1x1 conv to ``width`` channels, a 3x3 conv
    and a 1x1 conv to ``cmap_dim`` (lrelu between); the result is averaged over positions (each
    position scores its own receptive field, as a patch discriminator) and projected onto the
    class map. The scales' logits are summed and divided by sqrt(S), so that adding scales does
    not change the logit's spread at initialisation.
    """

    def __init__(
        self,
        channels: Sequence[int],  # C_s of each feature map, in the order they are given
        c_dim: int,
        width: int = 64,
        cmap_dim: int = 64,
    ) -> None:
        super().__init__()
        if not channels or any(int(ch) < 1 for ch in channels):
            raise ValueError(f"feature heads need one positive channel count per feature map, got {list(channels)}")
        self.channels = [int(ch) for ch in channels]
        self.c_dim = c_dim
        out = cmap_dim if c_dim > 0 else 1
        self.heads = nn.ModuleList(
            nn.Sequential(
                EqualizedConv2d(ch, width, 1, activation="lrelu"),
                EqualizedConv2d(width, width, 3, activation="lrelu"),
                EqualizedConv2d(width, out, 1),
            )
            for ch in self.channels
        )
        self.embedding = ClassEmbedding(c_dim, cmap_dim) if c_dim > 0 else None

    def forward(
        self,
        features: Sequence[torch.Tensor],  # [B, C_s, H_s, W_s] per scale
        c: torch.Tensor | None,  # [B, c_dim]
    ) -> torch.Tensor:  # [B, 1]
        if len(features) != len(self.heads) or any(f.shape[1] != ch for f, ch in zip(features, self.channels)):
            got = [int(f.shape[1]) for f in features]
            raise ValueError(f"feature heads expect maps with channels {self.channels}, got {got}")
        cmap = self.embedding(c.to(features[0].dtype)) if self.embedding is not None else None
        total = sum(_projection(head(f).mean(dim=(2, 3)), cmap) for head, f in zip(self.heads, features))
        return total / math.sqrt(len(self.heads))


class Discriminator(nn.Module):
    """``D(img [B, img_channels, R, R], c [B, c_dim]) -> logits [B, 1]`` (no sigmoid).

    With ``feature_channels``, ``D(img, c, features)`` also takes the classifier's feature maps of
    ``img`` and adds the :class:`FeatureHeads` logit to the image logit.
    """

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
        feature_channels: Sequence[int] | None = None,  # channels of the classifier's maps; None = no feature heads
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
        self.feature_heads = FeatureHeads(feature_channels, c_dim) if feature_channels else None

    def forward(
        self,
        img: torch.Tensor,  # [batch, img_channels, R, R], about [-1, 1]
        c: torch.Tensor | None,  # [batch, c_dim] class probabilities; None when c_dim == 0
        features: Sequence[torch.Tensor] | None = None,  # the classifier's maps of img (with feature heads)
    ) -> torch.Tensor:  # [batch, 1] logits
        if (features is None) != (self.feature_heads is None):
            raise ValueError("this discriminator " + ("reads the classifier's features of each image: pass features="
                                                      if features is None else "has no feature heads: features= "
                                                      "needs a discriminator built with feature_channels"))
        x = self.mbstd(self.trunk(img))
        x = self.conv(x)
        h = self.out(self.fc(x.flatten(1)))
        if self.c_dim == 0:
            if c is not None and c.numel() > 0:
                raise ValueError(f"this discriminator is unconditional (c_dim=0) but got c of shape {tuple(c.shape)}")
            logits = h
        else:
            if c is None or c.shape != (img.shape[0], self.c_dim):
                got = None if c is None else tuple(c.shape)
                raise ValueError(f"c must have shape [{img.shape[0]}, {self.c_dim}] (class probabilities), got {got}")
            # Normalising the embedding keeps the projection's scale independent of how peaked c is.
            cmap = self.cmap(normalize_2nd_moment(self.embed(c.to(h.dtype))))
            logits = _projection(h, cmap)
        if self.feature_heads is not None:
            logits = logits + self.feature_heads(features, c)
        return logits
