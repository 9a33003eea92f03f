"""Command-line front ends; the scripts at the top of the repository only call these."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under @hydra.main
        return []


def run_training(cfg: DictConfig) -> None:
    """Train, then print the run folder as the last line (rank zero). Configuration and data
    errors end the program with their message and exit status 2, not a traceback."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from stylex.errors import UsageError
    from stylex.training.run import train
    from stylex.utils.dist import is_rank_zero

    logging.getLogger("stylex").setLevel(logging.INFO)
    try:
        run_dir = train(cfg, _overrides())
    except (UsageError, FileNotFoundError, MisconfigurationException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if is_rank_zero():
        print(run_dir.resolve(), flush=True)
