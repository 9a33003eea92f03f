"""The drawing kit of the reports: PIL tiles, labels, panels, GIFs and a line plot.

Everything here draws with PIL alone (no plotting library) and knows nothing about AttFind
(the line plot and the vertical stack live in :mod:`stylex.utils.plot`, which training uses too):
images come in as tensors ``[3, R, R]`` in ``[-1, 1]`` and leave as PIL images or files.
Images are upscaled with nearest-neighbour to at least ``tile`` pixels so that the labels drawn
with PIL's default font stay legible on 32x32 renders. Files are written atomically.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from stylex.utils.io import atomic_write
from stylex.utils.plot import CURVE_COLOURS, font, line_plot, stack  # noqa: F401 (the kit's public names)


def to_pil(
    image: torch.Tensor,  # [3, R, R] in [-1, 1]
    tile: int = 128,  # minimum side of the result in pixels
) -> Image.Image:
    """An RGB PIL image, upscaled by an integer factor (nearest) to at least ``tile`` pixels."""
    assert image.ndim == 3 and image.shape[0] == 3, f"expected an image [3, H, W], got {tuple(image.shape)}"
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pil = Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    scale = max(1, math.ceil(tile / max(pil.size)))
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST) if scale > 1 else pil


def label(
    pil: Image.Image,
    text: str,
    size: int = 13,
) -> Image.Image:
    """A copy of ``pil`` with ``text`` in white on a dark box in the top-left corner."""
    out = pil.copy()
    draw = ImageDraw.Draw(out)
    f = font(size)
    x0, y0, x1, y1 = draw.textbbox((3, 2), text, font=f)
    draw.rectangle((0, 0, x1 + 3, y1 + 3), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255), font=f)
    return out


def title_band(
    width: int,
    lines: Sequence[str],
    size: int = 14,
) -> Image.Image:
    """A white band holding lines of dark text."""
    f = font(size)
    height = 6 + len(lines) * (size + 5)
    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for j, line in enumerate(lines):
        draw.text((6, 4 + j * (size + 5)), line, fill=(20, 20, 20), font=f)
    return band


def row(
    tiles: Sequence[Image.Image],
    gaps: Sequence[int] | int = 4,  # gap after each tile (a list: per tile)
) -> Image.Image:
    """Images side by side on white."""
    gaps = [gaps] * len(tiles) if isinstance(gaps, int) else list(gaps)
    width = sum(t.width for t in tiles) + sum(gaps[: len(tiles) - 1])
    out = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for t, g in zip(tiles, gaps + [0]):
        out.paste(t, (x, 0))
        x += t.width + g
    return out


def pair_panel(
    originals: torch.Tensor,  # [E, 3, R, R] renders before the edit, in [-1, 1]
    modified: torch.Tensor,  # [E, 3, R, R] renders after the edit
    p_original: Sequence[float],  # [E] probability of the target class before
    p_modified: Sequence[float],  # [E] after
    title: Sequence[str],  # lines of the title band
    tile: int = 128,
) -> Image.Image:
    """Example pairs side by side, ``original | modified``, a wider gap between pairs, each image
    labelled with the target-class probability (as in the paper's figures)."""
    e = originals.shape[0]
    assert modified.shape == originals.shape and len(p_original) == len(p_modified) == e, (
        f"{e} originals, {modified.shape[0]} modified images, {len(p_original)}/{len(p_modified)} probabilities"
    )
    tiles, gaps = [], []
    for j in range(e):
        tiles += [label(to_pil(originals[j], tile), f"before p={p_original[j]:.2f}"),
                  label(to_pil(modified[j], tile), f"after p={p_modified[j]:.2f}")]
        gaps += [2, 14]
    body = row(tiles, gaps)
    return stack([title_band(body.width, title), body])


def toggle_frames(
    originals: torch.Tensor,  # [E, 3, R, R]
    modified: torch.Tensor,  # [E, 3, R, R]
    p_original: Sequence[float],
    p_modified: Sequence[float],
    title: Sequence[str],
    tile: int = 128,
) -> list[Image.Image]:
    """Two frames, all originals then all modified images, for an animation."""
    frames = []
    for imgs, ps, tag in ((originals, p_original, "original"), (modified, p_modified, "modified")):
        body = row([label(to_pil(imgs[j], tile), f"p={ps[j]:.2f}") for j in range(imgs.shape[0])], 6)
        frames.append(stack([title_band(body.width, [*title, tag]), body]))
    return frames


def save_gif(
    path: Path,
    frames: Sequence[Image.Image],
    duration_ms: int = 800,
) -> None:
    """An endlessly looping GIF (written atomically)."""
    first, *rest = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    atomic_write(path, lambda p: first.save(p, format="GIF", save_all=True, append_images=rest,
                                            duration=duration_ms, loop=0))


def save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def data_uri(path: Path) -> str:
    """The file as a base64 data URI (PNG, GIF or JPEG)."""
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def slug(text: str) -> str:
    """A file-name-safe version of a class name."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return s or "class"
