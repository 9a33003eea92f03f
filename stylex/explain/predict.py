"""The per-image work of AttFind as Lightning predict steps: one device or all of a machine.

AttFind works image by image: each image needs its base log-probabilities and either the
probability Jacobian (pre-screening) or the log-probabilities of its requested edits. That work
is the ``predict_step`` of :class:`AttFindPredictor`, and :func:`run_predict` runs it

- in a plain loop on the predictor's device (``trainer_kwargs=None``), or
- through Lightning's predict loop over the devices of ``trainer_kwargs``; every rank writes its
  predictions to files (:class:`FileGather`) that the main process reads back.

:func:`merge_screen` and :func:`merge_effects` put the per-batch outputs, in whatever order
the ranks produced them, back into per-image tensors. Pair id ``2 * i + d`` is coordinate ``i``
moved in direction ``d``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from stylex.explain.evaluator import EffectEvaluator
from stylex.explain.measures import shift_targets
from stylex.stylespace import NoiseMaps


class ImageSet(Dataset):
    """Image ``n``: its styles, its noise maps if it has its own, and the ids of the
    (coordinate, direction) pairs to render."""

    def __init__(
        self,
        flat: torch.Tensor,  # [N, S] styles
        pairs: Sequence[torch.Tensor] | None,  # per image: pair ids to render; None = screening
        noise: NoiseMaps | None = None,  # [N or 1, 1, r, r] per noise layer; None = the evaluator's noise_mode
    ) -> None:
        self.flat = flat
        self.pairs = pairs
        self.noise = noise

    def __len__(self) -> int:
        return self.flat.shape[0]

    def __getitem__(self, n: int) -> dict[str, Any]:
        item = {"index": n, "flat": self.flat[n]}
        if self.noise is not None:
            item["noise"] = {name: m[0 if m.shape[0] == 1 else n] for name, m in self.noise.items()}
        if self.pairs is not None:
            item["pairs"] = self.pairs[n]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"index": torch.tensor([it["index"] for it in items]), "flat": torch.stack([it["flat"] for it in items])}
    if "noise" in items[0]:
        out["noise"] = {name: torch.stack([it["noise"][name] for it in items]) for name in items[0]["noise"]}
    if "pairs" in items[0]:
        out["pairs"] = [it["pairs"] for it in items]  # ragged: one id list per image
    return out


class AttFindPredictor(pl.LightningModule):
    """The per-image part of AttFind as Lightning predict steps.

    ``phase="screen"``: base log-probabilities and the probability Jacobian of each image.
    ``phase="effects"``: log-probabilities of the requested edits of each image. Pair id
    ``2 * i + d`` is coordinate ``i`` moved in direction ``d``.
    """

    def __init__(
        self,
        evaluator: EffectEvaluator,
        low: torch.Tensor,  # [S] per-coordinate minimum of the reference set
        high: torch.Tensor,  # [S] maximum
        shift_size: float,
    ) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.register_buffer("low", low.detach().clone())
        self.register_buffer("high", high.detach().clone())
        self.shift_size = float(shift_size)
        self.phase = "effects"

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Any]:
        flat = batch["flat"].to(self.low.device)
        noise = batch.get("noise")
        if self.phase == "screen":
            logp, jac = self.evaluator.probability_jacobian(flat, noise)
            return {"index": batch["index"].cpu(), "logp_base": logp.cpu(), "jacobian": jac.cpu()}
        targets = shift_targets(flat, self.low, self.high, self.shift_size)  # [B, S, 2]
        pairs = [p.to(flat.device) for p in batch["pairs"]]
        image = torch.cat([torch.full_like(p, n) for n, p in enumerate(pairs)])
        ids = torch.cat(pairs)
        coords, dirs = ids // 2, ids % 2
        with torch.no_grad():
            base, logp = self.evaluator.edit_log_probs(flat, image, coords, targets[image, coords, dirs], noise)
        sizes = [p.numel() for p in pairs]
        return {"index": batch["index"].cpu(), "logp_base": base.cpu(), "logp": list(logp.cpu().split(sizes)),
                "pairs": [p.cpu() for p in pairs]}


class FileGather(BasePredictionWriter):
    """Writes each rank's predictions to files; the main process reads them all back."""

    def __init__(self, folder: Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = folder

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        torch.save(prediction, self.folder / f"rank{trainer.global_rank}_batch{batch_idx}.pt")


def run_predict(
    predictor: AttFindPredictor,
    dataset: ImageSet,
    images_per_step: int,
    trainer_kwargs: dict[str, Any] | None,  # None = a plain loop on the predictor's device
    desc: str = "AttFind",  # the progress bar's label
    progress: bool | None = None,  # a progress bar: None = when stderr is a terminal
) -> list[dict[str, Any]]:  # the outputs of every predict step, in no particular order
    loader = DataLoader(dataset, batch_size=images_per_step, shuffle=False, collate_fn=collate)
    if trainer_kwargs is None:
        outs = []
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=len(dataset), desc=desc, unit="img", disable=not show, leave=False) as bar:
            for i, batch in enumerate(loader):
                outs.append(predictor.predict_step(batch, i))
                bar.update(len(batch["index"]))
        return outs
    with tempfile.TemporaryDirectory(prefix="attfind-") as tmp:
        folder = Path(tmp)
        show = sys.stderr.isatty() if progress is None else progress
        kwargs = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": show,
                  "enable_model_summary": False, **trainer_kwargs}
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), FileGather(folder)]
        kwargs["inference_mode"] = False  # screening needs gradients inside predict_step
        trainer = pl.Trainer(**kwargs)
        trainer.predict(predictor, dataloaders=loader, return_predictions=False)
        return [torch.load(f, weights_only=False) for f in sorted(folder.glob("rank*_batch*.pt"))]


def merge_screen(
    outs: list[dict[str, Any]],  # outputs of "screen" predict steps
    n: int,  # images
) -> tuple[torch.Tensor, torch.Tensor]:  # log p [N, K], probability Jacobian [N, K, S]
    index = torch.cat([o["index"] for o in outs])
    logp = torch.cat([o["logp_base"] for o in outs])
    jac = torch.cat([o["jacobian"] for o in outs])
    out_logp = torch.empty(n, logp.shape[1])
    out_jac = torch.empty(n, *jac.shape[1:])
    out_logp[index], out_jac[index] = logp, jac  # duplicates from padded samplers are identical
    return out_logp, out_jac


def merge_effects(
    outs: list[dict[str, Any]],  # outputs of "effects" predict steps
    n: int,  # images
    s: int,  # style coordinates
) -> tuple[torch.Tensor, torch.Tensor]:  # log p [N, K], of every edit [N, S, 2, K] (NaN = not rendered)
    k = outs[0]["logp_base"].shape[1]
    logp_base = torch.empty(n, k)
    logp = torch.full((n, s * 2, k), float("nan"))
    seen = torch.zeros(n, dtype=torch.bool)
    for o in outs:
        logp_base[o["index"]] = o["logp_base"]
        seen[o["index"]] = True
        for j, ids, values in zip(o["index"].tolist(), o["pairs"], o["logp"]):
            logp[j, ids] = values
    assert seen.all(), f"images {torch.nonzero(~seen).flatten().tolist()} were not processed"
    return logp_base, logp.view(n, s, 2, k)
