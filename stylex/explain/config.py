"""The settings of one AttFind search (see :mod:`stylex.explain.attfind` for the method).

A module of its own so that the search and its result (:mod:`stylex.explain.result`, which
keeps the settings it was made with) both depend on it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from stylex.explain.measures import MEASURES

# Which style coordinates the search may edit: every one, or those of the convolutions only.
# A to-RGB layer's styles scale how much each feature map of its block adds to the image's
# colour channels, after the last spatial operation of that block: they recolour what the
# convolutions drew and cannot change its shape.
LAYER_SETS = ("all", "conv")


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
            left out of the rankings; None = a tenth of the searched coordinates.
        cap: accumulated effect (in ``measure`` units) after which an image counts as explained
            by the class ranking; None = when the image would reach the one-vs-rest boundary of
            the class (probability 0.5, logit 0).
        affect_threshold: probability gain of the class that counts an image as "affected" by
            an attribute (for the reported share).
        noise_mode: synthesis noise; "const" keeps renders of equal styles identical.
        layers: the coordinates searched: ``"all"`` (the whole StyleSpace, the paper's AttFind)
            or ``"conv"`` (the convolutions' styles only, without the to-RGB layers', whose
            edits recolour; see ``LAYER_SETS``). The flip-rate baselines draw from the same set.
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
    layers: str = "all"

    def __post_init__(self) -> None:
        if self.layers not in LAYER_SETS:
            raise ValueError(f"layers must be one of {LAYER_SETS} (which style coordinates AttFind edits), "
                             f"got {self.layers!r}")
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
