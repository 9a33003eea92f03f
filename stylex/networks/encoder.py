"""The StylEx encoder: an image to the generator's unconditioned latent ``w``.

StylEx trains it jointly with the generator so that ``G.generate(E(x), C(x))`` reconstructs x;
the classifier output ``C(x)`` is concatenated afterwards by the generator, so E only has to
capture what the class vector does not.

Two latent spaces (``latent``):

- ``"w"``: one ``w`` for every style layer (``[B, w_dim]``), the paper's encoder;
- ``"w+"``: one ``w`` per style layer (``[B, num_ws, w_dim]``). The generator's ``condition``,
  ``styles`` and everything built on them (StyleSpace, AttFind, refinement, dissection) take
  either shape. A single ``w`` must explain coarse layout and fine detail at once; on small
  synthetic fundi an encoder fitted to a frozen generator reached pixel L1 0.077 with ``w``
  and 0.061 with ``w+`` in the same 600 steps, where the mean image scores 0.097 (the README has
  the figures).

With ``noise_maps`` the encoder also gives the generator's noise inputs maps computed from the
image (:class:`NoiseMapEncoder`, :meth:`Encoder.noise_maps`): the latent says what is drawn, the
maps where.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stylex.networks.discriminator import ResidualTrunk
from stylex.networks.layers import DEFAULT_RESAMPLE_FILTER, EqualizedConv2d, EqualizedLinear


LATENTS = ("w", "w+")


def complete_kwargs(
    encoder: Mapping[str, Any],  # Encoder kwargs as configured (``latent`` without ``num_ws``)
    num_ws: int,  # the generator's number of style layers (Generator.num_ws)
    noise_layers: Sequence[tuple[str, int]] | None = None,  # Generator.noise_layers (with noise_maps)
) -> dict[str, Any]:
    """The kwargs that build the encoder of a generator with ``num_ws`` style layers: an encoder
    into w+ gets one latent per layer, one with ``noise_maps`` the generator's noise layers."""
    out = dict(encoder)
    if out.get("latent", "w") == "w+":
        out["num_ws"] = int(num_ws)
    if out.get("noise_maps", False):
        if noise_layers is None:
            raise ValueError("an encoder with noise_maps needs the generator's noise layers (Generator.noise_layers)")
        out["noise_layers"] = [[str(name), int(r)] for name, r in noise_layers]
    else:
        out.pop("noise_layers", None)
    return out


class Encoder(nn.Module):
    """``E(img [B, img_channels, R, R]) -> w [B, w_dim]`` (``latent="w"``) or
    ``[B, num_ws, w_dim]`` (``latent="w+"``).

    The discriminator's residual trunk (without minibatch std, so each sample is encoded on its
    own), a 3x3 conv and a fully connected layer at 4x4, and a linear layer to the latent.
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
        latent: str = "w",  # "w" | "w+" (see the module docstring)
        num_ws: int | None = None,  # style layers of the generator; required with latent="w+"
        noise_maps: bool = False,  # also encode the generator's noise maps (NoiseMapEncoder, see noise_maps())
        noise_layers: Sequence[Sequence] | None = None,  # (name, resolution) pairs; required with noise_maps
    ) -> None:
        super().__init__()
        if latent not in LATENTS:
            raise ValueError(f"the encoder's latent must be 'w' or 'w+', got {latent!r}")
        if latent == "w+" and (num_ws is None or int(num_ws) < 1):
            raise ValueError(f"an encoder into w+ needs num_ws, the generator's number of style layers "
                             f"(Generator.num_ws), got {num_ws!r}")
        self.resolution = resolution
        self.w_dim = w_dim
        self.latent = latent
        self.num_ws = int(num_ws) if latent == "w+" else None
        self.trunk = ResidualTrunk(resolution, channel_base, channel_max, img_channels, conv_clamp, resample_filter)
        c4 = self.trunk.out_channels
        self.conv = EqualizedConv2d(c4, c4, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = EqualizedLinear(c4 * 16, c4, activation="lrelu")
        self.out = EqualizedLinear(c4, w_dim * (self.num_ws or 1))
        if noise_maps and not noise_layers:
            raise ValueError("an encoder with noise_maps needs noise_layers, the generator's (name, resolution) "
                             "pairs (Generator.noise_layers)")
        self.noise_encoder = (NoiseMapEncoder([(str(n), int(r)) for n, r in noise_layers], img_channels)
                              if noise_maps else None)

    def forward(
        self,
        img: torch.Tensor,  # [batch, img_channels, R, R], about [-1, 1]
    ) -> torch.Tensor:  # [batch, w_dim] or [batch, num_ws, w_dim]
        x = self.conv(self.trunk(img))
        w = self.out(self.fc(x.flatten(1)))
        return w if self.num_ws is None else w.view(-1, self.num_ws, self.w_dim)

    def noise_maps(
        self,
        img: torch.Tensor,  # [batch, img_channels, R, R]
    ) -> dict[str, torch.Tensor] | None:  # layer name -> [batch, 1, r, r]; None without noise_maps
        """The generator's noise maps for ``img`` (``G.generate(E(x), c, noise=E.noise_maps(x))``
        reconstructs x), or None for an encoder of the latent alone."""
        return None if self.noise_encoder is None else self.noise_encoder(img)


class NoiseMapEncoder(nn.Module):
    """An image to one map per noise input of the generator: ``{layer name: [B, 1, r, r]}``.

    StyleGAN2's styles are per-channel scales, so a latent can say *what* to draw but hardly
    *where*: where the optic disc sits, where each lesion lies. The noise inputs are the
    synthesis network's only spatial inputs; given maps computed from the image (instead of
    Gaussian noise) they can carry the positions, while the styles keep deciding what is drawn
    there. On the synthetic fundi (``benchmarks/reconstruction_bench.py --encoder-noise``) the
    ``cpu32`` generator and encoder then reconstruct held-out scenes after 600 steps with the disc,
    the vessels and the lesions in place, where the latent alone gives a blurred fundus (README,
    "How it fits together").

    Two 3x3 convolutions at the input resolution, then per noise layer an area average down to
    that layer's size and a 1x1 convolution to one channel. Plain ``nn.Conv2d`` (not the
    equalised layers of the networks): the figures above were measured with them.
    """

    def __init__(
        self,
        noise_layers: Sequence[tuple[str, int]],  # (layer name, resolution): Generator.noise_layers
        img_channels: int = 3,
        channels: int = 32,
    ) -> None:
        super().__init__()
        if not noise_layers:
            raise ValueError("NoiseMapEncoder needs the generator's noise layers (Generator.noise_layers), got none")
        self.noise_layers = [(str(name), int(r)) for name, r in noise_layers]
        self.body = nn.Sequential(
            nn.Conv2d(img_channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
        )
        # ModuleDict keys may not contain dots; layer names do ("b8.conv0").
        self.heads = nn.ModuleDict({self._key(name): nn.Conv2d(channels, 1, 1) for name, _ in self.noise_layers})

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def forward(
        self,
        img: torch.Tensor,  # [batch, img_channels, R, R]
    ) -> dict[str, torch.Tensor]:  # layer name -> [batch, 1, r, r], in synthesis order
        largest = max(r for _, r in self.noise_layers)
        if img.ndim != 4 or img.shape[-1] < largest or img.shape[-2] != img.shape[-1]:
            raise ValueError(f"NoiseMapEncoder expects square images of at least {largest}x{largest}, "
                             f"got {tuple(img.shape)}")
        h = self.body(img)
        return {name: self.heads[self._key(name)](F.adaptive_avg_pool2d(h, r) if r != h.shape[-1] else h)
                for name, r in self.noise_layers}
