"""Progress bars: the training bar counts the whole run's steps, not an epoch's batches."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from stylex.training.progress import StepProgressBar


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Recording(StepProgressBar):
    def __init__(self):
        super().__init__(refresh_rate=1)
        self.created = 0
        self.seen: list[tuple[int, int | None]] = []  # (n, total) after every batch

    def init_train_tqdm(self):
        self.created += 1
        return super().init_train_tqdm()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.seen.append((self.train_progress_bar.n, self.train_progress_bar.total))


def _fit(max_steps: int, bar: StepProgressBar, ckpt=None, root=None):
    data = DataLoader(TensorDataset(torch.randn(20, 2)), batch_size=4)  # 5 batches an epoch
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=root)
    trainer.fit(_Tiny(), data, ckpt_path=ckpt)
    return trainer


def test_the_training_bar_runs_once_to_max_steps_across_epochs(tmp_path):
    bar = _Recording()
    trainer = _fit(12, bar)
    assert trainer.current_epoch >= 2  # the run spans epochs ...
    assert bar.created == 1  # ... and one bar covers them all
    assert [n for n, _ in bar.seen] == list(range(1, 13)) and {t for _, t in bar.seen} == {12}
    # A resumed run continues the bar at its step, with the ETA of the steps still to do.
    ckpt = tmp_path / "at12.ckpt"
    trainer.save_checkpoint(ckpt)
    again = _Recording()
    _fit(15, again, ckpt=str(ckpt))
    assert again.train_progress_bar.initial == 12 and [n for n, _ in again.seen] == [13, 14, 15]
