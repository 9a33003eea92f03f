"""Visual reports of an AttFind search: panels, GIFs, a flip-rate plot, JSON and one HTML file.

Layout of a report folder::

    explanation.json          ranked attributes per class, per-image results, metrics
    report.html               everything below embedded as data URIs (one self-contained file)
    panels/<class>_<rank>.png example pairs (original | modified), class probability on each
    gifs/<class>_<rank>.gif   the same examples toggling between original and modified
    images/<n>.png            per-image panels (given images): input, reconstruction, top-k edits
    flip_rate.png             flip rate against k for AttFind and the baselines

Images are upscaled with nearest-neighbour to at least ``tile`` pixels so that the labels drawn
with PIL's default font stay legible on 32x32 renders.
"""

from __future__ import annotations

import base64
import html
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from stylex.explain.attfind import DIRECTIONS, Attribute, AttFind, AttFindResult, EffectEvaluator
from stylex.explain.metrics import GroundTruth, Sufficiency, apply_edits
from stylex.utils.io import atomic_write, atomic_write_json, atomic_write_text

FORMAT = "stylex-explanation"
VERSION = 1
JSON_FILE = "explanation.json"
HTML_FILE = "report.html"
PLOT_FILE = "flip_rate.png"

CURVE_COLOURS = {"attfind": (214, 39, 40), "random": (120, 120, 120), "variance": (31, 119, 180)}
_EXTRA_COLOURS = [(44, 160, 44), (148, 103, 189), (255, 127, 14)]


# ============================================================================ drawing
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


def describe(attribute: Attribute) -> str:
    return f"{attribute.layer}[{attribute.channel}] (#{attribute.coordinate}) {attribute.direction_name}"


# ============================================================================ the report
@dataclass
class Report:
    """Paths of a written report."""

    out_dir: Path
    json: Path
    html: Path
    panels: dict[tuple[int, int], Path] = field(default_factory=dict)  # (class, rank) -> PNG
    gifs: dict[tuple[int, int], Path] = field(default_factory=dict)
    image_panels: dict[int, Path] = field(default_factory=dict)
    plot: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)  # what explanation.json holds


@torch.no_grad()
def render_attribute(
    result: AttFindResult,
    evaluator: EffectEvaluator,
    attribute: Attribute,
    images: torch.Tensor,  # [E] image indices
    target: int,  # class whose probability is shown
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Renders of ``images`` before and after the attribute, with the target probability."""
    device = evaluator.device
    flat = result.flat[images]
    coords = torch.full((images.numel(), 1), attribute.coordinate, dtype=torch.long)
    edited = apply_edits(flat, result.targets[images], coords, torch.full_like(coords, attribute.direction))
    both = torch.cat([flat, edited]).to(device)
    renders = evaluator.space.render(both, noise_mode=evaluator.noise_mode)
    probs = evaluator.classify(renders).exp()[:, target].cpu().tolist()
    e = images.numel()
    return renders[:e].cpu(), renders[e:].cpu(), probs[:e], probs[e:]


def example_images(
    result: AttFindResult,
    attribute: Attribute,
    target: int,
    count: int,
) -> torch.Tensor:  # [<= count] image indices
    """The pool images on which the attribute raises the target probability most."""
    pool = result.pools.get(target, torch.arange(result.num_images))
    dp = result.logp[pool, attribute.coordinate, attribute.direction, target].exp() - result.probs[pool, target]
    dp = torch.nan_to_num(dp, nan=-math.inf)
    return pool[torch.argsort(dp, descending=True, stable=True)[:count]]


def write_report(
    out_dir: str | Path,
    result: AttFindResult,
    evaluator: EffectEvaluator,
    class_names: Sequence[str],
    examples: int = 4,  # example pairs per attribute
    sufficiency: Sufficiency | None = None,
    ground_truth: GroundTruth | None = None,
    image_info: Sequence[dict[str, Any]] | None = None,  # per image: e.g. {"source": path, "label": y}
    inputs: torch.Tensor | None = None,  # [N, 3, R, R] the real images, shown in image panels
    image_panels: Sequence[int] = (),  # images that get a panel of their own
    settings: dict[str, Any] | None = None,  # shown in the header and stored in the JSON
    title: str = "StylEx explanation",
    tile: int = 128,
) -> Report:
    """Write the whole report folder (see the module docstring) and return its paths."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    if len(names) != result.num_classes:
        raise ValueError(f"{len(names)} class names for a classifier with {result.num_classes} classes")
    report = Report(out_dir=out, json=out / JSON_FILE, html=out / HTML_FILE)

    # ---- per-class attributes: panels and GIFs
    classes_json: dict[str, Any] = {}
    for c in result.classes:
        entries = []
        for a in result.rankings[c]:
            idx = example_images(result, a, c, examples)
            orig, mod, p0, p1 = render_attribute(result, evaluator, a, idx, c)
            heading = [f"class '{names[c]}'  #{a.rank}: {describe(a)}",
                       f"mean change of p({names[c]}): {a.probability_change:+.3f}   "
                       f"affected: {a.share_affected:.0%}   flips: {a.flip_share:.0%}"]
            stem = f"{slug(names[c])}_{a.rank}"
            panel = out / "panels" / f"{stem}.png"
            gif = out / "gifs" / f"{stem}.gif"
            save_png(panel, pair_panel(orig, mod, p0, p1, heading, tile))
            save_gif(gif, toggle_frames(orig, mod, p0, p1, heading, tile))
            report.panels[(c, a.rank)], report.gifs[(c, a.rank)] = panel, gif
            entries.append({**a.to_dict(), "examples": idx.tolist(), "panel": _rel(panel, out), "gif": _rel(gif, out)})
        classes_json[names[c]] = {"index": c, "pool_size": int(result.pools[c].numel()), "attributes": entries}

    # ---- per-image results
    k_img = result.top_k
    images_json = []
    for n in range(result.num_images):
        pred = int(result.predicted[n])
        tops = []
        for i, d, eff in result.image_topk(n, k_img):
            layer, ch = result.space.coordinate(i)
            dp = float(result.logp[n, i, d, pred].exp() - result.probs[n, pred])
            tops.append({"coordinate": i, "layer": layer, "channel": ch, "direction": DIRECTIONS[d],
                         "effect": eff, "probability_change": dp})
        entry = {"index": n, **(dict(image_info[n]) if image_info else {}),
                 "predicted": names[pred], "probabilities": [round(float(p), 6) for p in result.probs[n]],
                 "stable": bool(result.stable[n]), "top_attributes": tops}
        images_json.append(entry)
    for n in image_panels:
        path = out / "images" / f"{n}.png"
        save_png(path, _image_panel(result, evaluator, n, names, inputs, tile))
        report.image_panels[n] = path
        images_json[n]["panel"] = _rel(path, out)

    # ---- flip-rate plot
    if sufficiency is not None:
        report.plot = out / PLOT_FILE
        save_png(report.plot, line_plot(sufficiency.ks, sufficiency.curves,
                                        title=f"Flip rate against k ({sufficiency.num_images} images)",
                                        xlabel="k: attributes changed together", ylabel="flip rate"))

    data = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "title": title,
        "class_names": names,
        "settings": dict(settings or {}),
        "style_space": {"dim": result.space.dim, "layers": [[n_, c_] for n_, c_ in result.space.layers]},
        "search": {k: v for k, v in result.to_dict(names).items() if k != "classes"},
        "classes": classes_json,
        "images": images_json,
        "flip_rate": sufficiency.to_dict() if sufficiency is not None else None,
        "ground_truth": ground_truth.to_dict(names) if ground_truth is not None else None,
        "files": {"html": HTML_FILE, "plot": PLOT_FILE if report.plot else None},
    }
    data["report_seconds"] = time.perf_counter() - t0
    atomic_write_json(report.json, data)
    atomic_write_text(report.html, render_html(data, out))
    report.data = data
    return report


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


@torch.no_grad()
def _image_panel(
    result: AttFindResult,
    evaluator: EffectEvaluator,
    n: int,
    names: Sequence[str],
    inputs: torch.Tensor | None,
    tile: int,
) -> Image.Image:
    """``input | reconstruction | top-1 edit | ... | top-k edit`` with p(predicted) on each."""
    pred = int(result.predicted[n])
    tops = result.image_topk(n, result.top_k)
    flat = result.flat[n : n + 1]
    rows = [flat] + [apply_edits(flat, result.targets[n : n + 1], torch.tensor([[i]]), torch.tensor([[d]]))
                     for i, d, _ in tops]
    renders = evaluator.space.render(torch.cat(rows).to(evaluator.device), noise_mode=evaluator.noise_mode)
    probs = evaluator.classify(renders).exp()[:, pred].cpu()
    tiles = []
    if inputs is not None:
        p_in = float(evaluator.classify(inputs[n : n + 1].to(evaluator.device)).exp()[0, pred])
        tiles.append(label(to_pil(inputs[n], tile), f"input p={p_in:.2f}"))
    tiles.append(label(to_pil(renders[0].cpu(), tile), f"recon p={float(probs[0]):.2f}"))
    for j, (i, d, _) in enumerate(tops, start=1):
        layer, ch = result.space.coordinate(i)
        tiles.append(label(to_pil(renders[j].cpu(), tile), f"#{j} p={float(probs[j]):.2f}"))
    body = row(tiles, 4)
    legend = "  ".join(f"#{j}: {result.space.coordinate(i)[0]}[{result.space.coordinate(i)[1]}] {DIRECTIONS[d]}"
                       for j, (i, d, _) in enumerate(tops, start=1))
    return stack([title_band(body.width, [f"image {n}: predicted '{names[pred]}'", legend], size=12), body])


# ============================================================================ HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f4f4f4}img{max-width:100%;image-rendering:pixelated}.attr{margin:14px 0}
.muted{color:#777;font-size:13px}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(
    data: dict[str, Any],  # the content of explanation.json
    root: Path,  # the report folder, where the referenced images live
    max_image_rows: int = 200,
) -> str:
    """One self-contained HTML page: every image is embedded as a data URI."""
    esc = html.escape
    s = data["search"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(data['title'])}</title>",
             f"<style>{_CSS}</style></head><body><h1>{esc(data['title'])}</h1>"]
    settings = [[k, v] for k, v in data["settings"].items()]
    settings += [["images explained", s["num_images"]], ["stable images", s["num_stable"]],
                 ["search", f"{s['mode']}, {s['pairs_rendered_per_image']:.0f} edits rendered per image"],
                 ["time", f"{s['seconds']:.1f} s ({s['seconds_per_image']:.3f} s per image)"]]
    parts.append(_table(["setting", "value"], settings))
    for w in s.get("warnings", []):
        parts.append(f"<p class='muted'>note: {esc(w)}</p>")

    for name, cls in data["classes"].items():
        parts.append(f"<h2>Class '{esc(name)}' ({cls['pool_size']} images not predicted as it)</h2>")
        parts.append(_table(
            ["rank", "coordinate", "layer", "channel", "direction", "mean Δp", "mean effect", "affected", "flips"],
            [[a["rank"], a["coordinate"], a["layer"], a["channel"], a["direction"], a["mean_probability_change"],
              a["mean_effect"], a["share_affected"], a["flip_share"]] for a in cls["attributes"]],
        ))
        for a in cls["attributes"]:
            parts.append(f"<div class='attr'><b>#{a['rank']}</b> {esc(a['layer'])}[{a['channel']}] "
                         f"{esc(a['direction'])}<br>")
            parts.append(f"<img alt='panel' src='{data_uri(root / a['panel'])}'> ")
            parts.append(f"<img alt='animation' src='{data_uri(root / a['gif'])}'></div>")

    if data.get("flip_rate"):
        fr = data["flip_rate"]
        parts.append("<h2>Sufficiency: flip rate against k</h2>")
        names = [k for k in fr if k not in ("k", "num_images", "seconds")]
        parts.append(_table(["k", *names], [[k, *[fr[nm][j] for nm in names]] for j, k in enumerate(fr["k"])]))
        if data["files"].get("plot"):
            parts.append(f"<img alt='flip rate' src='{data_uri(root / data['files']['plot'])}'>")

    gt = data.get("ground_truth")
    if gt:
        parts.append("<h2>Ground truth (synthetic factors)</h2>")
        parts.append(f"<p>recovery {gt['recovery']:.2f}, purity {gt['purity']:.2f} "
                     f"(causal: {esc(', '.join(gt['causal_factors']))})</p>")
        parts.append(_table(["class", "rank", "main factor"],
                            [[cn, j + 1, f or "none"] for cn, v in gt["classes"].items()
                             for j, f in enumerate(v["factors"])]))

    parts.append("<h2>Images</h2>")
    for im in data["images"]:
        if im.get("panel"):
            parts.append(f"<div class='attr'><img alt='image {im['index']}' src='{data_uri(root / im['panel'])}'></div>")
    rows = []
    for im in data["images"][:max_image_rows]:
        tops = "; ".join(f"{t['layer']}[{t['channel']}] {t['direction']} ({t['probability_change']:+.2f})"
                         for t in im["top_attributes"])
        rows.append([im["index"], im.get("source", ""), im["predicted"],
                     max(im["probabilities"]), "yes" if im["stable"] else "no", tops])
    parts.append(_table(["image", "source", "predicted", "p", "stable", "top attributes (Δp of predicted)"], rows))
    if len(data["images"]) > max_image_rows:
        parts.append(f"<p class='muted'>{len(data['images']) - max_image_rows} more images in {JSON_FILE}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


# ============================================================================ search + metrics + report
def explain_and_report(
    finder: AttFind,
    flat: torch.Tensor,  # [N, S] styles of the explained images
    out_dir: str | Path,
    class_names: Sequence[str],
    top_k: int = 4,
    classes: Sequence[int] | None = None,
    reference: torch.Tensor | None = None,  # [M, S] styles setting the min/max targets (None = flat)
    flip_k: int = 10,  # flip-rate curve for k = 1..flip_k (0 = none)
    examples: int = 4,
    image_info: Sequence[dict[str, Any]] | None = None,
    inputs: torch.Tensor | None = None,
    image_panels: Sequence[int] = (),
    settings: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    ground_truth_probe: Any = None,  # a metrics.FactorProbe: also score against the synthetic factors
    progress: Any = None,  # callable(str) for progress messages
    title: str = "StylEx explanation",
) -> tuple[Report, AttFindResult]:
    """AttFind on ``flat``, the flip-rate curves, optionally the ground truth, and the report."""
    from stylex.explain.metrics import ground_truth, sufficiency

    say = progress or (lambda msg: None)
    result = finder.run(flat, top_k=top_k, classes=classes, reference=reference,
                        trainer_kwargs=trainer_kwargs, progress=say)
    say(f"AttFind: {result.seconds:.1f} s for {result.num_images} images ({result.mode})")
    suff = None
    if flip_k > 0:
        suff = sufficiency(result, finder.evaluator, ks=range(1, flip_k + 1))
        say(f"flip rates: {suff.seconds:.1f} s")
    gt = ground_truth(result, finder.evaluator, ground_truth_probe) if ground_truth_probe is not None else None
    report = write_report(out_dir, result, finder.evaluator, class_names, examples=examples, sufficiency=suff,
                          ground_truth=gt, image_info=image_info, inputs=inputs, image_panels=image_panels,
                          settings=settings, title=title)
    return report, result
