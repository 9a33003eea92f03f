"""Cost of the generator-quality callback against the training it measures.

    python benchmarks/quality_bench.py                         # the quickstart (cpu32, resnet10t)
    python benchmarks/quality_bench.py --num-fake 1024 --repeats 5
    python benchmarks/quality_bench.py --override model=gpu64 --override trainer=gpu

Builds the preset's networks untrained (the cost does not depend on the weights), then times,
with the callback's own code (:class:`stylex.training.quality.GeneratorQuality`):

- the real side, once per run (features of ``--num-real`` validation images; cached afterwards);
- the factor probe (synthetic data): read from the cache, or trained once per resolution;
- one measurement (``--num-fake`` samples: FID, KID, conditioning and factor fidelity, plot),
  the median of ``--repeats``;
- ``--train-steps`` training steps (after a warm-up), to put the measurements in proportion:
  the share of a ``trainer.max_steps`` run that measuring every ``--every`` steps costs.

Run it alone on a quiet machine: on shared cores both figures stretch unevenly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from stylex.classifier import build_classifier  # noqa: E402
from stylex.config import register  # noqa: E402
from stylex.metrics.probe import cache_dir  # noqa: E402
from stylex.training.quality import GeneratorQuality  # noqa: E402
from stylex.training.run import build_datamodule, build_module  # noqa: E402


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self._t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-fake", type=int, default=None, help="default: the callback's")
    ap.add_argument("--num-real", type=int, default=None, help="default: the callback's")
    ap.add_argument("--every", type=int, default=None, help="default: the callback's every_n_steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=20, help="timed training steps (0: skip)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--override", action="append", default=[], help="train.py override (repeatable)")
    args = ap.parse_args(argv)

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=["logger=none", *args.override])
    q = OmegaConf.to_container(cfg.callbacks.quality, resolve=True)
    q.pop("_target_")
    for key, value in (("num_fake", args.num_fake), ("num_real", args.num_real), ("every_n_steps", args.every)):
        if value is not None:
            q[key] = value
    dm = build_datamodule(cfg)
    dm.setup("fit")
    clf = build_classifier(OmegaConf.to_container(cfg.classifier, resolve=True), dm.num_classes).freeze()
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    accelerator = str(cfg.trainer.accelerator)
    device = torch.device("cuda" if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda") else "cpu")
    module.to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model={cfg.model.name} resolution={cfg.model.resolution} classifier={cfg.classifier.arch} "
          f"batch={cfg.model.batch_size} device={where}")
    print(f"quality: every {q['every_n_steps']} steps, {q['num_fake']} generated vs {q['num_real']} real images")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = SimpleNamespace(datamodule=dm, loggers=[], default_root_dir=tmp, global_step=0)
        cb = GeneratorQuality(**q)
        probe_cached = any(cache_dir().glob(f"probe_r{cfg.model.resolution}_*.pt"))
        t = time.perf_counter()
        with torch.no_grad():
            cb._prepare(trainer, module)  # the real side (and the factor probe) once per run
        sync()
        prepare = time.perf_counter() - t
        times = []
        for r in range(args.repeats):
            cb._last_step = -1  # measure the same step again
            t = time.perf_counter()
            if cb.measure(trainer, module) is None:
                raise SystemExit("the measurement failed: see the warning above")
            sync()
            times.append(time.perf_counter() - t)
        figures = cb.last
    per_eval = statistics.median(times)
    probe_note = "" if cb._probe is None else (" (factor probe from the cache)" if probe_cached else
                                                " (factor probe trained and cached: once per resolution)")
    print(f"real side and probe, once per run: {prepare:.2f} s{probe_note}")
    print(f"one measurement: median {per_eval:.2f} s over {len(times)} (min {min(times):.2f}, max {max(times):.2f}); "
          f"feature space {figures['feature']}, KID subsets of {figures['kid_subset_size']}")

    if args.train_steps > 0:
        timer = StepTimer()
        pl.Trainer(max_steps=args.warmup + args.train_steps, accelerator="gpu" if device.type == "cuda" else "cpu",
                   devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                   callbacks=[timer]).fit(module, datamodule=dm)
        step = statistics.median(timer.times[args.warmup:])
        max_steps = int(cfg.trainer.max_steps)
        every = int(q["every_n_steps"])
        count = (max_steps // every if every > 0 else 0) + (0 if every > 0 and max_steps % every == 0 else 1)
        fit = max_steps * step
        print(f"training step: median {step * 1000:.0f} ms; a {max_steps}-step fit ~{fit:.0f} s")
        print(f"{count} measurements in that fit: ~{count * per_eval:.1f} s = {100 * count * per_eval / fit:.1f}% "
              f"of it (+{prepare:.1f} s once = {100 * (count * per_eval + prepare) / fit:.1f}% in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
