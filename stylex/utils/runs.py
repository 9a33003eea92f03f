"""Finding run folders (``<runs_root>/<dataset>/<timestamp>/``) made by ``train.py``."""

from __future__ import annotations

from pathlib import Path

from stylex.errors import UsageError


def latest_run(runs_root: str | Path, marker: str) -> Path | None:
    """The run folder under ``runs_root`` whose ``marker`` file (a path relative to the run, e.g.
    ``checkpoints/last.ckpt``) was written last; None when no run has it."""
    hits = list(Path(runs_root).glob(f"*/*/{marker}"))
    if not hits:
        return None
    depth = len(Path(marker).parts)
    newest = max(hits, key=lambda p: (p.stat().st_mtime, str(p)))
    return newest.parents[depth - 1]


def find_latest_run(
    runs_root: str | Path,
    marker: str,  # the file a usable run has, relative to the run folder
    context: str = "",  # what asked, e.g. "resume=last"; starts the message
    remedy: str = "",  # what the user can do instead; ends the message
    error: type[UsageError] = UsageError,  # the kind of UsageError to raise (e.g. ConfigError)
) -> Path:
    """:func:`latest_run`, or an ``error`` naming where it looked."""
    run = latest_run(runs_root, marker)
    if run is None:
        prefix = f"{context}: " if context else ""
        raise error(
            f"{prefix}no run found under {Path(runs_root).resolve()}: no run with {marker} "
            f"(looked for */*/{marker}).{' ' + remedy if remedy else ''}"
        )
    return run


def in_run(
    trainer,  # a pytorch_lightning.Trainer; its default_root_dir is the run folder
    path: str | Path,
) -> Path:
    """``path`` inside the run folder: relative paths are resolved against the trainer's
    ``default_root_dir`` (the run folder of ``train.py``), absolute ones are kept. Callbacks take
    relative paths, so that their config needs no run folder."""
    path = Path(path)
    return path if path.is_absolute() else Path(trainer.default_root_dir) / path
