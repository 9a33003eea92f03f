"""The post-training explanation: AttFind on a sample of validation images, as a callback.

After fit (and, optionally, every N epochs) the callback encodes a spread-out sample of the
validation split with the run's encoder, runs AttFind with the EMA generator and the frozen
classifier, writes the report (see :mod:`stylex.explain.report`) and hands the ranked table and
the panels to the run's loggers (see :mod:`stylex.explain.loggers`). It runs on rank zero only
and never stops a finished training: a failure is logged, not raised.

The signature of :class:`ExplainCallback` is the only source of its defaults (the Hydra config
is generated from it): every parameter has a plain type OmegaConf accepts, and a relative
``out_dir`` is resolved against the trainer's run folder (``trainer.default_root_dir``) when
the callback runs, so the config need not know that folder.

The defaults keep it within about half a minute at the CPU quickstart size (32x32, 1280 style
coordinates, 64 images): the search pre-screens coordinates with one gradient per image and
renders only the most promising edits.
"""

# No ``from __future__ import annotations``: the signature's annotations stay real types, for
# the config generated from it.
import logging
import time
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from stylex.data.base import spread_indices
from stylex.explain.attfind import AttFind, AttFindConfig
from stylex.explain.loggers import log_report
from stylex.explain.pipeline import explain_and_report, read_run_figures, refine_and_compare
from stylex.explain.report import Report
from stylex.utils.runs import in_run

log = logging.getLogger(__name__)


class ExplainCallback(pl.Callback):
    """Explains the classifier with the model being trained.

    Args:
        out_dir: report folder; a relative path is taken inside the run folder
            (``trainer.default_root_dir``), so the default is ``<run>/explain``. Periodic reports
            go to ``epoch_<n>/`` in it.
        top_k: attributes ranked per class.
        num_images: validation images explained.
        every_n_epochs: also explain after every N training epochs (0 = only after fit).
        shift_size: how far each coordinate moves toward its min / max (1 = all the way).
        prescreen: candidate edits per class rendered exactly (None = every coordinate, slow on
            a CPU; see :class:`~stylex.explain.config.AttFindConfig`).
        flip_k: flip-rate curve for k = 1..flip_k (0 = none).
        examples: example pairs per attribute in the panels.
        threads: CPU threads for torch while explaining (None = unchanged). On a CPU shared
            with other busy processes, 1 can be many times faster than the default: every small
            operation otherwise waits for a descheduled second thread.
        enabled: False turns the callback into a no-op (a config switch).
        refine_steps: optimise each image's latent for this many steps before the search
            (:mod:`stylex.explain.refine`; 0 = off); the report then says what it changed.
        layers: the style coordinates searched, ``"all"`` or ``"conv"`` (without the to-RGB
            layers'; see :class:`~stylex.explain.config.AttFindConfig`).
    """

    def __init__(
        self,
        out_dir: str = "explain",  # a Path works too
        top_k: int = 4,
        num_images: int = 64,
        every_n_epochs: int = 0,
        shift_size: float = 1.0,
        prescreen: Optional[int] = 16,
        flip_k: int = 6,
        examples: int = 4,
        threads: Optional[int] = None,
        enabled: bool = True,
        refine_steps: int = 0,
        layers: str = "all",
    ) -> None:
        if int(top_k) < 1 or int(num_images) < 1:
            raise ValueError(f"ExplainCallback needs top_k >= 1 and num_images >= 1, got {top_k} and {num_images}")
        self.out_dir = Path(out_dir)
        self.top_k = int(top_k)
        self.num_images = int(num_images)
        self.every_n_epochs = int(every_n_epochs)
        self.config = AttFindConfig(shift_size=float(shift_size), prescreen=prescreen, layers=str(layers))
        self.flip_k = int(flip_k)
        self.examples = int(examples)
        self.threads = None if threads is None else int(threads)
        if int(refine_steps) < 0:
            raise ValueError(f"ExplainCallback needs refine_steps >= 0, got {refine_steps}")
        self.refine_steps = int(refine_steps)
        self.enabled = bool(enabled)
        self.last_report: Optional[Report] = None

    # ---------------------------------------------------------------- hooks
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.enabled and self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0:
            self.explain(trainer, pl_module, self.report_dir(trainer) / f"epoch_{epoch:04d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.explain(trainer, pl_module, self.report_dir(trainer))

    def report_dir(self, trainer: pl.Trainer) -> Path:
        """``out_dir``, a relative one inside the run folder (``trainer.default_root_dir``)."""
        return in_run(trainer, self.out_dir)

    # ---------------------------------------------------------------- the work
    @rank_zero_only
    def explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out_dir: Path) -> Optional[Report]:
        """Run AttFind and write / log the report; returns it (None when skipped or failed)."""
        dm = getattr(trainer, "datamodule", None)
        dataset = getattr(dm, "val_dataset", None)
        if dataset is None or len(dataset) == 0:
            log.warning("explanation skipped: the data module has no validation split to explain")
            return None
        try:
            report = self._explain(trainer, pl_module, dataset, out_dir)
        except Exception as e:  # the training already finished: report the failure, keep the run
            log.exception("the post-training explanation failed (%s: %s); the run itself is complete",
                          type(e).__name__, e)
            return None
        self.last_report = report
        log.info("explanation written to %s", report.html)
        for logger in trainer.loggers:
            log_report(logger, report, step=int(trainer.global_step))
        return report

    def _explain(self, trainer, pl_module, dataset, out_dir: Path) -> Report:
        t0 = time.perf_counter()
        idx = spread_indices(len(dataset), self.num_images)
        samples = [dataset[i] for i in idx]
        images = torch.stack([s["image"] for s in samples])
        info = [{"source": f"val:{i}", "label": int(s["label"])} for i, s in zip(idx, samples)]
        encoder = pl_module.E
        was_training = encoder.training
        encoder.eval()  # the networks are shared with training: restore their mode afterwards
        threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with torch.autocast(device_type=pl_module.device.type, enabled=False):
                finder = AttFind(pl_module.G_ema, pl_module.classifier, self.config)
                flat = finder.encode(encoder, images)
                noise = finder.noise_maps(encoder, images)  # None unless the encoder gives noise maps
                sections = {}
                if self.refine_steps > 0:
                    flat, sections["refinement"] = refine_and_compare(
                        finder, encoder, images, flat, self.refine_steps, lr=0.05, kl_weight=0.1,
                        top_k=min(self.top_k, finder.space.dim), classes=None, reference=None, say=log.info,
                        noise=noise)
                names = [str(n) for n in getattr(pl_module, "class_names", None) or []]
                names = names or [str(c) for c in range(int(pl_module.num_classes))]
                settings = {"source": "validation split", "num_images": len(idx), "top_k": self.top_k,
                            "shift_size": self.config.shift_size, "measure": self.config.measure,
                            "layers": self.config.layers,
                            "affect_threshold": self.config.affect_threshold, "prescreen": self.config.prescreen,
                            "g_steps": int(getattr(pl_module, "g_steps", trainer.global_step))}
                root = getattr(trainer, "default_root_dir", None)
                figures = read_run_figures(Path(root)) if root else {}
                if figures:
                    sections["run"] = figures
                report, _ = explain_and_report(
                    finder, flat, out_dir, names, top_k=min(self.top_k, finder.space.dim), flip_k=self.flip_k,
                    examples=self.examples, image_info=info, inputs=images, settings=settings,
                    title=f"StylEx explanation after {settings['g_steps']} steps", sections=sections,
                    feature_classifier=getattr(pl_module, "own_feature_classifier", None), noise=noise,
                )
        finally:
            encoder.train(was_training)
            torch.set_num_threads(threads)
        log.info("explanation took %.1f s", time.perf_counter() - t0)
        return report
