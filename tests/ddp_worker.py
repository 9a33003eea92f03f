"""Run by test_ddp.py: a tiny StylEx run on 2 CPU processes with DDP.

Lightning re-launches this script once per extra rank; each rank writes its trainable
parameters at the start and at the end of fit to <out>/rank<r>_{start,end}.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from helpers import tiny_cfg  # noqa: E402
from stylex.training import run as run_mod  # noqa: E402


class DumpParams(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def _dump(self, trainer, pl_module, tag):
        flat = {name: torch.cat([p.detach().flatten() for p in getattr(pl_module, name).parameters()])
                for name in ("G", "D", "E")}
        flat["g_steps"] = pl_module.g_steps.clone()
        flat["run_dir"] = str(trainer.default_root_dir)
        torch.save(flat, self.out / f"rank{trainer.global_rank}_{tag}.pt")

    def on_train_start(self, trainer, pl_module):
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, pl_module, "end")


def main(out: Path, steps: int) -> None:
    original = run_mod.build_callbacks
    run_mod.build_callbacks = lambda *a, **k: original(*a, **k) + [DumpParams(out)]
    # No run_dir: rank zero picks a timestamped folder under runs_root and the other rank must
    # find the same one.
    cfg = tiny_cfg(out / "runs" / "unused", "run_dir=null", f"trainer.max_steps={steps}", "trainer.devices=2", "trainer.strategy=ddp",
                   "classifier.train.max_epochs=1", "trainer.enable_progress_bar=false")
    run_mod.train(cfg)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
