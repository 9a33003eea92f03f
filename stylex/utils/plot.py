"""Small charts drawn with PIL alone (no plotting library): a line plot and a vertical stack.

Used by the explanation report (flip rate against k) and by training (the generator-quality
figures against images seen), so it lives below both. Nothing here writes files; callers save
the returned PIL images (atomically, see :mod:`stylex.utils.io`).
"""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

# Fixed colours of the curves the reports know by name; any other curve takes the next colour
# of _EXTRA_COLOURS (then black).
CURVE_COLOURS = {"attfind": (214, 39, 40), "random": (120, 120, 120), "variance": (31, 119, 180)}
_EXTRA_COLOURS = [(44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
MAX_X_LABELS = 12  # x tick labels drawn at most (a long training curve has many points)


def font(size: int = 14) -> ImageFont.ImageFont:
    """PIL's bundled font (no download); a bitmap fallback on builds without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _nice_step(span: float, count: int = 5) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about ``count`` intervals."""
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)


def _auto_range(
    curves: dict[str, Sequence[float | None]],
) -> tuple[float, float]:
    """From min(0, lowest) to the first round tick above the highest finite value (a flat or
    empty plot gets [0, 1])."""
    values = [float(y) for ys in curves.values() for y in ys if y is not None and math.isfinite(y)]
    if not values:
        return 0.0, 1.0
    lo, hi = min(0.0, min(values)), max(values)
    if hi <= lo:
        return lo, lo + 1.0
    step = _nice_step(hi - lo)
    return math.floor(lo / step) * step, math.ceil(hi * 1.0001 / step) * step


def line_plot(
    xs: Sequence[float],
    curves: dict[str, Sequence[float | None]],  # legend name -> y per x (None / NaN: no point)
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = (0.0, 1.0),  # None = from the data
    size: tuple[int, int] = (640, 420),
) -> Image.Image:
    """A small line chart."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    f, small = font(15), font(12)
    legend = max((draw.textlength(name, font=small) for name in curves), default=0)
    left, right, top, bottom = 74, max(150, int(legend) + 52), 34, 52
    x0, x1, y0, y1 = left, w - right, h - bottom, top  # pixel frame of the axes

    lo_x, hi_x = (min(xs), max(xs)) if len(set(xs)) > 1 else (xs[0] - 1, xs[0] + 1)
    lo_y, hi_y = ylim if ylim is not None else _auto_range(curves)
    step = _nice_step(hi_y - lo_y)
    exponent = math.floor(math.log10(step))
    decimals = max(0, -exponent + (1 if round(step / 10**exponent, 6) == 2.5 else 0))  # what the step needs

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0),
                y0 - (min(max(y, lo_y), hi_y) - lo_y) / (hi_y - lo_y) * (y0 - y1))

    for t in range(int(round((hi_y - lo_y) / step)) + 1):  # horizontal grid and y ticks at round values
        yv = lo_y + t * step
        _, yp = px(lo_x, yv)
        draw.line((x0, yp, x1, yp), fill=(225, 225, 225))
        draw.text((x0 - 8, yp), f"{yv:.{decimals}f}", fill=(60, 60, 60), font=small, anchor="rm")
    stride = max(1, math.ceil(len(xs) / MAX_X_LABELS))
    for j, xv in enumerate(xs):
        xp, _ = px(xv, lo_y)
        draw.line((xp, y0, xp, y0 + 4), fill=(60, 60, 60))
        if j % stride == 0 or j == len(xs) - 1:
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
