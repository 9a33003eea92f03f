"""The classifier's own training stage: a short Lightning run before the GAN.

:func:`train_classifier` trains a :class:`Classifier` from scratch (or fine-tunes a pretrained
one) on a data module, with (optionally class-weighted, see :func:`inverse_frequency_weights`)
cross-entropy and light augmentation (:func:`flip_and_shift`), through
:class:`ClassifierModule`. It writes ``classifier.safetensors`` (+ ``.json``) and
``classifier_metrics.json`` into its output folder and returns the classifier frozen.

The stage takes from the main run's Trainer options only how and where to compute
(:data:`CLASSIFIER_TRAINER_KEYS`); whether to run it at all is decided by
:func:`stylex.classifier.stage.prepare_classifier`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from stylex.classifier.model import Classifier
from stylex.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def inverse_frequency_weights(
    labels: torch.Tensor,  # [N] int64 class indices of the training set
    num_classes: int,  # K
) -> torch.Tensor:
    """Class weights ``[K]`` proportional to 1 / class frequency, scaled so that the average
    weight over the training samples is 1 (``w_k = N / (K * n_k)``); with them every class
    contributes equally to the loss. A class absent from ``labels`` counts as seen once."""
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"training labels must lie in [0, {num_classes}), found values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()
    return counts.sum() / (num_classes * counts)


def add_pixel_noise(
    images: torch.Tensor,  # [B, C, H, W]
    max_std: float,  # largest noise standard deviation, in the images' units
) -> torch.Tensor:
    """Gaussian noise augmentation: each image gets i.i.d. pixel noise of a standard deviation
    drawn uniformly in ``[0, max_std]``. A classifier trained so reads its classes from structures
    that survive noise rather than from faint pixel patterns, which a generator conditioned on it
    would otherwise learn to draw in place of the structures themselves."""
    std = torch.rand(images.shape[0], 1, 1, 1, device=images.device, dtype=images.dtype) * float(max_std)
    return images + std * torch.randn_like(images)


def jitter_colour(
    images: torch.Tensor,  # [B, C, H, W] in [-1, 1]
    strength: float,  # s: largest brightness shift, log-contrast change and twice the per-channel shift
) -> torch.Tensor:
    """Photometric augmentation, drawn per image: a brightness shift uniform in ``[-s, s]``, a
    contrast factor ``exp(u)`` with u uniform in ``[-s, s]`` (about the image's mean), and a
    colour-balance shift per channel uniform in ``[-s/2, s/2]``. A classifier trained so cannot
    read its classes from the whole image's brightness or tint, which a generator conditioned
    on it would otherwise change instead of drawing the structures the classes differ by."""
    s = float(strength)
    if s == 0:
        return images
    b, c = images.shape[:2]

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, 1, 1, device=images.device, dtype=images.dtype) * 2 - 1) * s

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(b, 1).exp()
    return (images - mean) * contrast + mean + uniform(b, 1) + uniform(b, c) / 2


def flip_and_shift(
    images: torch.Tensor,  # [B, C, H, W]
    max_shift: int,  # largest translation in pixels, along each axis
) -> torch.Tensor:
    """Light augmentation: mirror each image left-right with probability 1/2 and translate it by
    a uniform random whole number of pixels in ``[-max_shift, max_shift]`` per axis, filling the
    border by reflection (so no artificial black edges appear). Shape is unchanged."""
    b, _, h, w = images.shape
    device = images.device
    mirror = torch.rand(b, device=device) < 0.5
    images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    s = min(int(max_shift), h - 1, w - 1)  # reflection padding must be narrower than the image
    if s <= 0:
        return images
    padded = F.pad(images, (s, s, s, s), mode="reflect")
    dy = torch.randint(-s, s + 1, (b, 1), device=device)
    dx = torch.randint(-s, s + 1, (b, 1), device=device)
    rows = torch.arange(h, device=device) + s + dy  # [B, H] source row of each output row
    cols = torch.arange(w, device=device) + s + dx  # [B, W]
    batch = torch.arange(b, device=device)[:, None, None]
    # Advanced indices around a slice put their broadcast dims first: [B, H, W, C].
    shifted = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2).contiguous()


def _unpack(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [B, C, H, W] in [-1, 1], labels [B] int64)`` from a data-module batch."""
    assert isinstance(batch, Mapping) and "image" in batch and "label" in batch, (
        f"classifier batches must be dicts with 'image' and 'label', got "
        f"{type(batch).__name__}{' with keys ' + str(list(batch)) if isinstance(batch, Mapping) else ''}"
    )
    images, labels = batch["image"], batch["label"]
    assert images.ndim == 4, f"batch['image'] must be [batch, channels, height, width], got {tuple(images.shape)}"
    assert labels.shape == (images.shape[0],), (
        f"batch['label'] must be [batch] class indices, got shape {tuple(labels.shape)} for "
        f"{images.shape[0]} images"
    )
    return images, labels.long()


class ClassifierModule(pl.LightningModule):
    """Trains a :class:`Classifier` with (optionally class-weighted) cross-entropy.

    Logs ``clf/train_loss`` (per step), ``clf/train_acc`` (per epoch, on augmented images),
    ``clf/val_loss``, ``clf/val_acc`` (micro accuracy) and ``clf/val_balanced_acc`` (macro
    accuracy, i.e. the mean per-class recall). Its checkpoints keep the classifier's weights
    under ``classifier.`` and its config in the ``classifier_config`` hyper-parameter, which is
    what :meth:`Classifier.load` reads.
    """

    def __init__(
        self,
        classifier: Classifier | None = None,  # the network to train; or give classifier_config
        classifier_config: Mapping[str, Any] | None = None,  # rebuilds one (used by load_from_checkpoint)
        lr: float = 1e-3,  # AdamW peak learning rate, decayed to 0 by a cosine over the run
        weight_decay: float = 0.05,  # AdamW decoupled weight decay, on weights only (not norms/biases)
        class_weights: torch.Tensor | Sequence[float] | None = None,  # [K] cross-entropy weights
        augment: bool = True,  # random mirror + small translation of training images
        max_shift: float = 0.0625,  # largest translation, as a fraction of the image side
        label_smoothing: float = 0.0,  # cross-entropy against (1 - e) one-hot + e / K (0 = plain labels)
        noise_std: float = 0.0,  # Gaussian pixel noise, std uniform in [0, noise_std] per image (0 = off)
        color_jitter: float = 0.0,  # photometric jitter strength (see jitter_colour; 0 = off)
    ) -> None:
        super().__init__()
        if classifier is None:
            if classifier_config is None:
                raise ValueError("ClassifierModule needs a classifier or a classifier_config")
            classifier = Classifier.from_config(classifier_config)
        if classifier.frozen:
            raise ValueError("the classifier is frozen; call classifier.unfreeze() before training it")
        k = classifier.num_classes
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if weights.shape != (k,):
                raise ValueError(f"class_weights must hold one weight per class ({k}), got {weights.numel()}")
        self.save_hyperparameters(
            {
                "classifier_config": classifier.config,
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "class_weights": None if weights is None else weights.tolist(),
                "augment": bool(augment),
                "max_shift": float(max_shift),
                "label_smoothing": float(label_smoothing),
                "noise_std": float(noise_std),
                "color_jitter": float(color_jitter),
            }
        )
        self.classifier = classifier
        self.register_buffer("class_weights", weights, persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.val_balanced_acc = MulticlassAccuracy(num_classes=k, average="macro")

    def forward(
        self,
        x: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
    ) -> torch.Tensor:
        return self.classifier(x)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights,
                               label_smoothing=self.hparams.get("label_smoothing", 0.0))

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = _unpack(batch)
        if self.hparams.augment:
            shift = round(self.hparams.max_shift * min(images.shape[-2:]))
            images = flip_and_shift(images, shift)
        if self.hparams.get("color_jitter", 0.0) > 0:
            images = jitter_colour(images, self.hparams.color_jitter)
        if self.hparams.get("noise_std", 0.0) > 0:
            images = add_pixel_noise(images, self.hparams.noise_std)
        logits = self.classifier(images)
        loss = self._loss(logits, labels)
        self.train_acc(logits.detach(), labels)
        n = images.shape[0]
        self.log("clf/train_loss", loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("clf/train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        images, labels = _unpack(batch)
        logits = self.classifier(images)
        self.val_acc(logits, labels)
        self.val_balanced_acc(logits, labels)
        n = images.shape[0]
        self.log("clf/val_loss", self._loss(logits, labels), on_epoch=True, sync_dist=True, batch_size=n)
        self.log("clf/val_acc", self.val_acc, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=n)
        self.log("clf/val_balanced_acc", self.val_balanced_acc, on_epoch=True, sync_dist=True, batch_size=n)

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.classifier.parameters() if p.requires_grad]
        # Decaying norm scales and biases only fights BatchNorm, which re-learns them; decay weights.
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            log.warning("classifier run has no finite length (max_epochs=-1?); using a constant learning rate")
            return {"optimizer": optimizer}
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# Trainer options that train_classifier takes over from the main run: how and where to compute.
# Everything else there (max_steps, val_check_interval, limit_*_batches, callbacks, ...) describes
# the GAN run and would make no sense for this short stage, so it is dropped.
CLASSIFIER_TRAINER_KEYS = (
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "deterministic",
    "benchmark",
    "sync_batchnorm",
    "inference_mode",
    "use_distributed_sampler",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
)


def _fit_inputs(datamodule: Any) -> dict[str, Any]:
    """Keyword arguments for trainer.fit/validate: the data module itself when Lightning can
    drive it, else its loaders (any object with train_dataloader/val_dataloader works)."""
    if isinstance(datamodule, pl.LightningDataModule):
        return {"datamodule": datamodule}
    return {"train_dataloaders": datamodule.train_dataloader(), "val_dataloaders": datamodule.val_dataloader()}


def train_classifier(
    classifier: Classifier,  # trained in place (unfrozen first if it was frozen)
    datamodule: Any,  # LightningDataModule (or object) with num_classes, train_labels(), loaders
    out_dir: str | Path,  # gets classifier.safetensors, classifier.json, classifier_metrics.json
    trainer_kwargs: Mapping[str, Any],  # the main run's pl.Trainer options; see CLASSIFIER_TRAINER_KEYS
    max_epochs: int,
    lr: float,
    weight_decay: float,
    balanced_loss: bool,  # weight the loss by inverse class frequency of train_labels()
    augment: bool,  # random mirror + small translation
    logger: Any = None,  # a Lightning logger, or None for no logging
    label_smoothing: float = 0.0,  # see ClassifierModule
    noise_std: float = 0.0,  # see ClassifierModule
    color_jitter: float = 0.0,  # see ClassifierModule
) -> tuple[Classifier, dict[str, Any]]:
    """Train ``classifier`` on ``datamodule`` with its own short Lightning run, save it, freeze it.

    ``balanced_loss`` calls ``datamodule.train_labels()`` before the fit starts, so the data
    module must be able to answer it by then (set it up first if it needs that).

    Only the options named in :data:`CLASSIFIER_TRAINER_KEYS` are taken from ``trainer_kwargs``;
    no checkpoints are written during the run and no sanity validation is done. The validation
    metrics are those of the last epoch (Lightning validates after every epoch, so they describe
    the final weights). Rank zero writes the files; all ranks return the same frozen classifier,
    on the CPU (Lightning moves the model back when a run ends).

    Returns ``(classifier, {"val_acc", "val_balanced_acc", "epochs", "seconds"})`` where
    ``seconds`` is the wall-clock time of the fit.
    """
    out_dir = Path(out_dir)
    if int(max_epochs) < 1:
        raise ValueError(f"classifier.train.max_epochs must be >= 1, got {max_epochs}")
    if classifier.frozen:
        classifier.unfreeze()
    num_classes = getattr(datamodule, "num_classes", classifier.num_classes)
    if num_classes != classifier.num_classes:
        raise ValueError(
            f"the data has {num_classes} classes but the classifier was built for {classifier.num_classes}"
        )
    class_weights = None
    if balanced_loss:
        class_weights = inverse_frequency_weights(datamodule.train_labels(), classifier.num_classes)
        log.info("classifier class weights: %s", [round(w, 3) for w in class_weights.tolist()])

    kept = {k: v for k, v in dict(trainer_kwargs).items() if k in CLASSIFIER_TRAINER_KEYS}
    dropped = sorted(set(trainer_kwargs) - set(kept))
    if dropped:
        log.debug("classifier stage ignores trainer options %s", dropped)
    kept.setdefault("enable_model_summary", False)
    kept.setdefault("log_every_n_steps", 10)
    trainer = pl.Trainer(
        **kept,
        max_epochs=int(max_epochs),
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    module = ClassifierModule(
        classifier, lr=lr, weight_decay=weight_decay, class_weights=class_weights, augment=augment,
        label_smoothing=label_smoothing, noise_std=noise_std, color_jitter=color_jitter,
    )

    start = time.perf_counter()
    trainer.fit(module, **_fit_inputs(datamodule))
    seconds = time.perf_counter() - start

    results = trainer.callback_metrics
    if "clf/val_acc" not in results:  # e.g. the loop never reached a validation epoch
        inputs = _fit_inputs(datamodule)
        inputs.pop("train_dataloaders", None)
        if "val_dataloaders" in inputs:
            inputs["dataloaders"] = inputs.pop("val_dataloaders")
        trainer.validate(module, verbose=False, **inputs)
        results = trainer.callback_metrics
    metrics = {
        "val_acc": float(results.get("clf/val_acc", float("nan"))),
        "val_balanced_acc": float(results.get("clf/val_balanced_acc", float("nan"))),
        "epochs": int(trainer.current_epoch),
        "seconds": round(seconds, 3),
    }

    classifier.freeze()
    if trainer.is_global_zero:
        classifier.save(out_dir / "classifier.safetensors")
        atomic_write_json(out_dir / "classifier_metrics.json", metrics)
        log.info(
            "classifier: val acc %.4f, balanced %.4f after %d epochs in %.1f s",
            metrics["val_acc"],
            metrics["val_balanced_acc"],
            metrics["epochs"],
            seconds,
        )
    trainer.strategy.barrier("classifier_saved")
    return classifier, metrics
