"""Edits of unit layers: the intervention itself, its checks, and batched renders and measures.

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

Measures. ``s_c(image)`` is the share of pixels the segmenter labels ``c``; the soft share
``s~_c`` averages its probabilities (or a ``concept_score`` callable) and is differentiable.
:func:`sweep` renders many intervened copies of a batch at once (resuming from the unit layer
when the generator supports prefix reuse) and reduces each with a measure, so that no image set
is kept in memory.

Styles are flat StyleSpace styles ``[N, S]``; every render uses ``noise_mode="const"``, or the
images' own noise maps when ``noise`` gives them (``{noise layer: [N or 1, 1, r, r]}``, as an
encoder trained with ``model.encoder_noise`` gives them): every intervened copy of an image
keeps its maps.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from stylex.dissect.base import Segmenter, check_layers, unit_counts
from stylex.stylespace import NoiseMaps, StyleSpace, check_noise, noise_rows

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


def check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_styles(space: StyleSpace, styles: torch.Tensor) -> torch.Tensor:
    if not isinstance(styles, torch.Tensor) or styles.ndim != 2 or styles.shape[1] != space.dim:
        shape = tuple(styles.shape) if isinstance(styles, torch.Tensor) else type(styles).__name__
        raise ValueError(f"styles must be flat StyleSpace styles [N, {space.dim}], got {shape}")
    if styles.shape[0] == 0:
        raise ValueError("no styles given: interventions need at least one image")
    return styles.detach()


def noise_on(
    noise: NoiseMaps | None,
    device: torch.device,
) -> dict[str, torch.Tensor] | None:
    """The maps moved to ``device`` once (renders index them per intervened copy)."""
    return None if noise is None else {name: m.to(device) for name, m in noise.items()}


def check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def space_device(space: StyleSpace) -> torch.device:
    g = space.generator
    for t in (*g.parameters(), *g.buffers()):
        return t.device
    return torch.device("cpu")


def image_resolution(space: StyleSpace) -> int:
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
    check_resize(resize)
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
    check_resize(resize)
    k = torch.as_tensor(values, dtype=torch.float32)
    if k.ndim not in (0, 1) or (k.ndim == 1 and k.numel() != idx.numel()):
        raise ValueError(f"values must be a scalar or [{idx.numel()}] (one per unit), got {tuple(k.shape)}")
    r = None if region is None else check_region(region, image_resolution(space))

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
    check_resize(resize)
    if not isinstance(alpha, torch.Tensor) or alpha.shape != (width,):
        got = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be a tensor [{width}] (one strength per unit of {layer!r}), got {got}")
    k = _check_values(values, width, layer)
    r = None if region is None else check_region(region, image_resolution(space))

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


def unit_values(
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


def share_measure(
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
def sweep(
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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> tuple[torch.Tensor | None, torch.Tensor]:  # base [N, ...] (or None), intervened [G, N, ...]
    """Every image under every intervention, rendered in batches of ``batch_size``: each batch of
    images is rendered once plain (when its base is measured, or when several interventions can
    resume from its prefix cache) and then in groups of interventions side by side, resuming from
    ``layer`` when the generator keeps a prefix cache. Every copy of an image keeps its noise maps."""
    device = space_device(space)
    n, g_total = styles.shape[0], alpha.shape[0]
    noise = check_noise(noise, n)
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
                maps = noise_on(noise_rows(noise, slice(i0, i0 + nb)), device)
                cache: dict = {}
                if base_measure is not None or (g_total > 1 and reuse is not False):
                    base = space.render(s, noise_mode="const", cache=cache, noise=maps)
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
                    tiled_maps = noise_rows(maps, local)  # row j copies image local[j]
                    with space.trace(edit={layer: fn}):
                        if reuse and layer in cache:
                            img = space.render(tiled, noise_mode="const", from_layer=layer,
                                               cache=space.cache_rows(cache, layer, local), noise=tiled_maps)
                        else:
                            img = space.render(tiled, noise_mode="const", noise=tiled_maps)
                    out = measure(img, rows_g, rows_n).cpu()
                    if result is None:
                        result = torch.empty(g_total, n, *out.shape[1:], dtype=out.dtype)
                    result[g0:g1, i0 : i0 + nb] = out.reshape(g1 - g0, nb, *out.shape[1:])
                    bar.update((g1 - g0) * nb)
    finally:
        bar.close()
    assert result is not None
    return (torch.cat(bases) if bases else None), result


def one_hot_sets(
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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> torch.Tensor:  # [N, 3, R, R] in [-1, 1], on the CPU
    """Render ``styles`` with ``units`` ablated (``values=None``) or set to ``values``."""
    _, images = sweep_unit_set(space, styles, layer, units, values, region, resize, lambda img, g, n: img.float(),
                               None, batch_size, progress, f"rendering {layer}", noise=noise)
    return images[0]


def sweep_unit_set(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles
    layer: str,  # a unit layer
    units: Sequence[int] | torch.Tensor,  # the one unit set intervened on
    values: float | Sequence[float] | torch.Tensor | None,  # None = ablation; scalar, [U] or [C]
    region: torch.Tensor | None,  # [R, R] or [N, R, R] at image resolution; None = everywhere
    resize: str,
    measure: Measure,  # applied to the intervened images
    base_measure: Measure | None,  # applied to the plain images (None = not measured)
    batch_size: int,
    progress: bool,
    desc: str,
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> tuple[torch.Tensor | None, torch.Tensor]:  # sweep's (base, [1, ...] intervened)
    """:func:`sweep` over a single unit set, with every argument checked."""
    styles = check_styles(space, styles)
    idx = check_units(space, layer, units)
    width = layer_width(space, layer)
    check_resize(resize)
    k = unit_values(values, idx, width)
    masks = None if region is None else check_region(region, image_resolution(space), styles.shape[0])[None]
    return sweep(space, styles, layer, one_hot_sets([idx], width), k[None], masks, measure, base_measure, resize,
                 check_batch_size(batch_size), progress, desc, noise=noise)


def layer_resolution(
    space: StyleSpace,
    layer: str,  # a unit layer
    styles: torch.Tensor,  # [N, S]: the first row is rendered once to read the layer's size
) -> tuple[int, int]:  # (h, w)
    check_layers(space, [layer])
    with torch.no_grad(), space.trace(retain=[layer]) as seen:
        space.render(styles[:1].to(space_device(space)), noise_mode="const")
    return tuple(seen[layer].shape[-2:])  # type: ignore[return-value]


# ============================================================================ causal effects
def resolve_concepts(
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


def tensor_json(t: torch.Tensor) -> Any:
    """Nested lists of floats, NaN and infinities as None (JSON has neither)."""
    if t.ndim == 0:
        return float_json(float(t))
    return [tensor_json(row) for row in t]


def float_json(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None

