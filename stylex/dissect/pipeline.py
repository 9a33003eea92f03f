"""Dissect a trained run: concepts, units, interventions, attributes, and the report.

:func:`dissect_export` runs every part of GAN Dissection on a loaded export and writes
``<out>/dissection.json``, the PNGs and ``report.html`` (see :mod:`stylex.dissect.report`):

1. **Concepts**: the run's segmenter (:func:`choose_segmenter`): the synthetic U-Net on the
   synthetic data set, a user-supplied segmenter (``--segmenter``), or else the classifier's
   own class evidence (Grad-CAM).
2. **Dissection** (:func:`stylex.dissect.dissection.dissect`): per unit its threshold, IoU with
   every concept and label, over noise samples (classes balanced) and encoded validation images.
3. **Intervention** per *target concept* (the lesions on the synthetic data; every class's
   evidence otherwise) on the layer holding the concept's best unit: single-unit ACE, the α
   unit set, the ablation curve by α*, ACE, IoU and at random, insertion at locations, and the
   classifier's response to ablating / inserting the concept's causal units.
4. **Artifact units** (when real images are at hand): ablating which units makes samples more
   realistic, and FID with the top 20 ablated against 20 random units.
5. **Attributes in space**: where each ranked attribute of the run's ``explanation.json`` acts
   ("acts on: haemorrhage (IoU 0.41)"), written back into the explanation (JSON and page) and,
   on the synthetic data, checked against the factor the ground truth says it changes.

A generator trained with ``model.encoder_noise`` draws each image's layout from noise maps: the
encoded images are rendered with the encoder's maps of them, and the samples (w from z) with the
maps of real images, sample i taking those of real image i (cycling), as on the training's noise
path; every edit of an image keeps its maps. Without real images the samples get constant noise.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from stylex.dissect.base import Segmenter, check_layers, unit_counts
from stylex.dissect.dissection import Dissection, dissect, encoder_latents, noise_latents
from stylex.dissect.artifacts import artifact_units
from stylex.dissect.intervention import (
    ablation_curve,
    classifier_effect,
    insert_at_locations,
    optimise_unit_set,
    unit_effects,
)
from stylex.dissect.localise import localise_attributes
from stylex.stylespace import NoiseMaps, StyleSpace, encode_noise_maps, noise_rows

log = logging.getLogger(__name__)
Say = Callable[[str], None]

LESION_CONCEPTS = ("exudate", "haemorrhage")
# The concept of the synthetic scene that each ground-truth factor changes.
FACTOR_CONCEPT = {"exudates": "exudate", "haemorrhages": "haemorrhage", "disc_x": "optic_disc",
                  "disc_y": "optic_disc", "vessel_angle": "vessel", "vessel_seed": "vessel",
                  "fundus_radius": "fundus", "brightness": "fundus", "hue": "fundus"}


@dataclass
class DissectSettings:
    """What a dissection measures and on how many images."""

    layers: Sequence[str] | None = None  # unit layers; None = every one
    num_images: int = 1000  # noise samples dissected (classes balanced)
    encoded_images: int = 200  # validation images dissected through the encoder (when there are any)
    quantile: float = 0.01  # unit threshold: top quantile of its activations
    iou_threshold: float = 0.05  # a unit is interpretable from this IoU on
    intervention_images: int = 128  # samples of every intervention measurement
    alpha_steps: int = 60  # Adam steps of the unit-set optimisation
    causal_units: int = 8  # size of a concept's causal unit set (classifier link, insertion)
    artifact_count: int = 20  # units ablated together in the artifact comparison
    seed: int = 0
    batch_size: int | None = None  # images per render; None = the dissection's default

    def __post_init__(self) -> None:
        if int(self.num_images) < 1:
            raise ValueError(f"the dissection needs at least one image, got num_images={self.num_images}")
        for name in ("intervention_images", "causal_units", "artifact_count"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.alpha_steps) < 0 or int(self.encoded_images) < 0:
            raise ValueError("alpha_steps and encoded_images must be >= 0")
        if not 0.0 < float(self.quantile) < 1.0:
            raise ValueError(f"the unit quantile must lie in (0, 1), got {self.quantile}")


# ============================================================================ concepts
def choose_segmenter(
    config: dict[str, Any],  # the run's resolved config
    classifier: nn.Module,
    class_names: Sequence[str],
    resolution: int,
    segmenter_path: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> Segmenter:
    """The concepts of a run: a given segmenter file, else the synthetic U-Net on synthetic runs,
    else the classifier's class evidence (Grad-CAM)."""
    if segmenter_path is not None:
        from stylex.dissect.segmenter import load_segmenter

        seg = load_segmenter(segmenter_path, device=device)
    else:
        dataset = config.get("dataset") or {}
        if str(dataset.get("_target_", "")).endswith("SyntheticDataModule"):
            from stylex.dissect.segmenter import synthetic_segmenter

            seg = synthetic_segmenter(resolution, lesion_scale=float(dataset.get("lesion_scale", 1.0)),
                                      device=device)
        else:
            from stylex.dissect.gradcam import ClassEvidence

            seg = ClassEvidence(classifier, class_names, resolution=resolution)
    if int(seg.resolution) != int(resolution):
        raise ValueError(f"the segmenter ({seg.source}) reads {seg.resolution}x{seg.resolution} images, the "
                         f"generator draws {resolution}x{resolution}: give a segmenter of the run's resolution")
    return seg


def concept_score(segmenter: Segmenter) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A differentiable share of every concept ``images -> [B, C]`` for the α optimisation: the
    softmax mass of each class for a network segmenter; None where there is none (Grad-CAM)."""
    from stylex.dissect.segmenter import NetworkSegmenter, normalise

    if not isinstance(segmenter, NetworkSegmenter) or segmenter.output != "logits":
        return None

    def score(images: torch.Tensor) -> torch.Tensor:
        x = normalise(images.to(segmenter.device, torch.float32), segmenter.normalisation)
        return segmenter.network(x).softmax(dim=1).mean(dim=(2, 3)).to(images.device)

    return score


def target_concepts(segmenter: Segmenter) -> list[str]:
    """The concepts interventions are measured for: the lesions where the segmenter knows them,
    otherwise every concept but a background."""
    lesions = [c for c in LESION_CONCEPTS if c in segmenter.concepts]
    return lesions or [c for c in segmenter.concepts if c not in ("background", "rest")]


# ============================================================================ the whole run
def dissect_export(
    exp: Any,  # stylex.export.Export (generator, encoder, classifier, class_names)
    out_dir: str | Path,
    segmenter: Segmenter,
    settings: DissectSettings | None = None,
    real_images: torch.Tensor | None = None,  # [M, 3, R, R] validation images (encoder path, realism)
    explanation: Path | None = None,  # the run's explanation.json: its attributes are localised
    device: torch.device | str = "cpu",
    say: Say | None = None,
    title: str = "StylEx dissection",
    artifacts: bool = True,  # rank artifact units (needs real_images)
) -> dict[str, Any]:  # what dissection.json holds
    """Dissect ``exp`` and write the report folder (module docstring)."""
    from stylex.dissect.report import write_dissection_report

    say = say or (lambda msg: None)
    s = settings or DissectSettings()
    device = torch.device(device)
    g, clf = exp.generator.to(device).eval(), exp.classifier.to(device).eval()
    space = StyleSpace(g)
    layers = check_layers(space, s.layers)  # a bad layer fails before any work
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    encoded = None
    if real_images is not None and s.encoded_images > 0:
        encoded = real_images[: s.encoded_images]
    layouts, noise_note = _layouts(exp.encoder, real_images, s, device, say)
    t = time.perf_counter()
    dis = dissect(space, segmenter, layers=layers, num_images=s.num_images, batch_size=s.batch_size,
                  quantile=s.quantile, iou_threshold=s.iou_threshold, seed=s.seed,
                  encoder_images=encoded, encoder=exp.encoder.to(device).eval() if encoded is not None else None,
                  classifier=_probabilities(clf) if encoded is not None else None, device=device,
                  noise=_cycled(layouts, s.num_images))
    timings["dissection"] = time.perf_counter() - t
    say(f"dissection of {len(layers)} layers over {dis.num_images + dis.num_encoded} images: "
        f"{timings['dissection']:.1f} s")

    # The intervention samples: noise latents of another seed, classes balanced.
    w, c = noise_latents(g, s.intervention_images, seed=s.seed + 1, device=device)
    styles = space.flat_styles(w, c).detach()
    noise = _cycled(layouts, styles.shape[0])
    t = time.perf_counter()
    interventions = {con: _intervene(space, styles, dis, segmenter, con, clf, exp.class_names, s, say, noise=noise)
                     for con in target_concepts(segmenter)}
    timings["intervention"] = time.perf_counter() - t

    artifact_json = None
    if artifacts and real_images is not None:
        t = time.perf_counter()
        layer = layers[len(layers) // 2]
        art = artifact_units(space, styles, layer, real_images.to(device), classifier=clf,
                             count=min(s.artifact_count, unit_counts(space)[layer]), seed=s.seed, noise=noise)
        artifact_json = art.to_json()
        timings["artifacts"] = time.perf_counter() - t
        fid = {k: (v or {}).get("fid") for k, v in art.realism.items()}
        if all(isinstance(v, float) for v in fid.values()):
            say(f"artifact units of {layer}: FID {fid['plain']:.1f} unablated, {fid['top']:.1f} with the top "
                f"{art.count} ablated, {fid['random']:.1f} with {art.count} random units")

    attributes = None
    if explanation is not None and Path(explanation).is_file():
        t = time.perf_counter()
        attributes = _localise(space, segmenter, dis, Path(explanation), exp, real_images, s, device, say,
                               layouts=layouts)
        timings["attributes"] = time.perf_counter() - t

    data = {
        "format": "stylex-dissection", "version": 1, "title": title,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "concept_source": segmenter.source,
        "settings": {**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(s).items()},
                     "layers": layers, "device": str(device)},
        "segmenter": _segmenter_record(segmenter),
        "noise_maps": noise_note,
        "dissection": dis.to_json(),
        "interventions": interventions,
        "artifacts": artifact_json,
        "attributes": attributes,
        "timings": {**timings, "total": time.perf_counter() - t0},
    }
    write_dissection_report(out_dir, data, space, dis, segmenter, styles, noise=noise)
    return data


def _layouts(
    encoder: nn.Module,
    real_images: torch.Tensor | None,  # [M, 3, R, R]
    s: DissectSettings,
    device: torch.device,
    say: Say,
) -> tuple[dict[str, torch.Tensor] | None, str | None]:  # the real images' noise maps [M, 1, r, r], a note
    """The encoder's noise maps of the real images (None for an encoder without noise maps), and
    what the report says about them."""
    if getattr(encoder, "noise_encoder", None) is None:
        return None, None
    if real_images is None:
        say("note: this generator takes its layouts from the encoder's noise maps of real images, and there "
            "are none: the samples are rendered with constant noise, without layouts")
        return None, "none: no real images for the samples' layouts (constant noise)"
    maps = encode_noise_maps(encoder.to(device).eval(), real_images, s.batch_size or 32, device)
    return maps, (f"the encoder's: encoded images their own, samples those of {real_images.shape[0]} "
                  "real images (sample i those of image i, cycling)")


def _cycled(
    layouts: NoiseMaps | None,  # [M, 1, r, r] per noise layer
    n: int,
) -> dict[str, torch.Tensor] | None:  # [n, 1, r, r]: row i holds the maps of image i % M
    if layouts is None:
        return None
    m = next(iter(layouts.values())).shape[0]
    return noise_rows(layouts, torch.arange(n) % m)


class _Probabilities(nn.Module):
    """The classifier's class probabilities (a stylex Classifier returns logits)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x).float().softmax(dim=1)


def _probabilities(classifier: nn.Module) -> nn.Module:
    return _Probabilities(classifier)


def _segmenter_record(segmenter: Segmenter) -> dict[str, Any]:
    out: dict[str, Any] = {"source": segmenter.source, "concepts": list(segmenter.concepts),
                           "resolution": int(segmenter.resolution)}
    iou = getattr(segmenter, "iou", None)
    if isinstance(iou, dict):
        out["held_out_iou"] = {k: float(v) for k, v in iou.items()}
        out["mean_iou"] = float(getattr(segmenter, "mean_iou", float("nan")))
    return out


def _best_layer(dis: Dissection, concept: str) -> str:
    """The layer holding the unit with the highest IoU for ``concept``."""
    c = dis.concept_index(concept)
    return max(dis.layers, key=lambda name: float(dis.layers[name].iou[:, c].max()))


def _intervene(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S]
    dis: Dissection,
    segmenter: Segmenter,
    concept: str,
    classifier: nn.Module,
    class_names: Sequence[str],
    s: DissectSettings,
    say: Say,
    noise: NoiseMaps | None = None,  # the samples' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> dict[str, Any]:
    """Every causal measurement of one concept on its best layer."""
    layer = _best_layer(dis, concept)
    c = dis.concept_index(concept)
    ld = dis.layers[layer]
    width = ld.iou.shape[0]
    out: dict[str, Any] = {"layer": layer, "units": width}
    effects = unit_effects(space, styles, layer, segmenter, concepts=[concept], progress=False, noise=noise)
    ace_rank = effects.ranking(concept)
    out["ace"] = {"base_share": float(effects.base_share[0]),
                  "top": [{"unit": int(u), "ace": float(effects.ace[int(u), 0])} for u in ace_rank[:10]]}
    rankings = {"ace": ace_rank, "iou": torch.argsort(ld.iou[:, c], descending=True, stable=True)}
    score = concept_score(segmenter)
    if score is not None and s.alpha_steps > 0:
        unit_set = optimise_unit_set(space, styles, layer, segmenter, concept, concept_score=score,
                                     steps=s.alpha_steps, seed=s.seed, progress=False, noise=noise)
        rankings = {"alpha": unit_set.ranking(), **rankings}
        out["alpha"] = {"top": [{"unit": int(u), "alpha": float(unit_set.alpha[int(u)])}
                                for u in unit_set.ranking()[:10]],
                        "objective": float(unit_set.objective[-1]) if unit_set.objective else None}
    else:
        out["alpha"] = None
    curve = ablation_curve(space, styles, layer, segmenter, concept, rankings, seed=s.seed, progress=False,
                           noise=noise)
    out["curve"] = curve.to_json()
    causal = torch.as_tensor(rankings.get("alpha", ace_rank), dtype=torch.long)[: min(s.causal_units, width)]
    k = torch.nan_to_num(ld.conditional_mean[:, c].float(), nan=0.0)
    values = k[causal]
    res = int(segmenter.resolution)
    gen = torch.Generator().manual_seed(s.seed)
    locations = (torch.rand(styles.shape[0], 2, 2, generator=gen) * (res / 2) + res / 4).round()
    ins = insert_at_locations(space, styles, layer, causal, values, segmenter, concept, locations,
                              tolerance=max(1.0, res / 16), progress=False, noise=noise)
    # Trials are the locations where the concept was absent before; there may be none.
    out["insertion"] = {"units": causal.tolist(), "success_rate": ins.success_rate if ins.trials else None,
                        "trials": ins.trials, "successes": ins.successes}
    removed = classifier_effect(space, styles, layer, causal, _probabilities(classifier), output="probabilities",
                                class_names=list(class_names), progress=False, noise=noise)
    inserted = classifier_effect(space, styles, layer, causal, _probabilities(classifier), values=values,
                                 output="probabilities", class_names=list(class_names), progress=False, noise=noise)
    out["classifier"] = {"ablation": removed.to_json(), "insertion": inserted.to_json()}
    left = {name: curve.remaining[name][0] for name in curve.remaining}
    say(f"{concept} on {layer}: one unit removes " + ", ".join(
        f"{name} {1 - v:.0%}" for name, v in left.items() if v is not None and math.isfinite(v))
        + (f"; insertion succeeds {ins.success_rate:.0%}" if ins.trials else "; no location to insert at")
        + f"; ablating {len(causal)} units changes "
        + ", ".join(f"p({n}) {d:+.3f}" for n, d in zip(class_names, removed.delta.tolist())))
    return out


def _localise(space, segmenter, dis, explanation: Path, exp, real_images, s, device, say,
              layouts: NoiseMaps | None = None) -> dict[str, Any] | None:
    """Localise the attributes of ``explanation.json`` and write "acts on" back into it
    (``layouts``: the real images' noise maps, each image's own in its renders)."""
    try:
        data = json.loads(explanation.read_text())
    except (OSError, ValueError) as e:
        say(f"note: cannot read {explanation} ({e}); attributes not localised")
        return None
    ranked = [(name, a) for name, cls in (data.get("classes") or {}).items() for a in cls.get("attributes", [])]
    if not ranked:
        return None
    noise = None
    if real_images is not None:  # AttFind explained encoded validation images: localise on those
        w, c = encoder_latents(exp.encoder.to(device).eval(), _probabilities(exp.classifier), real_images[:64],
                               batch_size=32, device=device)
        noise = noise_rows(layouts, slice(0, 64))
    else:
        w, c = noise_latents(exp.generator, 64, seed=s.seed + 2, device=device)
    flat = space.flat_styles(w, c).detach()
    stats = space.statistics(flat)
    shift = float((data.get("settings") or {}).get("shift_size", 1.0))

    class _Attr:  # AttFind's attribute as localise_attributes reads it
        def __init__(self, a):
            self.layer, self.channel = a["layer"], int(a["channel"])
            self.direction = 1 if a["direction"] == "increase" else 0

    found = localise_attributes(space, segmenter, flat, [_Attr(a) for _, a in ranked],
                                extremes=(stats["min"], stats["max"]), shift_size=shift, dissection=dis,
                                keep_maps=False, progress=False, device=device, noise=noise)
    gt = (data.get("ground_truth") or {}).get("classes") or {}
    rows, agree, judged = [], 0, 0
    for (name, a), loc in zip(ranked, found):
        row = {"class": name, "rank": a["rank"], **loc.to_dict()}
        factors = (gt.get(name) or {}).get("factors") or []
        factor = factors[a["rank"] - 1] if len(factors) >= a["rank"] else None
        if factor is not None:
            row["factor"] = factor
            row["factor_concept"] = FACTOR_CONCEPT.get(factor)
            if row["factor_concept"] is not None and row["acts_on"] is not None:
                judged += 1
                agree += int(row["factor_concept"] == row["acts_on"])
        rows.append(row)
        a["acts_on"] = loc.acts_on.removeprefix("acts on: ")
        a["acts_on_iou"] = {k: round(v, 4) for k, v in row["effect_iou"].items()}
    _write_back(explanation, data)
    out = {"explanation": str(explanation), "attributes": rows, "ground_truth_judged": judged,
           "ground_truth_agreement": agree / judged if judged else None}
    say("attributes: " + "; ".join(f"{r['class']} #{r['rank']} {r['layer']}[{r['channel']}] "
                                   f"acts on {r['acts_on']}" for r in rows))
    return out


def _write_back(path: Path, data: dict[str, Any]) -> None:
    """The explanation, with "acts on" per attribute, in its JSON and on its page."""
    from stylex.explain.html_page import render_html
    from stylex.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(path, data)
    html_file = path.parent / ((data.get("files") or {}).get("html") or "report.html")
    try:
        atomic_write_text(html_file, render_html(data, path.parent, json_file=path.name))
    except (OSError, KeyError) as e:  # an explanation of another version: its JSON still has the figures
        log.warning("could not re-render %s (%s)", html_file, e)
