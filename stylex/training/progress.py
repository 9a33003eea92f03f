"""The training progress bar: one bar for the whole run, generator steps against ``max_steps``.

Lightning's :class:`~pytorch_lightning.callbacks.TQDMProgressBar` restarts its bar at every
epoch, so a GAN run, whose length is set in steps and whose epochs are an artefact of the data
set's size, shows no remaining time. This bar counts ``trainer.global_step`` (generator steps:
the only ones the module counts there) towards ``trainer.max_steps``, so tqdm's rate and ETA are
those of the whole run; a resumed run starts the bar where it stopped. The epoch goes into the
postfix with the logged figures; validation keeps Lightning's own bar.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` over the run's generator steps (see the module docstring)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.init_train_tqdm()
        total = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None
        start = int(trainer.global_step)
        bar.reset(total=total)
        bar.initial = start  # tqdm's rate and ETA then count only this process's steps
        bar.n = start
        bar.set_description("training")
        self.train_progress_bar = bar

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: nothing restarts at an epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        if (batch_idx + 1) % self.refresh_rate == 0 or trainer.global_step == bar.total:
            bar.n = int(trainer.global_step)
            bar.set_postfix({"epoch": trainer.current_epoch, **self.get_metrics(trainer, pl_module)}, refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix({"epoch": trainer.current_epoch, **self.get_metrics(trainer, pl_module)})
