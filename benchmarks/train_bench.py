"""Training throughput of a StylEx preset, in images per second.

    python benchmarks/train_bench.py [--model cpu32] [--steps 30] [--warmup 5] [--precision 32-true]
                                     [--override ops_impl=cuda] [--override key=value ...]

Builds the preset's networks with an untrained frozen classifier of the preset's architecture
(throughput does not depend on its weights), runs whole training steps (discriminator with its
lazy R1 at the configured rate, generator + encoder on both paths, EMA) on the synthetic data and
prints the median step time and images per second after the warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from stylex.classifier import build_classifier  # noqa: E402
from stylex.ops import set_default_impl  # noqa: E402
from stylex.training.run import build_datamodule, build_module  # noqa: E402


class StepTimer(pl.Callback):
    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu32")
    ap.add_argument("--classifier", default=None, help="classifier preset (default: the training default)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--override", action="append", default=[],
                    help="extra config override, e.g. loss.encoder_losses=all (repeatable)")
    args = ap.parse_args(argv)

    overrides = [f"model={args.model}", "dataset.num_train=1024", "dataset.num_val=64", "logger=none"]
    if args.classifier:
        overrides.append(f"classifier={args.classifier}")
    if args.batch_size:
        overrides.append(f"model.batch_size={args.batch_size}")
    overrides += args.override
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "configs")):
        cfg = compose(config_name="train", overrides=overrides)
    set_default_impl(str(cfg.get("ops_impl", "auto")))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    clf = build_classifier(OmegaConf.to_container(cfg.classifier, resolve=True), dm.num_classes).freeze()
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=args.warmup + args.steps, accelerator=args.accelerator, devices=1, precision=args.precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    times = timer.times[args.warmup:]
    med = statistics.median(times)
    batch = int(cfg.model.batch_size)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.accelerator != "cpu" else (
        f"CPU, {torch.get_num_threads()} threads")
    extra = f" overrides={' '.join(args.override)}" if args.override else ""
    print(f"model={args.model} batch={batch} precision={args.precision} ops_impl={cfg.get('ops_impl', 'auto')} "
          f"device={device}{extra}")
    print(f"training step: median {med * 1000:.0f} ms over {len(times)} steps "
          f"(min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms)")
    print(f"throughput: {batch / med:.1f} images/s")


if __name__ == "__main__":
    main()
