"""Interventions on units: causal effects, unit sets, ablation curves, insertion, the classifier.

The causal half of GAN Dissection (Bau et al., ICLR 2019), on the edits of
:mod:`stylex.dissect.edits`.

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

Styles are flat StyleSpace styles ``[N, S]``; every render uses ``noise_mode="const"``, or each
image's own noise maps where ``noise`` gives them (``{noise layer: [N or 1, 1, r, r]}``); results
are plain dataclasses (CPU tensors) with ``to_json()``. Thresholds, IoU rankings and insertion
values ``k_{u,c}`` come from unit dissection as plain tensors / lists.

Typical use::

    effects = unit_effects(space, flat, "b16.conv1", segmenter)          # single-unit ACE
    units = effects.ranking("tree")[:8]                                  # most negative first
    # stylex.dissect.edits applies such a set by hand:
    with space.trace(edit=edits.ablation_edit(space, "b16.conv1", units, region=mask)):
        img = space.render(flat[:4])                                     # trees removed in `mask`
    found = optimise_unit_set(space, flat, "b16.conv1", segmenter, "tree")   # alpha*
    curve = ablation_curve(space, flat, "b16.conv1", segmenter, "tree",
                           {"alpha": found.ranking(), "ace": effects.ranking("tree"), "iou": iou_order})
    link = classifier_effect(space, flat, "b16.conv1", found.top(8), classifier)   # Delta p per class
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from stylex.dissect.base import Segmenter
from stylex.dissect.edits import (
    ConceptScore,
    check_batch_size,
    check_mode,
    check_region,
    check_resize,
    check_styles,
    check_units,
    class_probabilities,
    concept_index,
    float_json,
    image_resolution,
    layer_resolution,
    layer_width,
    noise_on,
    one_hot_sets,
    resolve_concepts,
    segment,
    share_measure,
    soft_concept_shares,
    soft_intervene,
    space_device,
    sweep,
    sweep_unit_set,
    tensor_json,
    unit_values,
)
from stylex.stylespace import NoiseMaps, StyleSpace, check_noise, noise_rows

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
                "concepts": list(self.concepts), "base_share": tensor_json(self.base_share),
                "ace": tensor_json(self.ace), "ranking": {c: self.ranking(c) for c in self.concepts}}


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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> CausalEffect:
    """``delta_{U -> c}`` for each concept: the mean share of ``c`` pixels with ``U`` intervened
    minus without."""
    styles = check_styles(space, styles)
    idx = check_units(space, layer, units)
    width = layer_width(space, layer)
    names, cidx = resolve_concepts(segmenter, concepts)
    check_resize(resize)
    k = unit_values(values, idx, width)
    masks = None if region is None else check_region(region, image_resolution(space), styles.shape[0])[None]
    shares = share_measure(segmenter, cidx)
    base, out = sweep(space, styles, layer, one_hot_sets([idx], width), k[None], masks, shares, shares, resize,
                       check_batch_size(batch_size), progress, f"ACE of {layer}", noise=noise)
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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> UnitEffects:
    """The single-unit ACE of every unit on each concept: one intervened render per (unit,
    image), batched over units. Insertion needs one value per unit of the layer (``[C]``, e.g.
    ``k_{.,c}`` of the concept it is ranked for)."""
    styles = check_styles(space, styles)
    width = layer_width(space, layer)
    idx = torch.arange(width) if units is None else check_units(space, layer, units)
    names, cidx = resolve_concepts(segmenter, concepts)
    check_resize(resize)
    if values is None:
        k = torch.zeros(width)
    else:
        k = torch.as_tensor(values, dtype=torch.float32)
        if k.shape != (width,):
            raise ValueError(f"single-unit insertion needs one value per unit of {layer!r}: [{width}], "
                             f"got {tuple(k.shape)}")
    masks = None if region is None else check_region(region, image_resolution(space), styles.shape[0])[None]
    alpha = one_hot_sets([i[None] for i in idx], width)  # [U, C]
    if masks is not None:
        masks = masks.expand(idx.numel(), *masks.shape[1:])
    shares = share_measure(segmenter, cidx)
    base, out = sweep(space, styles, layer, alpha, alpha * k, masks, shares, shares, resize,
                       check_batch_size(batch_size), progress, f"unit ACE of {layer}", noise=noise)
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
                "steps": self.steps, "lr": self.lr, "alpha": tensor_json(self.alpha),
                "pull": tensor_json(self.pull), "ranking": self.ranking(),
                "objective_first": float_json(self.objective[0]) if self.objective else None,
                "objective_last": float_json(self.objective[-1]) if self.objective else None}


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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> UnitSet:
    """``alpha*`` minimising ``+/- E[s~_c(G_alpha)] + lam ||alpha||^2`` over ``[0, 1]^C`` by
    projected Adam (see the module docstring)."""
    styles = check_styles(space, styles)
    check_mode(mode)
    width = layer_width(space, layer)
    c = concept_index(segmenter, concept)
    check_resize(resize)
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
    b = min(n, check_batch_size(batch_size))
    regions = None if region is None else check_region(region, image_resolution(space), n)
    device = space_device(space)
    k = k.to(device)
    noise = noise_on(check_noise(noise, n), device)
    sign = 1.0 if mode == "ablation" else -1.0
    gen = torch.Generator().manual_seed(int(seed))

    def score(alpha: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # E over rows of s~_c, differentiable
        s = styles[rows].to(device)
        m = None
        if regions is not None:
            m = (regions if regions.shape[0] == 1 else regions[rows]).to(device)[:, None]
        fn = partial(soft_intervene, alpha=alpha, values=k, mask=m, resize=resize)
        with space.trace(edit={layer: fn}):
            images = space.render(s, noise_mode="const", noise=noise_rows(noise, rows))
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
                "remaining": {name: [float_json(v) for v in vals] for name, vals in self.remaining.items()}}


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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> AblationCurve:
    """``r_c(n)`` for each ranking and for random rankings (all interventions rendered together)."""
    styles = check_styles(space, styles)
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
    alpha = one_hot_sets(sets, width)
    share = share_measure(segmenter, c)
    base, out = sweep(space, styles, layer, alpha, torch.zeros_like(alpha), None, share, share, "nearest",
                       check_batch_size(batch_size), progress, f"ablation curve of {concept}", noise=noise)
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
                "trials": self.trials, "successes": self.successes, "success_rate": float_json(self.success_rate)}


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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> InsertionResult:
    """Insert ``units`` with ``values`` around each location of each image; success where the
    segmenter finds the concept in the check area afterwards and did not before."""
    styles = check_styles(space, styles)
    idx = check_units(space, layer, units)
    width = layer_width(space, layer)
    c = concept_index(segmenter, concept)
    k = unit_values(values, idx, width)
    n, res = styles.shape[0], image_resolution(space)
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
    area_dev = area.to(space_device(space))

    def concept_mask(images: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:  # bool [M, R, R]
        return segment(segmenter, images, res)[:, c]

    def found_in_area(images: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [M] pixels
        check = area_dev[g, rows if area_dev.shape[1] > 1 else torch.zeros_like(rows)]
        return (concept_mask(images) & check).sum(dim=(-2, -1))

    alpha = one_hot_sets([idx] * num_loc, width)
    before_mask, after = sweep(space, styles, layer, alpha, alpha * k, region, found_in_area, concept_mask, "nearest",
                                check_batch_size(batch_size), progress, f"inserting {concept}", noise=noise)
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
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> ClassEffect:
    """Mean change of each class probability when ``units`` are ablated or inserted."""
    def probs(images: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return class_probabilities(classifier, images, output)

    idx = check_units(space, layer, units)
    base, out = sweep_unit_set(space, styles, layer, idx, values, region, resize, probs, probs, batch_size, progress,
                               f"classifier under {layer}", noise=noise)
    assert base is not None
    num = base.shape[1]
    names = list(class_names or getattr(classifier, "class_names", None) or [str(i) for i in range(num)])
    if len(names) != num:
        raise ValueError(f"class_names has {len(names)} names, the classifier gives {num} classes")
    return ClassEffect(layer=layer, mode="ablation" if values is None else "insertion", units=idx.tolist(),
                       class_names=names, base=base.mean(dim=0), intervened=out[0].mean(dim=0),
                       num_images=styles.shape[0])


