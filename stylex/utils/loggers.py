"""What the project sends to Lightning loggers, written once for every backend.

W&B gets images and tables natively, TensorBoard gets images and a Markdown table, CSV gets
neither (it holds numbers only). A logging backend must never stop a run: failures warn.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger

log = logging.getLogger(__name__)


def wandb_identity(
    dataset: str,  # the run's dataset.name
    run_dir: Path,  # the run folder
) -> dict[str, str]:
    """The W&B ``id`` and ``group`` of a training run, a function of its folder: a resumed run
    continues its W&B run, and explanations and dissections of the run join its group."""
    name = re.sub(r"[^a-z0-9_-]+", "-", f"{dataset}-{Path(run_dir).name}".lower()).strip("-")
    return {"id": name, "group": name}


def is_wandb(logger: Logger) -> bool:
    return isinstance(logger, WandbLogger)


def is_tensorboard(logger: Logger) -> bool:
    return isinstance(logger, TensorBoardLogger)


def _read_rgb(path: Path) -> np.ndarray:  # [H, W, 3] uint8
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def log_images(
    logger: Logger,
    key: str,  # e.g. "samples"; TensorBoard gets one tag per image, "<key>/<caption or index>"
    paths: Sequence[str | Path],  # PNG / GIF files
    step: int,
    captions: Sequence[str] | None = None,
) -> None:
    """Image files to one logger (W&B: one list of images; TensorBoard: one image per tag)."""
    if not paths:
        return
    try:
        if is_wandb(logger):
            # Lightning checks len() of every extra keyword, so a missing caption list is left out
            # rather than passed as None.
            extra = {"caption": list(captions)} if captions else {}
            logger.log_image(key=key, images=[str(p) for p in paths], step=None, **extra)
        elif is_tensorboard(logger):
            for j, path in enumerate(paths):
                tag = key if len(paths) == 1 else f"{key}/{j}"
                logger.experiment.add_image(tag, _read_rgb(Path(path)), global_step=step, dataformats="HWC")
    except Exception as e:  # a logging backend must never stop a run
        log.warning("could not log %s to %s: %s", key, type(logger).__name__, e)


def log_table(
    logger: Logger,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: int,
) -> None:
    """A table to one logger (W&B: a native table; TensorBoard: a Markdown text)."""
    try:
        if is_wandb(logger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
        elif is_tensorboard(logger):
            logger.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
    except Exception as e:  # a logging backend must never stop a run
        log.warning("could not log %s to %s: %s", key, type(logger).__name__, e)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def finish(loggers: Sequence[Logger]) -> None:
    """Close every logger of a finished run (W&B: the run is finished, so a later W&B run of
    the same process, such as the explanation, starts a new one)."""
    for logger in loggers:
        if is_wandb(logger):
            import wandb

            if wandb.run is not None:
                wandb.finish()
        else:
            logger.finalize("success")
