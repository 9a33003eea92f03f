"""Finding run folders (``<runs_root>/<dataset>/<timestamp>/``) made by ``train.py``."""

from __future__ import annotations

from pathlib import Path


def latest_run(runs_root: str | Path, marker: str) -> Path | None:
    """The run folder under ``runs_root`` whose ``marker`` file (a path relative to the run, e.g.
    ``checkpoints/last.ckpt``) was written last; None when no run has it."""
    hits = list(Path(runs_root).glob(f"*/*/{marker}"))
    if not hits:
        return None
    depth = len(Path(marker).parts)
    newest = max(hits, key=lambda p: (p.stat().st_mtime, str(p)))
    return newest.parents[depth - 1]
