"""The StylEx generator: StyleGAN2 whose styles also see the classifier's output.

``z --mapping--> w``; ``wc = cat([w, c])`` with ``c`` the classifier's class probabilities;
every style affine reads ``wc``; the synthesis network renders from the styles. The encoder
path of StylEx skips the mapping: ``generate(E(x), C(x))``.

Because ``c`` enters the styles through differentiable affines, gradients reach ``c`` (the
classifier-KL loss backpropagates through it).

Style mixing (:func:`mix_latents`) is StyleGAN's mixing regularisation: during training some
noise-path images take their styles from two latents, the first up to a random layer and the
second after it, so that no layer can rely on its neighbours sharing one latent.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from stylex.networks.layers import DEFAULT_RESAMPLE_FILTER
from stylex.networks.mapping import MappingNetwork
from stylex.networks.synthesis import SynthesisNetwork, SynthesisState


def mix_latents(
    w1: torch.Tensor,  # [batch, w_dim]
    w2: torch.Tensor,  # [batch, w_dim]
    num_ws: int,  # style layers of the generator
    prob: float,  # share of the batch that is mixed
    generator: torch.Generator | None = None,  # for reproducible draws (on w1's device)
) -> torch.Tensor:  # [batch, num_ws, w_dim]
    """Per-layer latents: with probability ``prob`` per image, layers ``>= k`` take ``w2`` and
    the layers before take ``w1``, with the crossover ``k`` uniform in ``1 .. num_ws - 1``;
    every other image takes ``w1`` at every layer."""
    if w1.ndim != 2 or w1.shape != w2.shape:
        raise ValueError(f"w1 and w2 must both be [batch, w_dim], got {tuple(w1.shape)} and {tuple(w2.shape)}")
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"the style-mixing probability must be in [0, 1], got {prob!r}")
    batch, device = w1.shape[0], w1.device
    cut = torch.full((batch,), num_ws, dtype=torch.long, device=device)
    if num_ws > 1 and prob > 0:
        cross = torch.randint(1, num_ws, (batch,), device=device, generator=generator)
        mixed = torch.rand(batch, device=device, generator=generator) < prob
        cut = torch.where(mixed, cross, cut)
    second = torch.arange(num_ws, device=device)[None, :] >= cut[:, None]  # [batch, num_ws]
    return torch.where(second[..., None], w2[:, None, :], w1[:, None, :])


class Generator(nn.Module):
    """Classifier-conditioned StyleGAN2 generator.

    Output images are ``[B, img_channels, resolution, resolution]``, roughly in [-1, 1] (no
    output nonlinearity). Channels at resolution r are ``min(channel_base // r, channel_max)``.
    """

    def __init__(
        self,
        z_dim: int = 512,
        w_dim: int = 512,
        c_dim: int = 0,  # number of classes of the explained classifier; 0 = unconditional
        resolution: int = 256,
        channel_base: int = 16384,
        channel_max: int = 512,
        mapping_layers: int = 8,
        mapping_lr_mul: float = 0.01,
        conv_clamp: float | None = None,
        img_channels: int = 3,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        noise_init: float = 0.0,  # the noise inputs' starting strength (StyleGAN2: 0)
        noise_per_channel: bool = False,  # one noise strength per channel (StyleGAN1) instead of per layer
        class_gain: float = 1.0,  # the class vector's scale in the conditioned latent (see condition)
    ) -> None:
        super().__init__()
        if c_dim < 0:
            raise ValueError(f"c_dim must be >= 0 (the number of classes), got {c_dim}")
        if isinstance(class_gain, bool) or not isinstance(class_gain, (int, float)) or not class_gain > 0:
            raise ValueError(f"class_gain must be a number > 0 (model.class_gain; 1 = StylEx's plain "
                             f"concatenation), got {class_gain!r}")
        self.class_gain = float(class_gain)
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.c_dim = c_dim
        self.resolution = resolution
        self.img_channels = img_channels
        # Named `mapping_net` because `mapping` is the method the rest of the project calls.
        self.mapping_net = MappingNetwork(z_dim, w_dim, num_layers=mapping_layers, lr_mul=mapping_lr_mul)
        self.synthesis = SynthesisNetwork(
            latent_dim=w_dim + c_dim,
            resolution=resolution,
            channel_base=channel_base,
            channel_max=channel_max,
            img_channels=img_channels,
            conv_clamp=conv_clamp,
            resample_filter=resample_filter,
            noise_init=noise_init,
            noise_per_channel=noise_per_channel,
        )

    @property
    def style_layers(self) -> list[tuple[str, int]]:
        """``(layer name, channels)`` of every style layer, in synthesis order."""
        return list(self.synthesis.style_layers)

    @property
    def num_styles(self) -> int:
        """Total number of style channels (the dimension of StyleSpace)."""
        return self.synthesis.num_styles

    @property
    def num_ws(self) -> int:
        """Number of style layers; the middle size of a per-layer latent ``[B, num_ws, w_dim + c_dim]``."""
        return len(self.synthesis.style_layers)

    def class_weights(self) -> dict[str, torch.Tensor]:  # layer name -> [channels, c_dim]
        """How the class vector enters each style layer: the columns of its affine's effective
        weight that read ``c`` (``style = A_w w + A_c c + b``), with their graphs. Row ``j`` of a
        layer's matrix is what the class adds to its style coordinate ``j``."""
        return {name: layer.affine.effective_weight()[:, self.w_dim:] * self.class_gain
                for name, layer in self.synthesis.named_layers()}

    def mapping(
        self,
        z: torch.Tensor,  # [batch, z_dim]
        truncation_psi: float = 1.0,  # 1 = none; pulls w toward the tracked mean w_avg
        update_w_avg: bool | None = None,  # None = update the running mean in training mode
    ) -> torch.Tensor:  # [batch, w_dim]
        return self.mapping_net(z, truncation_psi=truncation_psi, update_w_avg=update_w_avg)

    def condition(
        self,
        w: torch.Tensor,  # [batch, w_dim] (or [batch, num_ws, w_dim])
        c: torch.Tensor | None,  # [batch, c_dim] class probabilities; None allowed when c_dim == 0
    ) -> torch.Tensor:  # [batch, w_dim + c_dim] (or [batch, num_ws, w_dim + c_dim])
        """The conditioned latent ``wc = cat([w, class_gain * c])``.

        The affines use StyleGAN's equalised learning rate: every input's weights are scaled
        by ``1 / sqrt(w_dim + c_dim)``, so each input moves a style coordinate by about as much
        as an Adam step allows it. ``w`` has ``w_dim`` unit coordinates and ``c`` a few
        probabilities: at gain 1 the class can move a coordinate by little, and by less per
        step than ``w`` moves it together, and the generator spreads whatever the class
        needs over many coordinates. ``class_gain`` scales ``c`` (its weights' effective
        learning rate with it), so that one coordinate can carry a class attribute."""
        if w.ndim not in (2, 3) or w.shape[-1] != self.w_dim:
            raise ValueError(f"w must have shape [batch, {self.w_dim}], got {tuple(w.shape)}")
        batch = w.shape[0]
        if c is None:
            if self.c_dim != 0:
                raise ValueError(
                    f"this generator is conditioned on {self.c_dim} classes: pass c of shape [batch, {self.c_dim}]"
                )
            c = w.new_zeros(batch, 0)
        if c.ndim != 2 or c.shape != (batch, self.c_dim):
            raise ValueError(
                f"c must hold the classifier's class probabilities with shape [{batch}, {self.c_dim}] "
                f"(c_dim = number of classes), got {tuple(c.shape)}"
            )
        c = c.to(w.dtype) * self.class_gain
        if w.ndim == 3:
            c = c.unsqueeze(1).expand(batch, w.shape[1], self.c_dim)
        return torch.cat([w, c], dim=-1)

    def styles(
        self,
        wc: torch.Tensor,  # [batch, w_dim + c_dim] (or [batch, num_ws, w_dim + c_dim])
    ) -> dict[str, torch.Tensor]:  # layer name -> [batch, channels], in synthesis order
        return self.synthesis.styles(wc)

    def synthesize(
        self,
        styles: Mapping[str, torch.Tensor],
        noise_mode: str = "const",
        from_layer: str | None = None,
        cache: dict[str, SynthesisState] | None = None,
        noise: Mapping[str, torch.Tensor] | None = None,  # the noise maps themselves (SynthesisNetwork.noise_layers)
    ) -> torch.Tensor:  # [batch, img_channels, resolution, resolution]
        """Render from a styles mapping; see :mod:`stylex.networks.synthesis` for prefix reuse."""
        return self.synthesis.synthesize(styles, noise_mode=noise_mode, from_layer=from_layer, cache=cache,
                                         noise=noise)

    @property
    def noise_layers(self) -> list[tuple[str, int]]:
        """``(name, resolution)`` of every layer with a noise input."""
        return self.synthesis.noise_layers

    def generate(
        self,
        w: torch.Tensor,  # [batch, w_dim]
        c: torch.Tensor | None,  # [batch, c_dim]
        noise_mode: str = "random",
        noise: Mapping[str, torch.Tensor] | None = None,  # the noise maps themselves, instead of noise_mode
    ) -> torch.Tensor:  # [batch, img_channels, resolution, resolution]
        return self.synthesize(self.styles(self.condition(w, c)), noise_mode=noise_mode, noise=noise)

    def forward(
        self,
        z: torch.Tensor,  # [batch, z_dim]
        c: torch.Tensor | None,  # [batch, c_dim]
        truncation_psi: float = 1.0,
        noise_mode: str = "random",
        noise: Mapping[str, torch.Tensor] | None = None,  # the noise maps themselves, instead of noise_mode
    ) -> torch.Tensor:  # [batch, img_channels, resolution, resolution]
        return self.generate(self.mapping(z, truncation_psi=truncation_psi), c, noise_mode=noise_mode, noise=noise)
