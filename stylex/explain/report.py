"""The report of an AttFind search: a folder of panels, GIFs, a flip-rate plot, JSON and HTML.

Layout of a report folder::

    explanation.json          ranked attributes per class, per-image results, metrics (the flip
                              rate with, beside it, the KID of edited / unedited renders and the
                              agreement with the real inputs)
    report.html               everything below embedded as data URIs (one self-contained file)
    panels/<class>_<rank>.png example pairs (original | modified), class probability on each
    gifs/<class>_<rank>.gif   the same examples toggling between original and modified
    images/<n>.png            per-image panels (given images): input, reconstruction, top-k edits
    flip_rate.png             flip rate against k for AttFind and the baselines

:func:`write_report` renders the examples of every ranked attribute, draws them with
:mod:`stylex.explain.drawing`, writes ``explanation.json`` and the page of
:mod:`stylex.explain.html_page`, and returns the paths as a :class:`Report`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from stylex.explain.drawing import (
    difference_map,
    label,
    line_plot,
    pair_panel,
    row,
    save_gif,
    save_png,
    slug,
    stack,
    title_band,
    to_pil,
    toggle_frames,
)
from stylex.explain.evaluator import EffectEvaluator
from stylex.explain.factors import GroundTruth
from stylex.explain.html_page import render_html
from stylex.explain.measures import apply_edits
from stylex.explain.metrics import Sufficiency
from stylex.explain.result import DIRECTIONS, AttFindResult, Attribute
from stylex.utils.io import atomic_write_json, atomic_write_text
from stylex.stylespace import noise_rows

FORMAT = "stylex-explanation"
VERSION = 1
JSON_FILE = "explanation.json"
HTML_FILE = "report.html"
PLOT_FILE = "flip_rate.png"


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


def describe(attribute: Attribute) -> str:
    """``layer[channel] (#coordinate) direction``: how panels and titles name an attribute."""
    return f"{attribute.layer}[{attribute.channel}] (#{attribute.coordinate}) {attribute.direction_name}"


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
    maps = noise_rows(result.noise, torch.cat([images, images]))  # the edit keeps each image's maps
    renders = evaluator.render(both, maps)
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
    sections: dict[str, Any] | None = None,  # more top-level sections of the JSON, e.g. "refinement"
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
    real_probs = None
    if inputs is not None:
        if inputs.shape[0] != result.num_images:
            raise ValueError(f"{inputs.shape[0]} input images for {result.num_images} explained images")
        with torch.no_grad():
            real_probs = torch.cat([evaluator.classify(inputs[i:i + evaluator.batch_size].to(evaluator.device)).exp().cpu()
                                    for i in range(0, inputs.shape[0], evaluator.batch_size)])
    classes_json: dict[str, Any] = {}
    for c in result.classes:
        entries = []
        for a in result.rankings[c]:
            idx = example_images(result, a, c, examples)
            orig, mod, p0, p1 = render_attribute(result, evaluator, a, idx, c)
            real, p_real = None, None
            if inputs is not None:  # the real images beside their reconstructions
                real = inputs[idx].cpu()
                p_real = real_probs[idx, c].tolist()
            heading = [f"class '{names[c]}'  #{a.rank}: {describe(a)}",
                       f"mean change of p({names[c]}): {a.probability_change:+.3f}   "
                       f"affected: {a.share_affected:.0%}   flips: {a.flip_share:.0%}"]
            stem = f"{slug(names[c])}_{a.rank}"
            panel = out / "panels" / f"{stem}.png"
            gif = out / "gifs" / f"{stem}.gif"
            save_png(panel, pair_panel(orig, mod, p0, p1, heading, tile, inputs=real, p_inputs=p_real))
            save_gif(gif, toggle_frames(orig, mod, p0, p1, heading, tile,
                                        before="reconstruction" if inputs is not None else "render"))
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
        **dict(sections or {}),
    }
    data["report_seconds"] = time.perf_counter() - t0
    atomic_write_json(report.json, data)
    atomic_write_text(report.html, render_html(data, out, json_file=JSON_FILE))
    report.data = data
    return report


def run_figures(
    summary: dict[str, Any],  # a run's summary.json
) -> dict[str, Any]:
    """The figures of a training run that a report shows at its top: the classifier's validation
    accuracy, the reconstruction error and class agreement of the encoder path (after the
    encoder fit when there was one), and the generator's realism and conditioning figures."""
    clf = summary.get("classifier_metrics") or {}
    fit = summary.get("encoder_fit") or {}
    quality = summary.get("quality") or {}
    out = {
        "classifier_val_acc": clf.get("val_acc"),
        "classifier_val_balanced_acc": clf.get("val_balanced_acc"),
        "recon_l1": fit.get("recon_l1_after", summary.get("val/recon_l1")),
        "agreement": fit.get("agreement_after", summary.get("val/agreement")),
        "fid": summary.get("val/fid"),
        "kid": summary.get("val/kid"),
        "cond_fidelity": summary.get("val/cond_fidelity"),
        "feature": quality.get("feature"),
        "g_steps": summary.get("g_steps"),
        "images_seen": summary.get("images_seen"),
    }
    return {k: v for k, v in out.items() if v is not None}


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
    maps = noise_rows(result.noise, torch.full((len(rows),), n))
    renders = evaluator.render(torch.cat(rows).to(evaluator.device), maps)
    probs = evaluator.classify(renders).exp()[:, pred].cpu()
    tiles, changes = [], []
    if inputs is not None:
        p_in = float(evaluator.classify(inputs[n : n + 1].to(evaluator.device)).exp()[0, pred])
        tiles.append(label(to_pil(inputs[n], tile), f"input p={p_in:.2f}"))
    tiles.append(label(to_pil(renders[0].cpu(), tile), f"{'recon' if inputs is not None else 'render'} "
                                                         f"p={float(probs[0]):.2f}"))
    for j in range(1, len(tops) + 1):
        tiles.append(label(to_pil(renders[j].cpu(), tile), f"#{j} p={float(probs[j]):.2f}"))
        changes.append(label(to_pil(difference_map(renders[0].cpu(), renders[j].cpu()), tile), f"#{j} change"))
    body = row(tiles, 4)
    if changes:  # the change map of each edit, under the edit
        lead = len(tiles) - len(changes)
        spacer = Image.new("RGB", (sum(t.width + 4 for t in tiles[:lead]) - 4, tiles[0].height), (255, 255, 255))
        body = stack([body, row([spacer, *changes], 4)], gap=4)
    legend = "  ".join(f"#{j}: {result.space.coordinate(i)[0]}[{result.space.coordinate(i)[1]}] {DIRECTIONS[d]}"
                       for j, (i, d, _) in enumerate(tops, start=1))
    return stack([title_band(body.width, [f"image {n}: predicted '{names[pred]}'", legend], size=12), body])
