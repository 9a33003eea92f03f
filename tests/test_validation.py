"""Every value is checked before any work, and every failure a user can act on ends in one line.

What is checked here: types and ranges of the sections without a schema (``model``, ``trainer``,
``dataset``, the top-level options), the data against the batch sizes, the classifier checkpoint
and the run folder, all before the run folder exists; errors during training (a non-finite
gradient, a full disk) as :class:`~stylex.errors.UsageError`; the export's metadata; the thread
count; the warning of ``ops_impl=cuda`` on CPU tensors.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from helpers import REPO, TINY, compose_cfg, tiny_cfg
from stylex.errors import ConfigError, RunError, UsageError, is_disk_full
from stylex.training import run as run_mod
from stylex.training.run import train


def _refused(tmp_path: Path, *overrides: str) -> tuple[ConfigError, Path]:
    run_dir = tmp_path / "runs" / "synthetic" / "bad"
    with pytest.raises(ConfigError) as info:
        train(tiny_cfg(run_dir, *overrides))
    return info.value, run_dir


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=abc", "trainer.max_steps must be a whole number, got 'abc'"),
    ("trainer.max_steps=12.5", "trainer.max_steps must be a whole number, got 12.5"),
    ("trainer.max_steps=-5", "trainer.max_steps must be >= -1, got -5"),
    ("trainer.precision=fp8", "trainer.precision must be one of"),
    ("trainer.enable_progress_bar=maybe", "trainer.enable_progress_bar must be true or false or null"),
    ("trainer.threads=0", "trainer.threads must be a whole number >= 1 or null"),
    ("+trainer.logger=false", "trainer.logger is set by train.py itself"),
    ("model.lr=abc", "model.lr must be a finite number, got 'abc'"),
    ("model.lr=-0.1", "model.lr must be > 0"),
    ("model.batch_size=abc", "model.batch_size must be a whole number, got 'abc'"),
    ("model.batch_size=-4", "model.batch_size must be positive, got -4"),
    ("model.resolution=48", "model.resolution must be a power of two >= 8"),
    ("model.z_dim=0", "model.z_dim must be positive"),
    ("model.encoder_latent=z", "model.encoder_latent must be w or w+"),
    ("model.encoder_noise=true", "model.encoder_noise=true needs noise inputs that start above zero"),
    ("model.encoder_noise=maybe", "model.encoder_noise must be true or false"),
    ("model.noise_per_channel=3", "model.noise_per_channel must be true or false"),
    ("model.noise_init=-0.1", "model.noise_init must be >= 0, got -0.1"),
    ("model.class_gain=0", "model.class_gain must be > 0"),
    ("loss.class_sparsity=-1", "loss.class_sparsity must be >= 0"),
    ("model.channel_base=4", "use model.channel_base >= 16"),
    ("ops_impl=fast", "ops_impl='fast' is not one of auto, cuda, ref"),
    ("seed=abc", "seed must be a whole number"),
    ("dataset.num_train=abc", "dataset.num_train must be a whole number, got 'abc'"),
    ("dataset.lesion_count=[1,x]", "dataset.lesion_count must be a list of whole numbers"),
    ("+dataset.num_trian=5", "dataset.num_trian is not an option of SyntheticDataModule"),
    ("dataset.num_train=0", "dataset=synthetic: num_train must be >= 1"),
    ("classifier.arch=resnt18", "unknown classifier architecture 'resnt18'"),
    ("+logger.csv.flush_logs_every_n_steps=often", "logger.csv.flush_logs_every_n_steps must be a whole number"),
])
def test_wrong_values_are_refused_before_any_work(tmp_path, override, message):
    error, run_dir = _refused(tmp_path, override)
    assert message in str(error)
    assert not run_dir.exists(), "a run folder was made for a run that could not start"


def test_a_negative_batch_size_is_not_called_a_multiple_of_four(tmp_path):
    error, _ = _refused(tmp_path, "model.batch_size=-4")
    assert "multiple of 4" not in str(error)


def test_whole_floats_become_whole_numbers_for_the_trainer(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", "trainer.max_steps=2e3", "trainer.limit_val_batches=0.5")
    run_mod.check(cfg)
    assert cfg.trainer.max_steps == 2000 and type(cfg.trainer.max_steps) is int
    assert cfg.trainer.limit_val_batches == 0.5


def test_a_trainer_that_cannot_be_built_is_refused_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    error, run_dir = _refused(tmp_path, "trainer.accelerator=gpu")
    assert str(error).startswith("trainer: ")
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------ data, files
def test_a_data_error_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "folder" / "x"
    with pytest.raises(ConfigError, match="nowhere"):
        train(compose_cfg(["dataset=folder", f"dataset.root={tmp_path / 'nowhere'}", "logger=csv",
                           f"run_dir={run_dir}", f"runs_root={tmp_path / 'runs'}"]))
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_a_dataset_smaller_than_the_classifier_batch_is_named_before_the_stage(tmp_path):
    error, run_dir = _refused(tmp_path, "dataset.num_train=40")  # the preset's classifier batch is 64
    assert "classifier.train.batch_size=64" in str(error) and "40 training images" in str(error)
    assert not run_dir.exists()
    error, _ = _refused(tmp_path, "dataset.num_train=6")  # model.batch_size=8
    assert "model.batch_size=8" in str(error)


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, b"PK\x03\x04 truncated zip"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_damaged_classifier_checkpoint_is_named_before_any_work(tmp_path, content, suffix):
    bad = tmp_path / f"clf{suffix}"
    bad.write_bytes(content)
    error, run_dir = _refused(tmp_path, f"classifier.checkpoint={bad}")
    assert str(bad) in str(error) and "\n" not in str(error)
    assert not run_dir.exists()


def test_a_feature_checkpoint_that_is_missing_damaged_or_bare_is_named_before_any_work(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00garbage" * 10)
    bare = tmp_path / "bare.pt"  # weights without the architecture they belong to
    torch.save({"fc.weight": torch.zeros(2, 4)}, bare)
    for path, why in ((missing, "does not exist"), (damaged, "cannot be read"), (bare, "record no architecture")):
        error, run_dir = _refused(tmp_path, f"classifier.feature_checkpoint={path}")
        assert f"classifier.feature_checkpoint={path}" in str(error) and why in str(error)
        assert "\n" not in str(error) and not run_dir.exists()


def test_online_wandb_without_credentials_leaves_no_run_folder(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    run_dir = tmp_path / "runs" / "synthetic" / "w"
    line = [o for o in TINY if not o.startswith("logger=")] + ["logger=wandb", "logger.wandb.offline=false",
                                                               f"run_dir={run_dir}"]
    with pytest.raises(ConfigError, match="needs W&B credentials"):
        train(compose_cfg(line))
    assert not run_dir.exists()


@pytest.mark.parametrize("held", ["checkpoints/last.ckpt", "export/stylex.json"])
def test_a_new_run_is_refused_in_a_folder_that_holds_another_run(tmp_path, held):
    run_dir = tmp_path / "runs" / "synthetic" / "taken"
    kept = run_dir / held
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"an earlier run's weights")
    with pytest.raises(ConfigError, match=r"already holds a run .*resume=") as info:
        train(tiny_cfg(run_dir))
    assert f"run_dir={run_dir}" in str(info.value) and "\n" not in str(info.value)
    assert kept.read_bytes() == b"an earlier run's weights"
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()) == [held]


def test_a_runs_root_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "runs_file"
    blocker.write_text("not a folder")
    cfg = tiny_cfg(blocker / "synthetic" / "x", "run_dir=null", f"runs_root={blocker}")
    with pytest.raises(ConfigError, match=r"runs_root=.*is a file, not a folder"):
        train(cfg)


def test_an_unwritable_runs_root_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "readonly"
    root.mkdir()
    real_access = os.access
    monkeypatch.setattr(run_mod.os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    cfg = tiny_cfg(root / "synthetic" / "x", "run_dir=null", f"runs_root={root}")
    with pytest.raises(ConfigError, match="is not writable"):
        train(cfg)
    assert list(root.iterdir()) == []


# ------------------------------------------------------------------------------------------ during training
def _with_callback(monkeypatch, callback: pl.Callback) -> None:
    original = run_mod.build_callbacks
    monkeypatch.setattr(run_mod, "build_callbacks", lambda *a, **k: original(*a, **k) + [callback])


def test_a_non_finite_gradient_is_a_one_line_error(tmp_path, monkeypatch):
    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(pl_module.G.synthesis.parameters()).fill_(float("nan"))

    _with_callback(monkeypatch, Poison())
    with pytest.raises(RunError, match="non-finite gradient") as info:
        train(tiny_cfg(tmp_path / "runs" / "synthetic" / "nan", "trainer.max_steps=5",
                       "classifier.train.max_epochs=1", "callbacks.quality.enabled=false"))
    assert isinstance(info.value, UsageError) and "model.lr" in str(info.value)


def test_a_full_disk_while_checkpointing_names_the_file(tmp_path, monkeypatch):
    from stylex.training import checkpoint_io

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 39578304 vs 39578196")

    monkeypatch.setattr(checkpoint_io.torch, "save", full)
    run_dir = tmp_path / "runs" / "synthetic" / "full"
    with pytest.raises(RunError) as info:
        train(tiny_cfg(run_dir, "trainer.max_steps=10", "classifier.train.max_epochs=1",
                       "callbacks.quality.enabled=false"))
    text = str(info.value)
    assert text.startswith("the disk is full: writing ") and str(run_dir / "checkpoints") in text
    assert "\n" not in text and "resume=" in text


def test_a_full_disk_while_exporting_is_a_one_line_error(tmp_path, monkeypatch):
    from stylex import export

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(RunError, match="the disk is full: writing .*model.safetensors"):
        train(tiny_cfg(tmp_path / "runs" / "synthetic" / "full", "trainer.max_steps=2",
                       "classifier.train.max_epochs=1", "callbacks.quality.enabled=false"))


def test_disk_full_is_recognised_through_chained_errors():
    inner = OSError(errno.ENOSPC, "No space left on device")
    outer = RuntimeError("saving failed")
    outer.__cause__ = inner
    assert is_disk_full(outer) and is_disk_full(inner)
    assert not is_disk_full(RuntimeError("something else")) and not is_disk_full(OSError(errno.EACCES, "no"))


# ------------------------------------------------------------------------------------------ export, ops, threads
@pytest.mark.parametrize("text,kind", [("[1, 2]", "an array"), ('"stylex"', "a string"), ("3", "a number"),
                                       ("null", "null")])
def test_an_export_whose_metadata_is_not_an_object_is_a_clear_error(tmp_path, text, kind):
    from stylex.explain.cli import main
    from stylex.export import load_export

    export = tmp_path / "export"
    export.mkdir()
    (export / "stylex.json").write_text(text)
    (export / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=f"holds {kind}, not a JSON object"):
        load_export(export)
    assert main(["--run", str(tmp_path), "--quiet"]) == 2


def test_ops_impl_cuda_on_cpu_tensors_warns_once(monkeypatch):
    from stylex.ops import dispatch

    monkeypatch.setattr(dispatch, "_warned_cpu", False)
    x = torch.zeros(2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert dispatch.use_cuda(x, "cuda", "bias_act") is False
        assert dispatch.use_cuda(x, "cuda", "upfirdn2d") is False
        assert dispatch.use_cuda(x, "ref", "bias_act") is False
        assert dispatch.use_cuda(x, "auto", "bias_act") is False
    texts = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1 and "CPU tensor" in texts[0] and "reference implementation" in texts[0]


def test_threads_option_is_applied_and_not_passed_to_the_trainer(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "run", "trainer.threads=3")
    assert run_mod.cpu_threads(cfg) == 3
    assert "threads" not in run_mod.trainer_kwargs(cfg)
    auto = tiny_cfg(tmp_path / "run", "trainer.devices=2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert run_mod.cpu_threads(auto) is None  # the user's OMP_NUM_THREADS stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(run_mod.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(run_mod.torch, "get_num_threads", lambda: 8)
    assert run_mod.cpu_threads(auto) == 4  # 8 CPUs shared by the 2 processes of this machine


def test_training_runs_with_the_threads_it_was_given(tmp_path, monkeypatch):
    seen = []

    class Threads(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(torch.get_num_threads())

    _with_callback(monkeypatch, Threads())
    before = torch.get_num_threads()
    try:
        train(tiny_cfg(tmp_path / "runs" / "synthetic" / "t", "trainer.threads=2", "trainer.max_steps=2",
                       "classifier.train.max_epochs=1", "callbacks.quality.enabled=false"))
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2]


# ------------------------------------------------------------------------------------------ the command line
def _train_py(args, cwd, timeout=240):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("STYLEX_RUN_DIR", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


COMPOSE_ERRORS = [
    ("loss.r1_gamma=abc", "loss.r1_gamma=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("dataset=nope", "Could not find 'dataset/nope'; Available options in 'dataset': folder, retina, synthetic"),
]


@pytest.mark.parametrize("override,message", COMPOSE_ERRORS)
def test_composition_errors_become_one_line_naming_the_override(override, message):
    from stylex.cli import compose_config, config_error_line

    with pytest.raises(Exception) as info:
        compose_config(TINY + [override])
    line = config_error_line(info.value)
    assert line is not None and message in line and "\n" not in line
    assert config_error_line(RuntimeError("not a config error")) is None


# One value per way of rejecting it, in a real process (the in-process tests above have the
# rest): our own checks, and the schemas while Hydra composes the config.
@pytest.mark.parametrize("override,message", [
    ("model.resolution=48", "model.resolution must be a power of two"),
    COMPOSE_ERRORS[0],
])
def test_train_py_refuses_wrong_values_in_one_line_with_status_2(tmp_path, override, message):
    proc = _train_py(TINY + [override], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "runs").exists()
