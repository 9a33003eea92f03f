"""Lightning checkpoint I/O with atomic writes, so a kill mid-write keeps the previous file."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from stylex.errors import disk_full_error, is_disk_full
from stylex.utils.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it and renames it
    over the target. Loading is Lightning's own. A full disk is reported as
    :class:`~stylex.errors.RunError` naming the checkpoint (the previous file is kept)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(path, e) from e
            raise
