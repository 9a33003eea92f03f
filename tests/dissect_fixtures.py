"""A planted generator for dissection tests: one unit paints a known square, the others noise.

``PlantedGenerator`` has the interface StyleSpace and dissection use (style layers, styles,
synthesize, mapping, condition) over two layers at 16x16:

- ``b16.conv1`` (6 units): unit 0 = ``relu(s_0) * SQUARE`` (the square at rows 4..9, columns
  5..10, drawn only when its style is positive, i.e. in about half of the images); units 1..5
  = ``relu(s_k) * noise_k``, fixed random fields over the whole image (decoys).
- ``b16.torgb``: red = ``-0.6 + 1.6 tanh(2 x_0)``, green = ``-0.4 + 0.3 * mean(decoys)``,
  blue = -0.4 (the decoys change the picture, never the square).

Styles are the conditioned latent's first coordinates (``s_k = wc[:, k]``), so the square's
presence is known per latent: ``w[:, 0] > 0``. ``SquareSegmenter`` marks red pixels (the square)
against the rest; ``SquareClassifier`` says "square" with a probability rising with the share of
red pixels.

``maps_generator`` and ``random_maps``: a small real generator whose noise inputs matter, and
per-image noise maps for it (the renders of an ``model.encoder_noise`` run).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

RES = 16
UNITS = 6
SQUARE_ROWS = slice(4, 10)
SQUARE_COLS = slice(5, 11)


def square_mask() -> torch.Tensor:  # bool [RES, RES]
    m = torch.zeros(RES, RES, dtype=torch.bool)
    m[SQUARE_ROWS, SQUARE_COLS] = True
    return m


class PlantedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        pattern = torch.rand(UNITS, RES, RES, generator=g)
        pattern[0] = square_mask().float()
        self.register_buffer("pattern", pattern)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        # x: [B, UNITS, RES, RES] constant input (unused beyond its shape); style: [B, UNITS]
        return F.relu(style)[:, :, None, None] * self.pattern + 0.0 * x


class PlantedToRGB(nn.Module):
    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        red = -0.6 + 1.6 * torch.tanh(2.0 * x[:, 0])
        green = -0.4 + 0.3 * x[:, 1:].mean(dim=1)
        blue = torch.full_like(red, -0.4)
        return torch.stack([red, green, blue], dim=1) + 0.0 * style.sum()


class PlantedSynthesis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b16 = nn.Module()
        self.b16.conv1 = PlantedConv()
        self.b16.torgb = PlantedToRGB()
        self.register_buffer("const", torch.ones(UNITS, RES, RES))

    def named_layers(self):
        return [("b16.conv1", self.b16.conv1), ("b16.torgb", self.b16.torgb)]


class PlantedGenerator(nn.Module):
    z_dim = 8
    w_dim = 8
    c_dim = 2
    resolution = RES
    img_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.synthesis = PlantedSynthesis()

    @property
    def style_layers(self):
        return [("b16.conv1", UNITS), ("b16.torgb", UNITS)]

    @property
    def num_styles(self) -> int:
        return 2 * UNITS

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0, update_w_avg=None) -> torch.Tensor:
        return z * truncation_psi

    def condition(self, w: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if c is None:
            c = w.new_zeros(w.shape[0], self.c_dim)
        return torch.cat([w, c.to(w.dtype)], dim=-1)

    def styles(self, wc: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"b16.conv1": wc[:, :UNITS], "b16.torgb": wc[:, :UNITS]}

    def synthesize(self, styles, noise_mode: str = "const", from_layer=None, cache=None) -> torch.Tensor:
        if from_layer is not None:
            raise NotImplementedError("the planted generator has no prefix reuse")
        s = styles["b16.conv1"]
        x = self.synthesis.const.expand(s.shape[0], -1, -1, -1)
        x = self.synthesis.b16.conv1(x, s, noise_mode)
        return self.synthesis.b16.torgb(x, styles["b16.torgb"])

    def generate(self, w, c, noise_mode: str = "const") -> torch.Tensor:
        return self.synthesize(self.styles(self.condition(w, c)), noise_mode)

    def forward(self, z, c, truncation_psi: float = 1.0, noise_mode: str = "const") -> torch.Tensor:
        return self.generate(self.mapping(z, truncation_psi), c, noise_mode)


class SquareSegmenter:
    """Concepts ``["rest", "square"]``: red above 0.2 is the square."""

    concepts = ["rest", "square"]
    resolution = RES
    source = "planted square segmenter (red > 0.2)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        sq = images[:, 0] > 0.2
        return torch.stack([~sq, sq], dim=1)


class SquareClassifier(nn.Module):
    """Two classes ``["plain", "square"]``: p(square) = sigmoid(40 (red share - 0.05))."""

    num_classes = 2
    class_names = ["plain", "square"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        share = (torch.sigmoid(20.0 * (images[:, 0] - 0.2))).mean(dim=(1, 2))
        logit = 40.0 * (share - 0.05)
        return torch.stack([torch.sigmoid(-logit), torch.sigmoid(logit)], dim=1)


def maps_generator(seed: int = 0, **kwargs) -> nn.Module:
    """A small StyleGAN2 generator whose noise inputs matter (every strength 0.5), as one trained
    with ``model.encoder_noise`` draws its layouts from them."""
    from stylex.networks import Generator
    from stylex.networks.layers import NoiseInjection

    torch.manual_seed(seed)
    g = Generator(**kwargs).eval().requires_grad_(False)
    for m in g.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.5)
    return g


def random_maps(generator: nn.Module, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-image noise maps ``{noise layer: [n, 1, r, r]}``."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, 1, r, r, generator=gen) for name, r in generator.noise_layers}


def own(maps: dict[str, torch.Tensor] | None, i: int) -> dict[str, torch.Tensor] | None:
    """Image i's maps alone (batch 1)."""
    return None if maps is None else {name: m[i : i + 1] for name, m in maps.items()}
