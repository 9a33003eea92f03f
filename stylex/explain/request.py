"""The options of ``explain.py`` as plain values: :class:`ExplainRequest`.

Kept apart from the pipeline (and free of torch) so that the command line can parse and check
its options, and print ``--help``, without loading the models' libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stylex.errors import UsageError


@dataclass
class ExplainRequest:
    """The options of ``explain.py`` as plain values (field ``x_y`` is option ``--x-y``)."""

    run: Path | None = None  # run folder made by train.py (None: the latest under runs_root)
    checkpoint: Path | None = None  # a file of an export instead of a run (not with `run`)
    runs_root: Path = Path("runs")  # where to look for the latest run
    top_k: int = 4  # attributes ranked per class
    num_images: int = 64  # images explained (and, with `images`, the reference set's size)
    classes: list[str] | None = None  # class names or indices, items may be comma-separated (None: all)
    shift_size: float = 1.0  # fraction of the way to a coordinate's min/max each edit moves
    out: Path | None = None  # report folder (None: <run>/explain)
    images: list[Path] | None = None  # image files to explain (--image)
    source: str = "auto"  # images without `images`: "val" | "generated" | "auto" (val when rebuildable)
    measure: str = "prob"  # "prob" | "logit"
    layers: str = "all"  # style coordinates searched: "all" | "conv" (no to-RGB styles)
    prescreen: int | str | None = "auto"  # "auto", "none" / None (exhaustive) or candidates per class
    time_budget: float = 120.0  # seconds the exhaustive search may take before "auto" screens
    flip_k: int = 10  # flip-rate curve for k = 1..flip_k (0 = none)
    examples: int = 4  # example pairs per attribute panel
    ground_truth: bool = False  # synthetic data only: factor probe, recovery and purity
    device: str = "auto"  # cpu, cuda, cuda:1, ... ("auto": cuda when available)
    devices: int = 1  # spread the images over this many devices (Lightning's predict loop)
    batch_size: int | None = None  # renders per forward pass (None: by device)
    seed: int = 0  # seed of generated samples
    threads: int | None = None  # CPU threads for torch while explaining (None: torch's choice)
    wandb: bool = True  # log to W&B when the run did (--no-wandb: False)
    refine_steps: int = 0  # per-image refinement of w = E(x) before the search (0 = off; real images only)
    refine_lr: float = 0.05  # its Adam learning rate
    refine_kl: float = 0.1  # weight of its class-keeping KL term

    def check(self) -> None:
        """Raise a UsageError for an option out of its range (the rest needs the model)."""
        for option, value in (("--top-k", self.top_k), ("--num-images", self.num_images),
                              ("--devices", self.devices), ("--batch-size", self.batch_size),
                              ("--threads", self.threads)):
            if value is not None:
                positive(value, option)
        if not self.shift_size > 0:
            raise UsageError(f"--shift-size must be > 0 (1 = move to the min/max), got {self.shift_size}")
        if self.flip_k < 0 or self.examples < 1:
            raise UsageError("--flip-k must be >= 0 and --examples >= 1")
        if self.run is not None and self.checkpoint is not None:
            raise UsageError("--run and --checkpoint both name the model; pass one of them")
        if self.source not in ("auto", "val", "generated"):
            raise UsageError(f"--source must be auto, val or generated, got {self.source!r}")
        if self.refine_steps < 0 or not self.refine_lr > 0 or self.refine_kl < 0:
            raise UsageError("--refine-steps must be >= 0, --refine-lr > 0 and --refine-kl >= 0")


def positive(value: int, option: str) -> int:
    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value
