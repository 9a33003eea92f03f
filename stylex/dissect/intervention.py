"""Interventions on units: ablation, insertion, causal effects, unit sets, artifact units.

The causal half of GAN Dissection (Bau et al., ICLR 2019), on the units of
:mod:`stylex.dissect.base` (channels of a synthesis conv layer's output).

Intervention. Let ``x in R^{C x h x w}`` be the output of a unit layer. An intervention is a triple
``(alpha, k, m)``: per-unit strengths ``alpha in [0, 1]^C``, per-unit values ``k in R^C`` and a
region ``m in [0, 1]^{h x w}``; it replaces the output by::

    x'[u, i, j] = (1 - alpha_u m_ij) x[u, i, j] + alpha_u m_ij k_u

- ablation of a unit set ``U``: ``alpha = 1_U``, ``k = 0``; insertion: ``alpha = 1_U``,
  ``k_u = k_{u,c}`` (e.g. the mean activation of ``u`` where concept ``c`` is present);
- everywhere: ``m = 1``; inside a region ``P`` given at image resolution: ``m = resize(P)`` to the
  layer's ``h x w``, by ``"nearest"`` (each layer cell takes the image pixel nearest its centre, so
  ``m`` stays binary and the edit is a hard replacement) or ``"area"`` (``m`` = the share of the
  cell's pixels inside ``P``, so partly covered cells are blended);
- the soft form with ``alpha`` in ``[0, 1]^C`` is the one the unit-set optimisation moves.

Average causal effect (ACE) of intervening on ``U`` on concept ``c``::

    delta_{U -> c} = E_z[ s_c(G(z) with U intervened) ] - E_z[ s_c(G(z)) ]

where ``s_c(image)`` is the share of pixels the segmenter labels ``c``. Ablating a unit that
draws ``c`` gives a negative ACE; :class:`UnitEffects` ranks ablations most negative first and
insertions most positive first. Single-unit ACEs render, for each image batch, one intervened copy
per unit, all in one batch, resuming from the unit layer when the generator supports prefix
reuse.

Unit sets by optimisation. With a differentiable soft share ``s~_c`` (the segmenter's
``probabilities(images) -> [B, C, H, W]`` averaged over pixels, or a ``concept_score(images) ->
[B, C]`` callable), projected Adam on ``alpha in [0, 1]^C`` minimises::

    ablation:   E[ s~_c(G_alpha(z)) ] + lambda ||alpha||^2     (k = 0: remove c)
    insertion: -E[ s~_c(G_alpha(z)) ] + lambda ||alpha||^2     (k = k_{.,c}: draw c)

(``-delta_{alpha -> c} + lambda ||alpha||^2`` up to a constant), clamping ``alpha`` to ``[0, 1]``
after each step; units are ranked by ``alpha*`` (ties by the pull ``-/+ d E[s~_c] / d alpha_u``
at ``alpha*``).

Ablation curve. ``r_c(n) = E[s_c(G(z) with the top n units ablated)] / E[s_c(G(z))]``, the share
of ``c`` pixels left, for ``n = 1, 2, 4, ..., 64`` (capped at the layer width) and any number of
rankings (by ``alpha*``, by ACE, by IoU, ...), against random rankings (a mean over seeded draws).

Insertion at a location. Insert a unit set with values ``k`` in a square of ``(2 size + 1)^2``
layer cells around the cell of image pixel ``(x, y)``; a trial counts when the segmenter found no
``c`` in the check area before (the region at image resolution, or the pixels within ``r`` of
``(x, y)``), and succeeds when it finds ``c`` there afterwards.

Classifier link. ``Delta p_k = E[p_k(G(z) intervened)] - E[p_k(G(z))]`` for every class ``k`` of
the frozen classifier.

Artifact units. A full FID per unit is too costly, so the per-unit score is the drop of a cheap
distance when the unit is ablated: the Frechet distance between *diagonal* Gaussians fitted to the
classifier features (the features of :mod:`stylex.metrics.realism`) of generated and real images,
``d = ||mu_g - mu_r||^2 + sum_j (sigma_g,j - sigma_r,j)^2`` (FID without the cross-covariances:
no matrix square root, and stable on the few images a per-unit score can afford). The units whose
ablation lowers ``d`` most are the artifact units; FID and KID (torchmetrics, through
:class:`~stylex.metrics.realism.RealismMeter`) with the top ones ablated are reported against the
same number of random units.

Styles are flat StyleSpace styles ``[N, S]``; every render uses ``noise_mode="const"``; results
are plain dataclasses (CPU tensors) with ``to_json()``. Thresholds, IoU rankings and insertion
values ``k_{u,c}`` come from unit dissection as plain tensors / lists.

Typical use::

    effects = unit_effects(space, flat, "b16.conv1", segmenter)          # single-unit ACE
    units = effects.ranking("tree")[:8]                                  # most negative first
    with space.trace(edit=ablation_edit(space, "b16.conv1", units, region=mask)):
        img = space.render(flat[:4])                                     # trees removed in `mask`
    found = optimise_unit_set(space, flat, "b16.conv1", segmenter, "tree")   # alpha*
    curve = ablation_curve(space, flat, "b16.conv1", segmenter, "tree",
                           {"alpha": found.ranking(), "ace": effects.ranking("tree"), "iou": iou_order})
    link = classifier_effect(space, flat, "b16.conv1", found.top(8), classifier)   # Delta p per class
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from stylex.dissect.base import Segmenter, check_layers, unit_counts
from stylex.stylespace import StyleSpace

EditFn = Callable[[torch.Tensor], torch.Tensor]  # a layer's output -> its replacement (same shape)
ConceptScore = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, R, R] -> soft shares [B, concepts]
Measure = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (images, g, n) -> [M, ...]

RESIZE_MODES = ("nearest", "area")
MODES = ("ablation", "insertion")
CLASSIFIER_OUTPUTS = ("auto", "probabilities", "logits")


# ============================================================================ checks
def layer_width(
    space: StyleSpace,
    layer: str,  # a unit layer (a synthesis conv layer's StyleSpace name)
) -> int:
    """The number of units of ``layer`` (a ValueError lists the unit layers if it is none)."""
    check_layers(space, [layer])
    return unit_counts(space)[layer]


def check_units(
    space: StyleSpace,
    layer: str,
    units: Sequence[int] | torch.Tensor,  # channels of `layer`
) -> torch.Tensor:  # [U] int64, on the CPU
    """``units`` as an index tensor, checked: non-empty, in range, no repeats."""
    width = layer_width(space, layer)
    idx = torch.as_tensor(units).reshape(-1)
    if idx.numel() == 0:
        raise ValueError(f"no units given for layer {layer!r}; give at least one channel in 0..{width - 1}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"units must be integer channel indices, got {idx.dtype}")
    idx = idx.long().cpu()
    bad = [int(u) for u in idx if not 0 <= int(u) < width]
    if bad:
        raise ValueError(f"unit index {bad} out of range: layer {layer!r} has {width} units (0..{width - 1})")
    if len(set(idx.tolist())) != idx.numel():
        raise ValueError(f"units {idx.tolist()} repeat a channel; give each unit once")
    return idx


def concept_index(
    segmenter: Segmenter,
    concept: str,
) -> int:
    """The position of ``concept`` in ``segmenter.concepts`` (a ValueError lists them if absent)."""
    concepts = list(segmenter.concepts)
    if concept not in concepts:
        raise ValueError(f"unknown concept {concept!r}; the segmenter ({segmenter.source}) knows {concepts}")
    return concepts.index(concept)


def check_region(
    region: torch.Tensor,  # [R, R] or [B, R, R], bool or in [0, 1]
    resolution: int,  # the image side R
    batch: int | None = None,  # the number of images a per-image region must cover
) -> torch.Tensor:  # float [1 or B, R, R] in [0, 1]
    """A region at image resolution as a float mask with a batch dimension."""
    if not isinstance(region, torch.Tensor):
        raise ValueError(f"a region must be a tensor [H, W] or [B, H, W], got {type(region).__name__}")
    shape = tuple(region.shape)
    if region.ndim not in (2, 3) or shape[-2:] != (resolution, resolution):
        want = f"[{resolution}, {resolution}] or [batch, {resolution}, {resolution}]"
        raise ValueError(f"a region must have shape {want} (the image resolution), got {shape}")
    if region.ndim == 3 and batch is not None and region.shape[0] not in (1, batch):
        raise ValueError(f"a per-image region must have one mask per image: {batch}, got {region.shape[0]}")
    r = region.float() if region.dtype == torch.bool else region.to(torch.float32)
    if r.numel() and (r.min() < 0 or r.max() > 1):
        raise ValueError("a region must be boolean or hold values in [0, 1]")
    return r if r.ndim == 3 else r[None]


def _check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_styles(space: StyleSpace, styles: torch.Tensor) -> torch.Tensor:
    if not isinstance(styles, torch.Tensor) or styles.ndim != 2 or styles.shape[1] != space.dim:
        shape = tuple(styles.shape) if isinstance(styles, torch.Tensor) else type(styles).__name__
        raise ValueError(f"styles must be flat StyleSpace styles [N, {space.dim}], got {shape}")
    if styles.shape[0] == 0:
        raise ValueError("no styles given: interventions need at least one image")
    return styles.detach()


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def _device(space: StyleSpace) -> torch.device:
    g = space.generator
    for t in (*g.parameters(), *g.buffers()):
        return t.device
    return torch.device("cpu")


def _resolution(space: StyleSpace) -> int:
    return int(space.generator.resolution)


# ============================================================================ the edit itself
def fit_mask(
    mask: torch.Tensor,  # [B or 1, 1, H, W] in [0, 1]
    size: tuple[int, int],  # the layer's (h, w)
    resize: str = "nearest",  # "nearest" | "area"
) -> torch.Tensor:  # [B or 1, 1, h, w] in [0, 1]
    """A region resized to a layer's resolution: ``"nearest"`` samples the pixel nearest each
    cell's centre (binary stays binary); ``"area"`` gives each cell the share of its pixels inside
    the region."""
    _check_resize(resize)
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if resize == "nearest":
        return F.interpolate(mask, size=size, mode="nearest-exact")
    return F.adaptive_avg_pool2d(mask, size)


def _per_channel(
    v: float | torch.Tensor,  # scalar, [C] or [B, C]
    x: torch.Tensor,  # [B, C, h, w]
    what: str,
) -> torch.Tensor:  # [1 or B, C, 1, 1]
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    b, c = x.shape[:2]
    if v.ndim == 0:
        return v.expand(1, c)[:, :, None, None]
    if v.shape == (c,):
        return v[None, :, None, None]
    if v.shape == (b, c):
        return v[:, :, None, None]
    raise ValueError(f"{what} must be a scalar, [{c}] or [{b}, {c}] for a layer output {tuple(x.shape)}, "
                     f"got {tuple(v.shape)}")


def _layer_mask(
    mask: torch.Tensor | None,  # [B or 1, 1, H, W] in [0, 1]
    x: torch.Tensor,  # [B, C, h, w]
    resize: str,
) -> torch.Tensor | None:  # [B or 1, 1, h, w]
    if mask is None:
        return None
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"the intervention mask must be [1 or {x.shape[0]}, 1, H, W] for a layer output "
                         f"{tuple(x.shape)}, got {tuple(mask.shape)}")
    return fit_mask(mask.to(x.device), tuple(x.shape[-2:]), resize).to(x.dtype)


def soft_intervene(
    x: torch.Tensor,  # [B, C, h, w] a unit layer's output
    alpha: torch.Tensor,  # [C] or [B, C] strengths in [0, 1]
    values: float | torch.Tensor = 0.0,  # k: scalar, [C] or [B, C] (0 = ablation)
    mask: torch.Tensor | None = None,  # [B or 1, 1, H, W] region in [0, 1]; None = everywhere
    resize: str = "nearest",  # how a mask at another resolution is fitted to (h, w)
) -> torch.Tensor:  # [B, C, h, w]
    """``x' = (1 - alpha m) x + alpha m k`` (differentiable in ``alpha``)."""
    a = _per_channel(alpha, x, "alpha")
    k = _per_channel(values, x, "values")
    m = _layer_mask(mask, x, resize)
    if m is not None:
        a = a * m
    return (1 - a) * x + a * k


def hard_intervene(
    x: torch.Tensor,  # [B, C, h, w] a unit layer's output
    units: torch.Tensor,  # [U] int64 channels
    values: float | torch.Tensor = 0.0,  # scalar or [U]: the value each unit is set to (0 = ablation)
    mask: torch.Tensor | None = None,  # [B or 1, 1, H, W] region (bool or in [0, 1]); None = everywhere
    resize: str = "nearest",  # how a mask at another resolution is fitted to (h, w)
) -> torch.Tensor:  # [B, C, h, w]
    """Set ``units`` to ``values`` everywhere or inside the region (cells partly inside an
    ``"area"``-resized region are blended by their coverage)."""
    units = units.to(x.device)
    k = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    if k.ndim == 0:
        k = k.expand(units.numel())
    if k.shape != (units.numel(),):
        raise ValueError(f"values must be a scalar or [{units.numel()}] (one per unit), got {tuple(k.shape)}")
    k = k[None, :, None, None]
    out = x.clone()
    m = _layer_mask(mask, x, resize)
    if m is None:
        out[:, units] = k.expand(x.shape[0], -1, *x.shape[2:])
    elif bool(((m == 0) | (m == 1)).all()):
        out[:, units] = torch.where(m.bool(), k, x[:, units])
    else:
        out[:, units] = (1 - m) * x[:, units] + m * k
    return out


def _region_for_batch(
    region: torch.Tensor | None,  # float [1 or N, R, R]
    x: torch.Tensor,  # [B, C, h, w]
) -> torch.Tensor | None:  # [1 or B, 1, R, R]
    if region is None:
        return None
    if region.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"the region holds {region.shape[0]} masks but the render has {x.shape[0]} images; give "
                         f"one mask [H, W] or one per image")
    return region[:, None]


def ablation_edit(
    space: StyleSpace,
    layer: str,  # a unit layer
    units: Sequence[int] | torch.Tensor,  # channels to ablate
    region: torch.Tensor | None = None,  # [R, R] or [B, R, R] at image resolution; None = everywhere
    resize: str = "nearest",  # "nearest" | "area" (see fit_mask)
) -> dict[str, EditFn]:
    """``{layer: fn}`` for ``space.trace(edit=...)``: ``units`` set to 0 (inside ``region``)."""
    return insertion_edit(space, layer, units, 0.0, region, resize)


def insertion_edit(
    space: StyleSpace,
    layer: str,  # a unit layer
    units: Sequence[int] | torch.Tensor,  # channels to set
    values: float | Sequence[float] | torch.Tensor,  # scalar or [U]: k_u for each unit
    region: torch.Tensor | None = None,  # [R, R] or [B, R, R] at image resolution; None = everywhere
    resize: str = "nearest",  # "nearest" | "area" (see fit_mask)
) -> dict[str, EditFn]:
    """``{layer: fn}`` for ``space.trace(edit=...)``: ``units`` set to ``values`` (inside
    ``region``). A per-image region needs renders of exactly its batch."""
    idx = check_units(space, layer, units)
    _check_resize(resize)
    k = torch.as_tensor(values, dtype=torch.float32)
    if k.ndim not in (0, 1) or (k.ndim == 1 and k.numel() != idx.numel()):
        raise ValueError(f"values must be a scalar or [{idx.numel()}] (one per unit), got {tuple(k.shape)}")
    r = None if region is None else check_region(region, _resolution(space))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return hard_intervene(x, idx, k, _region_for_batch(r, x), resize)

    return {layer: fn}


def soft_edit(
    space: StyleSpace,
    layer: str,  # a unit layer
    alpha: torch.Tensor,  # [C] strengths in [0, 1], one per unit of the layer
    values: float | torch.Tensor = 0.0,  # scalar or [C]: k (0 = ablation)
    region: torch.Tensor | None = None,  # [R, R] or [B, R, R] at image resolution; None = everywhere
    resize: str = "nearest",  # "nearest" | "area" (see fit_mask)
) -> dict[str, EditFn]:
    """``{layer: fn}`` for ``space.trace(edit=...)``: the soft intervention
    ``x' = (1 - alpha m) x + alpha m k`` (differentiable in ``alpha``)."""
    width = layer_width(space, layer)
    _check_resize(resize)
    if not isinstance(alpha, torch.Tensor) or alpha.shape != (width,):
        got = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be a tensor [{width}] (one strength per unit of {layer!r}), got {got}")
    k = _check_values(values, width, layer)
    r = None if region is None else check_region(region, _resolution(space))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return soft_intervene(x, alpha, k, _region_for_batch(r, x), resize)

    return {layer: fn}


def _check_values(
    values: float | Sequence[float] | torch.Tensor | None,
    width: int,
    layer: str,
) -> torch.Tensor:  # [] or [width]
    k = torch.as_tensor(0.0 if values is None else values, dtype=torch.float32)
    if k.ndim == 0 or k.shape == (width,):
        return k
    raise ValueError(f"values must be a scalar or [{width}] (one per unit of {layer!r}), got {tuple(k.shape)}")


def _unit_values(
    values: float | Sequence[float] | torch.Tensor | None,  # None = ablation (0)
    units: torch.Tensor,  # [U]
    width: int,
) -> torch.Tensor:  # [width]: k placed on `units`, 0 elsewhere
    """Values given as a scalar, ``[U]`` (in the order of ``units``; this reading wins when
    ``U == C``) or ``[C]`` (one per unit of the layer, indexed by channel, e.g. ``k_{.,c}``)."""
    k = torch.as_tensor(0.0 if values is None else values, dtype=torch.float32)
    if k.ndim == 1 and k.numel() == width and units.numel() != width:
        return k.clone()  # a value for every unit of the layer (e.g. k_{.,c})
    if k.ndim == 0:
        k = k.expand(units.numel())
    if k.shape != (units.numel(),):
        raise ValueError(f"values must be a scalar, [{units.numel()}] (one per unit) or [{width}] (one per unit "
                         f"of the layer), got {tuple(k.shape)}")
    full = torch.zeros(width)
    full[units] = k
    return full


# ============================================================================ measuring images
def segment(
    segmenter: Segmenter,
    images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    size: int | None = None,  # side of the returned masks; None = the segmenter's own
) -> torch.Tensor:  # bool [B, len(concepts), size, size]
    """The segmenter's masks, images resized to its resolution first when it reads another, and
    masks resized (nearest) to ``size``."""
    images = _to_resolution(images, int(segmenter.resolution))
    masks = segmenter(images)
    want = (images.shape[0], len(segmenter.concepts), *images.shape[-2:])
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != want:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"the segmenter ({segmenter.source}) must return masks {list(want)}, got {got}")
    masks = masks.bool()
    if size is not None and masks.shape[-1] != size:
        masks = F.interpolate(masks.float(), size=(size, size), mode="nearest-exact").bool()
    return masks


def concept_shares(
    segmenter: Segmenter,
    images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
) -> torch.Tensor:  # [B, len(concepts)] share of pixels of each concept, in [0, 1]
    return segment(segmenter, images).float().mean(dim=(-2, -1))


def soft_concept_shares(
    segmenter: Segmenter,
    images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    concept_score: ConceptScore | None = None,  # images -> [B, len(concepts)]; None = segmenter.probabilities
) -> torch.Tensor:  # [B, len(concepts)] differentiable soft shares in [0, 1]
    """A differentiable share of each concept: ``concept_score(images)``, else the pixel mean of
    the segmenter's ``probabilities(images) -> [B, C, H, W]``."""
    n = len(segmenter.concepts)
    if concept_score is not None:
        out = concept_score(images)
        what = "concept_score"
    else:
        probabilities = getattr(segmenter, "probabilities", None)
        if not callable(probabilities):
            raise ValueError(
                f"optimising a unit set needs a differentiable concept score, but the segmenter "
                f"({segmenter.source}) has no probabilities(images) -> [B, C, H, W] method; give it one, or pass "
                f"concept_score=fn with fn(images) -> [B, {n}] soft shares"
            )
        maps = probabilities(_to_resolution(images, int(segmenter.resolution)))
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or tuple(maps.shape[:2]) != (images.shape[0], n):
            got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ValueError(f"segmenter.probabilities must return [{images.shape[0]}, {n}, H, W], got {got}")
        out = maps.mean(dim=(-2, -1))
        what = "segmenter.probabilities"
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (images.shape[0], n):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must give [{images.shape[0]}, {n}] soft shares, got {got}")
    return out


def class_probabilities(
    classifier: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    output: str = "auto",  # "auto" | "probabilities" | "logits": what classifier(images) returns
) -> torch.Tensor:  # [B, K] rows summing to 1
    """Class probabilities: ``"auto"`` uses ``classifier.probs`` when it has one (the project's
    :class:`~stylex.classifier.Classifier` returns logits), else expects probabilities from
    ``classifier(images)`` and refuses anything that is not."""
    if output not in CLASSIFIER_OUTPUTS:
        raise ValueError(f"output must be one of {CLASSIFIER_OUTPUTS}, got {output!r}")
    if output == "auto" and callable(getattr(classifier, "probs", None)):
        return classifier.probs(images).float()
    out = classifier(images).float()
    if out.ndim != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(f"the classifier must return [{images.shape[0]}, classes], got {tuple(out.shape)}")
    if output == "logits":
        return out.softmax(dim=-1)
    if not (bool((out >= 0).all()) and bool(((out.sum(dim=-1) - 1).abs() <= 1e-3).all())):
        raise ValueError("the classifier's outputs are not probabilities (negative, or rows not summing to 1); "
                         "pass output='logits' if it returns logits")
    return out


def _share_measure(
    segmenter: Segmenter,
    concepts: int | list[int],  # positions in segmenter.concepts
) -> Callable[..., torch.Tensor]:  # (images, ...) -> [B, len(concepts)] or [B]
    def measure(images: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return concept_shares(segmenter, images)[:, concepts]

    return measure


def _to_resolution(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrinking = size < images.shape[-1]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


# ============================================================================ batched renders
def _sweep(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S]
    layer: str,
    alpha: torch.Tensor,  # [G, C]: intervention g's strengths
    values: torch.Tensor,  # [G, C]: intervention g's values
    masks: torch.Tensor | None,  # [G, N or 1, H, W] in [0, 1]; None = everywhere
    measure: Measure,  # (images [M, 3, R, R], g [M], n [M]) -> [M, ...]
    base_measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,  # (images, n) -> [B, ...]
    resize: str,
    batch_size: int,  # images per render
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor | None, torch.Tensor]:  # base [N, ...] (or None), intervened [G, N, ...]
    """Every image under every intervention, rendered in batches of ``batch_size``: each batch of
    images is rendered once plain (when its base is measured, or when several interventions can
    resume from its prefix cache) and then in groups of interventions side by side, resuming from
    ``layer`` when the generator keeps a prefix cache."""
    device = _device(space)
    n, g_total = styles.shape[0], alpha.shape[0]
    b = min(n, batch_size)
    per = max(1, batch_size // b)
    alpha, values = alpha.to(device), values.to(device)
    masks = None if masks is None else masks.to(device)
    result: torch.Tensor | None = None
    bases: list[torch.Tensor] = []
    reuse: bool | None = None  # known after the first plain render (a generator without it leaves the cache empty)
    bar = tqdm(total=n * (g_total + (base_measure is not None)), desc=desc, unit="img", disable=not progress,
               leave=False)
    try:
        with torch.no_grad():
            for i0 in range(0, n, b):
                s = styles[i0 : i0 + b].to(device)
                nb = s.shape[0]
                cache: dict = {}
                if base_measure is not None or (g_total > 1 and reuse is not False):
                    base = space.render(s, noise_mode="const", cache=cache)
                    reuse = layer in cache
                    if base_measure is not None:
                        bases.append(base_measure(base, torch.arange(i0, i0 + nb, device=device)).cpu())
                        bar.update(nb)
                for g0 in range(0, g_total, per):
                    g1 = min(g_total, g0 + per)
                    rows_g = torch.arange(g0, g1, device=device).repeat_interleave(nb)
                    local = torch.arange(nb, device=device).repeat(g1 - g0)
                    rows_n = local + i0
                    m = None
                    if masks is not None:
                        m = masks[rows_g, rows_n if masks.shape[1] > 1 else torch.zeros_like(rows_n)][:, None]
                    fn = partial(soft_intervene, alpha=alpha[rows_g], values=values[rows_g], mask=m, resize=resize)
                    tiled = s.repeat(g1 - g0, 1)
                    with space.trace(edit={layer: fn}):
                        if reuse and layer in cache:
                            img = space.render(tiled, noise_mode="const", from_layer=layer,
                                               cache=space.cache_rows(cache, layer, local))
                        else:
                            img = space.render(tiled, noise_mode="const")
                    out = measure(img, rows_g, rows_n).cpu()
                    if result is None:
                        result = torch.empty(g_total, n, *out.shape[1:], dtype=out.dtype)
                    result[g0:g1, i0 : i0 + nb] = out.reshape(g1 - g0, nb, *out.shape[1:])
                    bar.update((g1 - g0) * nb)
    finally:
        bar.close()
    assert result is not None
    return (torch.cat(bases) if bases else None), result


def _one_hot_sets(
    sets: Sequence[torch.Tensor],  # G index tensors
    width: int,
) -> torch.Tensor:  # [G, width] float with 1 on each set
    alpha = torch.zeros(len(sets), width)
    for g, idx in enumerate(sets):
        alpha[g, idx] = 1.0
    return alpha


def render_intervened(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    units: Sequence[int] | torch.Tensor,  # channels to intervene on
    values: float | Sequence[float] | torch.Tensor | None = None,  # None = ablation; scalar, [U] or [C]
    region: torch.Tensor | None = None,  # [R, R] or [N, R, R] at image resolution; None = everywhere
    resize: str = "nearest",  # "nearest" | "area" (see fit_mask)
    batch_size: int = 64,  # images per render
    progress: bool = False,
) -> torch.Tensor:  # [N, 3, R, R] in [-1, 1], on the CPU
    """Render ``styles`` with ``units`` ablated (``values=None``) or set to ``values``."""
    styles = _check_styles(space, styles)
    idx = check_units(space, layer, units)
    width = layer_width(space, layer)
    _check_resize(resize)
    k = _unit_values(values, idx, width)
    masks = None if region is None else check_region(region, _resolution(space), styles.shape[0])[None]
    _, images = _sweep(space, styles, layer, _one_hot_sets([idx], width), k[None], masks,
                       lambda img, g, n: img.float(), None, resize, _check_batch_size(batch_size), progress,
                       f"rendering {layer}")
    return images[0]


def layer_resolution(
    space: StyleSpace,
    layer: str,  # a unit layer
    styles: torch.Tensor,  # [N, S]: the first row is rendered once to read the layer's size
) -> tuple[int, int]:  # (h, w)
    check_layers(space, [layer])
    with torch.no_grad(), space.trace(retain=[layer]) as seen:
        space.render(styles[:1].to(_device(space)), noise_mode="const")
    return tuple(seen[layer].shape[-2:])  # type: ignore[return-value]


# ============================================================================ causal effects
def _concepts(
    segmenter: Segmenter,
    concepts: Sequence[str] | str | None,  # None = all
) -> tuple[list[str], list[int]]:
    if concepts is None:
        names = list(segmenter.concepts)
    elif isinstance(concepts, str):
        names = [concepts]
    else:
        names = list(concepts)
    if not names:
        raise ValueError(f"no concepts given; the segmenter ({segmenter.source}) knows {list(segmenter.concepts)}")
    return names, [concept_index(segmenter, c) for c in names]


def _tensor_json(t: torch.Tensor) -> Any:
    """Nested lists of floats, NaN and infinities as None (JSON has neither)."""
    if t.ndim == 0:
        return _float_json(float(t))
    return [_tensor_json(row) for row in t]


def _float_json(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


@dataclass
class CausalEffect:
    """The ACE of one intervention (a unit set, ablated or inserted) on each concept."""

    layer: str
    mode: str  # "ablation" | "insertion"
    units: list[int]
    concepts: list[str]
    base_share: torch.Tensor  # [C] E[s_c] without intervention
    share: torch.Tensor  # [C] E[s_c] with the units intervened
    num_images: int

    @property
    def ace(self) -> torch.Tensor:  # [C] delta_{U -> c}
        return self.share - self.base_share

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "mode": self.mode, "units": list(self.units), "num_images": self.num_images,
                "concepts": {c: {"base_share": float(self.base_share[i]), "share": float(self.share[i]),
                                 "ace": float(self.ace[i])} for i, c in enumerate(self.concepts)}}


@dataclass
class UnitEffects:
    """Single-unit ACEs of every (given) unit of a layer on each concept."""

    layer: str
    mode: str  # "ablation" | "insertion"
    units: list[int]  # the U units measured, in the order of the rows below
    concepts: list[str]
    base_share: torch.Tensor  # [C] E[s_c] without intervention
    share: torch.Tensor  # [U, C] E[s_c] with unit u intervened
    num_images: int

    @property
    def ace(self) -> torch.Tensor:  # [U, C]
        return self.share - self.base_share

    def ranking(
        self,
        concept: str,
    ) -> list[int]:  # units, strongest effect first
        """Ablation: most negative ACE first (the units whose removal removes ``concept``);
        insertion: most positive first."""
        if concept not in self.concepts:
            raise ValueError(f"unknown concept {concept!r}; these effects cover {self.concepts}")
        a = self.ace[:, self.concepts.index(concept)]
        order = torch.argsort(a if self.mode == "ablation" else -a, stable=True)
        return [self.units[int(i)] for i in order]

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "mode": self.mode, "units": list(self.units), "num_images": self.num_images,
                "concepts": list(self.concepts), "base_share": _tensor_json(self.base_share),
                "ace": _tensor_json(self.ace), "ranking": {c: self.ranking(c) for c in self.concepts}}


def average_causal_effect(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    units: Sequence[int] | torch.Tensor,  # the unit set U
    segmenter: Segmenter,
    concepts: Sequence[str] | str | None = None,  # None = every concept of the segmenter
    values: float | Sequence[float] | torch.Tensor | None = None,  # None = ablation; else inserted k ([U] or [C])
    region: torch.Tensor | None = None,  # [R, R] or [N, R, R] at image resolution; None = everywhere
    resize: str = "nearest",
    batch_size: int = 64,  # images per render
    progress: bool = True,
) -> CausalEffect:
    """``delta_{U -> c}`` for each concept: the mean share of ``c`` pixels with ``U`` intervened
    minus without."""
    styles = _check_styles(space, styles)
    idx = check_units(space, layer, units)
    width = layer_width(space, layer)
    names, cidx = _concepts(segmenter, concepts)
    _check_resize(resize)
    k = _unit_values(values, idx, width)
    masks = None if region is None else check_region(region, _resolution(space), styles.shape[0])[None]
    shares = _share_measure(segmenter, cidx)
    base, out = _sweep(space, styles, layer, _one_hot_sets([idx], width), k[None], masks, shares, shares, resize,
                       _check_batch_size(batch_size), progress, f"ACE of {layer}")
    assert base is not None
    return CausalEffect(layer=layer, mode="ablation" if values is None else "insertion", units=idx.tolist(),
                        concepts=names, base_share=base.mean(dim=0), share=out[0].mean(dim=0),
                        num_images=styles.shape[0])


def unit_effects(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    segmenter: Segmenter,
    concepts: Sequence[str] | str | None = None,  # None = every concept of the segmenter
    units: Sequence[int] | torch.Tensor | None = None,  # None = every unit of the layer
    values: Sequence[float] | torch.Tensor | None = None,  # None = ablation; else [C] k_u inserted for unit u
    region: torch.Tensor | None = None,  # [R, R] or [N, R, R] at image resolution; None = everywhere
    resize: str = "nearest",
    batch_size: int = 64,  # images per render (units of one image batch share a render)
    progress: bool = True,
) -> UnitEffects:
    """The single-unit ACE of every unit on each concept: one intervened render per (unit,
    image), batched over units. Insertion needs one value per unit of the layer (``[C]``, e.g.
    ``k_{.,c}`` of the concept it is ranked for)."""
    styles = _check_styles(space, styles)
    width = layer_width(space, layer)
    idx = torch.arange(width) if units is None else check_units(space, layer, units)
    names, cidx = _concepts(segmenter, concepts)
    _check_resize(resize)
    if values is None:
        k = torch.zeros(width)
    else:
        k = torch.as_tensor(values, dtype=torch.float32)
        if k.shape != (width,):
            raise ValueError(f"single-unit insertion needs one value per unit of {layer!r}: [{width}], "
                             f"got {tuple(k.shape)}")
    masks = None if region is None else check_region(region, _resolution(space), styles.shape[0])[None]
    alpha = _one_hot_sets([i[None] for i in idx], width)  # [U, C]
    if masks is not None:
        masks = masks.expand(idx.numel(), *masks.shape[1:])
    shares = _share_measure(segmenter, cidx)
    base, out = _sweep(space, styles, layer, alpha, alpha * k, masks, shares, shares, resize,
                       _check_batch_size(batch_size), progress, f"unit ACE of {layer}")
    assert base is not None
    return UnitEffects(layer=layer, mode="ablation" if values is None else "insertion", units=idx.tolist(),
                       concepts=names, base_share=base.mean(dim=0), share=out.mean(dim=1),
                       num_images=styles.shape[0])


# ============================================================================ unit sets by optimisation
@dataclass
class UnitSet:
    """The strengths ``alpha*`` found for one concept, and the units ranked by them."""

    layer: str
    concept: str
    mode: str  # "ablation" | "insertion"
    alpha: torch.Tensor  # [C] alpha* in [0, 1]
    pull: torch.Tensor  # [C] how much the concept term still wants each unit at alpha* (ties)
    objective: list[float]  # the objective at each step
    lam: float
    steps: int
    lr: float

    def ranking(self) -> list[int]:
        """Units by ``alpha*`` (descending), ties by the pull."""
        by_pull = torch.argsort(-self.pull, stable=True)
        order = by_pull[torch.argsort(-self.alpha[by_pull], stable=True)]
        return order.tolist()

    def top(
        self,
        n: int,
    ) -> list[int]:
        return self.ranking()[: int(n)]

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "concept": self.concept, "mode": self.mode, "lambda": self.lam,
                "steps": self.steps, "lr": self.lr, "alpha": _tensor_json(self.alpha),
                "pull": _tensor_json(self.pull), "ranking": self.ranking(),
                "objective_first": _float_json(self.objective[0]) if self.objective else None,
                "objective_last": _float_json(self.objective[-1]) if self.objective else None}


def optimise_unit_set(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    segmenter: Segmenter,
    concept: str,
    mode: str = "ablation",  # "ablation": remove the concept; "insertion": draw it
    values: Sequence[float] | torch.Tensor | None = None,  # insertion: [C] k_{u,c} for every unit
    concept_score: ConceptScore | None = None,  # images -> [B, concepts] soft shares; None = segmenter.probabilities
    region: torch.Tensor | None = None,  # [R, R] or [N, R, R] at image resolution; None = everywhere
    resize: str = "nearest",
    lam: float = 1e-3,  # weight of ||alpha||^2
    steps: int = 100,  # Adam steps
    lr: float = 0.05,  # Adam learning rate
    init: float = 0.5,  # starting alpha of every unit
    batch_size: int = 16,  # images per step (a seeded cycle through the styles)
    seed: int = 0,
    progress: bool = True,
) -> UnitSet:
    """``alpha*`` minimising ``+/- E[s~_c(G_alpha)] + lam ||alpha||^2`` over ``[0, 1]^C`` by
    projected Adam (see the module docstring)."""
    styles = _check_styles(space, styles)
    _check_mode(mode)
    width = layer_width(space, layer)
    c = concept_index(segmenter, concept)
    _check_resize(resize)
    if int(steps) < 0 or not lr > 0 or lam < 0 or not 0 <= init <= 1:
        raise ValueError(f"the optimisation needs steps >= 0, lr > 0, lam >= 0 and 0 <= init <= 1; got "
                         f"steps={steps}, lr={lr}, lam={lam}, init={init}")
    if mode == "insertion":
        if values is None:
            raise ValueError("insertion needs values: [C] k_{u,c}, the value each unit is set to where inserted")
        k = torch.as_tensor(values, dtype=torch.float32)
        if k.shape != (width,):
            raise ValueError(f"insertion values must be [{width}] (one per unit of {layer!r}), got {tuple(k.shape)}")
    else:
        k = torch.zeros(width)
    n = styles.shape[0]
    b = min(n, _check_batch_size(batch_size))
    regions = None if region is None else check_region(region, _resolution(space), n)
    device = _device(space)
    k = k.to(device)
    sign = 1.0 if mode == "ablation" else -1.0
    gen = torch.Generator().manual_seed(int(seed))

    def score(alpha: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # E over rows of s~_c, differentiable
        s = styles[rows].to(device)
        m = None
        if regions is not None:
            m = (regions if regions.shape[0] == 1 else regions[rows]).to(device)[:, None]
        fn = partial(soft_intervene, alpha=alpha, values=k, mask=m, resize=resize)
        with space.trace(edit={layer: fn}):
            images = space.render(s, noise_mode="const")
        return soft_concept_shares(segmenter, images, concept_score)[:, c].mean()

    alpha = torch.full((width,), float(init), device=device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=float(lr))
    order, pos = torch.randperm(n, generator=gen), 0
    objective: list[float] = []
    with torch.enable_grad():
        for _ in tqdm(range(int(steps)), desc=f"alpha for {concept} in {layer}", disable=not progress, leave=False):
            if pos + b > n:
                order, pos = torch.randperm(n, generator=gen), 0
            rows = order[pos : pos + b]
            pos += b
            loss = sign * score(alpha, rows) + float(lam) * (alpha**2).sum()
            (grad,) = torch.autograd.grad(loss, [alpha])
            opt.zero_grad(set_to_none=True)
            alpha.grad = grad
            opt.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            objective.append(float(loss.detach()))
        # The pull at alpha*: the concept term's gradient over every image (breaks ties among alpha* = 1).
        pull = torch.zeros(width, device=device)
        for i0 in range(0, n, b):
            rows = torch.arange(i0, min(n, i0 + b))
            (g,) = torch.autograd.grad(score(alpha, rows), [alpha])
            pull += -sign * g * rows.numel() / n
    return UnitSet(layer=layer, concept=concept, mode=mode, alpha=alpha.detach().cpu(), pull=pull.detach().cpu(),
                   objective=objective, lam=float(lam), steps=int(steps), lr=float(lr))


# ============================================================================ ablation curves
@dataclass
class AblationCurve:
    """The share of a concept's pixels left after ablating the top ``n`` units of each ranking,
    relative to the unablated images (NaN where a ranking is shorter than ``n``, or the concept
    is absent from every image)."""

    layer: str
    concept: str
    sizes: list[int]  # n, the number of units removed
    base_share: float  # E[s_c] without intervention
    remaining: dict[str, list[float]]  # ranking name -> r_c(n) for each size; "random" = mean over draws
    random_draws: int
    num_images: int

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "concept": self.concept, "sizes": list(self.sizes),
                "base_share": self.base_share, "random_draws": self.random_draws, "num_images": self.num_images,
                "remaining": {name: [_float_json(v) for v in vals] for name, vals in self.remaining.items()}}


def curve_sizes(
    width: int,  # the layer's number of units
    max_units: int = 64,
) -> list[int]:
    """``1, 2, 4, ...`` up to ``min(max_units, width)``, ending at that cap."""
    cap = min(int(max_units), int(width))
    if cap < 1:
        raise ValueError(f"an ablation curve needs at least one unit, got max_units={max_units}, width={width}")
    sizes = [1 << i for i in range(cap.bit_length()) if 1 << i <= cap]
    return sizes if sizes[-1] == cap else [*sizes, cap]


def ablation_curve(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    segmenter: Segmenter,
    concept: str,
    rankings: Mapping[str, Sequence[int] | torch.Tensor],  # name -> units, best first ("alpha", "ace", "iou", ...)
    sizes: Sequence[int] | None = None,  # None = curve_sizes(width, max_units)
    max_units: int = 64,
    random_draws: int = 3,  # random rankings averaged into "random"
    seed: int = 0,
    batch_size: int = 64,  # images per render
    progress: bool = True,
) -> AblationCurve:
    """``r_c(n)`` for each ranking and for random rankings (all interventions rendered together)."""
    styles = _check_styles(space, styles)
    width = layer_width(space, layer)
    c = concept_index(segmenter, concept)
    if "random" in rankings:
        raise ValueError("'random' is the name of the random baseline; name the given ranking otherwise")
    if int(random_draws) < 0:
        raise ValueError(f"random_draws must be >= 0, got {random_draws}")
    sizes = curve_sizes(width, max_units) if sizes is None else [int(s) for s in sizes]
    if not sizes or any(not 1 <= s <= width for s in sizes):
        raise ValueError(f"sizes must be numbers of units in 1..{width}, got {sizes}")
    ranked = {name: check_units(space, layer, r) for name, r in rankings.items()}
    gen = torch.Generator().manual_seed(int(seed))
    draws = [torch.randperm(width, generator=gen) for _ in range(int(random_draws))]
    sets: list[torch.Tensor] = []
    slots: list[tuple[str, int, int]] = []  # (ranking name or "random", draw, size position)
    for name, r in [*ranked.items(), *((f"random:{d}", p) for d, p in enumerate(draws))]:
        for j, size in enumerate(sizes):
            if size <= r.numel():
                slots.append((name, len(sets), j))
                sets.append(r[:size])
    alpha = _one_hot_sets(sets, width)
    share = _share_measure(segmenter, c)
    base, out = _sweep(space, styles, layer, alpha, torch.zeros_like(alpha), None, share, share, "nearest",
                       _check_batch_size(batch_size), progress, f"ablation curve of {concept}")
    assert base is not None
    base_mean = float(base.mean())
    left = out.mean(dim=1) / base_mean if base_mean > 0 else torch.full((len(sets),), math.nan)
    remaining = {name: [math.nan] * len(sizes) for name in ranked}
    random = torch.full((len(draws), len(sizes)), math.nan)
    for name, g, j in slots:
        if name.startswith("random:"):
            random[int(name.split(":")[1]), j] = float(left[g])
        else:
            remaining[name][j] = float(left[g])
    if draws:
        remaining["random"] = random.mean(dim=0).tolist()
    return AblationCurve(layer=layer, concept=concept, sizes=sizes, base_share=base_mean, remaining=remaining,
                         random_draws=len(draws), num_images=styles.shape[0])


# ============================================================================ insertion at a location
@dataclass
class InsertionResult:
    """Drawing a concept at chosen pixels by inserting a unit set there."""

    layer: str
    concept: str
    units: list[int]
    values: list[float]  # k_u inserted
    size: int  # the region spans (2 size + 1)^2 cells of the layer around the location
    tolerance: float | None  # r: the check area is the pixels within r of (x, y); None = the region itself
    locations: torch.Tensor  # [L, 2] or [N, L, 2] (x, y) image pixels
    absent_before: torch.Tensor  # [N, L] bool: no concept pixel in the check area before
    found_after: torch.Tensor  # [N, L] bool: the concept found in the check area after

    @property
    def trials(self) -> int:  # (image, location) pairs where the concept was absent before
        return int(self.absent_before.sum())

    @property
    def successes(self) -> int:
        return int((self.absent_before & self.found_after).sum())

    @property
    def success_rate(self) -> float:  # NaN when no trial counted
        return self.successes / self.trials if self.trials else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "concept": self.concept, "units": list(self.units), "values": list(self.values),
                "size": self.size, "tolerance": self.tolerance, "pairs": int(self.absent_before.numel()),
                "trials": self.trials, "successes": self.successes, "success_rate": _float_json(self.success_rate)}


def _location_masks(
    locations: torch.Tensor,  # [N or 1, L, 2] (x, y) image pixels
    resolution: int,  # R
    layer_size: tuple[int, int],  # (h, w)
    size: int,
    tolerance: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # region [L, N|1, h, w] float, check area [L, N|1, R, R] bool
    h, w = layer_size
    x = locations[..., 0].long().transpose(0, 1)  # [L, N|1]
    y = locations[..., 1].long().transpose(0, 1)
    ci = (y * h) // resolution
    cj = (x * w) // resolution
    rows = torch.arange(h)[:, None]
    cols = torch.arange(w)[None, :]
    region = ((rows - ci[..., None, None]).abs() <= size) & ((cols - cj[..., None, None]).abs() <= size)
    if tolerance is None:
        area = F.interpolate(region.float(), size=(resolution, resolution), mode="nearest-exact") > 0.5
    else:
        py = torch.arange(resolution)[:, None].float()
        px = torch.arange(resolution)[None, :].float()
        d2 = (py - y[..., None, None]) ** 2 + (px - x[..., None, None]) ** 2
        area = d2 <= float(tolerance) ** 2
    return region.float(), area


def insert_at_locations(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    units: Sequence[int] | torch.Tensor,  # the concept's units (top units by alpha* or ACE for insertion)
    values: float | Sequence[float] | torch.Tensor,  # scalar, [U] or [C]: k_{u,c}
    segmenter: Segmenter,
    concept: str,
    locations: torch.Tensor,  # [L, 2] (the same for every image) or [N, L, 2]: (x, y) image pixels
    size: int = 1,  # region half-width in layer cells: (2 size + 1)^2 cells
    tolerance: float | None = None,  # r in pixels; None = the check area is the region itself
    min_pixels: int = 1,  # concept pixels in the check area that count as "found"
    batch_size: int = 64,  # images per render
    progress: bool = True,
) -> InsertionResult:
    """Insert ``units`` with ``values`` around each location of each image; success where the
    segmenter finds the concept in the check area afterwards and did not before."""
    styles = _check_styles(space, styles)
    idx = check_units(space, layer, units)
    width = layer_width(space, layer)
    c = concept_index(segmenter, concept)
    k = _unit_values(values, idx, width)
    n, res = styles.shape[0], _resolution(space)
    loc = torch.as_tensor(locations)
    given = tuple(loc.shape)
    if loc.ndim == 2:
        loc = loc[None]
    if loc.ndim != 3 or loc.shape[-1] != 2 or loc.shape[0] not in (1, n) or loc.shape[1] == 0:
        raise ValueError(f"locations must be [L, 2] or [{n}, L, 2] (x, y) pixels, got {given}")
    if loc.dtype.is_floating_point:
        loc = loc.round()
    loc = loc.long()
    if bool(((loc < 0) | (loc >= res)).any()):
        raise ValueError(f"locations must be pixels in 0..{res - 1}")
    if int(size) < 0 or int(min_pixels) < 1 or (tolerance is not None and tolerance < 0):
        raise ValueError(f"need size >= 0, min_pixels >= 1 and tolerance >= 0; got size={size}, "
                         f"min_pixels={min_pixels}, tolerance={tolerance}")
    region, area = _location_masks(loc, res, layer_resolution(space, layer, styles), int(size), tolerance)
    num_loc = region.shape[0]
    area_dev = area.to(_device(space))

    def concept_mask(images: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:  # bool [M, R, R]
        return segment(segmenter, images, res)[:, c]

    def found_in_area(images: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [M] pixels
        check = area_dev[g, rows if area_dev.shape[1] > 1 else torch.zeros_like(rows)]
        return (concept_mask(images) & check).sum(dim=(-2, -1))

    alpha = _one_hot_sets([idx] * num_loc, width)
    before_mask, after = _sweep(space, styles, layer, alpha, alpha * k, region, found_in_area, concept_mask, "nearest",
                                _check_batch_size(batch_size), progress, f"inserting {concept}")
    assert before_mask is not None  # [N, R, R]
    before = torch.stack([(before_mask & area[j].expand(n, -1, -1)).sum(dim=(-2, -1)) for j in range(num_loc)], dim=1)
    return InsertionResult(layer=layer, concept=concept, units=idx.tolist(), values=k[idx].tolist(), size=int(size),
                           tolerance=None if tolerance is None else float(tolerance),
                           locations=torch.as_tensor(locations).cpu(), absent_before=before == 0,
                           found_after=after.transpose(0, 1) >= int(min_pixels))


# ============================================================================ the classifier link
@dataclass
class ClassEffect:
    """How intervening on a unit set moves the frozen classifier's class probabilities."""

    layer: str
    mode: str  # "ablation" | "insertion"
    units: list[int]
    class_names: list[str]
    base: torch.Tensor  # [K] E[p_k] without intervention
    intervened: torch.Tensor  # [K] E[p_k] with the units intervened
    num_images: int

    @property
    def delta(self) -> torch.Tensor:  # [K] mean Delta p_k
        return self.intervened - self.base

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "mode": self.mode, "units": list(self.units), "num_images": self.num_images,
                "classes": {name: {"base": float(self.base[i]), "intervened": float(self.intervened[i]),
                                   "delta": float(self.delta[i])} for i, name in enumerate(self.class_names)}}


def classifier_effect(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    units: Sequence[int] | torch.Tensor,  # the concept's causal unit set
    classifier: nn.Module | Callable[[torch.Tensor], torch.Tensor],  # the frozen classifier
    values: float | Sequence[float] | torch.Tensor | None = None,  # None = ablation; else inserted k
    region: torch.Tensor | None = None,  # [R, R] or [N, R, R] at image resolution; None = everywhere
    resize: str = "nearest",
    output: str = "auto",  # what classifier(images) returns (see class_probabilities)
    class_names: Sequence[str] | None = None,  # None = classifier.class_names, else "0", "1", ...
    batch_size: int = 64,  # images per render
    progress: bool = True,
) -> ClassEffect:
    """Mean change of each class probability when ``units`` are ablated or inserted."""
    styles = _check_styles(space, styles)
    idx = check_units(space, layer, units)
    width = layer_width(space, layer)
    _check_resize(resize)
    k = _unit_values(values, idx, width)
    masks = None if region is None else check_region(region, _resolution(space), styles.shape[0])[None]
    def probs(images: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return class_probabilities(classifier, images, output)

    base, out = _sweep(space, styles, layer, _one_hot_sets([idx], width), k[None], masks, probs, probs, resize,
                       _check_batch_size(batch_size), progress, f"classifier under {layer}")
    assert base is not None
    num = base.shape[1]
    names = list(class_names or getattr(classifier, "class_names", None) or [str(i) for i in range(num)])
    if len(names) != num:
        raise ValueError(f"class_names has {len(names)} names, the classifier gives {num} classes")
    return ClassEffect(layer=layer, mode="ablation" if values is None else "insertion", units=idx.tolist(),
                       class_names=names, base=base.mean(dim=0), intervened=out[0].mean(dim=0),
                       num_images=styles.shape[0])


# ============================================================================ artifact units
@dataclass
class ArtifactUnits:
    """Units ranked by how much ablating each brings generated features closer to real ones."""

    layer: str
    feature: str  # the feature space's name
    score: torch.Tensor  # [C] d(plain) - d(unit ablated): > 0 = ablating it looks more real
    base_distance: float  # d(plain): diagonal Frechet distance of the scoring images
    count: int  # units ablated for the FID comparison
    top: list[int]  # the `count` best-scoring units
    random_sets: list[list[int]]  # the random unit sets compared against
    realism: dict[str, dict[str, Any]] = field(default_factory=dict)  # "plain" / "top" / "random" -> FID, KID

    def ranking(self) -> list[int]:
        return torch.argsort(-self.score, stable=True).tolist()

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "feature": self.feature, "score": _tensor_json(self.score),
                "base_distance": self.base_distance, "ranking": self.ranking(), "count": self.count,
                "top": list(self.top), "random_sets": [list(s) for s in self.random_sets],
                "realism": self.realism}


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def diagonal_frechet(
    fake: torch.Tensor,  # [M, F] features of generated images
    real_mean: torch.Tensor,  # [F]
    real_std: torch.Tensor,  # [F] population standard deviation
) -> torch.Tensor:  # [] ||mu_g - mu_r||^2 + ||sigma_g - sigma_r||^2
    """The Frechet distance between diagonal Gaussians (FID without cross-covariances)."""
    fake = fake.double()
    mu = fake.mean(dim=0)
    sd = fake.std(dim=0, correction=0)
    return ((mu - real_mean.double()) ** 2).sum() + ((sd - real_std.double()) ** 2).sum()


def artifact_units(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles of the generated images
    layer: str,  # a unit layer
    real_images: torch.Tensor,  # [M, 3, R, R] in [-1, 1]
    classifier: nn.Module | None = None,  # the frozen classifier (its pooled features)
    features: nn.Module | None = None,  # a stylex.metrics.realism FeatureExtractor instead
    count: int = 20,  # units ablated together for the FID comparison (capped at the layer width)
    random_draws: int = 3,  # random unit sets the FID is averaged over
    score_images: int | None = 64,  # styles used for the per-unit score (the first ones); None = all
    seed: int = 0,
    batch_size: int = 64,  # images per render and per feature pass
    progress: bool = True,
) -> ArtifactUnits:
    """Rank units by the drop of the diagonal Frechet distance when each is ablated, then FID/KID
    of all ``styles`` with the top ``count`` units ablated against ``count`` random units."""
    from stylex.metrics.realism import RealismMeter, feature_extractor

    styles = _check_styles(space, styles)
    width = layer_width(space, layer)
    if features is None:
        if classifier is None:
            raise ValueError("artifact units need the frozen classifier (its features) or a feature extractor")
        features = feature_extractor(classifier, resolution=_resolution(space))
    res = _resolution(space)
    if not isinstance(real_images, torch.Tensor) or tuple(real_images.shape[1:]) != (3, res, res):
        got = tuple(real_images.shape) if isinstance(real_images, torch.Tensor) else type(real_images).__name__
        raise ValueError(f"real_images must be [M, 3, {res}, {res}] in [-1, 1], got {got}")
    if real_images.shape[0] < 2 or styles.shape[0] < 2:
        raise ValueError(f"realism needs at least 2 real and 2 generated images, got {real_images.shape[0]} "
                         f"and {styles.shape[0]}")
    if int(count) < 1 or int(random_draws) < 0:
        raise ValueError(f"need count >= 1 and random_draws >= 0, got count={count}, random_draws={random_draws}")
    batch_size = _check_batch_size(batch_size)
    device = _device(space)
    features = features.to(device)

    def feats(img: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        out = features(img.float())
        features.forget()
        return out

    real = torch.cat([feats(real_images[i : i + batch_size].to(device)).cpu()
                      for i in range(0, real_images.shape[0], batch_size)])
    real_mean, real_std = real.double().mean(dim=0), real.double().std(dim=0, correction=0)
    scoring = styles if score_images is None else styles[: max(2, int(score_images))]
    alpha = torch.eye(width)
    base, out = _sweep(space, scoring, layer, alpha, torch.zeros_like(alpha), None, feats, feats, "nearest",
                       batch_size, progress, f"artifact units of {layer}")
    assert base is not None
    d_base = float(diagonal_frechet(base, real_mean, real_std))
    score = torch.tensor([d_base - float(diagonal_frechet(out[u], real_mean, real_std)) for u in range(width)])
    result = ArtifactUnits(layer=layer, feature=str(getattr(features, "name", type(features).__name__)),
                           score=score, base_distance=d_base, count=min(int(count), width), top=[], random_sets=[])
    result.top = result.ranking()[: result.count]
    gen = torch.Generator().manual_seed(int(seed))
    result.random_sets = [torch.randperm(width, generator=gen)[: result.count].tolist()
                          for _ in range(int(random_draws))]

    meter = RealismMeter(features, batch_size=batch_size, seed=int(seed)).to(device)
    meter.set_real(real_images)

    def realism(units: list[int] | None) -> dict[str, Any]:
        if units is None:
            with torch.no_grad():
                images = torch.cat([space.render(styles[i : i + batch_size].to(device), noise_mode="const").cpu()
                                    for i in range(0, styles.shape[0], batch_size)])
        else:
            images = render_intervened(space, styles, layer, units, batch_size=batch_size)
        m = meter.measure(images)
        return {"fid": _float_json(m["fid"]), "kid": _float_json(m["kid"]), "kid_std": _float_json(m["kid_std"])}

    bar = tqdm(total=2 + len(result.random_sets), desc="FID with artifact units ablated", disable=not progress,
               leave=False)
    try:
        result.realism["plain"] = realism(None)
        bar.update(1)
        result.realism["top"] = realism(result.top)
        bar.update(1)
        draws = []
        for units in result.random_sets:
            draws.append(realism(units))
            bar.update(1)
    finally:
        bar.close()
    if draws:
        result.realism["random"] = {"fid": _mean_or_none([d["fid"] for d in draws]),
                                    "kid": _mean_or_none([d["kid"] for d in draws]),
                                    "fids": [d["fid"] for d in draws], "kids": [d["kid"] for d in draws]}
    return result
