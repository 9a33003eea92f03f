"""What an AttFind search produces: ranked attributes and the per-image effects behind them.

- :class:`Attribute`: one ranked (coordinate, direction) pair with its summary over a class
  pool (mean effect, mean probability change, share of images affected and flipped);
- :func:`greedy_class_ranking`: the paper's greedy step that picks a class's top-K;
- :func:`best_per_coordinate`: the top-k coordinates of a score, each in its better direction
  (the image-specific rankings);
- :class:`AttFindResult`: everything one search produced (styles, targets, the log-probabilities
  of every rendered edit, stability, the rankings), with the derived views the metrics and the
  report read.

Direction ``d`` of a coordinate is ``DIRECTIONS[d]``: 0 moves it toward its minimum over the
reference set, 1 toward its maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from stylex.explain.config import AttFindConfig
from stylex.explain.measures import measure_change
from stylex.stylespace import StyleSpace

DIRECTIONS = ("decrease", "increase")  # d = 0: toward the minimum, d = 1: toward the maximum


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


def searched_coordinates(
    space: StyleSpace,
    layers: str,  # an AttFindConfig.layers value: "all" | "conv"
) -> torch.Tensor:  # [S] bool: True where AttFind may edit
    """The style coordinates a search with ``layers`` edits."""
    keep = torch.ones(space.dim, dtype=torch.bool)
    if layers == "conv":
        for name in space.layer_names:
            if name.endswith(".torgb"):
                keep[space.layer_slice(name)] = False
    return keep


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
    noise: dict[str, torch.Tensor] | None = None  # the images' own noise maps [N or 1, 1, r, r]; None = noise_mode
    _effects: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_images(self) -> int:
        return self.flat.shape[0]

    @property
    def num_classes(self) -> int:
        return self.logp_base.shape[1]

    @property
    def searched(self) -> torch.Tensor:  # [S] bool
        """The coordinates the search could edit (``config.layers``)."""
        return searched_coordinates(self.space, self.config.layers)

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
            "layers": self.config.layers,
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
