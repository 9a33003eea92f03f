"""Attribute localisation: where in the image does a StyleSpace attribute act, and on what?

An attribute is a StyleSpace coordinate ``i = (layer, channel)`` and a shift ``Δ`` (AttFind's
edit: the coordinate moved toward its minimum or maximum, ``Δ_n = shift_size · (extreme −
s_{n,i})``, or any shift given). Over a set of images with styles ``s_n``:

Effect map
    ``E_n = mean_colour |G(s_n + Δ_n e_i) − G(s_n)|`` (``[R, R]``, image units). An image is
    *affected* when ``max E_n ≥ min_effect``; its effect mask is ``E_n ≥ effect_fraction ·
    max E_n``. A fraction of each image's own maximum (rather than a fixed top share of pixels)
    lets a local edit give a small mask and a global one (a colour cast) a large one, and does
    not depend on how strongly the shift acts on that image; 0.5 is the effect's half-maximum
    region.

Unit map
    The style ``(layer, i)`` scales unit ``(P, i)``, ``P = base.feeding_unit_layer(layer)``
    (none for the first layer, which modulates the learned constant). That unit's map, upsampled
    bilinearly to the image side, is thresholded at the unit's dissection threshold ``t_u`` when a
    :class:`~stylex.dissect.dissection.Dissection` of ``P`` is given, otherwise at its top
    ``quantile`` over these images. The unit lies upstream of the edited style, so its map is the
    same before and after the edit.

Concepts
    ``S_{n,c} = seg(G(s_n))_c ∨ seg(G(s_n + Δ_n e_i))_c``: the union of the masks of the unedited
    and the edited render, because an edit can create what it acts on (an inserted lesion only
    exists in the edited image) or remove it (only in the unedited one).

Scores, summed over pixels and images (the effect's over the affected images only: an image the
shift leaves unchanged says nothing about where it acts)::

    IoU^E_c = Σ|E ≥ f·max E ∧ S_c| / Σ|E ≥ f·max E ∨ S_c|,    IoU^A_c likewise with A↑ > t_u

and the attribute "acts on" ``argmax_c IoU^E_c``.

Renders use ``noise_mode="const"``, or each image's own noise maps where ``noise`` gives them
(an encoder trained with ``model.encoder_noise``): the edited render of an image keeps its maps.

Typical use::

    found = localise_attributes(space, segmenter, flat, result.rankings[1][:5],
                                extremes=(stats["min"], stats["max"]), dissection=d)
    print(found[0].acts_on)           # acts on: exudate (IoU 0.41)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from stylex.dissect.base import Segmenter, feeding_unit_layer
from stylex.dissect.dissection import Dissection, check_segmenter, module_device, segment
from stylex.dissect.edits import noise_on
from stylex.dissect.stats import RunningQuantile, overlap_counts, upsample_maps
from stylex.stylespace import NoiseMaps, StyleSpace, check_noise, noise_rows

# (style layer, channel, shift): the shift a float or [N] per image
AttributeTriple = tuple[str, int, Union[float, torch.Tensor]]
AttributeLike = Union[AttributeTriple, Any]  # or an object with .layer, .channel, .direction (AttFind's Attribute)


@dataclass
class Localisation:
    """Where one attribute acts over N images (C concepts; maps on the CPU, R the image side)."""

    layer: str  # the style layer of the coordinate
    channel: int
    coordinate: int  # flat StyleSpace index
    delta: torch.Tensor  # [N] the shift of each image
    concepts: list[str]
    effect_iou: torch.Tensor  # [C] float64 IoU of the effect masks (affected images) with each concept
    affected: torch.Tensor  # [N] bool: max effect >= min_effect
    unit: tuple[str, int] | None  # the unit the style scales (None for the first layer)
    unit_threshold: float | None  # t_u used for the unit map
    unit_threshold_source: str | None  # "dissection" | "quantile of these images"
    unit_iou: torch.Tensor | None  # [C] float64 IoU of the unit masks (all images) with each concept
    effect: torch.Tensor | None = None  # [N, R, R] mean |edited - unedited| over colour channels
    effect_mask: torch.Tensor | None = None  # bool [N, R, R]
    unit_map: torch.Tensor | None = None  # [N, R, R] the unit's upsampled map
    unit_mask: torch.Tensor | None = None  # bool [N, R, R]
    masks: torch.Tensor | None = None  # bool [N, C, R, R] concept masks (unedited ∪ edited)
    before: torch.Tensor | None = None  # [N, 3, R, R] unedited renders in [-1, 1]
    after: torch.Tensor | None = None  # [N, 3, R, R] edited renders

    @property
    def name(self) -> str:
        return f"{self.layer}:{self.channel}"

    @property
    def num_affected(self) -> int:
        return int(self.affected.sum())

    @property
    def effect_concept(self) -> str | None:
        """The concept the effect overlaps most (None when no image is affected)."""
        if self.num_affected == 0:
            return None
        return self.concepts[int(self.effect_iou.argmax())]

    @property
    def unit_concept(self) -> str | None:
        if self.unit_iou is None:
            return None
        return self.concepts[int(self.unit_iou.argmax())]

    @property
    def acts_on(self) -> str:
        """``"acts on: <concept> (IoU 0.41)"``."""
        if self.effect_concept is None:
            return "acts on: nothing visible on these images"
        return f"acts on: {self.effect_concept} (IoU {float(self.effect_iou.max()):.2f})"

    def summary(self) -> str:
        text = f"{self.name} (shift {float(self.delta.mean()):+.3g}): {self.acts_on}"
        text += f" [{self.num_affected}/{self.affected.numel()} images affected]"
        if self.unit is not None and self.unit_iou is not None:
            text += (f"; scales unit {self.unit[0]}:{self.unit[1]} ~ {self.unit_concept} "
                     f"(IoU {float(self.unit_iou.max()):.2f})")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "channel": self.channel,
            "coordinate": self.coordinate,
            "mean_shift": float(self.delta.mean()),
            "images": int(self.affected.numel()),
            "affected": self.num_affected,
            "acts_on": self.effect_concept,
            "effect_iou": {c: float(v) for c, v in zip(self.concepts, self.effect_iou)},
            "unit": None if self.unit is None else [self.unit[0], self.unit[1]],
            "unit_threshold": self.unit_threshold,
            "unit_threshold_source": self.unit_threshold_source,
            "unit_concept": self.unit_concept,
            "unit_iou": None if self.unit_iou is None else {c: float(v) for c, v in zip(self.concepts, self.unit_iou)},
            "summary": self.summary(),
        }


def attribute_shifts(
    space: StyleSpace,
    flat: torch.Tensor,  # [N, S] styles of the images
    attributes: Sequence[AttributeLike],
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([S] min, [S] max) over the reference set
    shift_size: float = 1.0,  # AttFind's shift_size: the fraction of the way to the extreme
) -> list[tuple[str, int, torch.Tensor]]:  # (layer, channel, shift [N])
    """Each attribute as ``(layer, channel, Δ [N])``. A ``(layer, channel, delta)`` triple keeps
    its delta (a float or one per image); an AttFind ``Attribute`` (``.layer``, ``.channel``,
    ``.direction``: 0 toward the minimum, 1 toward the maximum) shifts by
    ``shift_size · (extreme − s)`` with the extremes given."""
    n = flat.shape[0]
    out = []
    for a in attributes:
        if isinstance(a, (tuple, list)):
            if len(a) != 3:
                raise ValueError(f"an attribute triple is (layer, channel, delta), got {a!r}")
            layer, channel, delta = a
            i = space.index(str(layer), int(channel))
            d = torch.as_tensor(delta, dtype=torch.float32).flatten().cpu()
            if d.numel() == 1:
                d = d.expand(n).clone()
            if d.shape != (n,):
                raise ValueError(f"the shift of {layer}:{channel} must be a number or one per image ({n}), "
                                 f"got {d.numel()} values")
        elif all(hasattr(a, k) for k in ("layer", "channel", "direction")):
            layer, channel = str(a.layer), int(a.channel)
            i = space.index(layer, channel)
            if extremes is None:
                raise ValueError(f"attribute {layer}:{channel} gives a direction but no shift: pass "
                                 "extremes=(min, max) of the styles as AttFind uses (from space.statistics(reference))")
            low, high = extremes
            if low.shape != (space.dim,) or high.shape != (space.dim,):
                raise ValueError(f"extremes must be two [{space.dim}] tensors, "
                                 f"got {tuple(low.shape)} and {tuple(high.shape)}")
            target = (high if int(a.direction) == 1 else low)[i].float().cpu()
            d = float(shift_size) * (target - flat[:, i].detach().float().cpu())
        else:
            raise ValueError(f"an attribute must be a (layer, channel, delta) triple or have .layer, .channel and "
                             f".direction (AttFind's Attribute), got {type(a).__name__}")
        out.append((str(layer), int(channel), d))
    return out


def localise_attributes(
    space: StyleSpace,
    segmenter: Segmenter,  # concept masks; resolution must equal the generator's
    flat: torch.Tensor,  # [N, S] styles of the images to edit
    attributes: Sequence[AttributeLike],  # (layer, channel, delta) triples or AttFind Attributes
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([S], [S]) min / max, for Attributes
    shift_size: float = 1.0,  # for Attributes: fraction of the way to the extreme
    dissection: Dissection | None = None,  # supplies the unit thresholds t_u where it covers the layer
    effect_fraction: float = 0.5,  # effect mask: E >= effect_fraction * max E of the image
    min_effect: float = 0.01,  # an image is affected when max E reaches this (image units, [-1, 1] range)
    quantile: float = 0.01,  # unit threshold over these images when the dissection has none
    batch_size: int | None = None,  # images per render; None = 32
    keep_maps: bool = True,  # keep the maps, masks and renders for drawing
    progress: bool = True,
    device: torch.device | str | None = None,  # None = the generator's
    noise: NoiseMaps | None = None,  # the images' noise maps [N or 1, 1, r, r]; None = noise_mode "const"
) -> list[Localisation]:
    """Localise each attribute over the images (module docstring); one result per attribute."""
    g = space.generator
    check_segmenter(space, segmenter)
    if not isinstance(flat, torch.Tensor) or flat.ndim != 2 or flat.shape[1] != space.dim:
        got = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ValueError(f"flat styles must have shape [images, {space.dim}], got {got}")
    if flat.shape[0] < 1:
        raise ValueError("localisation needs at least one image")
    if not 0.0 < effect_fraction <= 1.0:
        raise ValueError(f"effect_fraction must be in (0, 1], got {effect_fraction}")
    if min_effect < 0:
        raise ValueError(f"min_effect must be >= 0, got {min_effect}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if dissection is not None and dissection.concepts != list(segmenter.concepts):
        raise ValueError(f"the dissection's concepts {dissection.concepts} differ from the segmenter's "
                         f"{list(segmenter.concepts)}; localise with the segmenter the dissection used")
    device = torch.device(device) if device is not None else module_device(g)
    g.to(device)
    if isinstance(segmenter, nn.Module):
        segmenter.to(device)
    batch_size = int(batch_size) if batch_size is not None else 32
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = flat.shape[0]
    flat = flat.detach().float()
    noise = check_noise(noise, n)
    shifts = attribute_shifts(space, flat, attributes, extremes, shift_size)
    concepts = list(segmenter.concepts)
    res = int(g.resolution)

    # The unit fed by each attribute's style, and where its threshold comes from.
    units: list[tuple[str, int] | None] = []
    for layer, ch, _ in shifts:
        feeding = feeding_unit_layer(space, layer)
        units.append(None if feeding is None else (feeding, ch))
    unit_layers = sorted({u[0] for u in units if u is not None}, key=space.layer_names.index)
    thresholds: dict[tuple[str, int], tuple[float, str]] = {}
    missing = []
    for u in units:
        if u is None or u in thresholds:
            continue
        if dissection is not None and u[0] in dissection.layers:
            thresholds[u] = (float(dissection.layers[u[0]].thresholds[u[1]]), "dissection")
        elif u not in missing:
            missing.append(u)

    def base_batches(desc: str):
        bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
        try:
            with torch.no_grad(), space.trace(retain=unit_layers) as seen:
                for start in range(0, n, batch_size):
                    fb = flat[start : start + batch_size].to(device)
                    nb = noise_on(noise_rows(noise, slice(start, start + fb.shape[0])), device)
                    img = space.render(fb, noise_mode="const", noise=nb)
                    yield start, fb, nb, img, {name: seen[name] for name in unit_layers}
                    bar.update(fb.shape[0])
        finally:
            bar.close()

    if missing:  # a first pass for the thresholds of units no dissection covers
        running = {u: RunningQuantile(1, device=device) for u in missing}
        for _, _, _, _, maps in base_batches("localisation: unit thresholds"):
            for u in missing:
                running[u].add(maps[u[0]][:, u[1] : u[1] + 1])
        for u in missing:
            thresholds[u] = (float(running[u].top_quantile(quantile)[0]), "quantile of these images")

    k = len(shifts)
    c = len(concepts)
    e_inter = torch.zeros(k, c, dtype=torch.float64)
    e_area = torch.zeros(k, dtype=torch.float64)
    e_concept = torch.zeros(k, c, dtype=torch.float64)
    u_inter = torch.zeros(k, c, dtype=torch.float64)
    u_area = torch.zeros(k, dtype=torch.float64)
    u_concept = torch.zeros(k, c, dtype=torch.float64)
    affected = torch.zeros(k, n, dtype=torch.bool)
    kept: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(k)]

    def keep(j: int, key: str, value: torch.Tensor | None) -> None:
        if keep_maps and value is not None:
            kept[j].setdefault(key, []).append(value.detach().cpu())

    for start, fb, nb, before, maps in base_batches("localisation: attributes"):
        b = fb.shape[0]
        masks_before = segment(segmenter, before)
        for j, (layer, ch, delta) in enumerate(shifts):
            coord = space.index(layer, ch)
            edited = space.edit(fb, [coord], delta[start : start + b, None].to(device), mode="add")
            with torch.no_grad():
                after = space.render(edited, noise_mode="const", noise=nb)
            masks = masks_before | segment(segmenter, after)  # [B, C, R, R]
            effect = (after - before).abs().mean(dim=1)  # [B, R, R]
            peak = effect.flatten(1).amax(dim=1)  # [B]
            hit = peak >= min_effect
            if min_effect == 0:
                hit &= peak > 0
            emask = (effect >= effect_fraction * peak[:, None, None]) & hit[:, None, None]
            affected[j, start : start + b] = hit.cpu()
            if bool(hit.any()):
                inter, area, carea = overlap_counts(emask[hit, None], masks[hit])
                e_inter[j] += inter[0].cpu()
                e_area[j] += area[0].cpu()
                e_concept[j] += carea.cpu()
            umap = umask = None
            if units[j] is not None:
                p, i = units[j]
                umap = upsample_maps(maps[p][:, i : i + 1], res)  # [B, 1, R, R]
                umask = umap > thresholds[units[j]][0]
                inter, area, carea = overlap_counts(umask, masks)
                u_inter[j] += inter[0].cpu()
                u_area[j] += area[0].cpu()
                u_concept[j] += carea.cpu()
                umap, umask = umap[:, 0], umask[:, 0]
            for key, value in (("effect", effect), ("effect_mask", emask), ("unit_map", umap), ("unit_mask", umask),
                               ("masks", masks), ("before", before), ("after", after)):
                keep(j, key, value)

    def iou(inter: torch.Tensor, area: torch.Tensor, carea: torch.Tensor) -> torch.Tensor:
        union = area + carea - inter
        return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(union))

    out = []
    for j, (layer, ch, delta) in enumerate(shifts):
        maps_j = {key: torch.cat(v) for key, v in kept[j].items()}
        u = units[j]
        out.append(Localisation(
            layer=layer,
            channel=ch,
            coordinate=space.index(layer, ch),
            delta=delta,
            concepts=concepts,
            effect_iou=iou(e_inter[j], e_area[j], e_concept[j]),
            affected=affected[j],
            unit=u,
            unit_threshold=None if u is None else thresholds[u][0],
            unit_threshold_source=None if u is None else thresholds[u][1],
            unit_iou=None if u is None else iou(u_inter[j], u_area[j], u_concept[j]),
            **maps_j,
        ))
    return out
