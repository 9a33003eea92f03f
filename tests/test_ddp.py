"""Multi-process training: two CPU ranks under DDP must keep identical trainable weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.timeout(300)
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    env.pop("STYLEX_RUN_DIR", None)
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path), "4"], env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    start = [torch.load(tmp_path / f"rank{r}_start.pt") for r in (0, 1)]
    end = [torch.load(tmp_path / f"rank{r}_end.pt") for r in (0, 1)]
    for name in ("G", "D", "E"):
        assert torch.equal(start[0][name], start[1][name]), f"{name} differs across ranks at the start"
        assert torch.equal(end[0][name], end[1][name]), f"{name} differs across ranks after training"
        assert not torch.equal(start[0][name], end[0][name]), f"{name} did not train"
    assert int(end[0]["g_steps"]) == int(end[1]["g_steps"]) == 4
    # Both ranks worked in the one run folder that rank zero chose.
    assert end[0]["run_dir"] == end[1]["run_dir"]
    runs = list((tmp_path / "runs" / "synthetic").iterdir())
    assert len(runs) == 1 and str(runs[0]) == end[0]["run_dir"]
    assert (runs[0] / "export" / "stylex.json").is_file()
