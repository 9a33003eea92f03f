"""Train StylEx: ``python train.py [group=option ...] [key=value ...]`` (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

from stylex.config import register

register()  # the schemas configs/ is built on


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from stylex.cli import run_training

    run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
