"""Shared pieces of the test suite: tiny configs that train in seconds."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"

# A network and data small enough for a few dozen steps per second on a CPU.
TINY = [
    "model.resolution=16",
    "model.batch_size=8",
    "model.z_dim=32",
    "model.w_dim=32",
    "model.channel_base=256",
    "model.channel_max=32",
    "dataset.num_train=256",
    "dataset.num_val=64",
    "dataset.num_test=32",
    "classifier.train.max_epochs=2",
    "logger=csv",
    "callbacks.samples.every_n_steps=0",
    "callbacks.checkpoint.every_n_steps=10",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=2",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
    "callbacks.explain.enabled=false",
    "callbacks.encoder_fit.steps=0",
]


def compose_cfg(overrides: list[str]):
    from stylex.config import register

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(config_name="train", overrides=overrides)


def tiny_cfg(run_dir: Path, *extra: str):
    return compose_cfg(TINY + [f"run_dir={run_dir}", f"runs_root={run_dir.parent}", *extra])
