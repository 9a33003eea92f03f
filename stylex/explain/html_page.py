"""The HTML page of a report: one self-contained file, every image embedded as a data URI.

:func:`render_html` turns the content of ``explanation.json`` (see :mod:`stylex.explain.report`)
into the page: the settings, per class the ranked attributes with their panels and GIFs, the
flip-rate table and plot with the realism (KID) and agreement figures beside them, the ground
truth when measured, and the per-image results.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from stylex.explain.drawing import data_uri

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


_NOT_CURVES = ("k", "num_images", "seconds", "realism", "agreement", "notes")  # flip_rate keys besides the curves


def _manifold(fr: dict[str, Any]) -> str:
    """The realism of the edited renders and the agreement of the unedited ones, beside the flip rate."""
    esc = html.escape
    out = ["<p><b>Is a flip an explanation?</b> A flip won by leaving the data manifold shows here as a "
           "higher KID of the edited renders (against real images) than of the unedited ones.</p>"]
    r = fr.get("realism")
    if r:
        out.append(_table(
            [f"renders of {r['num_images']} images vs {r['num_real']} real", "KID", "± std"],
            [["unedited", r["kid_unedited"], r["kid_unedited_std"]],
             [f"top-{r['k']} attributes applied", r["kid_edited"], r["kid_edited_std"]]]))
        out.append(f"<p class='muted'>KID in {esc(r['feature'])} features (the classifier being explained), "
                   f"mean and standard deviation over subsets of {r['kid_subset_size']} images.</p>")
    if fr.get("agreement") is not None:
        out.append(f"<p>Agreement: the classifier gives {fr['agreement']:.0%} of the unedited renders the class "
                   "it gives their real input (flips are counted against the renders' own predictions).</p>")
    out += [f"<p class='muted'>note: {esc(n)}</p>" for n in fr.get("notes") or []]
    return "".join(out)


def _column_legend(measure: str, affect_threshold: float | None) -> str:
    """One line per column of the attribute tables."""
    unit = "logit (one class against the rest)" if measure == "logit" else "probability"
    thr = f"{affect_threshold:g}" if affect_threshold is not None else "the search's affect threshold"
    lines = [
        ("coordinate, layer, channel", "the StyleSpace coordinate (a flat index) and the style layer and channel it is."),
        ("direction", "which end of the coordinate's range the edit moves it to (the min or the max over the "
                      "explained images)."),
        ("mean Δp", "the mean change of the class probability when the edit is applied to the images not "
                    "predicted as the class."),
        ("mean effect", f"the same change in the search's measure, the {unit}: what AttFind ranked by."),
        ("affected", f"the share of those images whose class probability rises by at least {thr}."),
        ("flips", "the share of those images that the classifier then assigns to the class."),
    ]
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in lines)
    return f"<details open><summary>What the columns mean</summary><ul class='muted'>{items}</ul></details>"


def _run_figures(run: dict[str, Any]) -> str:
    """The run being explained: the classifier's accuracy and the generator's figures."""
    rows = []
    labels = {
        "classifier_val_acc": "classifier accuracy (validation)",
        "classifier_val_balanced_acc": "classifier balanced accuracy (validation)",
        "recon_l1": "reconstruction L1 of validation images (E then G, images in [-1, 1])",
        "agreement": "agreement: reconstructions given the class of their real image",
        "fid": "FID of samples", "kid": "KID of samples",
        "cond_fidelity": "conditioning fidelity: samples classified as the class they were drawn for",
        "g_steps": "generator steps", "images_seen": "real images seen",
    }
    for key, name in labels.items():
        if run.get(key) is not None:
            v = run[key]
            rows.append([name, f"{v:.1%}" if key in ("classifier_val_acc", "classifier_val_balanced_acc",
                                                     "agreement", "cond_fidelity") else v])
    if not rows:
        return ""
    note = (f"<p class='muted'>FID and KID in {html.escape(run['feature'])} features.</p>"
            if run.get("feature") else "")
    return "<h2>The run</h2>" + _table(["figure", "value"], rows) + note


def render_html(
    data: dict[str, Any],  # the content of explanation.json
    root: Path,  # the report folder, where the referenced images live
    max_image_rows: int = 200,  # rows of the per-image table; the rest are only in the JSON file
    json_file: str = "explanation.json",  # the JSON file's name, for the note on rows left out
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
    ref = data.get("refinement")
    if ref:
        same = ref.get("rankings_vs_encoder") or {}
        parts.append(
            f"<p>Latents refined per image ({ref['steps']} steps, {ref['seconds_per_image']:.3f} s per image): "
            f"reconstruction L1 {ref['recon_l1_before']:.4f} → {ref['recon_l1_after']:.4f}, class agreement "
            f"{ref['agreement_before']:.0%} → {ref['agreement_after']:.0%}"
            + (f"; the class rankings share {same['class_overlap']:.0%} of their attributes with those of the "
               f"encoder's latents." if same else ".") + "</p>")
    for w in s.get("warnings", []):
        parts.append(f"<p class='muted'>note: {esc(w)}</p>")
    if data.get("run"):
        parts.append(_run_figures(data["run"]))

    if data["classes"]:
        parts.append(_column_legend(str(data["settings"].get("measure", "prob")),
                                    data["settings"].get("affect_threshold")))
    for name, cls in data["classes"].items():
        parts.append(f"<h2>Class '{esc(name)}' ({cls['pool_size']} images not predicted as it)</h2>")
        parts.append(_table(
            ["rank", "coordinate", "layer", "channel", "direction", "mean Δp", "mean effect", "affected", "flips"],
            [[a["rank"], a["coordinate"], a["layer"], a["channel"], a["direction"], a["mean_probability_change"],
              a["mean_effect"], a["share_affected"], a["flip_share"]] for a in cls["attributes"]],
        ))
        for a in cls["attributes"]:
            where = f" — acts on: {esc(str(a['acts_on']))}" if a.get("acts_on") else ""
            parts.append(f"<div class='attr'><b>#{a['rank']}</b> {esc(a['layer'])}[{a['channel']}] "
                         f"{esc(a['direction'])}{where}<br>")
            parts.append(f"<img alt='panel' src='{data_uri(root / a['panel'])}'> ")
            parts.append(f"<img alt='animation' src='{data_uri(root / a['gif'])}'></div>")

    if data.get("flip_rate"):
        fr = data["flip_rate"]
        parts.append("<h2>Sufficiency: flip rate against k</h2>")
        names = [k for k in fr if k not in _NOT_CURVES]
        parts.append("<div style='display:flex;gap:28px;align-items:flex-start;flex-wrap:wrap'><div>")
        parts.append(_table(["k", *names], [[k, *[fr[nm][j] for nm in names]] for j, k in enumerate(fr["k"])]))
        parts.append("</div><div style='max-width:560px'>")
        parts.append(_manifold(fr))
        parts.append("</div></div>")
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
        parts.append(f"<p class='muted'>{len(data['images']) - max_image_rows} more images in {json_file}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)
