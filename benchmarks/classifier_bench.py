"""Validation accuracy of the classifier stage on a dataset, as `python train.py` would train it.

    python benchmarks/classifier_bench.py                                   # synthetic (default)
    python benchmarks/classifier_bench.py dataset=retina dataset.root=../shared/data
    python benchmarks/classifier_bench.py dataset=retina dataset.root=../shared/data dataset.binary=true

Arguments are Hydra overrides of configs/train.yaml. Prints accuracy, balanced accuracy and time.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from stylex.classifier import prepare_classifier  # noqa: E402
from stylex.training.run import build_datamodule, trainer_kwargs  # noqa: E402


def main(overrides: list[str]) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "configs")):
        cfg = compose(config_name="train", overrides=["logger=none", "trainer.enable_progress_bar=false", *overrides])
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    with tempfile.TemporaryDirectory() as tmp:
        section = OmegaConf.to_container(cfg.classifier, resolve=True)
        _, metrics = prepare_classifier(section, dm, Path(tmp) / "classifier", trainer_kwargs(cfg), loggers=[])
    c = cfg.classifier
    print(f"dataset={cfg.dataset.name} classes={dm.num_classes} resolution={cfg.model.resolution} "
          f"arch={c.arch} epochs={c.train.max_epochs} batch={c.train.batch_size or cfg.model.batch_size}")
    print(f"val accuracy {metrics['val_acc']:.3f}, balanced accuracy {metrics['val_balanced_acc']:.3f}, "
          f"{metrics['seconds']:.1f} s of training")


if __name__ == "__main__":
    main(sys.argv[1:])
