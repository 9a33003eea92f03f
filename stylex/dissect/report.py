"""The dissection report: ``dissection.json``, PNGs and a self-contained ``report.html``.

Layout of the folder::

    dissection.json          everything measured (see stylex.dissect.pipeline)
    report.html              the page below, images embedded as data URIs
    units_per_layer.png      interpretable units per layer and concept (the paper's bar chart)
    montages/<unit>.png      a unit's top-activating samples, its region outlined
    curves/<concept>.png     share of the concept left after ablating the top 1, 2, 4, ... units
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from stylex.dissect.base import Segmenter
from stylex.dissect.dissection import Dissection
from stylex.explain.drawing import data_uri, row, save_png, slug, to_pil
from stylex.stylespace import NoiseMaps, StyleSpace
from stylex.utils.io import atomic_write_json, atomic_write_text
from stylex.utils.plot import font, line_plot, stack

JSON_FILE = "dissection.json"
HTML_FILE = "report.html"
BARS_FILE = "units_per_layer.png"
MONTAGE_IMAGES = 5  # top-activating samples per unit montage
MONTAGE_UNITS = 12  # units that get a montage
_PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (23, 190, 207), (120, 120, 120)]


def bar_chart(
    counts: dict[str, dict[str, int]],  # layer -> concept -> interpretable units
    concepts: Sequence[str],
    title: str = "",
    size: tuple[int, int] = (760, 380),
) -> Image.Image:
    """Grouped bars: per layer (x) one bar per concept, the legend on the right."""
    width, height = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    f = font(12)
    left, right, top, bottom = 46, 170, 30, 56
    layers = list(counts)
    top_value = max([1] + [v for per in counts.values() for v in per.values()])
    draw.text((left, 8), title, fill=(20, 20, 20), font=font(14))
    draw.line((left, top, left, height - bottom), fill=(0, 0, 0))
    draw.line((left, height - bottom, width - right, height - bottom), fill=(0, 0, 0))
    span = height - bottom - top
    for tick in range(0, top_value + 1, max(1, top_value // 5)):
        y = height - bottom - span * tick / top_value
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((4, y - 7), str(tick), fill=(60, 60, 60), font=f)
    group = (width - right - left) / max(1, len(layers))
    bar = max(2.0, (group - 10) / max(1, len(concepts)))
    for i, layer in enumerate(layers):
        x0 = left + i * group + 5
        for j, concept in enumerate(concepts):
            v = counts[layer].get(concept, 0)
            if v:
                y = height - bottom - span * v / top_value
                draw.rectangle((x0 + j * bar, y, x0 + (j + 1) * bar - 1, height - bottom),
                               fill=_PALETTE[j % len(_PALETTE)])
        draw.text((x0, height - bottom + 6), layer, fill=(20, 20, 20), font=f)
    for j, concept in enumerate(concepts):
        y = top + j * 18
        draw.rectangle((width - right + 12, y + 2, width - right + 24, y + 12), fill=_PALETTE[j % len(_PALETTE)])
        draw.text((width - right + 30, y), concept, fill=(20, 20, 20), font=f)
    return img


def outline(
    mask: torch.Tensor,  # bool [R, R]
) -> torch.Tensor:  # bool [R, R]: the mask's pixels that touch a pixel outside it
    inside = mask.float()[None, None]
    eroded = -F.max_pool2d(-inside, 3, stride=1, padding=1)
    return mask & (eroded[0, 0] < 0.5)


@torch.no_grad()
def unit_montage(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] samples to choose from
    layer: str,
    channel: int,
    threshold: float,  # t_u
    caption: str,
    count: int = MONTAGE_IMAGES,
    tile: int = 96,
    noise: NoiseMaps | None = None,  # the samples' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> Image.Image:
    """The samples where the unit is most active, its region (map > t_u, upsampled) outlined."""
    device = next(iter(space.generator.parameters()), torch.zeros(())).device
    with space.trace(retain=[layer]) as seen:
        images = space.render(styles.to(device), noise=noise)
        maps = seen[layer][:, channel : channel + 1].float()
    res = images.shape[-1]
    maps = F.interpolate(maps, size=(res, res), mode="bilinear", align_corners=False)[:, 0].cpu()
    best = torch.argsort(maps.flatten(1).amax(dim=1), descending=True)[:count]
    tiles = []
    for i in best.tolist():
        pic = images[i].cpu().clone()
        edge = outline(maps[i] > threshold)
        pic[:, edge] = torch.tensor([-1.0, 1.0, 1.0])[:, None]  # cyan
        tiles.append(to_pil(pic, tile))
    body = row(tiles, 3)
    band = Image.new("RGB", (body.width, 18), (255, 255, 255))
    ImageDraw.Draw(band).text((2, 2), caption, fill=(20, 20, 20), font=font(12))
    return stack([band, body])


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:left}
th{background:#f4f4f4}img{max-width:100%;image-rendering:pixelated}.muted{color:#777;font-size:13px}
"""


def write_dissection_report(
    out_dir: str | Path,
    data: dict[str, Any],  # what dissection.json holds (stylex.dissect.pipeline.dissect_export)
    space: StyleSpace,
    dis: Dissection,
    segmenter: Segmenter,
    styles: torch.Tensor,  # [N, S] samples the montages are drawn from
    noise: NoiseMaps | None = None,  # the samples' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> Path:  # report.html
    """Draw the PNGs, write the JSON and the page; returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"bars": BARS_FILE, "montages": {}, "curves": {}}
    counts = dis.counts()
    save_png(out / BARS_FILE, bar_chart(counts, dis.concepts,
                                        title=f"interpretable units (IoU >= {dis.iou_threshold:g}) per layer"))

    chosen: list[tuple[str, int]] = []
    for concept in [c for c in dis.concepts if c not in ("background", "rest")]:
        for u in dis.top_units(concept, 2):
            if u.iou > 0 and (u.layer, u.channel) not in chosen:
                chosen.append((u.layer, u.channel))
    for u in sorted(dis.units(), key=lambda u: -u.iou):
        if len(chosen) >= MONTAGE_UNITS:
            break
        if u.interpretable and (u.layer, u.channel) not in chosen:
            chosen.append((u.layer, u.channel))
    for layer, ch in chosen[:MONTAGE_UNITS]:
        u = dis.unit(layer, ch)
        name = f"{slug(layer)}_{ch}"
        path = out / "montages" / f"{name}.png"
        save_png(path, unit_montage(space, styles, layer, ch, u.threshold,
                                    f"{layer}:{ch}  {u.label} (IoU {u.iou:.3f})", noise=noise))
        files["montages"][f"{layer}:{ch}"] = f"montages/{name}.png"

    for concept, iv in (data.get("interventions") or {}).items():
        curve = iv["curve"]
        named = {k: [None if v is None else float(v) for v in vals] for k, vals in curve["remaining"].items()}
        path = out / "curves" / f"{slug(concept)}.png"
        save_png(path, line_plot(curve["sizes"], named, title=f"{concept} left after ablating units of {iv['layer']}",
                                 xlabel="units ablated (top n of each ranking)", ylabel="share left", ylim=None))
        files["curves"][concept] = f"curves/{slug(concept)}.png"

    data["files"] = files
    atomic_write_json(out / JSON_FILE, data)
    page = out / HTML_FILE
    atomic_write_text(page, render_dissection_html(data, out))
    return page


def unit_rows(
    dissection: dict[str, Any],  # Dissection.to_json()
    limit: int = 60,
) -> list[list[Any]]:
    """``[unit, label, IoU, threshold]`` of the interpretable units, highest IoU first."""
    rows = [[f"{name}:{u}", layer["labels"][u], layer["best_iou"][u], layer["thresholds"][u]]
            for name, layer in dissection["layers"].items()
            for u in range(layer["units"]) if layer["interpretable"][u]]
    rows.sort(key=lambda r: -(r[2] or 0.0))
    return rows[:limit]


def best_units(
    dissection: dict[str, Any],  # Dissection.to_json()
) -> list[list[Any]]:
    """Per concept: its best unit over every layer, that unit's IoU, and how many units are
    labelled with it and interpretable."""
    out = []
    for j, concept in enumerate(dissection["concepts"]):
        best, where = -1.0, ""
        for name, layer in dissection["layers"].items():
            for u in range(layer["units"]):
                v = layer["iou"][u][j] or 0.0
                if v > best:
                    best, where = v, f"{name}:{u}"
        count = sum(per.get(concept, 0) for per in (dissection.get("counts") or {}).values())
        out.append([concept, where, best, count])
    return out


def render_dissection_html(
    data: dict[str, Any],
    root: Path,  # the report folder (images are read from it)
) -> str:
    """The self-contained page of a dissection."""
    esc = html.escape
    d = data["dissection"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(data['title'])}</title>",
             f"<style>{_CSS}</style></head><body><h1>{esc(data['title'])}</h1>"]
    parts.append("<p>GAN Dissection of the generator: which units (channels of a synthesis layer's output) draw "
                 "which concept (IoU of the unit's top-quantile region with the concept), which units cause it "
                 "(removing them removes it; inserting them draws it), and where the explanation's attributes "
                 "act.</p>")
    seg = data.get("segmenter") or {}
    rows = [["concepts from", data["concept_source"]],
            ["images", f"{d['num_images']} samples + {d['num_encoded']} encoded validation images"],
            ["unit threshold", f"top {d['quantile']:.2%} of each unit's activations"],
            *([["noise maps", data["noise_maps"]]] if data.get("noise_maps") else []),
            ["interpretable", f"IoU >= {d['iou_threshold']}"],
            ["time", f"{data['timings']['total']:.1f} s"]]
    if seg.get("held_out_iou"):
        rows.append(["segmenter held-out IoU", ", ".join(f"{k} {v:.2f}" for k, v in seg["held_out_iou"].items())])
    parts.append(_table(["setting", "value"], rows))

    parts.append("<h2>Which units draw what</h2>")
    parts.append(f"<img alt='units per layer' src='{data_uri(root / data['files']['bars'])}'>")
    counts = d.get("counts") or {}
    concepts = d["concepts"]
    parts.append(_table(["layer", *concepts], [[layer, *[per.get(c, 0) for c in concepts]]
                                               for layer, per in counts.items()]))
    parts.append(_table(["concept", "best unit", "its IoU", "interpretable units"],
                        best_units(d)))
    rows = unit_rows(d)
    if rows:
        parts.append("<p class='muted'>Most interpretable units (label = the concept of highest IoU; threshold = "
                     "t_u in the layer's activation units):</p>")
        parts.append(_table(["unit", "label", "IoU", "threshold"], rows))
    else:
        parts.append(f"<p><b>No unit reaches IoU {d['iou_threshold']:g} with any concept</b>: the generator does not "
                     "(yet) draw the concepts in a unit-aligned way; the best units per concept are above.</p>")
    for unit, rel in data["files"]["montages"].items():
        parts.append(f"<div><img alt='unit {esc(unit)}' src='{data_uri(root / rel)}'></div>")
    parts.append("<p class='muted'>Montages: the samples where the unit is most active, its region "
                 "(activation above t_u, upsampled) outlined in cyan.</p>")

    if data.get("interventions"):
        parts.append("<h2>Which units cause it</h2>")
        parts.append("<p class='muted'>ACE: the change of the concept's pixel share when a unit is set to zero. "
                     "α: the unit set found by optimising the removal of the concept (λ‖α‖² keeps it small). "
                     "Insertion: the concept's causal units set to their mean activation on the concept, in a small "
                     "region; success = the segmenter finds the concept there afterwards.</p>")
        for concept, iv in data["interventions"].items():
            cl = iv["classifier"]
            names = list(cl["ablation"]["classes"])
            parts.append(f"<h3>{esc(concept)} (layer {esc(iv['layer'])}, {iv['units']} units)</h3>")
            best = iv["ace"]["top"][:5]
            parts.append("<p>Largest single-unit effects (ACE): " + ", ".join(
                f"{u['unit']} ({u['ace']:+.4f})" for u in best) + f" of a base share {iv['ace']['base_share']:.4f}."
                + ("" if not iv.get("alpha") else " α*: " + ", ".join(
                    f"{u['unit']} ({u['alpha']:.2f})" for u in iv["alpha"]["top"][:5])) + "</p>")
            parts.append(f"<img alt='ablation curve' src='{data_uri(root / data['files']['curves'][concept])}'>")
            ins = iv["insertion"]
            if ins["trials"]:
                parts.append(f"<p>Insertion of units {ins['units']}: {ins['success_rate']:.0%} success over "
                             f"{ins['trials']} locations where the concept was absent.</p>")
            else:
                parts.append("<p>Insertion: the concept was present at every tried location already.</p>")
            parts.append(_table(["classifier", *[f"p({n})" for n in names]], [
                ["samples", *[cl["ablation"]["classes"][n]["base"] for n in names]],
                [f"{concept} units ablated", *[cl["ablation"]["classes"][n]["intervened"] for n in names]],
                [f"{concept} units inserted", *[cl["insertion"]["classes"][n]["intervened"] for n in names]]]))

    art = data.get("artifacts")
    if art:
        r = art["realism"]
        parts.append("<h2>Artifact units</h2>")
        parts.append(f"<p>Units of {esc(art['layer'])} ranked by how much ablating each brings the samples' "
                     f"{esc(art['feature'])} features closer to real images' (a diagonal Fréchet distance); then "
                     f"FID with the top {art['count']} ablated against {art['count']} random units.</p>")
        parts.append(_table(["samples", "FID", "KID"], [[k, (r.get(k) or {}).get("fid"), (r.get(k) or {}).get("kid")]
                                                        for k in ("plain", "top", "random")]))

    att = data.get("attributes")
    if att:
        parts.append("<h2>Where the explanation's attributes act</h2>")
        parts.append("<p class='muted'>Per attribute: the concept its effect |G(s+Δ) − G(s)| overlaps most "
                     "(IoU of the pixels changed by at least half the image's largest change), and the concept of "
                     "the unit its style scales.</p>")
        rows = [[r["class"], r["rank"], f"{r['layer']}[{r['channel']}]", r["acts_on"] or "nothing visible",
                 max((r["effect_iou"] or {0: 0}).values()), r.get("unit_concept") or "", r.get("factor") or ""]
                for r in att["attributes"]]
        parts.append(_table(["class", "rank", "attribute", "acts on", "IoU", "its unit's concept",
                             "ground-truth factor"], rows))
        if att.get("ground_truth_agreement") is not None:
            parts.append(f"<p>Agreement with the ground truth: {att['ground_truth_agreement']:.0%} of "
                         f"{att['ground_truth_judged']} attributes act on the concept of the factor they change.</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def log_to_wandb(
    lcfg: dict[str, Any],  # the training run's W&B logger settings
    run_dir: Path,  # the training run
    out: Path,  # the dissection's report folder
    data: dict[str, Any],  # dissection.json
) -> None:
    """The dissection as a W&B run in the training run's group (``job_type="dissect"``): the unit
    table, the bar chart, montages, and the ablation curves as images and native charts. A
    failure only warns: the report is on disk."""
    import logging
    import os

    log = logging.getLogger(__name__)
    try:
        import wandb

        from stylex.explain.loggers import training_identity

        os.environ.setdefault("WANDB_SILENT", "true")
        offline = bool(lcfg.get("offline", True)) or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun")
        ident = training_identity(run_dir, lcfg)
        run = wandb.init(project=lcfg.get("project") or "stylex", entity=lcfg.get("entity"),
                         dir=str(run_dir / "logs"), mode="offline" if offline else "online",
                         name=f"dissect-{run_dir.name}", job_type="dissect", group=ident["group"],
                         tags=list(lcfg.get("tags") or []),
                         config={"training_run": ident["id"], "concept_source": data["concept_source"],
                                 "settings": data["settings"]})
        try:
            files = data["files"]
            payload: dict[str, Any] = {
                "dissect/units": wandb.Table(columns=["unit", "label", "iou", "threshold"],
                                             data=unit_rows(data["dissection"], limit=1000)),
                "dissect/units_per_layer": wandb.Image(str(out / files["bars"])),
                "dissect/montages": [wandb.Image(str(out / rel), caption=unit)
                                     for unit, rel in files["montages"].items()],
            }
            for concept, iv in (data.get("interventions") or {}).items():
                curve = iv["curve"]
                names = list(curve["remaining"])
                payload[f"dissect/ablation/{concept}"] = wandb.plot.line_series(
                    xs=list(curve["sizes"]), ys=[[v if v is not None else float("nan") for v in curve["remaining"][n]]
                                                 for n in names],
                    keys=names, title=f"{concept} left after ablating units of {iv['layer']}", xname="units ablated")
            att = data.get("attributes")
            if att:
                payload["dissect/attributes"] = wandb.Table(
                    columns=["class", "rank", "layer", "channel", "acts_on"],
                    data=[[r["class"], r["rank"], r["layer"], r["channel"], r["acts_on"] or ""]
                          for r in att["attributes"]])
            run.log(payload)
        finally:
            run.finish()
    except Exception as e:
        log.warning("could not log the dissection to W&B: %s", e)
