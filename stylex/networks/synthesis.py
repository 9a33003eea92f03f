"""The StyleGAN2 synthesis network, driven by an explicit mapping ``layer name -> style``.

Layout (skip architecture, StyleGAN2 config E/F)::

    b4:  const [C4, 4, 4] -> conv1 (3x3) -> torgb (1x1)
    b8:  conv0 (3x3, up=2) -> conv1 (3x3) -> torgb (1x1)
    ...  one block per power of two up to the output resolution

    img = upsample2d(img_previous_block) + torgb(x)

Every conv and toRGB layer owns an affine ``EqualizedLinear(latent_dim, in_channels,
bias_init=1)`` that maps the (conditioned) latent to that layer's style; the styles are computed
by :meth:`SynthesisNetwork.styles` and consumed by :meth:`SynthesisNetwork.synthesize`, so a
caller can edit any style channel in between (StyleSpace). Style layers are named
``"b{resolution}.{conv0|conv1|torgb}"`` and always listed in synthesis order.

Prefix reuse
    Rendering is a chain of layers, and the state between two layers is the pair
    ``(x, img)`` = (feature maps, image accumulated by the previous blocks' toRGB layers; ``None``
    before the first toRGB). Passing an empty dict as ``cache`` to a full render records the
    state *entering* every layer. A later call with ``from_layer=name`` and that cache starts
    from the recorded state and runs only ``name`` and the layers after it, so only the styles
    of those layers are read. The result equals a full render whenever the styles before
    ``name`` are those of the cached render and the noise is deterministic (``noise_mode``
    ``"const"`` or ``"none"``). A cached state of batch 1 is broadcast to the batch of the
    styles, so one cached image serves many edits. A resumed render leaves the cache unchanged.
    Cached tensors keep their autograd graph when recorded with gradients enabled; record under
    ``torch.no_grad()`` when only rendering.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from stylex.networks.layers import (
    DEFAULT_RESAMPLE_FILTER,
    NOISE_MODES,
    EqualizedLinear,
    ModulatedConv2d,
    NoiseInjection,
)
from stylex.ops import bias_act, setup_filter, upsample2d


class SynthesisState(NamedTuple):
    """What flows between two style layers."""

    x: torch.Tensor  # [batch, channels, r, r] feature maps
    img: torch.Tensor | None  # [batch, img_channels, r', r'] image of the earlier blocks, or None


def channels_at(
    resolution: int,
    channel_base: int,
    channel_max: int,
) -> int:
    """Feature channels at a resolution: ``min(channel_base // resolution, channel_max)``."""
    c = min(channel_base // resolution, channel_max)
    if c < 1:
        raise ValueError(
            f"channel_base={channel_base} gives no channels at resolution {resolution}; "
            f"use channel_base >= {resolution}"
        )
    return c


def block_resolutions(resolution: int) -> list[int]:
    """4, 8, ..., resolution; ``resolution`` must be a power of two >= 8."""
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return [2**i for i in range(2, resolution.bit_length())]


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling 2x), noise, bias, lrelu (gain sqrt 2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent_dim: int,  # size of the conditioned latent the affine reads
        resolution: int,  # output resolution
        up: int = 1,
        kernel_size: int = 3,
        conv_clamp: float | None = None,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        noise_init: float = 0.0,  # the noise input's starting strength
        noise_per_channel: bool = False,  # one noise strength per output channel (NoiseInjection)
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv_clamp = conv_clamp
        self.affine = EqualizedLinear(latent_dim, in_channels, bias_init=1.0)
        self.conv = ModulatedConv2d(
            in_channels, out_channels, kernel_size, demodulate=True, up=up, resample_filter=resample_filter
        )
        self.noise = NoiseInjection(resolution, noise_init, out_channels if noise_per_channel else None)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(
        self,
        x: torch.Tensor,  # [batch, in_channels, r, r]
        s: torch.Tensor,  # [batch, in_channels] style
        noise_mode: str = "random",
        noise: torch.Tensor | None = None,  # [batch or 1, 1, r * up, r * up]: this map instead of noise_mode's
    ) -> torch.Tensor:  # [batch, out_channels, r * up, r * up]
        x = self.noise(self.conv(x, s), noise_mode, noise)
        return bias_act(x, self.bias.to(x.dtype), dim=1, act="lrelu", clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation, then bias; linear output."""

    def __init__(
        self,
        in_channels: int,
        img_channels: int,
        latent_dim: int,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv_clamp = conv_clamp
        self.affine = EqualizedLinear(latent_dim, in_channels, bias_init=1.0)
        self.conv = ModulatedConv2d(in_channels, img_channels, 1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))

    def forward(
        self,
        x: torch.Tensor,  # [batch, in_channels, r, r]
        s: torch.Tensor,  # [batch, in_channels] style
    ) -> torch.Tensor:  # [batch, img_channels, r, r]
        return bias_act(self.conv(x, s), self.bias.to(x.dtype), dim=1, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: ``conv0`` (up=2; absent at 4x4, which starts from ``const``), ``conv1``,
    ``torgb``."""

    def __init__(
        self,
        in_channels: int,  # channels of the previous block (ignored at 4x4)
        out_channels: int,
        latent_dim: int,
        resolution: int,
        img_channels: int,
        conv_clamp: float | None,
        resample_filter: Sequence[float],
        noise_init: float = 0.0,
        noise_per_channel: bool = False,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.out_channels = out_channels
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.layer_names: tuple[str, ...] = ("conv1", "torgb")
        else:
            self.conv0 = SynthesisLayer(
                in_channels,
                out_channels,
                latent_dim,
                resolution,
                up=2,
                conv_clamp=conv_clamp,
                resample_filter=resample_filter,
                noise_init=noise_init,
                noise_per_channel=noise_per_channel,
            )
            self.layer_names = ("conv0", "conv1", "torgb")
        self.conv1 = SynthesisLayer(
            out_channels, out_channels, latent_dim, resolution, conv_clamp=conv_clamp, noise_init=noise_init,
            noise_per_channel=noise_per_channel,
        )
        self.torgb = ToRGBLayer(out_channels, img_channels, latent_dim, conv_clamp=conv_clamp)


class SynthesisNetwork(nn.Module):
    """Conditioned latent -> styles -> image ``[B, img_channels, R, R]`` (roughly in [-1, 1], no
    output nonlinearity). See the module docstring for the layout and for prefix reuse."""

    def __init__(
        self,
        latent_dim: int,  # w_dim + c_dim: the affines read the conditioned latent
        resolution: int,
        channel_base: int = 16384,
        channel_max: int = 512,
        img_channels: int = 3,
        conv_clamp: float | None = None,
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        noise_init: float = 0.0,  # every noise input's starting strength
        noise_per_channel: bool = False,  # one strength per channel (NoiseInjection)
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.resolution = resolution
        self.img_channels = img_channels
        resolutions = block_resolutions(resolution)
        self.blocks = nn.ModuleDict()
        for r in resolutions:
            self.blocks[f"b{r}"] = SynthesisBlock(
                in_channels=channels_at(r // 2, channel_base, channel_max) if r > 4 else 0,
                out_channels=channels_at(r, channel_base, channel_max),
                latent_dim=latent_dim,
                resolution=r,
                img_channels=img_channels,
                conv_clamp=conv_clamp,
                resample_filter=resample_filter,
                noise_init=noise_init,
                noise_per_channel=noise_per_channel,
            )
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.style_layers: list[tuple[str, int]] = [(name, layer.in_channels) for name, layer in self.named_layers()]
        self._index = {name: i for i, (name, _) in enumerate(self.style_layers)}

    def named_layers(self) -> list[tuple[str, SynthesisLayer | ToRGBLayer]]:
        """``(name, layer)`` for every style layer, in synthesis order."""
        return [
            (f"{bname}.{lname}", getattr(block, lname))
            for bname, block in self.blocks.items()
            for lname in block.layer_names
        ]

    @property
    def num_styles(self) -> int:
        return sum(c for _, c in self.style_layers)

    @property
    def noise_layers(self) -> list[tuple[str, int]]:
        """``(name, resolution)`` of every layer with a noise input (the convolutions), in
        synthesis order: the keys and map sizes :meth:`synthesize` takes as ``noise``."""
        return [(name, layer.noise.resolution) for name, layer in self.named_layers()
                if isinstance(layer, SynthesisLayer)]

    def _check_noise(
        self,
        noise: Mapping[str, torch.Tensor],
        needed: Sequence[str],
        batch: int,
    ) -> None:
        """Raise ValueError naming the first noise map that is unknown, missing or misshapen."""
        sizes = dict(self.noise_layers)
        unknown = [k for k in noise if k not in sizes]
        if unknown:
            raise ValueError(f"noise maps for unknown layer(s) {unknown}; the layers with noise are {list(sizes)}")
        for name in needed:
            if name not in noise:
                raise ValueError(f"the noise maps have no entry for layer {name!r}: give one for every "
                                 "convolution rendered (SynthesisNetwork.noise_layers), or none")
            n, r = noise[name], sizes[name]
            ok = isinstance(n, torch.Tensor) and n.ndim == 4 and n.shape[0] in (1, batch) and n.shape[1:] == (1, r, r)
            if not ok:
                shape = tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__
                raise ValueError(f"the noise map of layer {name!r} must have shape [{batch} or 1, 1, {r}, {r}], "
                                 f"got {shape}")

    def styles(
        self,
        wc: torch.Tensor,  # [batch, latent_dim], or [batch, num_layers, latent_dim] (one per layer)
    ) -> dict[str, torch.Tensor]:  # name -> [batch, channels], in synthesis order
        """The style of every layer: its affine applied to the conditioned latent."""
        n = len(self.style_layers)
        if wc.ndim == 2 and wc.shape[1] == self.latent_dim:
            per_layer = [wc] * n
        elif wc.ndim == 3 and wc.shape[1:] == (n, self.latent_dim):
            per_layer = list(wc.unbind(dim=1))
        else:
            raise ValueError(
                f"the conditioned latent must have shape [batch, {self.latent_dim}] or "
                f"[batch, {n}, {self.latent_dim}] (w_dim + c_dim), got {tuple(wc.shape)}"
            )
        return {name: layer.affine(v) for (name, layer), v in zip(self.named_layers(), per_layer)}

    def _check_styles(
        self,
        styles: Mapping[str, torch.Tensor],
        needed: Sequence[str],
    ) -> int:
        """The batch size of ``styles``; raises ValueError naming the first bad layer."""
        known = dict(self.style_layers)
        unknown = [k for k in styles if k not in known]
        if unknown:
            raise ValueError(f"unknown style layer(s) {unknown}; the layers are {list(known)}")
        batch = None
        for name in needed:
            if name not in styles:
                raise ValueError(
                    f"the styles have no entry for layer {name!r}; every layer from the first rendered one on is needed"
                )
            s = styles[name]
            if not isinstance(s, torch.Tensor) or s.ndim != 2 or s.shape[1] != known[name]:
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"the style of layer {name!r} must have shape [batch, {known[name]}], got {shape}")
            if batch is None:
                batch = s.shape[0]
            elif s.shape[0] != batch:
                raise ValueError(f"the style of layer {name!r} has batch {s.shape[0]}, the earlier layers have {batch}")
        assert batch is not None
        return batch

    def synthesize(
        self,
        styles: Mapping[str, torch.Tensor],  # name -> [batch, channels]
        noise_mode: str = "const",  # "random" | "const" | "none"
        from_layer: str | None = None,  # resume at this layer from `cache` (prefix reuse)
        cache: dict[str, SynthesisState] | None = None,  # filled by a full render, read by a resumed one
        noise: Mapping[str, torch.Tensor] | None = None,  # conv layer -> [batch or 1, 1, r, r]; replaces noise_mode
    ) -> torch.Tensor:  # [batch, img_channels, resolution, resolution]
        """Render an image from a (possibly edited) styles mapping.

        ``noise`` gives every convolution's noise map itself (keys and sizes:
        :attr:`noise_layers`), for instance an encoder's maps of the image being reconstructed;
        ``noise_mode`` is then not used."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        layers = self.named_layers()
        if from_layer is None:
            start = 0
        else:
            if from_layer not in self._index:
                raise ValueError(f"from_layer={from_layer!r} is not a style layer; the layers are {list(self._index)}")
            if cache is None or from_layer not in cache:
                raise ValueError(
                    f"resuming at {from_layer!r} needs the cache filled by a full render "
                    "(synthesize(styles, cache={})) first"
                )
            start = self._index[from_layer]
        batch = self._check_styles(styles, [name for name, _ in layers[start:]])
        if noise is not None:
            self._check_noise(noise, [name for name, layer in layers[start:] if isinstance(layer, SynthesisLayer)],
                              batch)
        dtype = styles[layers[start][0]].dtype

        if from_layer is None:
            const = self.blocks["b4"].const.to(dtype)
            x, img = const.unsqueeze(0).expand(batch, *const.shape), None
        else:
            x, img = cache[from_layer]
            if x.shape[0] not in (1, batch):
                raise ValueError(
                    f"the cached state has batch {x.shape[0]}, the styles have {batch}; "
                    "they must match or the cache must have batch 1"
                )
            x = x.expand(batch, *x.shape[1:])
            img = None if img is None else img.expand(batch, *img.shape[1:])

        for name, layer in layers[start:]:
            if cache is not None and from_layer is None:
                cache[name] = SynthesisState(x, img)
            if isinstance(layer, ToRGBLayer):
                y = layer(x, styles[name])
                img = y if img is None else upsample2d(img, self.resample_filter) + y
            else:
                x = layer(x, styles[name], noise_mode, None if noise is None else noise[name])

        assert img is not None and img.shape == (batch, self.img_channels, self.resolution, self.resolution), (
            f"synthesis produced {None if img is None else tuple(img.shape)}"
        )
        return img

    def forward(
        self,
        wc: torch.Tensor,  # [batch, latent_dim]
        noise_mode: str = "random",
    ) -> torch.Tensor:
        return self.synthesize(self.styles(wc), noise_mode=noise_mode)
