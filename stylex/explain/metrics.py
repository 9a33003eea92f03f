"""How good is an explanation? Sufficiency (flip rate) and agreement between two searches.

Sufficiency / flip rate
    For every image take its top-k attributes, change them together (each coordinate moved to
    its AttFind target in its direction) and check whether the classifier's predicted class of
    the render changes. The flip rate at k is the share of images that flip. AttFind's
    image-specific ranking is compared with two rankings measured on the same images that never
    ask the classifier: ``random`` coordinates and coordinates ranked by their style
    ``variance`` over the image set. A baseline coordinate is moved toward whichever extreme is
    farther from the image's value (a choice that needs no classifier either).

Beside the flip rate (a flip won by leaving the data manifold is no explanation)
    - realism: KID (:mod:`stylex.metrics.realism`, the classifier's features, or those of the
      run's ``classifier.feature_checkpoint`` network when it has one) against real
      images of the renders with AttFind's top-k attributes applied (k = the curve's largest),
      next to the KID of the unedited renders of the same images. Edits that push renders off
      the data manifold show as a higher edited KID;
    - agreement: the share of unedited renders whose predicted class equals the prediction on
      the real input they were encoded from (only where real inputs exist; generated sources
      have none, which the figures say).

Agreement
    How well one search (e.g. a pre-screened one) reproduces another (the exhaustive search of
    the same images): overlap of the top-k lists and equality of the first attribute, for the
    class and the image rankings.

Ground truth on the synthetic data set (recovery / purity) is in
:mod:`stylex.explain.factors`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from stylex.explain.evaluator import EffectEvaluator
from stylex.explain.measures import apply_edits, farther_direction
from stylex.explain.result import AttFindResult
from stylex.metrics.realism import ClassifierFeatures, kid_against
from stylex.stylespace import NoiseMaps, noise_rows

BASELINES = ("random", "variance")
MIN_KID_IMAGES = 8  # images per side below which a KID is not worth reporting


# ============================================================================ rankings to compare
def attfind_rankings(
    result: AttFindResult,
    kmax: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # coords, dirs: [N, kmax] (-1 where fewer were ranked)
    """AttFind's image-specific rankings (away from each image's predicted class)."""
    n = result.num_images
    coords = torch.full((n, kmax), -1, dtype=torch.long)
    dirs = torch.zeros((n, kmax), dtype=torch.long)
    for i in range(n):
        for j, (c, d, _) in enumerate(result.image_topk(i, kmax)):
            coords[i, j], dirs[i, j] = c, d
    return coords, dirs


def random_rankings(
    flat: torch.Tensor,  # [N, S]
    targets: torch.Tensor,  # [N, S, 2]
    kmax: int,
    seed: int = 0,
    searched: torch.Tensor | None = None,  # [S] bool: the coordinates drawn from; None = all
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, kmax] each
    """Distinct random coordinates per image (among ``searched``), each moved toward its farther
    extreme."""
    n, s = flat.shape
    gen = torch.Generator().manual_seed(int(seed))
    draw = torch.rand(n, s, generator=gen)
    if searched is not None:
        draw[:, ~searched] = 2.0  # sorted after every searched coordinate
    coords = torch.argsort(draw, dim=1)[:, :kmax]
    return coords, farther_direction(flat, targets).gather(1, coords)


def variance_rankings(
    flat: torch.Tensor,  # [N, S]
    targets: torch.Tensor,  # [N, S, 2]
    kmax: int,
    std: torch.Tensor | None = None,  # [S] style standard deviation; None = over `flat`
    searched: torch.Tensor | None = None,  # [S] bool: the coordinates drawn from; None = all
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, kmax] each
    """The same kmax coordinates for every image: those (among ``searched``) whose style varies
    most over the image set, each moved toward its farther extreme."""
    n, s = flat.shape
    std = (flat.std(dim=0, correction=0) if std is None else std).clone()
    if searched is not None:
        std[~searched] = -1.0  # sorted after every searched coordinate
    order = torch.argsort(std, descending=True, stable=True)[:kmax]
    coords = order.expand(n, -1).clone()
    return coords, farther_direction(flat, targets).gather(1, coords)


# ============================================================================ flip rate
@torch.no_grad()
def flip_rates(
    evaluator: EffectEvaluator,
    flat: torch.Tensor,  # [N, S]
    targets: torch.Tensor,  # [N, S, 2]
    coords: torch.Tensor,  # [N, kmax] ranked coordinates per image (-1 = none)
    dirs: torch.Tensor,  # [N, kmax]
    ks: Sequence[int],  # e.g. 1..10
    base_pred: torch.Tensor | None = None,  # [N] predicted class of the unedited renders
    noise: NoiseMaps | None = None,  # the images' own noise maps; None = the evaluator's noise_mode
) -> list[float]:  # flip rate for each k
    """Share of images whose predicted class changes when their first k attributes change
    together, for each k."""
    n = flat.shape[0]
    device = evaluator.device
    if base_pred is None:
        base_pred = evaluator.log_probs(flat.to(device), noise).argmax(dim=1).cpu()
    rows = []
    for k in ks:
        c = coords[:, :k].clone()
        rows.append(apply_edits(flat, targets, c, dirs[:, :k]))
    edited = torch.cat(rows)  # [len(ks) * N, S]
    maps = noise_rows(noise, torch.arange(n).repeat(len(ks)))  # every edit keeps its image's maps
    pred = evaluator.log_probs(edited.to(device), maps).argmax(dim=1).cpu().view(len(ks), n)
    return [float((pred[j] != base_pred).double().mean()) for j in range(len(ks))]


@dataclass
class Sufficiency:
    """Flip-rate curves of AttFind and the baselines over the same images, with the realism of
    the edited renders and the agreement of the unedited ones beside them."""

    ks: list[int]
    curves: dict[str, list[float]]  # "attfind" | "random" | "variance" -> flip rate per k
    num_images: int
    seconds: float = 0.0
    # {"feature", "k", "num_real", "num_images", "kid_unedited", "kid_unedited_std", "kid_edited",
    #  "kid_edited_std", "kid_subset_size"}; None when not measured (see notes)
    realism: dict[str, Any] | None = None
    agreement: float | None = None  # share of unedited renders predicted as their real input
    notes: list[str] = field(default_factory=list)  # why a figure is missing

    def to_dict(self) -> dict[str, Any]:
        return {"k": list(self.ks), **{name: list(v) for name, v in self.curves.items()},
                "num_images": self.num_images, "seconds": self.seconds, "realism": self.realism,
                "agreement": self.agreement, "notes": list(self.notes)}


@torch.no_grad()
def _render(
    evaluator: EffectEvaluator,
    flat: torch.Tensor,  # [N, S]
    noise: NoiseMaps | None = None,  # the images' own noise maps
) -> torch.Tensor:  # [N, 3, R, R] on the CPU
    """Renders as the classifier sees them in the flip rate (not clamped: out-of-range pixels
    are part of what an edit does)."""
    b = evaluator.batch_size
    out = [evaluator.render(flat[i : i + b].to(evaluator.device), noise_rows(noise, slice(i, i + b))).float().cpu()
           for i in range(0, flat.shape[0], b)]
    return torch.cat(out)


@torch.no_grad()
def manifold_figures(
    evaluator: EffectEvaluator,
    flat: torch.Tensor,  # [N, S] styles of the measured images
    edited: torch.Tensor,  # [N, S] the same with the top-k attributes applied
    base_pred: torch.Tensor,  # [N] predicted class of the unedited renders
    k: int,  # attributes applied
    inputs: torch.Tensor | None = None,  # [N, 3, R, R] the real inputs of these images (None: generated)
    real_images: torch.Tensor | None = None,  # [M, 3, R, R] KID's real set (None: `inputs`)
    seed: int = 0,
    feature_classifier: torch.nn.Module | None = None,  # KID's features (None: the explained classifier's)
    noise: NoiseMaps | None = None,  # the images' own noise maps; None = the evaluator's noise_mode
) -> tuple[dict[str, Any] | None, float | None, list[str]]:  # realism, agreement, notes
    """KID of the unedited and the edited renders against real images, and the agreement of the
    unedited renders with their real inputs (see the module docstring)."""
    notes: list[str] = []
    agreement = None
    if inputs is None:
        notes.append("no real inputs given (generated samples have none): agreement not measured")
    elif inputs.shape[0] != flat.shape[0]:
        raise ValueError(f"{inputs.shape[0]} real inputs for {flat.shape[0]} images")
    elif flat.shape[0]:
        preds = torch.cat([evaluator.classify(inputs[i : i + 256].to(evaluator.device)).argmax(1).cpu()
                           for i in range(0, inputs.shape[0], 256)])
        agreement = float((preds == base_pred.cpu()).double().mean())
    real = real_images if real_images is not None else inputs
    if real is None:
        notes.append("no real images given to compare the renders with: KID not measured")
        return None, agreement, notes
    if min(real.shape[0], flat.shape[0]) < MIN_KID_IMAGES:
        notes.append(f"KID needs at least {MIN_KID_IMAGES} real and {MIN_KID_IMAGES} explained images "
                     f"(have {real.shape[0]} and {flat.shape[0]}): not measured")
        return None, agreement, notes
    resolution = int(getattr(evaluator.generator, "resolution", real.shape[-1]))
    if feature_classifier is None:
        features = ClassifierFeatures(evaluator.classifier, resolution)
    else:
        features = ClassifierFeatures(feature_classifier.to(evaluator.device), resolution, "feature-net")
    kid = kid_against(features, real.to(evaluator.device),
                      {"unedited": _render(evaluator, flat, noise), "edited": _render(evaluator, edited, noise)}, seed=seed)
    realism = {"feature": features.name, "k": int(k), "num_real": int(real.shape[0]), "num_images": int(flat.shape[0]),
               "kid_unedited": kid["unedited"]["kid"], "kid_unedited_std": kid["unedited"]["kid_std"],
               "kid_edited": kid["edited"]["kid"], "kid_edited_std": kid["edited"]["kid_std"],
               "kid_subset_size": kid["edited"]["kid_subset_size"]}
    return realism, agreement, notes


def sufficiency(
    result: AttFindResult,
    evaluator: EffectEvaluator,
    ks: Iterable[int] = range(1, 11),
    seed: int = 0,
    stable_only: bool = True,  # measure on the images AttFind kept
    inputs: torch.Tensor | None = None,  # [N, 3, R, R] real images the result's styles encode (None: generated)
    real_images: torch.Tensor | None = None,  # [M, 3, R, R] KID's real set (None: `inputs`)
    realism: bool = True,  # measure KID and agreement beside the flip rates
    feature_classifier: torch.nn.Module | None = None,  # KID's features (None: the explained classifier's)
) -> Sufficiency:
    """Flip rate against k for AttFind's image rankings, random coordinates and style variance,
    with the KID of the top-k edited and of the unedited renders and the agreement beside it."""
    t0 = time.perf_counter()
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive numbers of attributes, got {ks}")
    kmax = min(max(ks), int(result.searched.sum()))
    ks = [k for k in ks if k <= kmax]
    keep = torch.nonzero(result.stable if stable_only else torch.ones_like(result.stable)).flatten()
    flat, targets = result.flat[keep], result.targets[keep]
    noise = noise_rows(result.noise, keep)
    base_pred = result.predicted[keep]
    std = result.flat.std(dim=0, correction=0)
    a_coords, a_dirs = attfind_rankings(result, kmax)
    rankings = {
        "attfind": (a_coords[keep], a_dirs[keep]),
        "random": random_rankings(flat, targets, kmax, seed, result.searched),
        "variance": variance_rankings(flat, targets, kmax, std, result.searched),
    }
    curves = {name: flip_rates(evaluator, flat, targets, c, d, ks, base_pred, noise)
              for name, (c, d) in rankings.items()}
    out = Sufficiency(ks=ks, curves=curves, num_images=int(keep.numel()))
    if realism:
        c, d = rankings["attfind"]
        edited = apply_edits(flat, targets, c[:, :kmax].clone(), d[:, :kmax])
        out.realism, out.agreement, out.notes = manifold_figures(
            evaluator, flat, edited, base_pred, kmax, inputs=inputs[keep] if inputs is not None else None,
            real_images=real_images, seed=seed, feature_classifier=feature_classifier, noise=noise)
    out.seconds = time.perf_counter() - t0
    return out


def summarize_curve(values: Sequence[float]) -> float:
    """Area under a flip-rate curve, normalised to [0, 1] (the mean over k)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


# ============================================================================ comparing two searches
def agreement(
    approx: AttFindResult,  # e.g. a pre-screened search
    exact: AttFindResult,  # the exhaustive search of the same images
    k: int | None = None,  # top-k compared (default: the smaller top_k of the two)
) -> dict[str, float]:
    """How well ``approx`` reproduces ``exact``:

    - ``class_overlap``: mean over classes of |top-k(approx) ∩ top-k(exact)| / k, pairs compared
      as (coordinate, direction);
    - ``class_top1``: share of classes whose first attribute is the same;
    - ``image_overlap`` / ``image_top1``: the same for the image-specific rankings, averaged over
      images.
    """
    k = int(k or min(approx.top_k, exact.top_k))
    classes = [c for c in exact.classes if c in approx.rankings]
    overlap, top1 = [], []
    for c in classes:
        a = [x.pair for x in approx.rankings[c][:k]]
        e = [x.pair for x in exact.rankings[c][:k]]
        overlap.append(len(set(a) & set(e)) / max(1, len(e)))
        top1.append(float(bool(a) and bool(e) and a[0] == e[0]))
    img_overlap, img_top1 = [], []
    for n in range(exact.num_images):
        a = [(i, d) for i, d, _ in approx.image_topk(n, k)]
        e = [(i, d) for i, d, _ in exact.image_topk(n, k)]
        img_overlap.append(len(set(a) & set(e)) / max(1, len(e)))
        img_top1.append(float(bool(a) and bool(e) and a[0] == e[0]))

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    return {"k": k, "class_overlap": mean(overlap), "class_top1": mean(top1),
            "image_overlap": mean(img_overlap), "image_top1": mean(img_top1)}


# Global image changes that carry no class in a data set whose classes differ by local structures
# (lesions, spots): each is (name, function of images in [-1, 1]).
PHOTOMETRIC_SHIFTS: tuple[tuple[str, Any], ...] = (
    ("darker by 0.2", lambda x: x - 0.2),
    ("brighter by 0.2", lambda x: x + 0.2),
    ("contrast x 0.7", lambda x: x * 0.7),
    ("yellow tint 0.2", lambda x: x + x.new_tensor([0.2, 0.2, -0.1])[None, :, None, None]),
    ("pixel noise 0.1", lambda x: x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)),
)


@torch.no_grad()
def photometric_sensitivity(
    classifier: torch.nn.Module,  # images in [-1, 1] -> logits [B, K]
    images: torch.Tensor,  # [N, 3, R, R] in [-1, 1]
    shifts: Sequence[tuple[str, Any]] = PHOTOMETRIC_SHIFTS,
    batch_size: int = 256,
) -> dict[str, float]:  # shift name -> share of images whose predicted class changes
    """How often the classifier's prediction changes under global brightness, contrast, tint and
    noise changes of the images (clamped to [-1, 1]). A classifier that flips under them can be
    moved by a generator that changes the whole image's colour instead of drawing what the
    classes differ by; an explanation of it then truly ranks colour."""
    weight = next(iter(classifier.parameters()), None)
    device = weight.device if weight is not None else images.device

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([classifier(x[i : i + batch_size].clamp(-1, 1).to(device)).argmax(1).cpu()
                          for i in range(0, x.shape[0], batch_size)])

    images = images.float().cpu()
    before = predict(images)
    return {name: float((predict(fn(images)) != before).float().mean()) for name, fn in shifts}
