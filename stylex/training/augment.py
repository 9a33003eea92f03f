"""Discriminator augmentation: the "bgc" pipeline of Karras et al., "Training Generative
Adversarial Networks with Limited Data" (NeurIPS 2020), written from the paper.

Contract
--------
``AugmentPipe(p)(x)`` takes images ``x`` of shape ``[B, C, H, W]`` in [-1, 1] (any ``H``, ``W``;
the colour transforms need ``C == 3``) and returns a tensor of the same shape and dtype. Every
image gets its own random draws; each transform is applied with probability ``p`` times its
multiplier (1 by default). The output is differentiable with respect to ``x``, so that the
generator learns through the augmented images D sees and R1 can be taken at the un-augmented
reals. ``p == 0`` returns ``x`` itself: no draws, no work, the random-number stream untouched.

``p`` is a buffer (checkpointed, restored on resume, moved by ``.to``); the training loop reads
it through a host copy, so change it with :meth:`AugmentPipe.set_p` (or ``load_state_dict``).

The pipeline, in the order the transforms apply to the image
-------------------------------------------------------------
============  =========================================================================
blit          x-flip (i ~ U{0, 1}); rotation by k quarter turns (k ~ U{0..3}; only
              {0, 2} on non-square images, which a quarter turn would not fit);
              integer translation by round(t · size), t ~ U(-0.125, 0.125) per axis
geometric     isotropic scaling s ~ lognormal(0, (0.2 ln 2)²); pre-rotation
              θ ~ U(-π, π); anisotropic scaling (s, 1/s), s ~ lognormal(0, (0.2 ln 2)²);
              post-rotation θ ~ U(-π, π); fractional translation t · size,
              t ~ N(0, 0.125²) per axis. Each rotation is drawn with probability
              1 - sqrt(1 - p), so that some rotation happens with probability p.
colour        brightness b ~ N(0, 0.2²) added; contrast c ~ lognormal(0, (0.5 ln 2)²)
              multiplied; luma flip (i ~ U{0, 1}: mirror through the plane orthogonal
              to the luma axis v = (1, 1, 1)/√3); hue rotation about v by
              θ ~ U(-π, π); saturation s ~ lognormal(0, (ln 2)²) on the chroma
============  =========================================================================

Blit and geometric transforms are composed into one 3×3 matrix per image (pixel units, origin
at the image centre), so every image is resampled once: bilinearly by ``F.grid_sample`` with
reflection padding, or, for an image that drew no geometric transform, exactly, by gathering
whole pixels (the matrix then maps pixel centres to pixel centres, and the same reflection is
applied to the indices). Colour transforms are composed into one 4×4 affine matrix per image.

The paper resamples through a 2× upsampled image with a wavelet low-pass filter; bilinear
sampling here is cheaper and slightly blurrier. Its central finding holds either way: these
augmentations do not leak into the generated images (D cannot tell an augmented distribution
from the clean one it must match) only while p stays below about 0.8; above it the generator
may learn to produce augmented-looking images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

BLIT = ("xflip", "rotate90", "xint")
GEOMETRIC = ("scale", "rotate", "aniso", "xfrac")
COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
TRANSFORMS = BLIT + GEOMETRIC + COLOUR

XINT_MAX = 0.125  # integer translation: up to 1/8 of the image
SCALE_STD = 0.2 * math.log(2)  # log-std of the isotropic scale
ANISO_STD = 0.2 * math.log(2)  # log-std of the anisotropic scale
XFRAC_STD = 0.125  # fractional translation, in image sizes
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5 * math.log(2)
SATURATION_STD = 1.0 * math.log(2)


@dataclass
class Draws:
    """The random parameters of one call, one row per image; the identity values mean "not drawn"."""

    xflip: torch.Tensor  # [B] 1 = mirror left-right
    rotate90: torch.Tensor  # [B] k in {0..3}: k quarter turns, as torch.rot90(x, k, dims=(2, 3))
    xint: torch.Tensor  # [B, 2] integer shift (x, y) in pixels
    scale: torch.Tensor  # [B] isotropic scale (1 = none; 2 enlarges the content twofold)
    rotate_pre: torch.Tensor  # [B] angle in radians, in the sense of rotate90 (π/2 = one quarter turn)
    aniso: torch.Tensor  # [B] s: x scaled by s, y by 1/s
    rotate_post: torch.Tensor  # [B] angle in radians
    xfrac: torch.Tensor  # [B, 2] shift (x, y) in pixels
    brightness: torch.Tensor  # [B] added to every channel
    contrast: torch.Tensor  # [B] multiplies every channel
    lumaflip: torch.Tensor  # [B] 1 = mirror the colour through the plane orthogonal to the luma axis
    hue: torch.Tensor  # [B] rotation about the luma axis, radians
    saturation: torch.Tensor  # [B] factor on the chroma (the part orthogonal to the luma axis)

    @classmethod
    def identity(cls, batch: int, device: torch.device | str | None = None) -> "Draws":
        zeros = lambda *s: torch.zeros(batch, *s, device=device)  # noqa: E731
        ones = lambda: torch.ones(batch, device=device)  # noqa: E731
        return cls(xflip=zeros(), rotate90=zeros(), xint=zeros(2), scale=ones(), rotate_pre=zeros(),
                   aniso=ones(), rotate_post=zeros(), xfrac=zeros(2), brightness=zeros(), contrast=ones(),
                   lumaflip=zeros(), hue=zeros(), saturation=ones())

    def geometric(self) -> torch.Tensor:  # [B] bool
        """Images with a non-blit geometric transform: those that need interpolation."""
        return ((self.scale != 1) | (self.rotate_pre != 0) | (self.aniso != 1) | (self.rotate_post != 0)
                | (self.xfrac != 0).any(dim=1))


# ------------------------------------------------------------------ geometry
def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [B] each -> [B, 3, 3]
    m = torch.zeros(cos.shape[0], 3, 3, dtype=cos.dtype, device=cos.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = cos, -sin, sin, cos, 1
    return m


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:  # [B] each -> [B, 3, 3]
    m = torch.zeros(sx.shape[0], 3, 3, dtype=sx.dtype, device=sx.device)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1
    return m


def _translation(t: torch.Tensor) -> torch.Tensor:  # [B, 2] -> [B, 3, 3]
    m = torch.eye(3, dtype=t.dtype, device=t.device).repeat(t.shape[0], 1, 1)
    m[:, :2, 2] = t
    return m


def geometric_matrix(draws: Draws, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [B, 3, 3]
    """The matrix that maps an output pixel to the input point it samples (pixel units, origin at
    the image centre, x right, y down).

    The image undergoes T_1 (x-flip) first and T_8 (fractional translation) last, so a pixel
    ``y`` of the output reads the input at ``T_1⁻¹ ⋯ T_8⁻¹ y``: the product below lists the
    inverses in the order the transforms apply. A rotation of the image by θ reads its input at
    ``R(θ) y``, with ``R(π/2)`` exactly what ``torch.rot90(·, 1, dims=(2, 3))`` does.
    """
    d = {f.name: getattr(draws, f.name).to(dtype) for f in fields(draws)}
    one = torch.ones_like(d["scale"])
    k = draws.rotate90.long() % 4
    cos90 = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=dtype, device=k.device)[k]  # exact quarter turns
    sin90 = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=dtype, device=k.device)[k]
    factors = [
        _scaling(1 - 2 * d["xflip"], one),  # x-flip is its own inverse
        _rotation(cos90, sin90),
        _translation(-d["xint"]),
        _scaling(1 / d["scale"], 1 / d["scale"]),
        _rotation(d["rotate_pre"].cos(), d["rotate_pre"].sin()),
        _scaling(1 / d["aniso"], d["aniso"]),
        _rotation(d["rotate_post"].cos(), d["rotate_post"].sin()),
        _translation(-d["xfrac"]),
    ]
    m = factors[0]
    for f in factors[1:]:
        m = m @ f  # [B, 3, 3]
    return m


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Integer indices folded into [0, n) by mirroring about the outer pixel edges (… 1 0 | 0 1 …
    n-1 | n-1 …): the reflection ``grid_sample`` applies with ``align_corners=False``."""
    i = torch.remainder(i, 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def resample(
    x: torch.Tensor,  # [B, C, H, W]
    matrix: torch.Tensor,  # [B, 3, 3] output pixel -> input point (see geometric_matrix)
    exact: torch.Tensor | None = None,  # [B] bool: images whose matrix maps pixel centres to pixel centres
) -> torch.Tensor:  # [B, C, H, W]
    """``x`` resampled through ``matrix``: bilinear with reflection padding, or, where ``exact``,
    by gathering whole pixels (no interpolation blur); both are differentiable in ``x``."""
    b, c, h, w = x.shape
    u = torch.arange(w, dtype=matrix.dtype, device=x.device) - (w - 1) / 2  # [W] pixel centres
    v = torch.arange(h, dtype=matrix.dtype, device=x.device) - (h - 1) / 2  # [H]
    dest = torch.stack([u.expand(h, w), v[:, None].expand(h, w), torch.ones(h, w, dtype=u.dtype, device=u.device)],
                       dim=-1).reshape(1, h * w, 3)  # [1, HW, 3]
    src = (dest @ matrix.transpose(1, 2))[..., :2]  # [B, HW, 2] input points, centred pixel units
    out = None
    # On the CPU, reading ``exact`` costs nothing and saves the interpolation when no image needs it;
    # on an accelerator the read would wait for the device, so both paths run and ``where`` picks.
    if exact is None or x.device.type != "cpu" or not bool(exact.all()):
        # align_corners=False: pixel index i sits at (2i + 1)/size - 1, i.e. 2 · (centred coordinate) / size
        grid = src * torch.tensor([2 / w, 2 / h], dtype=src.dtype, device=src.device)  # [B, HW, 2]
        out = F.grid_sample(x, grid.view(b, h, w, 2).to(x.dtype), mode="bilinear", padding_mode="reflection",
                            align_corners=False)  # [B, C, H, W]
    if exact is not None:
        ix = _reflect(torch.round(src[..., 0] + (w - 1) / 2).long(), w)  # [B, HW]
        iy = _reflect(torch.round(src[..., 1] + (h - 1) / 2).long(), h)  # [B, HW]
        index = (iy * w + ix)[:, None, :].expand(b, c, h * w)  # [B, C, HW]
        gathered = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
        out = gathered if out is None else torch.where(exact[:, None, None, None], gathered, out)
    return out


# ------------------------------------------------------------------ colour
def colour_matrix(draws: Draws, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [B, 4, 4]
    """The affine colour map of each image in homogeneous RGB, applied to a column (r, g, b, 1):
    brightness first, then contrast, luma flip, hue rotation, saturation."""
    b = draws.brightness.shape[0]
    dev = draws.brightness.device
    eye = torch.eye(4, dtype=dtype, device=dev)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=dtype, device=dev) / math.sqrt(3)  # the luma axis
    vv = torch.outer(v, v)  # [4, 4] projection onto the luma axis
    vx = torch.zeros(4, 4, dtype=dtype, device=dev)  # cross-product matrix of v: vx @ a = v × a
    vx[0, 1], vx[0, 2], vx[1, 0], vx[1, 2], vx[2, 0], vx[2, 1] = -v[2], v[1], v[2], -v[0], -v[1], v[0]
    col = lambda t: t.to(dtype)[:, None, None]  # noqa: E731  [B] -> [B, 1, 1]

    bright = eye.repeat(b, 1, 1)
    bright[:, :3, 3] = draws.brightness.to(dtype)[:, None]
    contrast = eye.repeat(b, 1, 1)
    contrast[:, :3, :3] *= col(draws.contrast)
    lumaflip = eye - 2 * vv * col(draws.lumaflip)  # [B, 4, 4]; the 4th coordinate is untouched (v[3] = 0)
    theta = col(draws.hue)
    # Rodrigues: rotation about v; the homogeneous coordinate stays 1 because v[3] = 0 and vx's 4th row is 0.
    hue = theta.cos() * (eye - vv) + theta.sin() * vx + vv  # [B, 4, 4]
    hue[:, 3, 3] = 1
    sat = vv + (eye - vv) * col(draws.saturation)  # [B, 4, 4]
    sat[:, 3, 3] = 1
    return sat @ hue @ lumaflip @ contrast @ bright


def recolour(
    x: torch.Tensor,  # [B, 3, H, W]
    matrix: torch.Tensor,  # [B, 4, 4] see colour_matrix
) -> torch.Tensor:  # [B, 3, H, W]
    b, c, h, w = x.shape
    m = matrix.to(x.dtype)
    return torch.baddbmm(m[:, :3, 3:], m[:, :3, :3], x.reshape(b, 3, h * w)).view(b, 3, h, w)


# ------------------------------------------------------------------ the pipe
def _refresh_host_p(module: "AugmentPipe", incompatible_keys) -> None:
    module._p_host = float(module.p)  # a loaded p replaces the host copy the pipe reads


class AugmentPipe(nn.Module):
    """The bgc augmentation pipeline (see the module docstring) at probability ``p``."""

    def __init__(
        self,
        p: float = 0.0,  # probability of each transform, in [0, 1]
        multipliers: Mapping[str, float] | None = None,  # per-transform factor on p, by name (TRANSFORMS); missing = 1
    ) -> None:
        super().__init__()
        multipliers = dict(multipliers or {})
        unknown = sorted(set(multipliers) - set(TRANSFORMS))
        if unknown:
            raise ValueError(f"AugmentPipe: unknown transform(s) {unknown}; known: {list(TRANSFORMS)}")
        self.multipliers = {name: float(multipliers.get(name, 1.0)) for name in TRANSFORMS}
        if any(m < 0 for m in self.multipliers.values()):
            raise ValueError(f"AugmentPipe: multipliers must be >= 0, got {self.multipliers}")
        self.register_buffer("p", torch.zeros(()))
        self._p_host = 0.0
        self.set_p(p)
        self.register_load_state_dict_post_hook(_refresh_host_p)

    @property
    def p_value(self) -> float:
        """p as a Python number (no device read)."""
        return self._p_host

    def set_p(self, p: float) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        self._p_host = float(p)
        self.p.fill_(self._p_host)

    def extra_repr(self) -> str:
        return f"p={self._p_host:.4f}"

    def _probability(self, name: str) -> float:
        return min(1.0, self._p_host * self.multipliers[name])

    # ------------------------------------------------------------------ draws
    def sample(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,  # fixes the draws (on ``device``)
    ) -> Draws:
        """Independent draws for ``batch`` images at the current p: three random calls in all."""
        prob = self._probability
        rot = 1 - math.sqrt(1 - prob("rotate"))  # each of the two rotations, so that P(any rotation) = p
        # one column per gate: xflip, rotate90, xint, scale, pre-rotation, aniso, post-rotation, xfrac, colours
        probs = [prob("xflip"), prob("rotate90"), prob("xint"), prob("scale"), rot, prob("aniso"), rot,
                 prob("xfrac")] + [prob(n) for n in COLOUR]
        gate = torch.rand(batch, 13, device=device, generator=generator) < torch.tensor(probs, device=device)  # [B, 13]
        u = torch.rand(batch, 8, device=device, generator=generator)  # [B, 8] uniform values
        n = torch.randn(batch, 7, device=device, generator=generator)  # [B, 7] normal values
        g = gate.float()
        size = torch.tensor([width, height], dtype=torch.float32, device=device)  # [2] (x, y)
        quarter_turns = 4 if height == width else 2  # a quarter turn does not fit a non-square canvas
        return Draws(
            xflip=torch.floor(u[:, 0] * 2) * g[:, 0],
            rotate90=torch.floor(u[:, 1] * quarter_turns) * (4 // quarter_turns) * g[:, 1],
            xint=torch.round((u[:, 2:4] * 2 - 1) * XINT_MAX * size) * g[:, 2:3],
            scale=torch.where(gate[:, 3], torch.exp(n[:, 0] * SCALE_STD), 1.0),
            rotate_pre=(u[:, 4] * 2 - 1) * math.pi * g[:, 4],
            aniso=torch.where(gate[:, 5], torch.exp(n[:, 1] * ANISO_STD), 1.0),
            rotate_post=(u[:, 5] * 2 - 1) * math.pi * g[:, 6],
            xfrac=n[:, 2:4] * XFRAC_STD * size * g[:, 7:8],
            brightness=n[:, 4] * BRIGHTNESS_STD * g[:, 8],
            contrast=torch.where(gate[:, 9], torch.exp(n[:, 5] * CONTRAST_STD), 1.0),
            lumaflip=torch.floor(u[:, 6] * 2) * g[:, 10],
            hue=(u[:, 7] * 2 - 1) * math.pi * g[:, 11],
            saturation=torch.where(gate[:, 12], torch.exp(n[:, 6] * SATURATION_STD), 1.0),
        )

    # ------------------------------------------------------------------ application
    def apply(
        self,
        x: torch.Tensor,  # [B, C, H, W] in [-1, 1]
        draws: Draws,  # one row per image (see sample)
    ) -> torch.Tensor:  # [B, C, H, W], x's dtype
        """``x`` under given draws (deterministic, differentiable in ``x``). The maths runs in
        float32 (float64 for float64 input) outside autocast, whatever the caller's precision."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            y = x.to(dtype)
            if any(self.multipliers[n] > 0 for n in BLIT + GEOMETRIC):
                y = resample(y, geometric_matrix(draws, dtype), exact=~draws.geometric())
            if any(self.multipliers[n] > 0 for n in COLOUR):
                if y.shape[1] != 3:
                    raise ValueError(f"AugmentPipe: the colour transforms need RGB images, got {y.shape[1]} channels; "
                                     "set their multipliers to 0")
                y = recolour(y, colour_matrix(draws, dtype))
        return y.to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,  # [B, C, H, W] in [-1, 1]
        generator: torch.Generator | None = None,  # fixes the draws
    ) -> torch.Tensor:  # [B, C, H, W]
        if self._p_host == 0.0:
            return x  # the exact identity: no draws, no copy
        b, _, h, w = x.shape
        return self.apply(x, self.sample(b, h, w, x.device, generator))
