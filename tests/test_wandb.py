"""W&B as a dashboard: a training run and its explanations in one group, tags, the config once,
the export as a model artifact (checked without a W&B account: the calls are recorded)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from helpers import tiny_cfg
from stylex.explain.loggers import log_to_wandb
from stylex.training.callbacks import log_export_artifact
from stylex.classifier import Classifier
from stylex.training.run import build_datamodule, build_loggers, build_module
from stylex.utils.loggers import wandb_identity


@pytest.fixture(autouse=True)
def _no_run_left_open():
    """Building a W&B logger starts its (offline) run: end it, so that the next test's logger
    does not join it."""
    yield
    import wandb

    wandb.finish()


def test_a_training_run_has_a_stable_id_group_tags_and_job_type(tmp_path):
    run_dir = tmp_path / "runs" / "synthetic" / "2024-01-01_00-00-00"
    cfg = tiny_cfg(run_dir, "logger=wandb")
    (logger,) = build_loggers(cfg, run_dir)
    init = logger._wandb_init
    ident = wandb_identity("synthetic", run_dir)
    assert init["id"] == ident["id"] == "synthetic-2024-01-01_00-00-00" and init["group"] == ident["group"]
    assert init["job_type"] == "train" and init["resume"] == "allow"
    assert init["tags"] == ["synthetic", "cpu32", "resnet10t"]
    # log_model=true works offline: the export becomes an artifact that syncs with the run, and
    # Lightning's own log_model (checkpoints, refused offline) stays off.
    (logger,) = build_loggers(tiny_cfg(run_dir, "logger=wandb", "logger.wandb.log_model=true"), run_dir)
    assert logger.log_export is True and not logger._log_model and init["mode"] == "offline"
    # A user's own group and tags are kept.
    cfg = tiny_cfg(run_dir, "logger=wandb", "+logger.wandb.group=mine", "+logger.wandb.tags=[extra]")
    (logger,) = build_loggers(cfg, run_dir)
    assert logger._wandb_init["group"] == "mine" and logger._wandb_init["tags"][-1] == "extra"


def test_the_config_is_logged_once_as_the_resolved_config(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(run_dir, "logger=csv")
    (logger,) = build_loggers(cfg, run_dir)
    logger.save()
    saved = OmegaConf.load(Path(logger.log_dir) / "hparams.yaml")
    assert saved.model.resolution == 16 and saved.dataset.name == "synthetic" and "loss" in saved
    # The module and the data module log no hyperparameters of their own (no second copy).
    module = build_module(cfg, 2, ["a", "b"], Classifier("resnet10t", 2).freeze())
    dm = build_datamodule(cfg)
    assert module._log_hyperparams is False and dm._log_hyperparams is False
    assert module.hparams.generator["c_dim"] == 2  # still recorded with the model


class _Run:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.artifacts, self.id = kwargs, [], [], "abc123"

    def log(self, payload):
        self.logged.append(payload)

    def log_artifact(self, artifact, aliases=None):
        self.artifacts.append((artifact, aliases))

    def finish(self):
        pass


def test_the_explanation_joins_the_training_runs_group_with_a_native_chart(tmp_path, monkeypatch):
    import wandb

    run_dir = tmp_path / "runs" / "retina" / "2024-02-02_00-00-00"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("dataset:\n  name: retina\n")
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(_Run(**kw)) or runs[-1])
    report = SimpleNamespace(data={"classes": {}, "settings": {"top_k": 2},
                                   "flip_rate": {"k": [1, 2], "attfind": [0.2, 0.5], "random": [0.0, 0.1],
                                                 "variance": [0.0, 0.0]}},
                             panels={}, plot=None)
    log_to_wandb({"project": "stylex", "offline": True, "tags": ["retina"]}, run_dir, report)
    (run,) = runs
    ident = wandb_identity("retina", run_dir)
    assert run.kwargs["job_type"] == "explain" and run.kwargs["group"] == ident["group"]
    assert run.kwargs["config"]["training_run"] == ident["id"] and run.kwargs["tags"] == ["retina"]
    (payload,) = run.logged
    assert "explain/flip_rate_chart" in payload and "explain/attributes" in payload


def test_the_export_is_a_model_artifact_only_with_log_model(tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "stylex.json").write_text(json.dumps({"format": "stylex-export"}))
    (folder / "model.safetensors").write_bytes(b"weights")

    class Logger(WandbLogger):
        def __init__(self, log_model):
            self.log_export, self.run = log_model, _Run()

        @property
        def experiment(self):
            return self.run

    off, on = Logger(False), Logger(True)
    log_export_artifact([off, on], folder, step=40)
    assert off.run.artifacts == []
    (artifact, aliases), = on.run.artifacts
    assert artifact.type == "model" and "step-40" in aliases
    assert sorted(artifact.manifest.entries) == [
        "model.safetensors", "stylex.json"]


def test_an_offline_run_with_log_model_stores_the_export_artifact_with_the_run(tmp_path):
    from stylex.training.run import train

    run_dir = tmp_path / "runs" / "synthetic" / "offline"
    train(tiny_cfg(run_dir, "logger=wandb", "logger.wandb.log_model=true", "trainer.max_steps=2",
                   "classifier.train.max_epochs=1", "callbacks.quality.enabled=false"))
    (record,) = (run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()  # the run's records, synced later by `wandb sync`
    ident = wandb_identity("synthetic", run_dir)
    assert f"export-{ident['id']}".encode() in data and b"stylex.json" in data and b"model.safetensors" in data


def test_images_reach_wandb_with_and_without_captions(tmp_path, monkeypatch, caplog):
    """Lightning's ``log_image`` takes len() of every extra keyword: a plot logged without
    captions (the flip-rate plot) must not pass ``caption=None``."""
    import wandb
    from PIL import Image
    from pytorch_lightning.loggers import WandbLogger

    from stylex.utils.loggers import log_images

    png = tmp_path / "plot.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png)
    logger = WandbLogger(project="stylex", save_dir=str(tmp_path), offline=True)
    sent = []
    monkeypatch.setattr(logger, "log_metrics", lambda metrics, step=None: sent.append(metrics))
    with caplog.at_level("WARNING"):
        log_images(logger, "explain/flip_rate", [png], step=3)
        log_images(logger, "samples", [png, png], step=3, captions=["a", "b"])
    assert not [r for r in caplog.records if "could not log" in r.getMessage()]
    (plot,), pair = sent[0]["explain/flip_rate"], sent[1]["samples"]
    assert isinstance(plot, wandb.Image) and plot._caption is None
    assert [im._caption for im in pair] == ["a", "b"]
