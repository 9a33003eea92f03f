"""The dissection of a run as a post-training Lightning callback (``callbacks.dissect``).

Off by default: on the 2-core CPU the synthetic segmenter's first training and a 1,000-image
dissection would push the quickstart past its 10 minutes. ``callbacks.dissect.enabled=true``
turns it on; ``python explain.py --dissect`` does the same on a finished run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from stylex.data.base import spread_indices
from stylex.data.synthetic import SyntheticDataModule
from stylex.utils.io import atomic_folder
from stylex.utils.runs import in_run

log = logging.getLogger(__name__)


class DissectCallback(pl.Callback):
    """After fit (rank zero): dissect the EMA generator into ``<run>/<out_dir>``.

    Args:
        enabled: run at all.
        out_dir: the report folder, relative to the run folder.
        num_images: generated samples dissected.
        encoded_images: validation images dissected through the encoder.
        layers: unit layers (None = every one).
        segmenter: a segmenter file (None: the synthetic U-Net on synthetic data, else the
            classifier's class evidence).
        intervention_images: samples per intervention measurement.
        artifacts: rank artifact units against the validation images.
        threads: CPU threads while dissecting (None = torch's).
    """

    def __init__(self, enabled: bool = False, out_dir: str = "dissect", num_images: int = 1000,
                 encoded_images: int = 200, layers: Optional[Sequence[str]] = None, segmenter: Optional[str] = None,
                 intervention_images: int = 128, artifacts: bool = True, threads: Optional[int] = None) -> None:
        from stylex.dissect.pipeline import DissectSettings

        self.enabled = bool(enabled)
        self.out_dir = out_dir
        self.settings = DissectSettings(layers=list(layers) if layers else None, num_images=num_images,
                                        encoded_images=encoded_images, intervention_images=intervention_images)
        self.segmenter = segmenter
        self.artifacts = bool(artifacts)
        self.threads = threads
        self.last_report: Optional[Path] = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.dissect(trainer, pl_module)

    @rank_zero_only
    def dissect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Path]:
        """Dissect and write the report; a failure is logged, the finished run is kept."""
        try:
            return self._dissect(trainer, pl_module)
        except Exception as e:  # the training already finished: report the failure, keep the run
            log.exception("the post-training dissection failed (%s: %s); the run itself is complete",
                          type(e).__name__, e)
            return None

    def _dissect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        from types import SimpleNamespace

        from stylex.dissect.pipeline import choose_segmenter, dissect_export

        t0 = time.perf_counter()
        out = in_run(trainer, self.out_dir)
        names = [str(n) for n in getattr(pl_module, "class_names", None) or []]
        g = pl_module.G_ema
        dm = getattr(trainer, "datamodule", None)
        config = {"dataset": dict(getattr(dm, "hparams", {}) or {})}
        if isinstance(dm, SyntheticDataModule):  # choose_segmenter reads the run's config
            config["dataset"]["_target_"] = "stylex.data.SyntheticDataModule"
        real = None
        dataset = getattr(dm, "val_dataset", None)
        if dataset is not None and len(dataset) > 0:
            idx = spread_indices(len(dataset), max(self.settings.encoded_images, 128))
            real = torch.stack([dataset[i]["image"] for i in idx])
        threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        was = {m: m.training for m in (g, pl_module.E)}
        try:
            with torch.autocast(device_type=pl_module.device.type, enabled=False):
                segmenter = choose_segmenter(config, pl_module.classifier, names, int(g.resolution),
                                             segmenter_path=self.segmenter, device=pl_module.device)
                exp = SimpleNamespace(generator=g, encoder=pl_module.E, classifier=pl_module.classifier,
                                      class_names=names)
                explanation = in_run(trainer, "explain") / "explanation.json"
                with atomic_folder(out) as tmp:
                    dissect_export(exp, tmp, segmenter, self.settings, real_images=real,
                                   explanation=explanation if explanation.is_file() else None,
                                   device=pl_module.device, say=log.info, artifacts=self.artifacts,
                                   title=f"StylEx dissection after {int(trainer.global_step)} steps")
        finally:
            for m, mode in was.items():
                m.train(mode)
            torch.set_num_threads(threads)
        self.last_report = out / "report.html"
        log.info("dissection written to %s (%.1f s)", self.last_report, time.perf_counter() - t0)
        return self.last_report

    def state_dict(self) -> dict[str, Any]:
        return {}
