"""The StylEx encoder: an image to the generator's unconditioned latent ``w``.

StylEx trains it jointly with the generator so that ``G.generate(E(x), C(x))`` reconstructs x;
the classifier output ``C(x)`` is concatenated afterwards by the generator, so E only has to
capture what the class vector does not.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from stylex.networks.discriminator import ResidualTrunk
from stylex.networks.layers import DEFAULT_RESAMPLE_FILTER, EqualizedConv2d, EqualizedLinear


class Encoder(nn.Module):
    """``E(img [B, img_channels, R, R]) -> w [B, w_dim]``.

    The discriminator's residual trunk (without minibatch std, so each sample is encoded on its
    own), a 3x3 conv and a fully connected layer at 4x4, and a linear layer to ``w_dim``.
    """

    def __init__(
        self,
        resolution: int,
        w_dim: int,
        channel_base: int = 16384,
        channel_max: int = 512,
        conv_clamp: float | None = None,
        img_channels: int = 3,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.w_dim = w_dim
        self.trunk = ResidualTrunk(resolution, channel_base, channel_max, img_channels, conv_clamp, resample_filter)
        c4 = self.trunk.out_channels
        self.conv = EqualizedConv2d(c4, c4, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = EqualizedLinear(c4 * 16, c4, activation="lrelu")
        self.out = EqualizedLinear(c4, w_dim)

    def forward(
        self,
        img: torch.Tensor,  # [batch, img_channels, R, R], about [-1, 1]
    ) -> torch.Tensor:  # [batch, w_dim]
        x = self.conv(self.trunk(img))
        return self.out(self.fc(x.flatten(1)))
