"""AttFind: which style coordinates does the classifier react to?

For every image ``n``, style coordinate ``i`` and direction ``d`` (0 = toward the coordinate's
minimum over a reference image set, 1 = toward its maximum) AttFind renders the image with

    s_i  <-  s_i + shift_size * (target_d[i] - s_i)        (shift_size 1 = exactly the min/max)

and records the classifier's log-probabilities of the edited render. An *effect* is the change
relative to the unedited render, measured either as a probability change (``measure="prob"``)
or as a change of the one-vs-rest logit ``log p_c - log(1 - p_c)`` (``measure="logit"``).

From the effects:

- unstable images (more than ``unstable_count`` coordinates change some class probability by
  more than ``unstable_threshold``) are set aside, as their output is fragile;
- the class-specific top-K for class c (the paper's AttFind) is picked greedily among the
  stable images not predicted as c: each step takes the (coordinate, direction) with the
  largest mean effect toward c over the images not yet explained, and an image counts as
  explained once its accumulated effect reaches the one-vs-rest decision boundary of c (or
  ``cap``). Multi-class is handled one-vs-rest;
- the image-specific top-K of an image are the coordinates whose change lowers its predicted
  class the most.

Speed. Only the layers at and after an edited style are re-rendered (StyleSpace prefix reuse),
and many edits share one forward pass. With ``prescreen`` set, one gradient per image gives a
first-order estimate of every effect, and only the most promising (coordinate, direction)
pairs are rendered: the ``prescreen`` best per class (on all images) and the
``prescreen_image`` best per image (on that image). Pairs that were not rendered hold NaN in
:attr:`AttFindResult.logp`.

Scale-out. The per-image work runs as the ``predict_step`` of a LightningModule, either in a
plain loop on one device or through Lightning's predict loop over all devices of a machine
(``trainer_kwargs``); results are gathered through files written by a prediction writer.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from stylex.stylespace import StyleSpace

MEASURES = ("prob", "logit")
DIRECTIONS = ("decrease", "increase")  # d = 0: toward the minimum, d = 1: toward the maximum


# ============================================================================ configuration
@dataclass
class AttFindConfig:
    """Settings of one AttFind search.

    Attributes:
        shift_size: fraction of the way to the min / max each edit moves a coordinate
            (1 = exactly to the extreme; must be > 0).
        measure: ``"prob"`` (change of the class probability) or ``"logit"`` (change of the
            one-vs-rest logit of the class).
        batch_size: edited images rendered per forward pass; None = 64 on a CPU (larger
            batches fall out of the caches and run slower per image there) and, on a GPU, 512
            up to 64x64 and proportionally fewer above (32 at 256x256) to bound the memory.
        reuse_prefix: re-render only the layers from the edited one on (identical results,
            faster); False renders every edit from the start.
        prescreen: None = render every (coordinate, direction) pair for every image; an
            integer M = rank pairs by a first-order (gradient) estimate and render only the M
            best per class on all images plus ``prescreen_image`` best per image.
        prescreen_image: per-image candidates under ``prescreen`` (None = ``max(4, M // 2)``).
        unstable_threshold: probability change (any class) that makes a coordinate count as
            "sensitive" for an image.
        unstable_count: an image with more sensitive coordinates than this is unstable and
            left out of the rankings; None = a tenth of the coordinates.
        cap: accumulated effect (in ``measure`` units) after which an image counts as explained
            by the class ranking; None = when the image would reach the one-vs-rest boundary of
            the class (probability 0.5, logit 0).
        affect_threshold: probability gain of the class that counts an image as "affected" by
            an attribute (for the reported share).
        noise_mode: synthesis noise; "const" keeps renders of equal styles identical.
    """

    shift_size: float = 1.0
    measure: str = "prob"
    batch_size: int | None = None
    reuse_prefix: bool = True
    prescreen: int | None = None
    prescreen_image: int | None = None
    unstable_threshold: float = 0.5
    unstable_count: int | None = None
    cap: float | None = None
    affect_threshold: float = 0.1
    noise_mode: str = "const"

    def __post_init__(self) -> None:
        if not self.shift_size > 0:
            raise ValueError(f"shift_size must be > 0 (1 = move to the min/max), got {self.shift_size}")
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {self.measure!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prescreen is not None and int(self.prescreen) < 1:
            raise ValueError(f"prescreen must be None (exhaustive) or >= 1 candidates, got {self.prescreen}")
        if self.prescreen_image is not None and int(self.prescreen_image) < 0:
            raise ValueError(f"prescreen_image must be >= 0, got {self.prescreen_image}")


# ============================================================================ measures
def log1mexp(
    logp: torch.Tensor,  # log p, p in [0, 1]
) -> torch.Tensor:  # log(1 - p)
    """``log(1 - exp(logp))`` without cancellation near p = 0 or p = 1."""
    logp = logp.clamp(max=0.0)
    return torch.where(
        logp > -math.log(2.0),
        torch.log(-torch.expm1(logp)),
        torch.log1p(-torch.exp(logp)),
    )


def ovr_logit(
    logp: torch.Tensor,  # [..., K] log-probabilities
) -> torch.Tensor:  # [..., K]
    """One-vs-rest logit of every class: ``log p_c - log(1 - p_c)``, clamped to +-30 so that a
    saturated classifier gives large but finite numbers."""
    return (logp - log1mexp(logp)).clamp(-30.0, 30.0)


def to_measure(
    logp: torch.Tensor,  # [..., K] log-probabilities
    measure: str,  # "prob" | "logit"
) -> torch.Tensor:  # [..., K]
    if measure == "prob":
        return logp.exp()
    if measure == "logit":
        return ovr_logit(logp)
    raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def measure_change(
    logp_edit: torch.Tensor,  # [N, ..., K] log-probabilities of edited renders (NaN = not rendered)
    logp_base: torch.Tensor,  # [N, K] log-probabilities of the unedited renders
    measure: str,
) -> torch.Tensor:  # [N, ..., K]: effect on every class, NaN where not rendered
    """Effect of each edit on each class, in ``measure`` units."""
    n, k = logp_base.shape
    assert logp_edit.shape[0] == n and logp_edit.shape[-1] == k, (
        f"edited log-probabilities {tuple(logp_edit.shape)} do not match the base {tuple(logp_base.shape)}"
    )
    base = logp_base.view(n, *([1] * (logp_edit.ndim - 2)), k)
    return to_measure(logp_edit, measure) - to_measure(base, measure)


# ============================================================================ edits and targets
def shift_targets(
    flat: torch.Tensor,  # [N, S] styles of the explained images
    low: torch.Tensor,  # [S] per-coordinate minimum over the reference set
    high: torch.Tensor,  # [S] per-coordinate maximum over the reference set
    shift_size: float = 1.0,
) -> torch.Tensor:  # [N, S, 2]: the edited value of every coordinate, toward min (0) / max (1)
    """``s + shift_size * (extreme - s)`` for both extremes."""
    assert flat.ndim == 2 and low.shape == high.shape == flat.shape[1:], (
        f"styles {tuple(flat.shape)} and min/max {tuple(low.shape)}/{tuple(high.shape)} must be [N, S] and [S]"
    )
    extremes = torch.stack([low, high], dim=-1).to(flat)  # [S, 2]
    return flat[:, :, None] + shift_size * (extremes[None] - flat[:, :, None])


# ============================================================================ the evaluator
class EffectEvaluator(nn.Module):
    """Renders styles (edited or not) and classifies the renders.

    Holds the generator and classifier as submodules so that the pair moves between devices as
    one module; it never changes their weights or modes.
    """

    def __init__(
        self,
        generator: nn.Module,  # stylex Generator (the EMA one of a run)
        classifier: nn.Module,  # images [B, 3, R, R] in [-1, 1] -> logits [B, K]
        batch_size: int | None = None,  # renders per forward pass; None = by device (see AttFindConfig)
        reuse_prefix: bool = True,
        noise_mode: str = "const",
    ) -> None:
        super().__init__()
        self.generator = generator
        self.classifier = classifier
        self.space = StyleSpace(generator)
        self._batch_size = None if batch_size is None else int(batch_size)
        self.reuse_prefix = bool(reuse_prefix)
        self.noise_mode = noise_mode

    # Never switch the wrapped networks to training mode (BatchNorm statistics must not move).
    def train(self, mode: bool = True) -> "EffectEvaluator":
        return self

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def batch_size(self) -> int:
        if self._batch_size is not None:
            return self._batch_size
        if self.device.type == "cpu":
            return 64
        r = int(getattr(self.generator, "resolution", 64))
        return int(min(512, max(16, 512 * (64 / r) ** 2)))

    def classify(
        self,
        images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # [B, K] float32 log-probabilities
        return self.classifier(images).float().log_softmax(dim=-1)

    def log_probs(
        self,
        flat: torch.Tensor,  # [B, S] styles
    ) -> torch.Tensor:  # [B, K]
        """Log-probabilities of full renders, ``batch_size`` at a time."""
        outs = [
            self.classify(self.space.render(flat[i : i + self.batch_size], noise_mode=self.noise_mode))
            for i in range(0, flat.shape[0], self.batch_size)
        ]
        return torch.cat(outs) if outs else flat.new_zeros(0, 0)

    def _chunks(
        self,
        coords: torch.Tensor,  # [M] sorted ascending
    ) -> list[tuple[int, int]]:
        """``(start, stop)`` slices of ``coords`` rendered together.

        Edits of one layer resume from that layer. Small groups of consecutive layers are
        merged and resumed from the earliest of them: a few rows more of the deeper layers cost
        less than an extra, half-empty forward pass.
        """
        m = coords.shape[0]
        if m == 0:
            return []
        layer_starts = torch.tensor([self.space.offsets[name] for name in self.space.layer_names])
        layer_of = torch.bucketize(coords.cpu(), layer_starts, right=True) - 1  # [M] layer index
        bounds = [0] + (torch.nonzero(layer_of[1:] != layer_of[:-1]).flatten() + 1).tolist() + [m]
        min_chunk = max(1, self.batch_size // 4)
        chunks: list[tuple[int, int]] = []
        start = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            size = a - start
            if size > 0 and (size >= min_chunk or (b - start) > self.batch_size):
                chunks.append((start, a))
                start = a
            while b - start > self.batch_size:  # a layer larger than one batch
                chunks.append((start, start + self.batch_size))
                start += self.batch_size
        if start < m:
            chunks.append((start, m))
        return chunks

    def edit_log_probs(
        self,
        flat: torch.Tensor,  # [B, S] styles of B images
        image: torch.Tensor,  # [M] int64: which image each edit belongs to
        coords: torch.Tensor,  # [M] int64: the coordinate it changes (any order, repeats allowed)
        values: torch.Tensor,  # [M]: the coordinate's new value
    ) -> tuple[torch.Tensor, torch.Tensor]:  # log p of the unedited renders [B, K], of each edit [M, K]
        """Classify B images under M single-coordinate edits.

        The edits of all images are sorted by layer and rendered ``batch_size`` at a time, each
        batch resuming from the state the unedited images had when entering the earliest
        edited layer, so edits of different images share forward passes (small per-image edit
        lists, as under pre-screening, still make full batches).
        """
        assert flat.ndim == 2 and flat.shape[1] == self.space.dim, (
            f"styles must be [B, {self.space.dim}], got {tuple(flat.shape)}"
        )
        m = coords.shape[0]
        assert coords.ndim == 1 and image.shape == values.shape == coords.shape, (
            f"image, coords and values must all be [M], got {tuple(image.shape)}, {tuple(coords.shape)}, "
            f"{tuple(values.shape)}"
        )
        cache: dict | None = {} if self.reuse_prefix else None
        base = self.log_probs(flat) if cache is None else self.classify(
            self.space.render(flat, noise_mode=self.noise_mode, cache=cache))
        order = torch.argsort(coords, stable=True)
        sorted_coords, sorted_values, sorted_image = coords[order], values[order], image[order]
        out = torch.empty(m, base.shape[1], device=base.device)
        for a, b in self._chunks(sorted_coords):
            rows = sorted_image[a:b]
            edited = flat[rows].scatter(1, sorted_coords[a:b, None], sorted_values[a:b, None].to(flat.dtype))
            if cache is None:
                img = self.space.render(edited, noise_mode=self.noise_mode)
            else:
                start = self.space.layer_of(int(sorted_coords[a]))
                x, prev = cache[start]
                # The state entering `start` of the image each row edits (the prefix is unedited).
                state = {start: type(cache[start])(x[rows], None if prev is None else prev[rows])}
                img = self.space.render(edited, noise_mode=self.noise_mode, from_layer=start, cache=state)
            out[order[a:b]] = self.classify(img)
        return base, out

    def probability_jacobian(
        self,
        flat: torch.Tensor,  # [B, S]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # log p [B, K]; d p_k / d s_i [B, K, S]
        """Gradient of every class probability with respect to every style coordinate.

        One backward pass per image: the image is repeated K times and row k differentiates
        p_k. Parameters receive no gradient (``torch.autograd.grad`` on the styles only).
        """
        b, s = flat.shape
        with torch.enable_grad():
            k = None
            logps, jacs = [], []
            step = max(1, self.batch_size // 8)
            for i in range(0, b, step):
                x = flat[i : i + step].detach()
                if k is None:
                    with torch.no_grad():
                        k = self.classify(self.space.render(x[:1], noise_mode=self.noise_mode)).shape[1]
                rep = x.repeat_interleave(k, dim=0).requires_grad_(True)  # [bk * K, S]
                logp = self.classify(self.space.render(rep, noise_mode=self.noise_mode))  # [bk * K, K]
                probs = logp.exp().view(-1, k, k)
                diag = torch.diagonal(probs, dim1=1, dim2=2)  # [bk, K]: row k of copy k
                (grad,) = torch.autograd.grad(diag.sum(), rep)
                logps.append(logp.view(-1, k, k)[:, 0].detach())
                jacs.append(grad.view(-1, k, s).detach())
        return torch.cat(logps), torch.cat(jacs)


# ============================================================================ per-image work as a predict step
class _ImageSet(Dataset):
    """Image ``n``: its styles and the ids of the (coordinate, direction) pairs to render."""

    def __init__(self, flat: torch.Tensor, pairs: Sequence[torch.Tensor] | None) -> None:
        self.flat = flat
        self.pairs = pairs

    def __len__(self) -> int:
        return self.flat.shape[0]

    def __getitem__(self, n: int) -> dict[str, Any]:
        item = {"index": n, "flat": self.flat[n]}
        if self.pairs is not None:
            item["pairs"] = self.pairs[n]
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"index": torch.tensor([it["index"] for it in items]), "flat": torch.stack([it["flat"] for it in items])}
    if "pairs" in items[0]:
        out["pairs"] = [it["pairs"] for it in items]  # ragged: one id list per image
    return out


class AttFindPredictor(pl.LightningModule):
    """The per-image part of AttFind as Lightning predict steps.

    ``phase="screen"``: base log-probabilities and the probability Jacobian of each image.
    ``phase="effects"``: log-probabilities of the requested edits of each image. Pair id
    ``2 * i + d`` is coordinate ``i`` moved in direction ``d``.
    """

    def __init__(
        self,
        evaluator: EffectEvaluator,
        low: torch.Tensor,  # [S] per-coordinate minimum of the reference set
        high: torch.Tensor,  # [S] maximum
        shift_size: float,
    ) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.register_buffer("low", low.detach().clone())
        self.register_buffer("high", high.detach().clone())
        self.shift_size = float(shift_size)
        self.phase = "effects"

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Any]:
        flat = batch["flat"].to(self.low.device)
        if self.phase == "screen":
            logp, jac = self.evaluator.probability_jacobian(flat)
            return {"index": batch["index"].cpu(), "logp_base": logp.cpu(), "jacobian": jac.cpu()}
        targets = shift_targets(flat, self.low, self.high, self.shift_size)  # [B, S, 2]
        pairs = [p.to(flat.device) for p in batch["pairs"]]
        image = torch.cat([torch.full_like(p, n) for n, p in enumerate(pairs)])
        ids = torch.cat(pairs)
        coords, dirs = ids // 2, ids % 2
        with torch.no_grad():
            base, logp = self.evaluator.edit_log_probs(flat, image, coords, targets[image, coords, dirs])
        sizes = [p.numel() for p in pairs]
        return {"index": batch["index"].cpu(), "logp_base": base.cpu(), "logp": list(logp.cpu().split(sizes)),
                "pairs": [p.cpu() for p in pairs]}


class _FileGather(BasePredictionWriter):
    """Writes each rank's predictions to files; the main process reads them all back."""

    def __init__(self, folder: Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = folder

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        torch.save(prediction, self.folder / f"rank{trainer.global_rank}_batch{batch_idx}.pt")


def _run_predict(
    predictor: AttFindPredictor,
    dataset: _ImageSet,
    images_per_step: int,
    trainer_kwargs: dict[str, Any] | None,  # None = a plain loop on the predictor's device
) -> list[dict[str, Any]]:
    loader = DataLoader(dataset, batch_size=images_per_step, shuffle=False, collate_fn=_collate)
    if trainer_kwargs is None:
        return [predictor.predict_step(batch, i) for i, batch in enumerate(loader)]
    with tempfile.TemporaryDirectory(prefix="attfind-") as tmp:
        folder = Path(tmp)
        kwargs = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                  "enable_model_summary": False, **trainer_kwargs}
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), _FileGather(folder)]
        kwargs["inference_mode"] = False  # screening needs gradients inside predict_step
        trainer = pl.Trainer(**kwargs)
        trainer.predict(predictor, dataloaders=loader, return_predictions=False)
        return [torch.load(f, weights_only=False) for f in sorted(folder.glob("rank*_batch*.pt"))]


# ============================================================================ rankings
@dataclass
class Attribute:
    """One ranked (coordinate, direction) pair."""

    coordinate: int  # flat StyleSpace index
    layer: str
    channel: int
    direction: int  # 0 = toward the minimum ("decrease"), 1 = toward the maximum ("increase")
    effect: float  # mean effect toward the target class over the pool, in measure units
    probability_change: float  # mean change of the target class probability over the pool
    share_affected: float  # share of pool images whose target probability rises by >= affect_threshold
    flip_share: float  # share of pool images whose predicted class becomes the target
    rank: int = 0

    @property
    def direction_name(self) -> str:
        return DIRECTIONS[self.direction]

    @property
    def pair(self) -> int:
        return 2 * self.coordinate + self.direction

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "coordinate": self.coordinate,
            "layer": self.layer,
            "channel": self.channel,
            "direction": self.direction_name,
            "mean_effect": self.effect,
            "mean_probability_change": self.probability_change,
            "share_affected": self.share_affected,
            "flip_share": self.flip_share,
        }


def greedy_class_ranking(
    effect: torch.Tensor,  # [P, S, 2] effect toward the class on each pool image (NaN = not rendered)
    need: torch.Tensor,  # [P] accumulated effect at which each image counts as explained
    k: int,
) -> list[tuple[int, int]]:  # up to k (coordinate, direction) pairs, best first
    """The paper's greedy AttFind step for one class.

    Repeatedly takes the pair with the largest mean effect over the images not yet explained
    (only pairs rendered on every pool image compete; a coordinate is used at most once), adds
    its effect to each image's total, and marks images whose total reaches ``need`` as
    explained. Once every image is explained the remaining picks use all images.
    """
    p, s, _ = effect.shape
    assert need.shape == (p,), f"need must be [{p}], got {tuple(need.shape)}"
    if p == 0:
        return []
    available = ~torch.isnan(effect).any(dim=0)  # [S, 2]
    values = torch.nan_to_num(effect, nan=0.0).double()
    total = torch.zeros(p, dtype=torch.float64)
    active = torch.ones(p, dtype=torch.bool)
    used = torch.zeros(s, dtype=torch.bool)
    picks: list[tuple[int, int]] = []
    for _ in range(k):
        rows = active if active.any() else torch.ones_like(active)
        score = values[rows].mean(dim=0)  # [S, 2]
        score[~available] = -math.inf
        score[used] = -math.inf
        best = int(torch.argmax(score))
        if not math.isfinite(float(score.flatten()[best])):
            break
        i, d = divmod(best, 2)
        picks.append((i, d))
        used[i] = True
        total += values[:, i, d]
        active &= total < need.double()
    return picks


def best_per_coordinate(
    score: torch.Tensor,  # [S, 2] (NaN = not rendered)
    k: int,
) -> list[tuple[int, int, float]]:  # up to k (coordinate, direction, score), best first
    """The k coordinates with the highest score in their better direction."""
    filled = torch.nan_to_num(score, nan=-math.inf)
    best, direction = filled.max(dim=1)
    order = torch.argsort(best, descending=True, stable=True)[:k]
    return [(int(i), int(direction[i]), float(best[i])) for i in order if math.isfinite(float(best[i]))]


# ============================================================================ the result
@dataclass
class AttFindResult:
    """Everything one search produced (CPU tensors).

    ``logp[n, i, d]`` are the log-probabilities of image n with coordinate i moved in direction d
    (NaN where the pair was not rendered under pre-screening); ``logp_base[n]`` those of the
    unedited render.
    """

    space: StyleSpace
    config: AttFindConfig
    flat: torch.Tensor  # [N, S] styles of the explained images
    targets: torch.Tensor  # [N, S, 2] edited values
    logp_base: torch.Tensor  # [N, K]
    logp: torch.Tensor  # [N, S, 2, K]
    stable: torch.Tensor  # [N] bool
    sensitive: torch.Tensor  # [N] number of sensitive coordinates per image
    classes: list[int]  # the explained classes
    rankings: dict[int, list[Attribute]]  # class -> class-specific top-K
    pools: dict[int, torch.Tensor]  # class -> image indices the class ranking used
    top_k: int
    mode: str  # "exhaustive" | "prescreen"
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    estimate: torch.Tensor | None = None  # [N, S, 2, K] first-order probability changes (prescreen)
    warnings: list[str] = field(default_factory=list)
    _effects: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_images(self) -> int:
        return self.flat.shape[0]

    @property
    def num_classes(self) -> int:
        return self.logp_base.shape[1]

    @property
    def predicted(self) -> torch.Tensor:  # [N] int64
        return self.logp_base.argmax(dim=1)

    @property
    def probs(self) -> torch.Tensor:  # [N, K]
        return self.logp_base.exp()

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.num_images)

    @property
    def evaluated(self) -> torch.Tensor:  # [N, S, 2] bool: which pairs were rendered
        return ~torch.isnan(self.logp[..., 0])

    def effects(self, measure: str | None = None) -> torch.Tensor:  # [N, S, 2, K]
        """Effects on every class in ``measure`` units (the config's by default); NaN where
        not rendered. Computed once per measure."""
        measure = measure or self.config.measure
        if measure not in self._effects:
            self._effects[measure] = measure_change(self.logp, self.logp_base, measure)
        return self._effects[measure]

    def attribute(
        self,
        coordinate: int,
        direction: int,
        target: int,  # class the effect is measured toward
        images: torch.Tensor | None = None,  # [P] image indices; None = the class pool
    ) -> Attribute:
        """Summary of one pair toward ``target`` over ``images``."""
        images = self.pools.get(target, torch.arange(self.num_images)) if images is None else images
        layer, channel = self.space.coordinate(coordinate)
        logp = self.logp[images, coordinate, direction]  # [P, K]
        eff = measure_change(logp[:, None], self.logp_base[images], self.config.measure)[:, 0, target]
        dp = logp[:, target].exp() - self.logp_base[images, target].exp()
        ok = ~torch.isnan(dp)

        def mean(x: torch.Tensor) -> float:
            return float(x[ok].double().mean()) if ok.any() else float("nan")

        return Attribute(
            coordinate=int(coordinate),
            layer=layer,
            channel=int(channel),
            direction=int(direction),
            effect=mean(eff),
            probability_change=mean(dp),
            share_affected=mean((dp >= self.config.affect_threshold).double()),
            flip_share=mean((logp.argmax(dim=1) == target).double()),
        )

    def image_topk(
        self,
        n: int,  # image index
        k: int,
        target: int | None = None,  # None: away from the image's predicted class; else toward `target`
    ) -> list[tuple[int, int, float]]:  # (coordinate, direction, effect), best first
        """Image-specific ranking: the k coordinates with the largest effect for image n."""
        eff = self.effects()[n]  # [S, 2, K]
        score = -eff[..., int(self.predicted[n])] if target is None else eff[..., target]
        return best_per_coordinate(score, k)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        return {
            "mode": self.mode,
            "measure": self.config.measure,
            "shift_size": self.config.shift_size,
            "num_images": self.num_images,
            "num_stable": int(self.stable.sum()),
            "seconds": self.seconds,
            "seconds_per_image": self.seconds_per_image,
            "timings": dict(self.timings),
            "pairs_rendered_per_image": float(self.evaluated.sum(dim=(1, 2)).double().mean()),
            "classes": {
                names[c]: {
                    "index": c,
                    "pool_size": int(self.pools[c].numel()),
                    "attributes": [a.to_dict() for a in self.rankings[c]],
                }
                for c in self.classes
            },
            "warnings": list(self.warnings),
        }


# ============================================================================ AttFind
class AttFind:
    """Runs the search on styles; see the module docstring for the method.

    Example::

        finder = AttFind(export.generator, export.classifier, AttFindConfig(prescreen=32))
        flat = finder.encode(export.encoder, images)          # [N, S]
        result = finder.run(flat, top_k=4)
        result.rankings[1][0].to_dict()
    """

    def __init__(
        self,
        generator: nn.Module,
        classifier: nn.Module,
        config: AttFindConfig | None = None,
        device: str | torch.device | None = None,  # None = where the generator is
    ) -> None:
        self.config = config or AttFindConfig()
        self.evaluator = EffectEvaluator(
            generator, classifier, batch_size=self.config.batch_size,
            reuse_prefix=self.config.reuse_prefix, noise_mode=self.config.noise_mode,
        )
        if device is not None:
            self.evaluator.to(device)
        self.space = self.evaluator.space

    @property
    def device(self) -> torch.device:
        return self.evaluator.device

    # ---------------------------------------------------------------- styles of the images
    @torch.no_grad()
    def encode(
        self,
        encoder: nn.Module,  # images -> w [B, w_dim]
        images: torch.Tensor,  # [N, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # [N, S] on the CPU
        """Styles of real images: ``w = E(x)``, conditioned on the classifier's probabilities."""
        g = self.evaluator.generator
        r = int(getattr(g, "resolution", images.shape[-1]))
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (r, r):
            raise ValueError(f"images must be [N, 3, {r}, {r}] in [-1, 1] (the model's resolution), "
                             f"got {tuple(images.shape)}")
        out = []
        step = self.evaluator.batch_size
        for i in range(0, images.shape[0], step):
            x = images[i : i + step].to(self.device, torch.float32)
            c = self.evaluator.classify(x).exp()
            out.append(self.space.flat_styles(encoder(x), c).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.space.dim)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        seed: int = 0,
        truncation_psi: float = 1.0,
    ) -> torch.Tensor:  # [num, S] on the CPU
        """Styles of generated images: ``w = mapping(z)`` with one-hot class vectors cycling
        through the classes, so every class is represented."""
        g = self.evaluator.generator
        gen = torch.Generator().manual_seed(int(seed))
        z = torch.randn(num, g.z_dim, generator=gen).to(self.device)
        w = g.mapping(z, truncation_psi=truncation_psi, update_w_avg=False)
        c = torch.nn.functional.one_hot(torch.arange(num) % g.c_dim, g.c_dim).float().to(self.device)
        return self.space.flat_styles(w, c).cpu()

    # ---------------------------------------------------------------- the search
    def run(
        self,
        flat: torch.Tensor,  # [N, S] styles of the explained images
        top_k: int = 4,
        classes: Iterable[int] | None = None,  # None = every class
        reference: torch.Tensor | None = None,  # [M, S] styles whose min/max set the targets; None = flat
        trainer_kwargs: dict[str, Any] | None = None,  # Lightning Trainer args for multi-device predict
        images_per_step: int | None = None,  # images per predict step; None = enough for a few full batches
        progress: Callable[[str], None] | None = None,
    ) -> AttFindResult:
        cfg = self.config
        space = self.space
        if flat.ndim != 2 or flat.shape[1] != space.dim:
            raise ValueError(f"styles must be [N, {space.dim}], got {tuple(flat.shape)}")
        if flat.shape[0] == 0:
            raise ValueError("AttFind needs at least one image")
        if not 1 <= int(top_k) <= space.dim:
            raise ValueError(f"top_k must lie in [1, {space.dim}] (the number of style coordinates), got {top_k}")
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        flat = flat.detach().float().cpu()
        stats = space.statistics(flat if reference is None else torch.cat([reference.detach().float().cpu(), flat]))
        predictor = AttFindPredictor(self.evaluator, stats["min"], stats["max"], cfg.shift_size)
        if trainer_kwargs is None:
            predictor.to(self.device)
        targets = shift_targets(flat, stats["min"], stats["max"], cfg.shift_size)
        n, s = flat.shape
        say = progress or (lambda msg: None)

        # ---- which pairs each image renders
        estimate = None
        if cfg.prescreen is None:
            pair_lists = [torch.arange(2 * s)] * n
            mode = "exhaustive"
        else:
            say(f"pre-screening {n} images with one gradient each")
            t = time.perf_counter()
            predictor.phase = "screen"
            step = images_per_step or max(1, self.evaluator.batch_size // 8)
            outs = _run_predict(predictor, _ImageSet(flat, None), step, trainer_kwargs)
            logp0, jac = _merge_screen(outs, n)
            timings["prescreen"] = time.perf_counter() - t
            estimate = jac.permute(0, 2, 1)[:, :, None, :] * (targets - flat[:, :, None])[..., None]  # [N,S,2,K]
            pair_lists = self._candidates(estimate, logp0, classes, top_k)
            mode = "prescreen"

        say(f"rendering {sum(len(p) for p in pair_lists)} edits of {n} images")
        t = time.perf_counter()
        predictor.phase = "effects"
        edits = sum(len(p) for p in pair_lists) / n
        step = images_per_step or max(1, min(n, math.ceil(4 * self.evaluator.batch_size / max(1.0, edits))))
        outs = _run_predict(predictor, _ImageSet(flat, pair_lists), step, trainer_kwargs)
        logp_base, logp = _merge_effects(outs, n, s)
        timings["effects"] = time.perf_counter() - t
        result = self.rank(flat, targets, logp_base, logp, top_k, classes, estimate)
        result.mode = mode
        result.seconds = time.perf_counter() - t0
        result.timings = timings
        return result

    def _candidates(
        self,
        estimate: torch.Tensor,  # [N, S, 2, K] first-order probability changes
        logp_base: torch.Tensor,  # [N, K]
        classes: Iterable[int] | None,
        top_k: int,
    ) -> list[torch.Tensor]:  # per image: pair ids to render
        cfg = self.config
        n, s, _, k = estimate.shape
        if cfg.measure == "logit":
            # d logit / d p = 1 / (p (1 - p)): the same first-order estimate in logit units
            p = logp_base.exp().clamp(1e-6, 1 - 1e-6)
            estimate = estimate / (p * (1 - p))[:, None, None, :]
        pred = logp_base.argmax(dim=1)
        m = min(2 * s, max(int(cfg.prescreen), top_k))
        m_img = cfg.prescreen_image if cfg.prescreen_image is not None else max(4, m // 2)
        m_img = min(2 * s, m_img)
        shared: list[torch.Tensor] = []
        for c in _class_list(classes, k):
            pool = pred != c
            rows = estimate[pool] if pool.any() else estimate
            shared.append(torch.topk(rows[..., c].mean(dim=0).flatten(), m).indices)
        shared_ids = torch.unique(torch.cat(shared)) if shared else torch.zeros(0, dtype=torch.long)
        lists = []
        for i in range(n):
            own = torch.topk((-estimate[i, :, :, pred[i]]).flatten(), m_img).indices if m_img else shared_ids[:0]
            lists.append(torch.unique(torch.cat([shared_ids, own])))
        return lists

    def rank(
        self,
        flat: torch.Tensor,  # [N, S]
        targets: torch.Tensor,  # [N, S, 2]
        logp_base: torch.Tensor,  # [N, K]
        logp: torch.Tensor,  # [N, S, 2, K] (NaN = not rendered)
        top_k: int,
        classes: Iterable[int] | None = None,
        estimate: torch.Tensor | None = None,  # [N, S, 2, K] first-order probability changes
    ) -> AttFindResult:
        """Stability filter and class rankings from rendered effects."""
        cfg = self.config
        n, s = flat.shape
        k = logp_base.shape[1]
        warnings: list[str] = []
        # ---- stability: rendered probability changes, first-order estimates where not rendered
        dp = logp.exp() - logp_base.exp()[:, None, None, :]
        if estimate is not None:
            dp = torch.where(torch.isnan(dp), estimate, dp)
        sensitive = (torch.nan_to_num(dp, nan=0.0).abs().amax(dim=(2, 3)) > cfg.unstable_threshold).sum(dim=1)
        limit = cfg.unstable_count if cfg.unstable_count is not None else max(1, s // 10)
        stable = sensitive <= limit
        if not stable.any():
            warnings.append(
                f"every image has more than {limit} coordinates changing a class probability by more than "
                f"{cfg.unstable_threshold}; ranking over all images instead (raise unstable_count or "
                "unstable_threshold to silence this)"
            )
            stable = torch.ones(n, dtype=torch.bool)

        result = AttFindResult(
            space=self.space, config=cfg, flat=flat, targets=targets, logp_base=logp_base, logp=logp,
            stable=stable, sensitive=sensitive, classes=_class_list(classes, k), rankings={}, pools={},
            top_k=int(top_k), mode="exhaustive", seconds=0.0, estimate=estimate, warnings=warnings,
        )
        pred = result.predicted
        eff = result.effects()  # [N, S, 2, K]
        base_measure = to_measure(logp_base, cfg.measure)  # [N, K]
        boundary = 0.5 if cfg.measure == "prob" else 0.0
        for c in result.classes:
            pool = torch.nonzero(stable & (pred != c)).flatten()
            if pool.numel() == 0:
                pool = torch.nonzero(stable).flatten()
                warnings.append(
                    f"class {c}: every stable image is already predicted as this class; its ranking "
                    "uses them all (explain more images for a sharper ranking)"
                )
            need = (torch.full((pool.numel(),), float(cfg.cap)) if cfg.cap is not None
                    else (boundary - base_measure[pool, c]).clamp_min(0.0))
            picks = greedy_class_ranking(eff[pool][..., c], need, int(top_k))
            result.pools[c] = pool
            ranked = []
            for r, (i, d) in enumerate(picks, start=1):
                a = result.attribute(i, d, c, pool)
                a.rank = r
                ranked.append(a)
            if len(ranked) < top_k:
                warnings.append(f"class {c}: only {len(ranked)} of {top_k} attributes could be ranked "
                                "(too few pairs were rendered on every image; raise prescreen)")
            result.rankings[c] = ranked
        return result


def _class_list(classes: Iterable[int] | None, k: int) -> list[int]:
    out = list(range(k)) if classes is None else [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < k]
    if bad:
        raise ValueError(f"classes {bad} are out of range: the classifier has {k} classes (0..{k - 1})")
    return out


def _merge_screen(outs: list[dict[str, Any]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.cat([o["index"] for o in outs])
    logp = torch.cat([o["logp_base"] for o in outs])
    jac = torch.cat([o["jacobian"] for o in outs])
    out_logp = torch.empty(n, logp.shape[1])
    out_jac = torch.empty(n, *jac.shape[1:])
    out_logp[index], out_jac[index] = logp, jac  # duplicates from padded samplers are identical
    return out_logp, out_jac


def _merge_effects(outs: list[dict[str, Any]], n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = outs[0]["logp_base"].shape[1]
    logp_base = torch.empty(n, k)
    logp = torch.full((n, s * 2, k), float("nan"))
    seen = torch.zeros(n, dtype=torch.bool)
    for o in outs:
        logp_base[o["index"]] = o["logp_base"]
        seen[o["index"]] = True
        for j, ids, values in zip(o["index"].tolist(), o["pairs"], o["logp"]):
            logp[j, ids] = values
    assert seen.all(), f"images {torch.nonzero(~seen).flatten().tolist()} were not processed"
    return logp_base, logp.view(n, s, 2, k)


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
