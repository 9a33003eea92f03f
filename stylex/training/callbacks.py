"""Callbacks of a StylEx run: checkpoints, image grids, the encoder fit, the export, throughput
and a summary of figures at the end.

``configs/callbacks/default.yaml`` lists them (with the explanation) in the order Lightning runs
them; their signatures hold the defaults (the config is built from them). Paths are relative to
the run folder (the trainer's ``default_root_dir``) unless absolute.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from stylex.data.base import spread_indices
from stylex.export import save_export
from stylex.utils.io import atomic_write, atomic_write_json
from stylex.utils.loggers import is_wandb, log_images
from stylex.utils.runs import in_run

log = logging.getLogger(__name__)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint set up for a GAN run: every ``every_n_steps`` training steps
    ``step<NNNNNN>.ckpt`` (the newest ``keep`` kept, -1 = all) and ``last.ckpt``.

    There is no "best" model (a GAN has no validation loss to rank by): the generator step
    counter is the monitored value, so the newest checkpoints are kept. A checkpoint of a step
    that is written again (a run resumed from before it) replaces the old file instead of
    adding a ``-v1`` copy, and the step checkpoints already in the folder count toward ``keep``
    whatever the resumed checkpoint remembers of them. The ``last.ckpt`` of the end of training
    is :class:`FinalCheckpoint`'s, written after the encoder fit.
    """

    STEP_FILE = re.compile(r"^step(\d+)(-v\d+)?\.ckpt$")

    def __init__(self, dirpath: str = "checkpoints", every_n_steps: int = 200, keep: int = 3) -> None:
        super().__init__(
            dirpath=None, filename="step{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=int(every_n_steps), save_top_k=int(keep), monitor="g_step", mode="max",
            save_last=True, save_on_train_epoch_end=False, enable_version_counter=False,
        )
        self._run_dirpath = dirpath

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(in_run(trainer, self._run_dirpath))
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._adopt_step_files(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # FinalCheckpoint writes the last.ckpt of the end of training

    def _adopt_step_files(self, trainer: pl.Trainer) -> None:
        """Count the step checkpoints on disk toward ``keep`` (rank zero looks, every rank
        agrees), and remove the oldest beyond it."""
        found: list[tuple[int, str]] = []
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for path in Path(self.dirpath).iterdir():
                match = self.STEP_FILE.match(path.name)
                if match:
                    found.append((int(match.group(1)), str(path)))
        found = trainer.strategy.broadcast(sorted(found))
        self.best_k_models = {path: torch.tensor(float(step)) for step, path in found}
        self.kth_best_model_path, self.kth_value = "", None
        self.best_model_path, self.best_model_score = "", None
        if self.save_top_k >= 0:
            surplus = len(found) - self.save_top_k
            for step, path in found[: max(surplus, 0)]:
                del self.best_k_models[path]
                log.info("removing %s: callbacks.checkpoint.keep=%d keeps only the newest step checkpoints",
                         path, self.save_top_k)
                trainer.strategy.remove_checkpoint(path)
        if not self.best_k_models:
            return
        self.best_model_path = max(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.best_model_score = self.best_k_models[self.best_model_path]
        self.kth_best_model_path = min(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.kth_value = self.best_k_models[self.kth_best_model_path]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # What counts toward ``keep`` is read from the folder at train start, so a run folder
        # that was moved or copied resumes without Lightning's warning about its old path.
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Lightning keeps the file a run resumed from; here it ages out like any other, so
        # that ``keep`` holds across resumes.
        if previous == current:
            return False
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents


class ExceptionCheckpoint(pl.Callback):
    """When training stops on an exception (a crash, a diverged step, Ctrl-C), writes
    ``checkpoints/on_exception.ckpt`` with the state at that moment, so that ``resume=<run>``
    continues from there; a run that ends normally removes it. A failure to write it is logged
    and the original exception goes on. Under DDP rank zero writes it alone (the other ranks
    may be stopped elsewhere).

    Lightning's ``OnExceptionCheckpoint`` does the same, but its presence also makes
    ``trainer.fit`` resume by itself from the newest file in the folder; here the run chooses
    the checkpoint (see ``stylex.training.run.choose_checkpoint``).
    """

    def __init__(self, path: str = "checkpoints/on_exception.ckpt") -> None:
        self.path = Path(path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        path = in_run(trainer, self.path)
        if trainer.global_step == 0:  # nothing trained yet: nothing to keep
            return
        try:
            if trainer.world_size == 1:
                trainer.save_checkpoint(path, weights_only=False)
            elif trainer.is_global_zero:  # no barrier: the other ranks may never reach one
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            else:
                return
        except Exception as e:  # the exception that stopped training is the one to report
            log.warning("training stopped (%s) and its state could not be saved to %s: %s",
                        type(exception).__name__, path, e)
            return
        log.warning("training stopped at step %d (%s); its state is in %s: resume=%s continues from it",
                    trainer.global_step, type(exception).__name__, path, trainer.default_root_dir)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls teardown only when fit ended normally: an older crash's state is stale.
        if stage == "fit" and trainer.is_global_zero:
            in_run(trainer, self.path).unlink(missing_ok=True)


def _is_due(pl_module, every: int) -> bool:
    return every > 0 and pl_module.count("g_steps") % every == 0


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` generator steps (and at the end) writes a PNG grid to
    ``<run>/samples/`` and logs it: row 1 real validation images, row 2 their reconstructions
    (encoder → EMA generator), then one row of samples per class (fixed latents, one-hot
    conditioning). Captions name the classifier's predicted class of each image."""

    def __init__(self, out_dir: str = "samples", every_n_steps: int = 200, num_images: int = 8, seed: int = 0):
        self.out_dir = Path(out_dir)
        self.every = int(every_n_steps)
        self.num_images = int(num_images)
        self.seed = seed
        self._real: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self.last_path: Path | None = None

    def _fixed_inputs(self, trainer, pl_module):
        if self._real is None:
            ds = trainer.datamodule.val_dataset
            n = min(self.num_images, len(ds))
            self._real = torch.stack([ds[i]["image"] for i in range(n)])
            g = torch.Generator().manual_seed(self.seed)
            self._z = torch.randn(n, pl_module.G_ema.z_dim, generator=g)
        return self._real.to(pl_module.device), self._z.to(pl_module.device)

    @torch.no_grad()
    def render(self, trainer, pl_module) -> torch.Tensor:
        """The grid as a [3, H, W] tensor in [0, 1]."""
        real, z = self._fixed_inputs(trainer, pl_module)
        with torch.autocast(device_type=pl_module.device.type, enabled=False):
            rec, _ = pl_module.reconstruct(real)
            rows = [real, rec]
            for k in range(pl_module.num_classes):
                c = F.one_hot(torch.full((z.shape[0],), k, device=z.device), pl_module.num_classes).float()
                # With the encoder's noise maps, each sample takes its layout from the next real image.
                rows.append(pl_module.sample(z, c, layout=real.roll(1, dims=0)))
        imgs = torch.cat(rows).float().clamp(-1, 1).add(1).div(2)
        return make_grid(imgs, nrow=real.shape[0], padding=1, pad_value=1.0)

    @rank_zero_only
    def write(self, trainer, pl_module) -> Path:
        grid = self.render(trainer, pl_module)
        step = pl_module.count("g_steps")
        path = in_run(trainer, self.out_dir) / f"step_{step:06d}.png"
        atomic_write(path, lambda p: save_image(grid, str(p), format="png"))
        self.last_path = path
        caption = "rows: real | reconstruction | " + " | ".join(f"samples of '{n}'" for n in pl_module.class_names)
        for logger in trainer.loggers:
            log_images(logger, "samples", [path], step, [caption])
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if _is_due(pl_module, self.every):
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.write(trainer, pl_module)


class Exporter(pl.Callback):
    """Writes the export (EMA generator, encoder, classifier, the realism network when the run has
    one of its own, and what the run records with the model: the module's ``info``) to
    ``<run>/export`` at the end of training and every ``every_n_steps`` generator steps (0 = only
    at the end)."""

    def __init__(self, out_dir: str = "export", every_n_steps: int = 0):
        self.out_dir = Path(out_dir)
        self.every = int(every_n_steps)

    @rank_zero_only
    def export(self, trainer, pl_module) -> Path:
        hp = pl_module.hparams
        extra = {**dict(hp.get("info") or {}), "g_steps": pl_module.count("g_steps"),
                 "images_seen": pl_module.count("images_seen")}
        return save_export(
            in_run(trainer, self.out_dir), pl_module.G_ema, dict(hp.generator), pl_module.E, dict(hp.encoder),
            pl_module.classifier, pl_module.class_names, extra=extra,
            feature_classifier=getattr(pl_module, "own_feature_classifier", None),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if _is_due(pl_module, self.every):
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        folder = self.export(trainer, pl_module)
        if folder is not None:
            log_export_artifact(trainer.loggers, Path(folder), int(trainer.global_step))


def log_export_artifact(
    loggers: Sequence[Any],  # the run's Lightning loggers
    folder: Path,  # the export folder
    step: int,
) -> None:
    """The export as a W&B artifact of type ``model``, for W&B loggers made with
    ``log_model=true`` (off by default). Offline, the artifact is stored with the run and syncs
    with it. A logging failure only warns: the export is on disk already."""
    for logger in loggers:
        if not is_wandb(logger) or not getattr(logger, "log_export", False):
            continue
        try:
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(name=f"export-{run.id}", type="model",
                                      metadata={"g_steps": step, "format": "stylex-export"})
            artifact.add_dir(str(folder))
            run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
        except Exception as e:
            log.warning("could not log the export to W&B as an artifact: %s", e)


class Throughput(pl.Callback):
    """Measures training images per second (after a warm-up of this fit, so resumed runs are
    measured too) and reports it in the summary."""

    def __init__(self, warmup_steps: int = 5):
        self.warmup = warmup_steps
        self._t0: float | None = None
        self._n0 = 0
        self._batches = 0
        self.images_per_second: float | None = None

    def on_train_start(self, trainer, pl_module):
        self._batches, self._t0 = 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches += 1
        if self._batches == self.warmup:
            self._t0, self._n0 = time.perf_counter(), pl_module.count("images_seen")
        elif self._t0 is not None:
            dt = time.perf_counter() - self._t0
            if dt > 0:
                self.images_per_second = (pl_module.count("images_seen") - self._n0) / dt
                pl_module.log("train/images_per_second", self.images_per_second, on_step=True, prog_bar=False)


class Summary(pl.Callback):
    """At the end of fit, writes ``<run>/summary.json``: what the run records with the model (the
    module's ``info``), counters, wall time, throughput (from :class:`Throughput`'s logged
    figure), the last validation figures, the encoder fit's before / after figures (from the
    run's :class:`EncoderFit`, when it has one) and the last generator-quality figures with
    their feature space (``val/fid``, ... and ``quality``, from the run's
    :class:`~stylex.training.quality.GeneratorQuality`)."""

    def __init__(self, path: str = "summary.json"):
        self.path = Path(path)
        self._t0 = time.perf_counter()

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        speed = trainer.callback_metrics.get("train/images_per_second")
        summary = {
            **dict(pl_module.hparams.get("info") or {}),
            "g_steps": pl_module.count("g_steps"),
            "images_seen": pl_module.count("images_seen"),
            "fit_seconds": round(time.perf_counter() - self._t0, 2),
            "images_per_second": float(speed) if speed is not None else None,
            **metrics,
        }
        fits = [cb.result for cb in trainer.callbacks if isinstance(cb, EncoderFit) and cb.result]
        if fits:
            summary["encoder_fit"] = fits[0]
        # The last generator-quality figures: its final measurement runs after self.log closes,
        # so they come from the callback itself, with the feature space they were measured in.
        from stylex.training.quality import GeneratorQuality

        quality = [cb.last for cb in trainer.callbacks if isinstance(cb, GeneratorQuality) and cb.last]
        if quality:
            summary.update(quality[0]["metrics"])
            summary["quality"] = {k: v for k, v in quality[0].items() if k != "metrics"}
        atomic_write_json(in_run(trainer, self.path), summary)


def _endless(loader):
    while True:
        yield from loader


class EncoderFit(pl.Callback):
    """When fit ends, trains the encoder alone against the frozen EMA generator (see
    :meth:`StylexModule.fit_encoder_to_ema`), before the last samples, export, checkpoint and
    explanation. Every rank runs the same seeded steps on the full training set, so the
    replicas stay equal under DDP.

    Args:
        steps: optimiser steps (0 = off).
        lr: Adam learning rate (None = the module's encoder learning rate).
        kl_weight: weight of the classifier KL of the reconstructions in the fit.
        check_images: validation images, spread over the split, on which the reconstruction
            error and class agreement are measured before and after.
        seed: batch order and any randomness of the fit.
    """

    def __init__(self, steps: int = 200, lr: Optional[float] = None, kl_weight: float = 0.1,
                 check_images: int = 128, seed: int = 0):
        if int(steps) < 0 or float(kl_weight) < 0 or int(check_images) < 1:
            raise ValueError(f"encoder_fit needs steps >= 0, kl_weight >= 0 and check_images >= 1; got "
                             f"steps={steps}, kl_weight={kl_weight}, check_images={check_images}")
        self.steps = int(steps)
        self.lr = lr
        self.kl_weight = float(kl_weight)
        self.check_images = int(check_images)
        self.seed = int(seed)
        self.result: dict[str, Any] = {}  # the figures of the last fit (see fit_encoder_to_ema)

    def on_train_end(self, trainer, pl_module):
        dm = trainer.datamodule
        if self.steps <= 0 or dm is None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(
            dm.train_dataloader().dataset, batch_size=dm.batch_size, shuffle=True, generator=gen, drop_last=True,
        )
        check = encoder_check_images(dm.val_dataloader().dataset, self.check_images)
        lr = float(self.lr if self.lr is not None else pl_module.optim_cfg["lr_e"])
        log.info("fitting the encoder to the EMA generator (%d steps)", self.steps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            info = pl_module.fit_encoder_to_ema(_endless(loader), self.steps, lr, check, self.kl_weight,
                                                progress=bool(getattr(trainer, "progress_bar_callback", None)))
        self.result = info
        log.info("encoder fit: reconstruction L1 %.4f -> %.4f (the mean image: %.4f), class agreement "
                 "%.2f -> %.2f, in %.1f s", info["recon_l1_before"], info["recon_l1_after"],
                 info["mean_image_l1"], info["agreement_before"], info["agreement_after"], info["seconds"])
        # self.log is closed once fit ends; the loggers take the figures directly (rank zero only).
        figures = {f"encoder_fit/{k}": float(info[k]) for k in
                   ("recon_l1_before", "recon_l1_after", "mean_image_l1", "agreement_before", "agreement_after")}
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)


def encoder_check_images(
    dataset,  # map-style dataset of {"image": [3, R, R], ...}
    count: int,
) -> torch.Tensor:  # [min(count, len), 3, R, R]
    """The images the encoder fit is measured on: ``count`` spread evenly over ``dataset``."""
    return torch.stack([dataset[i]["image"] for i in spread_indices(len(dataset), count)])


class FinalCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` when fit ends, so a run always resumes from its final state even when
    ``max_steps`` is not a multiple of the checkpoint interval. Every rank calls it (the strategy
    decides who writes)."""

    def __init__(self, path: str = "checkpoints/last.ckpt"):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(in_run(trainer, self.path), weights_only=False)
