"""Resuming a run: the saved config wins, the command line applies as Hydra parsed it, the newest
checkpoint that loads is taken, nothing changes when a resume fails, and crashes keep their work.
Also the record of the command lines in the run folder, and ``-m`` sweeps."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from helpers import REPO, TINY, compose_cfg, tiny_cfg
from stylex.errors import ConfigError
from stylex.training import run as run_mod
from stylex.training.run import train

# The original command line of the run every test here resumes (a copy of it).
BASE = ["trainer.max_steps=20", "classifier.train.max_epochs=1", "trainer.enable_progress_bar=false",
        "callbacks.quality.enabled=false", "~callbacks.samples"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A csv-logged run of 20 steps: step000010.ckpt, step000020.ckpt and last.ckpt (step 20)."""
    run_dir = tmp_path_factory.mktemp("base") / "synthetic" / "base"
    train(tiny_cfg(run_dir, *BASE), overrides=TINY + BASE)
    return run_dir


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    copy = tmp_path / "runs" / "synthetic" / "copy"
    shutil.copytree(base_run, copy)
    return copy


def _resume(run: Path, *overrides: str) -> Path:
    """``python train.py resume=<run> <overrides>``: the defaults composed with this command line
    only, as a user's resume line is (no logger=csv, no model.* of the original run)."""
    line = [f"resume={run}", *overrides]
    return train(compose_cfg(line), overrides=line)


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def _files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run.rglob("*")) if p.is_file()}


def _with_callback(monkeypatch, callback: pl.Callback) -> None:
    original = run_mod.build_callbacks
    monkeypatch.setattr(run_mod, "build_callbacks", lambda *a, **k: original(*a, **k) + [callback])


# ------------------------------------------------------------------------------------------ the config
def test_a_csv_run_resumes_with_its_csv_logger(run):
    _resume(run, "trainer.max_steps=22")
    saved = OmegaConf.load(run / "config.yaml")
    assert list(saved.logger) == ["csv"]
    assert not (run / "logs" / "wandb").exists(), "the resumed run switched to the default logger"
    assert _step(run / "checkpoints" / "last.ckpt") == 22


def test_a_run_without_logger_stays_without_one(run):
    saved = OmegaConf.load(run / "config.yaml")
    saved.logger = {}  # what logger=none writes
    OmegaConf.save(saved, run / "config.yaml")
    shutil.rmtree(run / "logs")
    _resume(run, "trainer.max_steps=21")
    assert len(OmegaConf.load(run / "config.yaml").logger) == 0
    assert not (run / "logs").exists()


def test_a_logger_group_on_the_resume_line_applies(run):
    _resume(run, "logger=tensorboard", "trainer.max_steps=21")
    assert list(OmegaConf.load(run / "config.yaml").logger) == ["tensorboard"]
    assert list((run / "logs").rglob("events.out.tfevents.*"))


def test_resume_overrides_are_read_as_hydra_reads_them(run):
    _resume(run, "trainer.max_steps=2.2e1", "~callbacks.throughput", "trainer.log_every_n_steps=1")
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.trainer.max_steps == 22 and isinstance(saved.trainer.max_steps, int)
    assert "throughput" not in saved.callbacks, "~key must delete the key, not set it to null"
    assert _step(run / "checkpoints" / "last.ckpt") == 22


def test_the_original_command_line_is_kept_and_its_deletions_stay(run):
    _resume(run, "trainer.max_steps=21")
    record = OmegaConf.to_container(OmegaConf.load(run / "overrides.yaml"))
    assert [entry["overrides"] for entry in record] == [TINY + BASE, [f"resume={run}", "trainer.max_steps=21"]]
    # ~callbacks.samples of the original command line still holds, though today's defaults have it
    assert "samples" not in OmegaConf.load(run / "config.yaml").callbacks


def test_a_callback_added_since_the_run_was_made_takes_its_defaults(run):
    saved = OmegaConf.load(run / "config.yaml")
    del saved.callbacks["exception_checkpoint"]
    OmegaConf.save(saved, run / "config.yaml")
    _resume(run, "trainer.max_steps=21")
    assert OmegaConf.load(run / "config.yaml").callbacks.exception_checkpoint.path == "checkpoints/on_exception.ckpt"


@pytest.mark.parametrize("override,message", [
    ("dataset=retina", "keeps its config groups"),
    ("model=gpu64", "keeps its config groups"),
    ("experiment=cpu_long", "keeps its config groups"),
    ("model.lr=0.1", "keeps its model, data and classifier"),
])
def test_resume_refuses_to_change_what_was_trained(run, override, message):
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=message):
        _resume(run, override)
    assert _snapshot(run) == before


# ------------------------------------------------------------------------------------------ the checkpoint
def test_resume_takes_the_newest_checkpoint_that_loads(run, caplog, monkeypatch):
    """A kill at step 20 after step000020.ckpt was written but while last.ckpt was: last.ckpt
    is older (here: step 10) or damaged, and a partial temporary file lies beside it."""
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "step000010.ckpt", ckpts / "last.ckpt")  # an older last.ckpt
    with caplog.at_level(logging.INFO, logger="stylex"):
        assert run_mod.choose_checkpoint(run) == ckpts / "step000020.ckpt"
    assert "resuming from" in caplog.text and "step000020.ckpt (step 20" in caplog.text

    data = (ckpts / "step000020.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 3])  # a damaged last.ckpt
    partial = ckpts / ".last.ckpt.k1ll3d.tmp"
    partial.write_bytes(data[:1000])
    caplog.clear()
    seen = {}

    class Start(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step

    _with_callback(monkeypatch, Start())
    with caplog.at_level(logging.INFO, logger="stylex"):
        _resume(run, "trainer.max_steps=30")
    assert seen["step"] == 20
    assert re.search(r"not resuming from .*last\.ckpt: it cannot be read", caplog.text)
    assert "resuming from" in caplog.text and "step000020.ckpt" in caplog.text
    assert not partial.exists(), "the partial file of the interrupted write was left"
    assert _files(run) == ["last.ckpt", "step000010.ckpt", "step000020.ckpt", "step000030.ckpt"]
    assert _step(ckpts / "last.ckpt") == 30


def test_a_resumed_run_replaces_checkpoints_instead_of_adding_versions(run):
    ckpts = run / "checkpoints"
    _resume(run, "trainer.max_steps=40", "callbacks.checkpoint.keep=2")  # resume=<folder>: from step 20
    assert _files(run) == ["last.ckpt", "step000030.ckpt", "step000040.ckpt"]
    # from an older checkpoint again: step 30 and 40 are written again, over the old files
    line = [f"resume={ckpts / 'step000030.ckpt'}", "trainer.max_steps=50", "callbacks.checkpoint.keep=2"]
    train(compose_cfg(line), overrides=line)
    assert _files(run) == ["last.ckpt", "step000040.ckpt", "step000050.ckpt"]
    assert _step(ckpts / "last.ckpt") == 50


def test_a_failed_resume_changes_nothing(run):
    ckpts = run / "checkpoints"
    for path in ckpts.glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:500])
    (ckpts / ".last.ckpt.k1ll3d.tmp").write_bytes(b"partial")
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="no checkpoint in .* can be read"):
        _resume(run, "trainer.max_steps=30")
    assert _snapshot(run) == before


def test_a_damaged_classifier_of_the_run_is_named_and_changes_nothing(run):
    weights = run / "classifier" / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="classifier this run trained earlier.*cannot be read"):
        _resume(run, "trainer.max_steps=30")
    assert _snapshot(run) == before


def test_a_resume_with_a_wrong_value_changes_nothing(run):
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="trainer.max_steps must be a whole number"):
        _resume(run, "trainer.max_steps=abc")
    assert _snapshot(run) == before


def test_resuming_a_run_that_reached_max_steps_says_how_to_continue_and_changes_nothing(run):
    # Lightning would stop at once and skip the end of training (encoder fit, export, explanation).
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"at step 20 already, which reaches trainer.max_steps=20; give a larger"):
        _resume(run)
    assert _snapshot(run) == before


def test_a_short_run_and_its_resume_keep_exactly_one_last_ckpt(tmp_path):
    run = tmp_path / "runs" / "synthetic" / "short"
    train(tiny_cfg(run, "trainer.max_steps=3", "classifier.train.max_epochs=1", "callbacks.quality.enabled=false"))
    assert _files(run) == ["last.ckpt"]
    _resume(run, "trainer.max_steps=5")
    assert _files(run) == ["last.ckpt"]
    assert _step(run / "checkpoints" / "last.ckpt") == 5


# ------------------------------------------------------------------------------------------ crashes
def test_a_crash_keeps_its_work_and_the_resume_continues_from_it(run, monkeypatch):
    class Crash(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 27:
                raise RuntimeError("simulated crash")

    crash = Crash()
    _with_callback(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume(run, "trainer.max_steps=40")
    saved = run / "checkpoints" / "on_exception.ckpt"
    assert _step(saved) == 27
    state = torch.load(saved, map_location="cpu", weights_only=False)
    assert int(state["state_dict"]["g_steps"]) == 27

    seen = {}

    class Start(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"], seen["g_steps"] = trainer.global_step, pl_module.count("g_steps")

    _with_callback(monkeypatch, Start())  # replaces the crashing callback
    monkeypatch.setattr(crash, "on_train_batch_end", lambda *a, **k: None)
    _resume(run, "trainer.max_steps=32")
    assert seen == {"step": 27, "g_steps": 27}
    assert _step(run / "checkpoints" / "last.ckpt") == 32
    assert not saved.exists(), "the crash's checkpoint outlived the run that continued it"


def test_resume_last_finds_a_run_that_crashed_before_its_first_checkpoint(tmp_path):
    old, crashed = (tmp_path / "synthetic" / n / "checkpoints" for n in ("old", "crashed"))
    for folder, name, stamp in ((old, "last.ckpt", 1_000), (crashed, "on_exception.ckpt", 2_000)):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (stamp, stamp))
    assert run_mod.find_latest_run(tmp_path) == crashed.parent


# ------------------------------------------------------------------------------------------ -m sweeps
@pytest.mark.parametrize("ddp", [False, True], ids=["one-process", "ddp-2-ranks"])
def test_a_multirun_sweep_makes_one_run_folder_per_value(tmp_path, ddp):
    """Two values of a loss weight: two runs, two folders; under DDP each job launches (and
    ends) a group of its own."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("STYLEX_RUN_DIR", None)
    args = TINY + ["trainer.max_steps=2", "classifier.train.max_epochs=1", "trainer.enable_progress_bar=false",
                   "callbacks.quality.enabled=false", "loss.kl_gen=0.5,2.0"]
    if ddp:
        args += ["trainer.strategy=ddp", "trainer.devices=2"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted((tmp_path / "runs" / "synthetic").iterdir())
    assert len(runs) == 2
    weights = sorted(OmegaConf.load(r / "config.yaml").loss.kl_gen for r in runs)
    assert weights == [0.5, 2.0]
    for r in runs:
        kl_gen = OmegaConf.load(r / "config.yaml").loss.kl_gen
        recorded = OmegaConf.to_container(OmegaConf.load(r / "overrides.yaml"))[0]["overrides"]
        assert f"loss.kl_gen={kl_gen}" in recorded
        assert (r / "export" / "stylex.json").is_file()
    printed = [line for line in proc.stdout.splitlines() if line.startswith("/")]
    assert sorted(Path(p) for p in printed) == [r.resolve() for r in runs]
