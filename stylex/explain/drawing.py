"""The drawing kit of the reports: PIL tiles, labels, panels, GIFs and a line plot.

Everything here draws with PIL alone (no plotting library) and knows nothing about AttFind:
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
from PIL import Image, ImageDraw, ImageFont

from stylex.utils.io import atomic_write

CURVE_COLOURS = {"attfind": (214, 39, 40), "random": (120, 120, 120), "variance": (31, 119, 180)}
_EXTRA_COLOURS = [(44, 160, 44), (148, 103, 189), (255, 127, 14)]


def font(size: int = 14) -> ImageFont.ImageFont:
    """PIL's bundled font (no download); a bitmap fallback on builds without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


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


def stack(
    rows: Sequence[Image.Image],
    gap: int = 0,
) -> Image.Image:
    """Images one under the other, left-aligned on white."""
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + gap
    return out


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


def line_plot(
    xs: Sequence[float],
    curves: dict[str, Sequence[float]],  # legend name -> y per x
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] = (0.0, 1.0),
    size: tuple[int, int] = (640, 420),
) -> Image.Image:
    """A small line chart drawn with PIL (no plotting library needed)."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    f, small = font(15), font(12)
    left, right, top, bottom = 62, 150, 34, 52
    x0, x1, y0, y1 = left, w - right, h - bottom, top  # pixel frame of the axes

    lo_x, hi_x = (min(xs), max(xs)) if len(xs) > 1 else (xs[0] - 1, xs[0] + 1)
    lo_y, hi_y = ylim

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0),
                y0 - (min(max(y, lo_y), hi_y) - lo_y) / (hi_y - lo_y) * (y0 - y1))

    for t in range(6):  # horizontal grid and y ticks
        yv = lo_y + t * (hi_y - lo_y) / 5
        _, yp = px(lo_x, yv)
        draw.line((x0, yp, x1, yp), fill=(225, 225, 225))
        draw.text((x0 - 8, yp), f"{yv:.1f}", fill=(60, 60, 60), font=small, anchor="rm")
    for xv in xs:
        xp, _ = px(xv, lo_y)
        draw.line((xp, y0, xp, y0 + 4), fill=(60, 60, 60))
        draw.text((xp, y0 + 7), f"{xv:g}", fill=(60, 60, 60), font=small, anchor="mt")
    draw.rectangle((x0, y1, x1, y0), outline=(60, 60, 60))
    extra = iter(_EXTRA_COLOURS)
    for j, (name, ys) in enumerate(curves.items()):
        colour = CURVE_COLOURS.get(name) or next(extra, (0, 0, 0))
        pts = [px(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        for x, y in pts:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        ly = top + 10 + j * 22  # legend
        draw.line((x1 + 12, ly, x1 + 36, ly), fill=colour, width=3)
        draw.text((x1 + 42, ly), name, fill=(20, 20, 20), font=small, anchor="lm")
    draw.text(((x0 + x1) / 2, 8), title, fill=(20, 20, 20), font=f, anchor="mt")
    draw.text(((x0 + x1) / 2, h - 8), xlabel, fill=(20, 20, 20), font=small, anchor="mb")
    ylabel_img = Image.new("RGB", (y0 - y1, 18), (255, 255, 255))
    ImageDraw.Draw(ylabel_img).text(((y0 - y1) / 2, 9), ylabel, fill=(20, 20, 20), font=small, anchor="mm")
    img.paste(ylabel_img.rotate(90, expand=True), (4, y1))
    return img


def data_uri(path: Path) -> str:
    """The file as a base64 data URI (PNG, GIF or JPEG)."""
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def slug(text: str) -> str:
    """A file-name-safe version of a class name."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return s or "class"
