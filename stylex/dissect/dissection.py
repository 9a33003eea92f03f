"""Unit dissection: which concept does each unit of the generator draw (GAN Dissection, Bau et
al., ICLR 2019)?

For every unit ``u = (layer, channel)`` (see :mod:`stylex.dissect.base`) and every concept ``c``
of a segmenter, over the same set of generated images::

    t_u       = Q_{1-q}(A_u)                                     the unit's top-q threshold
    IoU_{u,c} = Σ|A_u↑ > t_u ∧ S_c| / Σ|A_u↑ > t_u ∨ S_c|        sums over pixels and images
    label_u   = argmax_c IoU_{u,c},  interpretable when IoU_{u,label_u} ≥ iou_threshold
    k_{u,c}   = Σ A_u↑ · S_c / Σ S_c                             mean activation where c is

with ``A_u`` the unit's map, ``A_u↑`` that map upsampled bilinearly to the segmentation's side
and ``S_c`` the segmenter's mask of the concept on the render. The threshold is taken over the
unit's activations at its own resolution (every position of every image); the statistics stream
(:mod:`stylex.dissect.stats`), so memory does not grow with the number of images.

Images
    *Noise path*: ``z ~ N(0, I)`` (seeded) → ``w = mapping(z)`` → render ``G(w ⊕ c)`` with ``c``
    a one-hot class vector, the classes taken in turn (image ``i`` gets ``classes[i % K]``), so
    every class is drawn equally often. One-hot vectors are what a confident classifier outputs
    and what the training samples and AttFind condition on; the classifier's probabilities of
    the render itself cannot be used, since the render depends on them. *Encoder path*
    (optional): validation images ``x`` give ``w = E(x)`` and ``c = C(x)``, the classifier's
    probabilities, as in training. Renders use ``noise_mode="const"``, except where noise maps
    are given: an encoder trained with ``model.encoder_noise`` gives each encoded image its own
    maps (:func:`stylex.stylespace.encode_noise_maps`), and ``noise`` gives the noise-path images theirs (the
    pipeline's: maps of real images, the layouts the training's noise path draws on).

Two passes over the same latents: pass 1 accumulates the thresholds, pass 2 the overlaps and
conditional means. The units of a unit layer ``L`` are modulated by the StyleSpace coordinates
``(M, i)`` for every style layer ``M`` in ``base.modulating_styles(L)``; the result records them.

Typical use::

    space = StyleSpace(export.generator)
    d = dissect(space, segmenter, num_images=1000)
    d.counts()["b16.conv1"]          # {concept: interpretable units}: the paper's bar chart
    d.top_units("exudate", 5)        # the five units with the highest IoU with "exudate"
    d.layers["b16.conv1"].thresholds # [U] t_u, read by the interventions
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from stylex.dissect.base import Segmenter, check_layers, modulating_styles, unit_counts
from stylex.dissect.stats import IoUAccumulator, RunningQuantile
from stylex.stylespace import NoiseMaps, StyleSpace, check_noise, encode_noise_maps, noise_cat, noise_rows

NOISE_CONDITIONING = "one-hot classes in turn (noise path)"
ENCODER_CONDITIONING = "classifier probabilities of the input (encoder path)"


# ============================================================================ results
@dataclass
class DissectedUnit:
    """One unit's dissection."""

    layer: str
    channel: int
    threshold: float  # t_u, in the unit's activation units
    label: str  # the concept of highest IoU
    iou: float  # IoU with that concept
    interpretable: bool  # iou >= the dissection's iou_threshold
    ious: dict[str, float]  # IoU with every concept
    conditional_mean: dict[str, float]  # k_{u,c} for every concept (NaN where it never occurs)
    styles: list[tuple[str, int]]  # the StyleSpace coordinates that scale this unit

    @property
    def name(self) -> str:
        return f"{self.layer}:{self.channel}"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "channel": self.channel, "threshold": self.threshold, "label": self.label,
                "iou": self.iou, "interpretable": self.interpretable, "ious": dict(self.ious),
                "conditional_mean": {k: _plain(v) for k, v in self.conditional_mean.items()},
                "styles": [list(s) for s in self.styles]}


@dataclass
class LayerDissection:
    """The dissection of every unit of one layer (CPU tensors; U units, C concepts)."""

    layer: str
    thresholds: torch.Tensor  # [U] float64 t_u
    iou: torch.Tensor  # [U, C] float64 IoU_{u,c}
    conditional_mean: torch.Tensor  # [U, C] float64 k_{u,c} (NaN where the concept never occurs)
    unit_area: torch.Tensor  # [U] share of pixels where the unit is above its threshold (≈ q)
    modulated_by: list[str]  # style layers M whose coordinate (M, i) scales unit i

    @property
    def units(self) -> int:
        return int(self.thresholds.shape[0])

    @property
    def labels(self) -> torch.Tensor:  # [U] int64 index of the best concept
        return self.iou.argmax(dim=1)

    @property
    def best_iou(self) -> torch.Tensor:  # [U]
        return self.iou.amax(dim=1)


@dataclass
class Dissection:
    """What :func:`dissect` found.

    ``layers[name]`` holds per-unit tensors (thresholds ``[U]``, IoU and ``k`` ``[U, C]``);
    :meth:`unit`, :meth:`units` and :meth:`top_units` give per-unit records, :meth:`counts` the
    paper's bar chart (interpretable units per concept in each layer).
    """

    concepts: list[str]  # C concept names, the segmenter's
    source: str  # the segmenter's one-line description
    layers: dict[str, LayerDissection]  # in synthesis order
    quantile: float  # q: the share of activations above each threshold
    iou_threshold: float  # a unit is interpretable when its best IoU reaches this
    num_images: int  # noise-path images
    num_encoded: int  # encoder-path images
    resolution: int  # R, the side at which IoU is measured
    concept_area: torch.Tensor  # [C] share of all pixels where each concept is present
    seed: int
    classes: list[int]  # the classes the noise path cycles through (empty when unconditional)
    conditioning: str  # how the images were conditioned
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    # ---- lookups ---------------------------------------------------------------------------
    def concept_index(
        self,
        concept: str,
    ) -> int:
        if concept not in self.concepts:
            raise ValueError(f"unknown concept {concept!r}; the concepts are {', '.join(self.concepts)}")
        return self.concepts.index(concept)

    def _layer(self, layer: str) -> LayerDissection:
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} was not dissected; the dissected layers are {', '.join(self.layers)}")
        return self.layers[layer]

    def thresholds(
        self,
        layer: str,
    ) -> torch.Tensor:  # [U] float64
        return self._layer(layer).thresholds

    def conditional_mean(
        self,
        layer: str,
        concept: str,
    ) -> torch.Tensor:  # [U] float64: k_{u,c} of every unit of the layer for one concept
        return self._layer(layer).conditional_mean[:, self.concept_index(concept)]

    def interpretable(
        self,
        layer: str,
    ) -> torch.Tensor:  # [U] bool
        return self._layer(layer).best_iou >= self.iou_threshold

    def unit(
        self,
        layer: str,
        channel: int,
    ) -> DissectedUnit:
        ld = self._layer(layer)
        if not 0 <= channel < ld.units:
            raise ValueError(f"channel {channel} is out of range for layer {layer!r}, which has {ld.units} units")
        iou = ld.iou[channel]
        best = int(iou.argmax())
        return DissectedUnit(
            layer=layer,
            channel=int(channel),
            threshold=float(ld.thresholds[channel]),
            label=self.concepts[best],
            iou=float(iou[best]),
            interpretable=bool(iou[best] >= self.iou_threshold),
            ious={c: float(v) for c, v in zip(self.concepts, iou)},
            conditional_mean={c: float(v) for c, v in zip(self.concepts, ld.conditional_mean[channel])},
            styles=[(m, int(channel)) for m in ld.modulated_by],
        )

    def units(self) -> list[DissectedUnit]:
        """Every unit, layer by layer in synthesis order."""
        return [self.unit(name, i) for name, ld in self.layers.items() for i in range(ld.units)]

    def top_units(
        self,
        concept: str,
        k: int = 10,
    ) -> list[DissectedUnit]:
        """The ``k`` units (over all layers) with the highest IoU with ``concept``, best first."""
        c = self.concept_index(concept)
        scored = [(float(ld.iou[i, c]), name, i) for name, ld in self.layers.items() for i in range(ld.units)]
        scored.sort(key=lambda x: -x[0])  # stable: ties keep synthesis order
        return [self.unit(name, i) for _, name, i in scored[: max(0, int(k))]]

    def counts(self) -> dict[str, dict[str, int]]:
        """``layer -> {concept: interpretable units labelled with it}`` (every concept listed)."""
        out: dict[str, dict[str, int]] = {}
        for name, ld in self.layers.items():
            labels = ld.labels[ld.best_iou >= self.iou_threshold]
            out[name] = {c: int((labels == j).sum()) for j, c in enumerate(self.concepts)}
        return out

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain types only (NaN becomes None); :meth:`from_json` reads it back."""
        return {
            "source": self.source,
            "concepts": list(self.concepts),
            "quantile": self.quantile,
            "iou_threshold": self.iou_threshold,
            "num_images": self.num_images,
            "num_encoded": self.num_encoded,
            "resolution": self.resolution,
            "seed": self.seed,
            "classes": list(self.classes),
            "conditioning": self.conditioning,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "concept_area": [_plain(v) for v in self.concept_area.tolist()],
            "counts": self.counts(),
            "layers": {
                name: {
                    "units": ld.units,
                    "modulated_by": list(ld.modulated_by),
                    "thresholds": [_plain(v) for v in ld.thresholds.tolist()],
                    "labels": [self.concepts[j] for j in ld.labels.tolist()],
                    "best_iou": [_plain(v) for v in ld.best_iou.tolist()],
                    "interpretable": (ld.best_iou >= self.iou_threshold).tolist(),
                    "unit_area": [_plain(v) for v in ld.unit_area.tolist()],
                    "iou": [[_plain(v) for v in row] for row in ld.iou.tolist()],
                    "conditional_mean": [[_plain(v) for v in row] for row in ld.conditional_mean.tolist()],
                }
                for name, ld in self.layers.items()
            },
        }

    @classmethod
    def from_json(
        cls,
        data: dict[str, Any],  # the output of to_json (e.g. read back from a file)
    ) -> "Dissection":
        def tensor(x: Any) -> torch.Tensor:
            return torch.tensor(_unplain(x), dtype=torch.float64)

        layers = {
            name: LayerDissection(
                layer=name,
                thresholds=tensor(ld["thresholds"]),
                iou=tensor(ld["iou"]),
                conditional_mean=tensor(ld["conditional_mean"]),
                unit_area=tensor(ld["unit_area"]),
                modulated_by=list(ld["modulated_by"]),
            )
            for name, ld in data["layers"].items()
        }
        return cls(
            concepts=list(data["concepts"]), source=data["source"], layers=layers, quantile=data["quantile"],
            iou_threshold=data["iou_threshold"], num_images=data["num_images"], num_encoded=data["num_encoded"],
            resolution=data["resolution"], concept_area=tensor(data["concept_area"]), seed=data["seed"],
            classes=list(data["classes"]), conditioning=data["conditioning"], seconds=data.get("seconds", 0.0),
            timings=dict(data.get("timings", {})),
        )

    def summary(self) -> str:
        """A few lines: images, thresholds and interpretable units per layer."""
        lines = [f"dissection of {sum(ld.units for ld in self.layers.values())} units in {len(self.layers)} layers "
                 f"over {self.num_images + self.num_encoded} images; concepts from {self.source}; "
                 f"top {self.quantile:g} thresholds, interpretable at IoU >= {self.iou_threshold:g}"]
        for name, counts in self.counts().items():
            shown = ", ".join(f"{c} {n}" for c, n in counts.items() if n) or "none"
            lines.append(f"  {name}: {sum(counts.values())}/{self.layers[name].units} interpretable ({shown})")
        return "\n".join(lines)


def _plain(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


def _unplain(x: Any) -> Any:
    if isinstance(x, list):
        return [_unplain(v) for v in x]
    return math.nan if x is None else x


# ============================================================================ latents
def module_device(module: Any) -> torch.device:
    """The device of a module's first parameter or buffer (CPU when it has none)."""
    if isinstance(module, nn.Module):
        for t in list(module.parameters()) + list(module.buffers()):
            return t.device
    return torch.device("cpu")


def noise_latents(
    generator: nn.Module,  # z_dim, c_dim, mapping(z, truncation_psi, update_w_avg)
    num_images: int,  # N
    classes: Sequence[int] | None = None,  # classes to cycle through; None = all c_dim classes
    seed: int = 0,
    truncation_psi: float = 1.0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # w [N, w_dim], c [N, c_dim] one-hot (None if c_dim == 0)
    """The noise-path latents of a dissection: the same for the same arguments on every device
    (``z`` is drawn on the CPU), so a later pass or another module can redraw them."""
    device = torch.device(device) if device is not None else module_device(generator)
    c_dim = int(getattr(generator, "c_dim", 0))
    classes = _check_classes(classes, c_dim)
    z = torch.randn(num_images, int(generator.z_dim), generator=torch.Generator().manual_seed(int(seed)))
    ws = []
    with torch.no_grad():
        for start in range(0, num_images, batch_size):
            zb = z[start : start + batch_size].to(device)
            ws.append(generator.mapping(zb, truncation_psi=truncation_psi, update_w_avg=False).float())
    w = torch.cat(ws) if ws else torch.zeros(0, int(generator.w_dim), device=device)
    if c_dim == 0:
        return w, None
    k = torch.tensor(classes, dtype=torch.long)[torch.arange(num_images) % len(classes)]
    return w, torch.nn.functional.one_hot(k, c_dim).float().to(device)


def _check_classes(classes: Sequence[int] | None, c_dim: int) -> list[int]:
    if c_dim == 0:
        if classes:
            raise ValueError(f"classes={list(classes)} given, but the generator is unconditional (c_dim = 0)")
        return []
    if classes is None:
        return list(range(c_dim))
    classes = [int(k) for k in classes]
    bad = [k for k in classes if not 0 <= k < c_dim]
    if not classes or bad:
        raise ValueError(f"classes must be a non-empty list of class indices in 0..{c_dim - 1}, got {classes}")
    return classes


def encoder_latents(
    encoder: nn.Module,  # images -> w [B, w_dim] (or [B, num_ws, w_dim], an encoder into w+)
    classifier: nn.Module,  # images -> class probabilities [B, K]
    images: torch.Tensor,  # [M, 3, R, R] in [-1, 1]
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:  # w [M, w_dim] (or [M, num_ws, w_dim]), c [M, K]
    """The encoder-path latents: ``w = E(x)``, ``c = C(x)``."""
    ws, cs = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device).float()
            w = encoder(x)
            c = classifier(x)
            if w.ndim not in (2, 3) or w.shape[0] != x.shape[0] or c.ndim != 2 or c.shape[0] != x.shape[0]:
                raise ValueError(f"for a batch of {x.shape[0]} images the encoder gave {tuple(w.shape)} and the "
                                 f"classifier {tuple(c.shape)}; expected [{x.shape[0]}, w_dim] (or "
                                 f"[{x.shape[0]}, num_ws, w_dim]) and [{x.shape[0]}, K]")
            ws.append(w.float())
            cs.append(c.float())
    return torch.cat(ws), torch.cat(cs)


def _noise_spans(
    parts: Sequence[tuple[int, NoiseMaps | None]],  # (images, their maps [n or 1, ...] or None) in order
) -> list[tuple[int, int, NoiseMaps | None]]:  # (start, end, maps of rows start..end) covering every image
    """One span over all images when all or none of them have maps, else one span per part."""
    parts = [(n, m) for n, m in parts if n > 0]
    if len({m is None for _, m in parts}) > 1:
        spans, start = [], 0
        for n, m in parts:
            spans.append((start, start + n, m))
            start += n
        return spans
    total = sum(n for n, _ in parts)
    if not parts or parts[0][1] is None:
        return [(0, total, None)]
    full = [{name: x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x for name, x in m.items()} for n, m in parts]
    return [(0, total, full[0] if len(full) == 1 else noise_cat(full))]


# ============================================================================ dissection
def default_batch_size(
    device: torch.device,
    resolution: int,
) -> int:
    """Renders per batch: 32 on a CPU, on a GPU 128 up to 64x64 and fewer above."""
    if device.type != "cuda":
        return 32
    return max(4, min(128, 128 * 64 * 64 // (resolution * resolution)))


def segment(
    segmenter: Segmenter,
    images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
) -> torch.Tensor:  # bool [B, C, R, R]
    """The segmenter's masks, checked against its contract."""
    masks = segmenter(images)
    b, _, r, _ = images.shape
    expected = (b, len(segmenter.concepts), r, r)
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != expected:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"the segmenter ({segmenter.source}) returned masks of shape {got} for {b} images; "
                         f"expected {expected} [batch, concepts, R, R]")
    return masks.to(images.device).bool()


def check_segmenter(
    space: StyleSpace,
    segmenter: Segmenter,
) -> None:
    """The segmenter's contract and resolution against the generator's (ValueError)."""
    for attr in ("concepts", "resolution", "source"):
        if not hasattr(segmenter, attr):
            raise ValueError(f"the segmenter has no {attr!r}; a segmenter needs concepts, resolution, source "
                             "and __call__(images) -> bool masks")
    if not segmenter.concepts:
        raise ValueError(f"the segmenter ({segmenter.source}) has no concepts")
    res = int(space.generator.resolution)
    if int(segmenter.resolution) != res:
        raise ValueError(f"the segmenter reads {segmenter.resolution}x{segmenter.resolution} images but the "
                         f"generator draws {res}x{res}; use a segmenter built for resolution {res}")


def _batches(
    w: torch.Tensor,  # [N, w_dim]
    c: torch.Tensor | None,  # [N, K]
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for start in range(0, w.shape[0], batch_size):
        yield w[start : start + batch_size], None if c is None else c[start : start + batch_size]


def dissect(
    space: StyleSpace,  # StyleSpace of the generator to dissect
    segmenter: Segmenter,  # concept masks of renders; resolution must equal the generator's
    layers: Sequence[str] | None = None,  # unit layers (conv layers); None = every one
    num_images: int = 1000,  # noise-path images
    batch_size: int | None = None,  # renders per batch; None = default_batch_size
    quantile: float = 0.01,  # q: share of each unit's activations above its threshold
    iou_threshold: float = 0.05,  # a unit is interpretable when its best IoU reaches this
    classes: Sequence[int] | None = None,  # classes the noise path cycles through; None = all
    seed: int = 0,  # seed of the noise-path z
    encoder_images: torch.Tensor | None = None,  # [M, 3, R, R] in [-1, 1]: also dissect on E(x)
    encoder: nn.Module | None = None,  # needed with encoder_images
    classifier: nn.Module | None = None,  # needed with encoder_images (c = C(x))
    progress: bool = True,  # tqdm bars
    device: torch.device | str | None = None,  # None = the generator's; the networks are moved there
    truncation_psi: float = 1.0,  # of the noise path's mapping
    bins: int = 2048,  # histogram bins per unit for the thresholds (error <= range / bins)
    noise: NoiseMaps | None = None,  # the noise-path images' maps [num_images or 1, 1, r, r]; None = "const"
) -> Dissection:
    """Dissect the units of ``layers`` against the segmenter's concepts (module docstring).

    ``num_images`` may be 0 only when ``encoder_images`` are given. Raises ValueError for an
    unknown layer (listing the valid ones), no images, a segmenter of another resolution, or
    shapes that do not match.
    """
    t_start = time.perf_counter()
    g = space.generator
    layers = check_layers(space, [layers] if isinstance(layers, str) else layers)
    check_segmenter(space, segmenter)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1) (the share of activations above a threshold), got {quantile}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    num_images = int(num_images)
    has_encoded = encoder_images is not None
    if num_images < 0 or (num_images < 1 and not has_encoded):
        raise ValueError(f"num_images must be >= 1 (the number of generated images to dissect), got {num_images}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    res = int(g.resolution)
    device = torch.device(device) if device is not None else module_device(g)
    batch_size = int(batch_size) if batch_size is not None else default_batch_size(device, res)
    classes_used = _check_classes(classes, int(getattr(g, "c_dim", 0)))
    g.to(device)
    if isinstance(segmenter, nn.Module):
        segmenter.to(device)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    w, c = noise_latents(g, num_images, classes_used or None, seed, truncation_psi, device=device)
    noise = check_noise(noise, num_images)
    encoded_noise = None
    num_encoded = 0
    conditioning = NOISE_CONDITIONING if num_images else ""
    if has_encoded:
        if encoder is None or classifier is None:
            raise ValueError("encoder_images need both encoder= and classifier= (w = E(x), c = C(x))")
        if encoder_images.ndim != 4 or tuple(encoder_images.shape[1:]) != (int(g.img_channels), res, res):
            raise ValueError(f"encoder_images must be [M, {g.img_channels}, {res}, {res}] in [-1, 1], "
                             f"got {tuple(encoder_images.shape)}")
        encoder.to(device)
        classifier.to(device)
        we, ce = encoder_latents(encoder, classifier, encoder_images, batch_size, device)
        encoded_noise = encode_noise_maps(encoder, encoder_images, batch_size, device)
        if c is not None and ce.shape[1] != c.shape[1]:
            raise ValueError(f"the classifier gives {ce.shape[1]} classes but the generator is conditioned on "
                             f"{c.shape[1]}")
        if we.ndim == 3 and w.ndim == 2:  # an encoder into w+: a mapped w is the same w at every layer
            w = w[:, None].expand(-1, we.shape[1], -1)
        w = torch.cat([w, we])
        c = ce if c is None else torch.cat([c, ce])
        num_encoded = int(encoder_images.shape[0])
        conditioning = " + ".join(x for x in (conditioning, ENCODER_CONDITIONING) if x)
    timings["latents"] = time.perf_counter() - t0
    total = w.shape[0]
    units = unit_counts(space)
    # Batches never mix images with and without noise maps.
    spans = _noise_spans([(num_images, noise), (num_encoded, encoded_noise)])

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor | None, NoiseMaps | None]]:
        for a, b, maps in spans:
            for (wb, cb), start in zip(_batches(w[a:b], None if c is None else c[a:b], batch_size),
                                       range(0, b - a, batch_size)):
                yield wb, cb, noise_rows(maps, slice(start, start + wb.shape[0]))

    def renders(desc: str) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
        try:
            with torch.no_grad(), space.trace(retain=layers) as seen:
                for wb, cb, nb in batches():
                    img = space.render(space.flat_styles(wb, cb), noise_mode="const", noise=nb)
                    maps = {}
                    for name in layers:
                        m = seen[name]
                        if m.ndim != 4 or m.shape[0] != wb.shape[0] or m.shape[1] != units[name]:
                            raise ValueError(f"layer {name!r} gave maps of shape {tuple(m.shape)} for {wb.shape[0]} "
                                             f"images; expected [{wb.shape[0]}, {units[name]}, h, w]")
                        maps[name] = m
                    yield img, maps
                    bar.update(wb.shape[0])
        finally:
            bar.close()

    # Pass 1: thresholds.
    t0 = time.perf_counter()
    running = {name: RunningQuantile(units[name], bins=bins, device=device) for name in layers}
    for _, maps in renders("dissection 1/2: thresholds"):
        for name in layers:
            running[name].add(maps[name])
    thresholds = {name: running[name].top_quantile(quantile) for name in layers}
    timings["thresholds"] = time.perf_counter() - t0

    # Pass 2: overlaps with the concepts and conditional means.
    t0 = time.perf_counter()
    concepts = list(segmenter.concepts)
    acc = {name: IoUAccumulator(thresholds[name], len(concepts)) for name in layers}
    for img, maps in renders("dissection 2/2: IoU"):
        masks = segment(segmenter, img)
        for name in layers:
            acc[name].add(maps[name], masks)
    timings["iou"] = time.perf_counter() - t0

    result_layers = {}
    for name in layers:
        a = acc[name]
        result_layers[name] = LayerDissection(
            layer=name,
            thresholds=thresholds[name].cpu(),
            iou=a.iou().cpu(),
            conditional_mean=a.conditional_mean().cpu(),
            unit_area=(a.unit_area / max(1, a.pixels)).cpu(),
            modulated_by=modulating_styles(space, name),
        )
    any_acc = acc[layers[0]]
    return Dissection(
        concepts=concepts,
        source=str(segmenter.source),
        layers=result_layers,
        quantile=float(quantile),
        iou_threshold=float(iou_threshold),
        num_images=num_images,
        num_encoded=num_encoded,
        resolution=res,
        concept_area=(any_acc.concept_area / max(1, any_acc.pixels)).cpu(),
        seed=int(seed),
        classes=classes_used,
        conditioning=conditioning,
        seconds=time.perf_counter() - t_start,
        timings=timings,
    )
