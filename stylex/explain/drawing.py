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


def difference_map(
    before: torch.Tensor,  # [3, R, R] in [-1, 1]
    after: torch.Tensor,  # [3, R, R] in [-1, 1]
    full_scale: float = 0.5,  # mean absolute change (in [-1, 1] units) drawn white
) -> torch.Tensor:  # [3, R, R] in [-1, 1]: black (no change) -> red -> yellow -> white
    """Where an edit changed the picture: the mean absolute change over the colour channels on a
    fixed heat scale, so that maps of different edits compare."""
    v = ((after - before).abs().mean(dim=0) / full_scale).clamp(0, 1)  # [R, R] in [0, 1]
    heat = torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)])
    return heat * 2 - 1


def pair_panel(
    originals: torch.Tensor,  # [E, 3, R, R] renders before the edit, in [-1, 1]
    modified: torch.Tensor,  # [E, 3, R, R] renders after the edit
    p_original: Sequence[float],  # [E] probability of the target class before
    p_modified: Sequence[float],  # [E] after
    title: Sequence[str],  # lines of the title band
    tile: int = 128,
    inputs: torch.Tensor | None = None,  # [E, 3, R, R] the real images the renders reconstruct
    p_inputs: Sequence[float] | None = None,  # [E] the target probability of the real images
    per_row: int = 2,  # example groups side by side; more examples wrap onto further rows
) -> Image.Image:
    """One group per example, a wider gap between groups: ``input | reconstruction | edited |
    change`` (``render | edited | change`` for generated images), each image labelled with the
    target-class probability as in the paper's figures; the change is :func:`difference_map`."""
    e = originals.shape[0]
    assert modified.shape == originals.shape and len(p_original) == len(p_modified) == e, (
        f"{e} originals, {modified.shape[0]} modified images, {len(p_original)}/{len(p_modified)} probabilities"
    )
    assert inputs is None or inputs.shape == originals.shape, "inputs must match the renders"
    before = "recon" if inputs is not None else "render"
    rows, tiles, gaps = [], [], []
    for j in range(e):
        if inputs is not None:
            p = "" if p_inputs is None else f" p={p_inputs[j]:.2f}"
            tiles.append(label(to_pil(inputs[j], tile), f"input{p}"))
            gaps.append(2)
        tiles += [label(to_pil(originals[j], tile), f"{before} p={p_original[j]:.2f}"),
                  label(to_pil(modified[j], tile), f"edited p={p_modified[j]:.2f}"),
                  label(to_pil(difference_map(originals[j], modified[j]), tile), "change")]
        gaps += [2, 2, 14]
        if (j + 1) % max(1, per_row) == 0 or j == e - 1:
            rows.append(row(tiles, gaps))
            tiles, gaps = [], []
    body = stack(rows, gap=8)
    return stack([title_band(body.width, title), body])


def toggle_frames(
    originals: torch.Tensor,  # [E, 3, R, R]
    modified: torch.Tensor,  # [E, 3, R, R]
    p_original: Sequence[float],
    p_modified: Sequence[float],
    title: Sequence[str],
    tile: int = 128,
    before: str = "reconstruction",  # what the first frame shows: "reconstruction" or "render"
) -> list[Image.Image]:
    """Two frames, all unedited renders then all edited ones, for an animation."""
    frames = []
    for imgs, ps, tag in ((originals, p_original, before), (modified, p_modified, "edited")):
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
