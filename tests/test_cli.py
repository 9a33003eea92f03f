"""The command line as a user meets it: `python train.py ...`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO, TINY


def _run(args, tmp_path, timeout=240):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("STYLEX_RUN_DIR", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_py_prints_the_run_folder_last(tmp_path):
    proc = _run(TINY + ["trainer.max_steps=3", "trainer.enable_progress_bar=false", "classifier.train.max_epochs=1",
                        "logger=wandb"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    run_dir = Path(last)
    assert run_dir.is_absolute() and run_dir.parent.parent == (tmp_path / "runs").resolve()
    assert (run_dir / "export" / "stylex.json").is_file()
    # W&B ran offline inside the run folder, with no account and no prompt.
    assert list((run_dir / "logs").rglob("offline-run-*")), "no offline W&B run was written"


def test_train_py_reports_a_missing_dataset_without_traceback(tmp_path):
    proc = _run(["dataset=folder", f"dataset.root={tmp_path / 'nowhere'}", "logger=csv"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr
