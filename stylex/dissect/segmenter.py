"""Concept segmenters for dissection: networks that label concepts in generated images.

Every segmenter here implements :class:`stylex.dissect.base.Segmenter`: ``concepts``,
``resolution``, ``source`` and ``segmenter(images)``, mapping ``[B, 3, R, R]`` images in
``[-1, 1]`` to boolean masks ``[B, len(concepts), R, R]``.

Two kinds live in this module (class evidence for datasets without any segmenter is in
:mod:`stylex.dissect.gradcam`):

- **The synthetic segmenter** (:func:`synthetic_segmenter`): a U-Net of
  ``segmentation_models_pytorch`` (smp) on a timm encoder, randomly initialised (nothing is ever
  downloaded), trained on synthetic fundus scenes (:mod:`stylex.data.synthetic`) against their
  exact masks, whose concepts are ``SEGMENT_NAMES``. Training takes 1 to 2 minutes on a 2-core
  CPU at 32x32, so trained segmenters are cached in ``$STYLEX_CACHE_DIR/segmenters`` (default
  ``~/.cache/stylex/segmenters``), one file pair per resolution, lesion scale, training settings
  and hash of ``stylex/data/synthetic.py`` (a changed renderer draws other scenes). Files are
  written atomically, so concurrent runs at worst train the same segmenter twice.

- **A user-supplied segmenter** (:func:`load_segmenter`), in one of two formats:

  * *TorchScript* (``.pt`` or ``.ts``, written by ``torch.jit.save`` of a scripted or traced
    module): the module maps normalised images ``[B, 3, R, R]`` to per-concept scores
    ``[B, C, R, R]``. Its concepts and resolution come from a JSON file beside it with the same
    stem (``seg.pt`` -> ``seg.json``) holding ``{"concepts": [...], "resolution": R}`` and
    optionally ``"normalisation"``, ``"output"`` and ``"source"``; without that file, from the
    scripted module's attributes of the same names (``concepts: List[str]``,
    ``resolution: int``, optional ``normalisation: str``, ``output: str``).
  * *safetensors + JSON*: the weights of an smp model, with a JSON beside them (same stem) that
    names the architecture::

        {"arch": "Unet", "encoder_name": "tu-resnet18", "encoder_depth": 3,
         "decoder_channels": [64, 32, 16], "classes": 6,
         "concepts": ["background", "fundus", ...], "resolution": 32,
         "normalisation": "[-1,1]"}

    ``arch`` is any smp model class (``Unet``, ``UnetPlusPlus``, ``FPN``, ...);
    ``encoder_name``, ``encoder_depth`` and ``decoder_channels`` are its arguments of the same
    name, ``arch_kwargs`` (optional) holds any others; ``classes`` must equal the number of
    concepts. The path given may be the ``.safetensors`` file or the ``.json`` (whose optional
    ``"weights"`` names the weights file, relative to the JSON's folder).

  Common keys: ``normalisation`` says what the network reads: ``"[-1,1]"`` (generator range, the
  default), ``"[0,1]"``, ``"imagenet"`` (ImageNet mean/std on ``[0, 1]`` images) or
  ``{"mean": [r, g, b], "std": [r, g, b]}`` on ``[0, 1]`` images. ``output`` is ``"logits"``
  (the default: one concept per pixel, the argmax, so masks are one-hot) or ``"multilabel"``
  (a concept wherever its score is positive; masks may overlap). ``source`` is the line shown
  in reports.

:func:`save_segmenter` writes either format, so a trained synthetic segmenter can be exported,
and a cached one is itself a safetensors + JSON pair that :func:`load_segmenter` reads.

A segmenter reads images of its own resolution only; others raise a ValueError, unless it was
made with ``resize=True``, which resizes images to its resolution (bilinear) and its scores back
to the images' size before taking the masks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stylex.utils.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

CACHE_ENV = "STYLEX_CACHE_DIR"  # replaces ~/.cache/stylex (shared with the factor probe)
SEGMENTER_FORMAT = 1  # bump when training or the file layout changes: older cached files then miss
DEFAULT_LESION_SCALE = 1.6  # the default synthetic dataset's lesion radii (configs/dataset/synthetic.yaml)
NORMALISATIONS = ("[-1,1]", "[0,1]", "imagenet")
OUTPUTS = ("logits", "multilabel")
TORCHSCRIPT_SUFFIXES = (".pt", ".ts")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys a segmenter JSON may hold; anything else is most likely a typo and is refused.
_COMMON_KEYS = {"concepts", "resolution", "normalisation", "output", "source", "training"}
_ARCH_KEYS = ("arch", "encoder_name", "encoder_depth", "decoder_channels", "arch_kwargs", "classes")
_SMP_KEYS = set(_ARCH_KEYS) | {"weights"}
_FORMAT_HELP = "see the docstring of stylex/dissect/segmenter.py for the segmenter file formats"

Normalisation = str | Mapping[str, Sequence[float]]


# ============================================================================ normalisation
def check_normalisation(
    spec: Any,  # "[-1,1]", "[0,1]", "imagenet" or {"mean": [3 floats], "std": [3 floats]}
    where: str = "normalisation",  # what to name in the error (a file, an argument)
) -> Normalisation:
    """``spec`` validated and in canonical form (a string or ``{"mean": [...], "std": [...]}``)."""
    if isinstance(spec, str):
        canonical = spec.replace(" ", "").lower()
        if canonical in NORMALISATIONS:
            return canonical
    elif isinstance(spec, Mapping) and set(spec) == {"mean", "std"}:
        try:
            mean = [float(v) for v in spec["mean"]]
            std = [float(v) for v in spec["std"]]
        except (TypeError, ValueError):
            mean, std = [], []
        if len(mean) == len(std) == 3 and all(s > 0 for s in std):
            return {"mean": mean, "std": std}
    raise ValueError(
        f"{where}: unknown normalisation {spec!r}; use one of {', '.join(NORMALISATIONS)} or "
        f'{{"mean": [r, g, b], "std": [r, g, b]}} (positive std) applied to [0, 1] images'
    )


def normalise(
    images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
    spec: Normalisation,  # as returned by check_normalisation
) -> torch.Tensor:
    """The network input that ``spec`` describes, ``[B, 3, H, W]``."""
    if spec == "[-1,1]":
        return images
    x = (images + 1.0) * 0.5  # [0, 1]
    if spec == "[0,1]":
        return x
    if spec == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = spec["mean"], spec["std"]  # type: ignore[index]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# ============================================================================ the segmenter
class NetworkSegmenter:
    """A network that scores concepts per pixel, as a :class:`~stylex.dissect.base.Segmenter`.

    The network maps normalised images ``[B, 3, R, R]`` to scores ``[B, C, R, R]``; masks are
    the per-pixel argmax (``output="logits"``, one-hot masks) or the positive scores
    (``output="multilabel"``). The network is kept in eval mode without gradients.
    """

    def __init__(
        self,
        network: nn.Module,  # [B, 3, R, R] normalised images -> [B, C, R, R] scores
        concepts: Sequence[str],  # C concept names, one per output channel
        resolution: int,  # R, the image side the network reads
        source: str,  # one line saying what the segmenter is (shown in reports)
        normalisation: Normalisation = "[-1,1]",  # what the network reads (see check_normalisation)
        output: str = "logits",  # "logits" (argmax, one-hot masks) or "multilabel" (scores > 0)
        resize: bool = False,  # resize images of another size instead of refusing them
        arch: Mapping[str, Any] | None = None,  # the smp architecture (JSON keys), None if not an smp model
        batch_size: int = 256,  # images per forward pass
        training: Mapping[str, Any] | None = None,  # how it was trained (a JSON's "training" entry), if known
    ) -> None:
        self.concepts = [str(c) for c in concepts]
        if not self.concepts or len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"a segmenter needs distinct concept names, got {self.concepts}")
        self.resolution = int(resolution)
        if self.resolution < 1:
            raise ValueError(f"a segmenter's resolution must be a positive number of pixels, got {resolution!r}")
        if output not in OUTPUTS:
            raise ValueError(f"unknown segmenter output {output!r}; use one of {', '.join(OUTPUTS)}")
        self.source = str(source)
        self.normalisation = check_normalisation(normalisation)
        self.output = output
        self.resize = bool(resize)
        self.arch = dict(arch) if arch is not None else None
        self.batch_size = int(batch_size)
        self.training = dict(training) if training is not None else None
        self.network = network.eval()
        for param in network.parameters():  # (ScriptModules have no requires_grad_)
            param.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        for t in self.network.parameters():
            return t.device
        for t in self.network.buffers():
            return t.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> NetworkSegmenter:
        self.network.to(device)
        return self

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"a segmenter reads float images [batch, 3, height, width] in [-1, 1], got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        size = tuple(images.shape[-2:])
        if size != (self.resolution, self.resolution) and not self.resize:
            raise ValueError(
                f"this segmenter ({self.source}) reads {self.resolution}x{self.resolution} images, got "
                f"{size[0]}x{size[1]}; resize the images, or build or load the segmenter with resize=True"
            )

    @torch.no_grad()
    def logits(
        self,
        images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]; H = W = resolution unless resize
    ) -> torch.Tensor:  # float [B, C, H, W] on the images' device
        """Per-concept scores at the images' size."""
        self._check(images)
        size = tuple(images.shape[-2:])
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i : i + self.batch_size].to(self.device, torch.float32)
            if size != (self.resolution, self.resolution):
                shrinking = self.resolution < max(size)
                x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False,
                                  antialias=shrinking)
            scores = self.network(normalise(x, self.normalisation))
            if scores.ndim != 4 or scores.shape[1] != len(self.concepts):
                raise ValueError(
                    f"the segmenter network ({self.source}) returned shape {tuple(scores.shape)}, expected "
                    f"[batch, {len(self.concepts)}, {self.resolution}, {self.resolution}] (one channel per concept)"
                )
            if tuple(scores.shape[-2:]) != size:
                scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
            out.append(scores.float().to(images.device))
        if not out:
            return images.new_zeros((0, len(self.concepts), *size))
        return torch.cat(out)

    def __call__(
        self,
        images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]; H = W = resolution unless resize
    ) -> torch.Tensor:  # bool [B, C, H, W]
        """Concept masks: one-hot (argmax) for ``output="logits"``, scores > 0 for "multilabel"."""
        scores = self.logits(images)
        if self.output == "multilabel":
            return scores > 0
        masks = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return masks.scatter_(1, scores.argmax(1, keepdim=True), True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, concepts={self.concepts}, resolution={self.resolution})"


class SyntheticSegmenter(NetworkSegmenter):
    """The U-Net trained on synthetic scenes (:func:`synthetic_segmenter`), with its record:

    - ``iou``: held-out IoU per concept (``SEGMENT_NAMES`` order); ``mean_iou`` their mean;
    - ``lesion_scale``: the lesion radii of the scenes it learnt from;
    - ``config``: its :class:`SegmenterTrainConfig`;
    - ``train_seconds``: wall-clock training time; ``loss_history``: mean loss per epoch.
    """

    def __init__(
        self,
        network: nn.Module,  # the trained smp U-Net: [B, 3, R, R] in [-1, 1] -> [B, 6, R, R] logits
        resolution: int,  # R
        lesion_scale: float,  # lesion radii of the training scenes
        config: SegmenterTrainConfig,  # how it was built and trained
        iou: Mapping[str, float],  # held-out IoU per concept
        train_seconds: float,  # wall-clock training time, rendering included
        loss_history: Sequence[float],  # mean training loss per epoch
        resize: bool = False,  # accept images of other sizes (see NetworkSegmenter)
    ) -> None:
        from stylex.data.synthetic import SEGMENT_NAMES

        self.lesion_scale = float(lesion_scale)
        self.config = config
        self.iou = {str(k): float(v) for k, v in iou.items()}
        self.mean_iou = _nanmean(self.iou.values())
        self.train_seconds = float(train_seconds)
        self.loss_history = [float(v) for v in loss_history]
        source = (f"U-Net ({config.encoder_name} encoder, depth {config.encoder_depth}) trained on synthetic "
                  f"scenes (lesion scale {self.lesion_scale:g}), mean IoU {self.mean_iou:.2f}")
        super().__init__(network, SEGMENT_NAMES, resolution, source, normalisation="[-1,1]", output="logits",
                         resize=resize, arch=config.arch(len(SEGMENT_NAMES)))
        self.training = self.record()

    def record(self) -> dict[str, Any]:
        """What its JSON keeps under ``"training"`` (JSON values only), including the cache key."""
        return {"kind": "synthetic", "format": SEGMENTER_FORMAT, "lesion_scale": self.lesion_scale,
                "config": dataclasses.asdict(self.config), "iou": self.iou, "mean_iou": self.mean_iou,
                "train_seconds": self.train_seconds, "loss_history": self.loss_history,
                "renderer": renderer_digest(), "key": segmenter_key(self.resolution, self.lesion_scale, self.config)}


def _nanmean(values: Any) -> float:
    vals = [float(v) for v in values if not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else math.nan


# ============================================================================ training
@dataclasses.dataclass(frozen=True)
class SegmenterTrainConfig:
    """How the synthetic segmenter is built and trained; every field is part of the cache key.

    The defaults reach a held-out mean IoU of about 0.92 at 32x32 (exudates and haemorrhages about
    0.94, vessels 0.75) in 1 to 2 minutes on 2 CPU cores; ``benchmarks/segmenter_bench.py``
    prints the figures. Alternatives measured at 32x32, lesion scale 1.6, one seed (mean IoU /
    vessel IoU / exudate IoU), against these settings with 3000 scenes x 4 epochs (0.89 / 0.68 /
    0.93, half the time): cross-entropy weights frequency ** -0.5 0.89 / 0.66 / 0.91; no Dice
    term (weighted cross-entropy alone) 0.86 / 0.64 / 0.83; weighted, with decoder channels
    (128, 64, 32) 0.92 / 0.74 / 0.93 at twice the cost; bilinear decoder upsampling 0.88 / 0.64 /
    0.92; a VGG-11 encoder (full-resolution skip; 2000 x 3) 0.87 / 0.61 / 0.91 at 5x the cost
    per step. Vessels, 1 to 2 pixels wide, are the hardest concept: the encoder's stride-2 stem
    leaves the decoder no full-resolution features (doubling the input size instead reaches
    0.81 on vessels, at 4x the cost of training and inference).
    """

    encoder_name: str = "tu-resnet18"  # smp encoder (``tu-<timm name>`` for timm models), random init
    encoder_depth: int = 3  # encoder stages; the resolution must be divisible by 2**depth
    decoder_channels: tuple[int, ...] = (64, 32, 16)  # one entry per encoder stage
    num_train: int = 4000  # training scenes (rendered afresh, data_seed's "train" split)
    num_val: int = 512  # held-out scenes for the IoU (data_seed's "val" split)
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-4
    class_weight_power: float = 0.0  # cross-entropy weight of a class = frequency ** -power (0 = unweighted)
    dice_weight: float = 1.0  # soft Dice loss added to the cross-entropy: each class counts alike, however rare
    seed: int = 0  # initialisation and batch order
    data_seed: int = 12345  # scenes independent of any training run's default seed

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        if not 1 <= int(self.encoder_depth) <= 5:
            raise ValueError(f"encoder_depth must lie in [1, 5], got {self.encoder_depth!r}")
        if len(self.decoder_channels) != int(self.encoder_depth):
            raise ValueError(
                f"decoder_channels needs one entry per encoder stage ({self.encoder_depth}), got "
                f"{list(self.decoder_channels)}"
            )
        for name in ("num_train", "num_val", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"segmenter training: {name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.class_weight_power < 0 or self.dice_weight < 0:
            raise ValueError("segmenter training: lr must be > 0 and weight_decay, class_weight_power and "
                             "dice_weight >= 0")

    def arch(self, classes: int) -> dict[str, Any]:
        """The smp architecture as a segmenter JSON names it."""
        return {"arch": "Unet", "encoder_name": self.encoder_name, "encoder_depth": int(self.encoder_depth),
                "decoder_channels": list(self.decoder_channels), "classes": int(classes)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SegmenterTrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown segmenter training settings {unknown}; known: {sorted(names)}")
        return cls(**values)


def build_smp_network(
    arch: Mapping[str, Any],  # {"arch", "encoder_name", "encoder_depth", "decoder_channels", "classes", "arch_kwargs"}
    where: str = "segmenter architecture",  # what to name in errors (a file)
) -> nn.Module:
    """A randomly initialised smp model; encoder weights are never downloaded."""
    import segmentation_models_pytorch as smp

    name = arch.get("arch")
    cls = getattr(smp, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "check_input_shape")):
        known = sorted(n for n in dir(smp) if isinstance(getattr(smp, n), type)
                       and hasattr(getattr(smp, n), "check_input_shape"))
        raise ValueError(f"{where}: unknown smp architecture {name!r}; use one of {', '.join(known)}")
    kwargs = dict(arch.get("arch_kwargs") or {})
    for key in ("encoder_name", "encoder_depth", "decoder_channels"):
        if arch.get(key) is not None:
            kwargs[key] = list(arch[key]) if key == "decoder_channels" else arch[key]
    kwargs.pop("encoder_weights", None)  # the weights come from the file (or training), never the network
    try:
        return cls(encoder_weights=None, in_channels=3, classes=int(arch["classes"]), **kwargs)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: smp could not build {name} with {kwargs} ({type(e).__name__}: {e})") from e


def _scenes(
    num: int,
    seed: int,
    split: str,
    resolution: int,
    lesion_scale: float,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered scenes: uint8 images ``[N, 3, R, R]`` and int64 label maps ``[N, R, R]``."""
    from stylex.data.synthetic import generate_split

    data = generate_split(num, seed, split, resolution, progress=progress, lesion_scale=lesion_scale)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(data["masks"]).long()


def _to_generator_range(images: torch.Tensor) -> torch.Tensor:  # uint8 -> float [-1, 1]
    return images.float() / 127.5 - 1.0


def synthetic_scenes(
    num: int,  # number of scenes
    resolution: int,
    lesion_scale: float = DEFAULT_LESION_SCALE,
    seed: int = 12345,
    split: str = "test",  # "train", "val" or "test": disjoint random streams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic scenes to measure a segmenter on: float images ``[N, 3, R, R]`` in ``[-1, 1]``
    and int64 label maps ``[N, R, R]`` (indices into ``SEGMENT_NAMES``)."""
    images, masks = _scenes(num, seed, split, resolution, lesion_scale)
    return _to_generator_range(images), masks


def train_synthetic_segmenter(
    resolution: int,  # R, a power of two divisible by 2**config.encoder_depth
    lesion_scale: float = DEFAULT_LESION_SCALE,  # lesion radii of the scenes (a run's dataset.lesion_scale)
    config: SegmenterTrainConfig | None = None,  # None = the defaults
    device: str | torch.device = "cpu",
    progress: bool = True,  # tqdm bars while rendering and training
) -> SyntheticSegmenter:
    """Train a U-Net on freshly rendered synthetic scenes; its ``iou`` holds the held-out IoU per
    concept. Gradients are switched on here, so callers under ``no_grad`` can train one too."""
    config = config or SegmenterTrainConfig()
    resolution = int(resolution)
    if resolution % (2 ** config.encoder_depth):
        raise ValueError(
            f"a U-Net of encoder depth {config.encoder_depth} needs a resolution divisible by "
            f"{2 ** config.encoder_depth}, got {resolution}; lower encoder_depth"
        )
    with torch.inference_mode(False), torch.enable_grad():
        return _train(resolution, float(lesion_scale), config, torch.device(device), progress)


def _train(resolution: int, lesion_scale: float, config: SegmenterTrainConfig, device: torch.device,
           progress: bool) -> SyntheticSegmenter:
    from stylex.data.synthetic import SEGMENT_NAMES

    classes = len(SEGMENT_NAMES)
    start = time.perf_counter()
    x, y = _scenes(config.num_train, config.data_seed, "train", resolution, lesion_scale, progress)
    xv, yv = _scenes(config.num_val, config.data_seed, "val", resolution, lesion_scale, progress)
    torch.manual_seed(config.seed)
    network = build_smp_network(config.arch(classes)).to(device)
    # Lesions cover 1-3 % of the pixels. The Dice term already gives every class the same say; the
    # optional weights (frequency ** -power) are normalised so that the average pixel weighs 1.
    freq = torch.bincount(y.flatten(), minlength=classes).double()
    freq = (freq / freq.sum()).clamp_min(1e-4)
    weight = freq.pow(-config.class_weight_power)
    weight = (weight / (weight * freq).sum()).float().to(device)
    opt = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(config.num_train / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    bar = tqdm(total=config.epochs * per_epoch, desc=f"training segmenter {resolution}x{resolution}", unit="step",
               disable=not progress, leave=False)
    network.train()
    for _ in range(config.epochs):
        order = torch.randperm(config.num_train, generator=gen)
        total = 0.0
        for i in range(0, config.num_train, config.batch_size):
            idx = order[i : i + config.batch_size]
            images = _to_generator_range(x[idx]).to(device)
            target = y[idx].to(device)
            loss = segmentation_loss(network(images), target, weight, config.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.detach().item()
            total += value * len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        history.append(total / config.num_train)
    bar.close()
    network.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    plain = NetworkSegmenter(network, SEGMENT_NAMES, resolution, "synthetic segmenter in training")
    iou = segmenter_iou(plain, _to_generator_range(xv), yv)
    return SyntheticSegmenter(network, resolution, lesion_scale, config, iou, seconds, history)


def segmentation_loss(
    logits: torch.Tensor,  # [B, C, R, R]
    target: torch.Tensor,  # int64 [B, R, R], class indices
    weight: torch.Tensor | None = None,  # [C] cross-entropy class weights
    dice_weight: float = 1.0,  # weight of the soft Dice term
) -> torch.Tensor:  # scalar
    """Class-weighted cross-entropy plus ``dice_weight`` times the soft Dice loss (one minus the
    mean over classes of ``2 |P n T| / (|P| + |T|)``, computed over the batch)."""
    loss = F.cross_entropy(logits, target, weight=weight)
    if dice_weight > 0:
        probs = logits.softmax(1)  # [B, C, R, R]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        inter = (probs * onehot).sum((0, 2, 3))  # [C]
        denom = (probs + onehot).sum((0, 2, 3))  # [C]
        loss = loss + dice_weight * (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()
    return loss


# ============================================================================ IoU
def segmenter_iou(
    segmenter: Callable[[torch.Tensor], torch.Tensor],  # a Segmenter
    images: torch.Tensor,  # [N, 3, R, R] in [-1, 1]
    masks: torch.Tensor,  # int [N, R, R] concept indices, or bool [N, C, R, R]
    batch_size: int = 256,  # images per call of the segmenter
) -> dict[str, float]:
    """IoU per concept over the whole set: ``sum |pred n true| / sum |pred u true|``, pooled over
    every pixel of every image (so small objects weigh by their area). NaN for a concept that is
    absent from both the predictions and the truth."""
    concepts = list(segmenter.concepts)  # type: ignore[attr-defined]
    n = images.shape[0]
    if masks.shape[0] != n:
        raise ValueError(f"{n} images but {masks.shape[0]} masks")
    if masks.dtype == torch.bool:
        if masks.ndim != 4 or masks.shape[1] != len(concepts):
            raise ValueError(f"bool masks must be [N, {len(concepts)}, R, R] (one per concept), "
                             f"got {tuple(masks.shape)}")
    elif masks.ndim != 3 or masks.is_floating_point():
        raise ValueError(f"masks must be integer concept indices [N, R, R] or bool [N, C, R, R], got "
                         f"{masks.dtype} {tuple(masks.shape)}")
    inter = torch.zeros(len(concepts), dtype=torch.float64)
    union = torch.zeros(len(concepts), dtype=torch.float64)
    for i in range(0, n, batch_size):
        pred = segmenter(images[i : i + batch_size]).cpu()  # bool [b, C, R, R]
        true = masks[i : i + batch_size].cpu()
        if true.dtype != torch.bool:
            true = true.long()[:, None] == torch.arange(len(concepts))[None, :, None, None]
        if pred.shape != true.shape:
            raise ValueError(f"the segmenter returned masks {tuple(pred.shape)}, the truth is {tuple(true.shape)}")
        inter += (pred & true).sum((0, 2, 3)).double()
        union += (pred | true).sum((0, 2, 3)).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, math.nan))
    return {c: float(v) for c, v in zip(concepts, iou)}


# ============================================================================ files
def save_segmenter(
    segmenter: NetworkSegmenter,
    path: str | Path,  # .safetensors (smp models; JSON beside it) or .pt/.ts (TorchScript; JSON beside it)
) -> None:
    """Write ``segmenter`` in a format :func:`load_segmenter` reads, each file atomically.

    ``.safetensors`` needs an smp model (``segmenter.arch`` set); ``.pt``/``.ts`` traces the
    network at the segmenter's resolution (or saves it as is when it already is TorchScript).
    """
    path = Path(path)
    spec: dict[str, Any] = {"concepts": segmenter.concepts, "resolution": segmenter.resolution,
                            "normalisation": segmenter.normalisation, "output": segmenter.output,
                            "source": segmenter.source}
    if isinstance(segmenter, SyntheticSegmenter):
        spec["training"] = segmenter.record()
    elif segmenter.training is not None:
        spec["training"] = dict(segmenter.training)
    network = segmenter.network
    if path.suffix == ".safetensors":
        if segmenter.arch is None:
            raise ValueError(f"{path}: safetensors + JSON holds smp models only; "
                             "save this segmenter as .pt (TorchScript)")
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in network.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
        atomic_write_json(path.with_suffix(".json"), {**segmenter.arch, **spec})
    elif path.suffix in TORCHSCRIPT_SUFFIXES:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript's deprecation notice
            if not isinstance(network, torch.jit.ScriptModule):
                example = torch.zeros(1, 3, segmenter.resolution, segmenter.resolution, device=segmenter.device)
                with torch.no_grad():
                    network = torch.jit.trace(network, normalise(example, segmenter.normalisation), check_trace=False)
            atomic_write(path, lambda tmp: torch.jit.save(network, str(tmp)))
        atomic_write_json(path.with_suffix(".json"), spec)
    else:
        raise ValueError(f"{path}: save a segmenter as .safetensors (smp models) or {'/'.join(TORCHSCRIPT_SUFFIXES)} "
                         "(TorchScript)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the file") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e}); a segmenter JSON is UTF-8 text") from e
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a segmenter JSON must hold an object {{...}}, got {type(spec).__name__}; "
                         f"{_FORMAT_HELP}")
    return spec


def _check_spec(spec: dict[str, Any], allowed: set[str], where: Path) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    concepts = spec.get("concepts")
    if not (isinstance(concepts, list) and concepts and all(isinstance(c, str) for c in concepts)):
        raise ValueError(f'{where}: "concepts" must be a non-empty list of names, one per output channel, '
                         f"got {concepts!r}")
    resolution = spec.get("resolution")
    if not (isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0):
        raise ValueError(f'{where}: "resolution" must be the image side the network reads (a positive integer), '
                         f"got {resolution!r}")
    if spec.get("output", "logits") not in OUTPUTS:
        raise ValueError(f'{where}: "output" must be one of {", ".join(OUTPUTS)}, got {spec.get("output")!r}')
    check_normalisation(spec.get("normalisation", "[-1,1]"), str(where))


def _load_smp(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any], Path]:
    """(network, spec, json path) of a safetensors + JSON pair; ``path`` is either file."""
    if path.suffix == ".json":
        json_path = path
        spec = _read_json(json_path)
        named = spec.get("weights")
        weights = json_path.parent / named if isinstance(named, str) else path.with_suffix(".safetensors")
    else:
        json_path, weights = path.with_suffix(".json"), path
        if not json_path.is_file():
            raise FileNotFoundError(f"{json_path} not found: the safetensors weights {path} need a JSON beside them "
                                    f"naming the smp architecture, concepts and resolution; {_FORMAT_HELP}")
        spec = _read_json(json_path)
    _check_spec(spec, _COMMON_KEYS | _SMP_KEYS, json_path)
    missing = [k for k in ("arch", "classes") if k not in spec]
    if missing:
        raise ValueError(f"{json_path}: missing key(s) {missing}; a safetensors segmenter names its smp architecture "
                         f'("arch", "encoder_name", "classes", ...); {_FORMAT_HELP}')
    if spec["classes"] != len(spec["concepts"]):
        raise ValueError(f'{json_path}: "classes" is {spec["classes"]} but {len(spec["concepts"])} concepts are named; '
                         "list one concept per output channel")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: {json_path} describes a segmenter whose weights should be there")
    network = build_smp_network(spec, str(json_path))
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    # Checked here, not by load_state_dict: smp's drops mismatched tensors with only a warning.
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{weights}: the weights do not fit the architecture {json_path} names ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys, {len(wrong)} shape mismatches, "
            f"e.g. {(missing + unexpected + wrong)[:3]}); "
            "fix arch, encoder_name, encoder_depth, decoder_channels or classes"
        )
    network.load_state_dict(state, strict=True)
    return network.to(device), spec, json_path


def _load_torchscript(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any], Path]:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript's deprecation notice
            network = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # torch raises RuntimeError or ValueError depending on how the file is damaged
        raise ValueError(f"{path}: not a TorchScript file ({type(e).__name__}); write it with "
                         "torch.jit.save(torch.jit.script(model) or torch.jit.trace(model, example), path)") from e
    json_path = path.with_suffix(".json")
    if json_path.is_file():
        spec = _read_json(json_path)
        where = json_path
    else:
        spec = {}
        for key in ("concepts", "resolution", "normalisation", "output", "source"):
            if hasattr(network, key):
                value = getattr(network, key)
                spec[key] = list(value) if key == "concepts" else value
        where = path
        if "concepts" not in spec or "resolution" not in spec:
            raise ValueError(f"{path}: the TorchScript file does not say its concepts and resolution; put "
                             f'{{"concepts": [...], "resolution": R}} in {json_path}, or give the scripted module '
                             "attributes concepts (List[str]) and resolution (int)")
    _check_spec(spec, _COMMON_KEYS | {"classes"}, where)
    if "classes" in spec and spec["classes"] != len(spec["concepts"]):
        raise ValueError(f'{where}: "classes" is {spec["classes"]} but {len(spec["concepts"])} concepts are named; '
                         "list one concept per output channel")
    return network, spec, where


def load_segmenter(
    path: str | Path,  # .pt/.ts TorchScript, or .safetensors / .json of an smp model (see the module docstring)
    device: str | torch.device = "cpu",
    resolution: int | None = None,  # the image side it must read (e.g. the generator's); None = any
    resize: bool = False,  # accept images of other sizes, resizing them (see NetworkSegmenter)
) -> NetworkSegmenter:
    """A user-supplied segmenter, checked by one forward pass: its output must have one channel
    per concept at the declared resolution."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"segmenter file {path} does not exist; give a TorchScript file (.pt/.ts) or "
                                "safetensors weights (.safetensors, with a .json beside them)")
    device = torch.device(device)
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        network, spec, where = _load_torchscript(path, device)
        arch = None
    elif path.suffix in (".safetensors", ".json"):
        network, spec, where = _load_smp(path, device)
        arch = {k: spec[k] for k in _ARCH_KEYS if k in spec}
    else:
        raise ValueError(f"{path}: unknown segmenter format {path.suffix!r}; give a TorchScript file (.pt/.ts) or "
                         "safetensors weights (.safetensors, with a .json beside them)")
    side = int(spec["resolution"])
    if resolution is not None and int(resolution) != side and not resize:
        raise ValueError(f"{path} segments {side}x{side} images but {resolution}x{resolution} images are to be "
                         "segmented; use a segmenter trained at that size, or pass resize=True to resize the images")
    concepts = spec["concepts"]
    source = spec.get("source") or f"segmenter {path.name} ({len(concepts)} concepts)"
    segmenter = NetworkSegmenter(network, concepts, side, source, spec.get("normalisation", "[-1,1]"),
                                 spec.get("output", "logits"), resize, arch, training=spec.get("training"))
    _probe_output(segmenter, path, where)
    return segmenter


def _probe_output(segmenter: NetworkSegmenter, path: Path, where: Path) -> None:
    """One forward pass on a blank image: the output must be ``[1, C, R, R]``."""
    r = segmenter.resolution
    blank = torch.zeros(1, 3, r, r, device=segmenter.device)
    try:
        with torch.no_grad():
            out = segmenter.network(normalise(blank, segmenter.normalisation))
    except Exception as e:  # any failure here means the file and its description disagree
        raise ValueError(f"{path}: the network failed on a {r}x{r} image ({type(e).__name__}: {e}); check "
                         f'"resolution" in {where}') from e
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{path}: the network returned {shape}, expected scores [batch, concepts, {r}, {r}]")
    if out.shape[1] != len(segmenter.concepts):
        raise ValueError(f"{path}: the network outputs {out.shape[1]} channels but {where} names "
                         f"{len(segmenter.concepts)} concepts; list one concept per output channel")
    if tuple(out.shape[-2:]) != (r, r):
        raise ValueError(f"{path}: resolution mismatch: {where} says {r} but the network returns "
                         f"{out.shape[-2]}x{out.shape[-1]} scores for {r}x{r} images; set \"resolution\" to the "
                         "image side the network was made for")


# ============================================================================ the on-disk cache
def cache_dir() -> Path:
    """Where trained segmenters are kept: ``$STYLEX_CACHE_DIR/segmenters``, else ``~/.cache/stylex/segmenters``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "stylex") / "segmenters"


def renderer_digest() -> str:
    """sha256 of ``stylex/data/synthetic.py``: the scenes a segmenter learns from depend on it."""
    from stylex.data import synthetic

    return hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()


def segmenter_key(
    resolution: int,
    lesion_scale: float,
    config: SegmenterTrainConfig,
) -> str:
    """The cache key: resolution, lesion scale, training settings, renderer source and format."""
    blob = json.dumps({"resolution": int(resolution), "lesion_scale": float(lesion_scale),
                       "config": dataclasses.asdict(config), "renderer": renderer_digest(),
                       "format": SEGMENTER_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_segmenter_path(
    resolution: int,
    lesion_scale: float = DEFAULT_LESION_SCALE,
    config: SegmenterTrainConfig | None = None,
    folder: str | Path | None = None,  # default: cache_dir()
) -> Path:
    """The weights file of a cached synthetic segmenter (its JSON lies beside it)."""
    config = config or SegmenterTrainConfig()
    folder = Path(folder) if folder is not None else cache_dir()
    return folder / f"segmenter_r{int(resolution)}_{segmenter_key(resolution, lesion_scale, config)}.safetensors"


def _load_cached(path: Path, key: str, device: torch.device, resize: bool) -> SyntheticSegmenter:
    """A cached synthetic segmenter (ValueError when the files do not hold the expected one)."""
    try:
        loaded = load_segmenter(path, device, resize=resize)
        record = loaded.training or {}
        if record.get("key") != key or record.get("format") != SEGMENTER_FORMAT:
            raise ValueError("the record's key or format differs")
        config = SegmenterTrainConfig.from_dict(record["config"])
        return SyntheticSegmenter(loaded.network, loaded.resolution, record["lesion_scale"], config, record["iou"],
                                  record["train_seconds"], record["loss_history"], resize=resize)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:  # a damaged or foreign file is a miss
        raise ValueError(f"{path} does not hold the expected synthetic segmenter ({type(e).__name__}: {e})") from e


def synthetic_segmenter(
    resolution: int = 32,  # R, the generator's resolution
    lesion_scale: float = DEFAULT_LESION_SCALE,  # the run's dataset.lesion_scale
    device: str | torch.device = "cpu",
    progress: bool = True,  # tqdm bars and a summary line when it has to train
    folder: str | Path | None = None,  # cache folder; default cache_dir()
    config: SegmenterTrainConfig | None = None,  # training settings; None = the defaults
    resize: bool = False,  # accept images of other sizes (see NetworkSegmenter)
) -> SyntheticSegmenter:
    """The synthetic segmenter for ``resolution`` and ``lesion_scale``: read from the cache, or
    trained (printing its held-out IoU per concept) and stored.

    A cached file that cannot be read is replaced by a fresh segmenter; a cache folder that cannot
    be written only costs the next caller a new training.
    """
    config = config or SegmenterTrainConfig()
    device = torch.device(device)
    path = cached_segmenter_path(resolution, lesion_scale, config, folder)
    key = segmenter_key(resolution, lesion_scale, config)
    if path.is_file() and path.with_suffix(".json").is_file():
        try:
            return _load_cached(path, key, device, resize)
        except ValueError as e:
            log.warning("segmenter cache: %s; training a new one", e)
    log.info("training the synthetic segmenter at %dx%d (cached in %s)", resolution, resolution, path.parent)
    segmenter = train_synthetic_segmenter(resolution, lesion_scale, config, device, progress)
    segmenter.resize = bool(resize)
    summary = (f"synthetic segmenter {resolution}x{resolution} (lesion scale {float(lesion_scale):g}) trained in "
               f"{segmenter.train_seconds:.0f} s; held-out IoU: "
               + ", ".join(f"{c} {v:.3f}" for c, v in segmenter.iou.items()) + f"; mean {segmenter.mean_iou:.3f}")
    log.info(summary)
    if progress:
        tqdm.write(summary)
    try:
        save_segmenter(segmenter, path)  # the JSON, written last, names the key: a reader finding it finds both
    except OSError as e:  # a read-only home must not stop a run: the segmenter is still usable
        log.warning("could not cache the synthetic segmenter in %s (%s); set %s to a writable folder",
                    path.parent, e, CACHE_ENV)
    return segmenter
