"""The image classifier that StylEx explains.

A :class:`Classifier` wraps a timm model so that it reads images the way the generator writes
them: ``[B, 3, R, R]`` in ``[-1, 1]``. It maps them to ``[0, 1]``, optionally resizes them to the
size the network was built for, and applies the per-channel mean/std that the architecture's
timm configuration names. All of this is differentiable, because StylEx back-propagates the
classifier's output into the generator.

While StylEx trains, the classifier is *frozen* (:meth:`Classifier.freeze`): its weights never
receive gradients and it stays in eval mode, so BatchNorm running statistics never move, even
when a parent module is switched to training mode. Gradients still flow through it to its input.

:class:`ClassifierModule` and :func:`train_classifier` train a classifier from scratch (or
fine-tune a pretrained one) as a short stage before the GAN, and :func:`build_classifier` turns
the ``classifier`` section of the config into a ready classifier.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchmetrics.classification import MulticlassAccuracy

from stylex.utils.io import atomic_write

log = logging.getLogger(__name__)

# The keys of Classifier.config; they are also the overrides Classifier.load accepts.
CONFIG_KEYS = ("arch", "num_classes", "input_size", "in_chans", "timm_kwargs")

# Name under which save() also embeds the config in the safetensors header, so that the weights
# file alone is enough to rebuild the classifier if its .json sidecar gets lost.
_METADATA_KEY = "stylex_classifier_config"

# timm_kwargs may not repeat what Classifier passes to timm.create_model itself.
_RESERVED_TIMM_KWARGS = ("model_name", "pretrained", "num_classes", "in_chans")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` with mappings turned into dicts and sequences into lists (e.g. OmegaConf nodes)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _atomic_write(
    dest: Path,  # final path of the file
    write: Callable[[str], None],  # writes the whole file to the temporary path it is given
) -> None:
    """Publish a file atomically (see :func:`stylex.utils.io.atomic_write`)."""
    atomic_write(dest, lambda tmp: write(str(tmp)))


def _suggest_archs(arch: str, limit: int = 12) -> list[str]:
    """timm architectures whose names contain ``arch`` or resemble it."""
    base = arch.split(".")[0]
    contained = timm.list_models(f"*{base}*")
    similar = difflib.get_close_matches(base, timm.list_models(), n=limit, cutoff=0.6)
    merged = list(dict.fromkeys(similar + contained))
    return merged[:limit]


def _check_arch(arch: str) -> None:
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"classifier arch must be a timm model name such as 'resnet18', got {arch!r}")
    if timm.is_model(arch):
        return
    close = _suggest_archs(arch)
    hint = f"close matches: {', '.join(close)}" if close else "no similar names found"
    raise ValueError(
        f"unknown classifier architecture {arch!r} (option classifier.arch): timm has no such model; "
        f"{hint}. timm.list_models() lists them all."
    )


def _is_download_failure(err: BaseException) -> bool:
    """Whether ``err`` from timm.create_model(pretrained=True) means the weights were not fetched."""
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return True
    package = type(err).__module__.split(".")[0]
    if package in ("huggingface_hub", "requests", "httpx", "urllib3"):
        return True
    # timm's own "no pretrained weights exist for <arch>" and "invalid pretrained config" errors.
    return isinstance(err, RuntimeError) and ("pretrained" in str(err).lower() or "weights" in str(err).lower())


def _create_timm_model(
    arch: str,
    num_classes: int,
    pretrained: bool,
    in_chans: int,
    timm_kwargs: dict[str, Any],
) -> nn.Module:
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **timm_kwargs
        )
    except Exception as err:
        if pretrained and _is_download_failure(err):
            raise RuntimeError(
                f"pretrained weights for classifier arch {arch!r} could not be fetched "
                f"({type(err).__name__}: {err}). Without network access, pass a local file with "
                f"classifier.checkpoint=<file>, or train from scratch with classifier.pretrained=false."
            ) from err
        raise


def _normalisation(
    model: nn.Module,
    in_chans: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, each ``[1, in_chans, 1, 1]``, from the model's timm config."""
    data_cfg = timm.data.resolve_data_config({}, model=model)
    mean = [float(m) for m in data_cfg["mean"]]
    std = [float(s) for s in data_cfg["std"]]
    if len(mean) != in_chans:
        # A model built for another channel count: the RGB statistics do not apply channel by
        # channel, so fall back to their averages, which is what timm does for grayscale input.
        mean = [sum(mean) / len(mean)] * in_chans
        std = [sum(std) / len(std)] * in_chans
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict keys as :class:`Classifier` names them (``model.<timm key>``).

    Accepts keys with the wrappers that DDP (``module.``) and torch.compile (``_orig_mod.``) add,
    and bare timm keys as saved by ``torch.save(timm_model.state_dict())``.
    """
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    # mean/std are derived from the architecture, never loaded (older saves may carry them).
    out = {k: v for k, v in out.items() if k not in ("mean", "std")}
    if out and not all(k.startswith("model.") for k in out):
        out = {f"model.{k}": v for k, v in out.items()}
    return out


def read_checkpoint(
    path: str | Path,  # .safetensors (+ .json), Lightning .ckpt, or a torch state_dict file
    weights_only: bool = True,  # passed to torch.load; False unpickles arbitrary Python objects
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The weights in ``path`` (CPU tensors, keys as :class:`Classifier` names them) and the
    classifier config recorded with them, or ``None`` when the file records none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier checkpoint {str(path)!r} does not exist (option classifier.checkpoint); "
            f"check the path, or set classifier.checkpoint=null to train a classifier instead."
        )
    if path.suffix == ".safetensors":
        return _normalise_keys(load_file(str(path), device="cpu")), _safetensors_config(path)

    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise ValueError(
                f"{path} holds Python objects besides tensors, which are not unpickled by default "
                f"because unpickling can run arbitrary code. If you trust the file, pass "
                f"weights_only=False to Classifier.load."
            ) from err
        raise ValueError(
            f"{path} is not a PyTorch checkpoint ({err}); expected a .safetensors file written by "
            f"Classifier.save, a Lightning .ckpt of ClassifierModule, or a torch state_dict."
        ) from err

    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        prefix = "classifier."
        state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(
                f"{path} is a Lightning checkpoint without weights under 'classifier.'; expected a "
                f"checkpoint of stylex.classifier.ClassifierModule (or a module that keeps its "
                f"classifier in an attribute named 'classifier')."
            )
        hparams = obj.get("hyper_parameters") or {}
        config = hparams.get("classifier_config")
        return _normalise_keys(state), (_plain(config) if config is not None else None)

    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _normalise_keys(obj), None

    raise ValueError(
        f"{path} holds a {type(obj).__name__}, not a state dict; expected a .safetensors file "
        f"written by Classifier.save, a Lightning .ckpt of ClassifierModule, or a torch state_dict."
    )


def _safetensors_config(path: Path) -> dict[str, Any] | None:
    """The config from the .json sidecar of ``path``, else from its header, else None."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"classifier config {sidecar} is not valid JSON: {err}") from err
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(_METADATA_KEY)
    return json.loads(text) if text else None


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A timm classifier that reads generator-range images and returns logits.

    Logits, not probabilities, are the primary output: StylEx's classifier-KL loss and the
    attribute search compare log-probabilities (``log_softmax(logits)``), which is more accurate
    computed from logits than by taking the log of saturated softmax values, and "logit"
    explanations read the logits directly. :meth:`probs` gives softmax probabilities.
    """

    def __init__(
        self,
        arch: str,  # timm model name, e.g. "resnet18" (optionally with a ".tag")
        num_classes: int,  # K, the number of output logits
        input_size: int | None = None,  # side the images are resized to; None = as they come
        pretrained: bool = False,  # start from timm's pretrained weights (downloads them)
        in_chans: int = 3,  # image channels
        **timm_kwargs: Any,  # passed on to timm.create_model (e.g. drop_rate=0.1)
    ) -> None:
        super().__init__()
        _check_arch(arch)
        if int(num_classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
        if input_size is not None and int(input_size) < 1:
            raise ValueError(
                f"classifier.input_size must be a positive number of pixels or null, got {input_size}"
            )
        reserved = sorted(set(timm_kwargs) & set(_RESERVED_TIMM_KWARGS))
        if reserved:
            raise ValueError(
                f"classifier.timm_kwargs may not set {', '.join(reserved)}: the classifier sets these "
                f"itself; use the arguments of the same name instead."
            )
        self.arch = arch
        self.num_classes = int(num_classes)
        self.input_size = None if input_size is None else int(input_size)
        self.in_chans = int(in_chans)
        self.timm_kwargs = _plain(dict(timm_kwargs))
        self.model = _create_timm_model(arch, self.num_classes, bool(pretrained), self.in_chans, self.timm_kwargs)
        mean, std = _normalisation(self.model, self.in_chans)
        # Not persistent: they follow from the architecture, so plain timm state dicts load as is.
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self._frozen = False

    # ---- forward ----------------------------------------------------------------------------

    def preprocess(
        self,
        x: torch.Tensor,  # [B, in_chans, H, W] in [-1, 1]
    ) -> torch.Tensor:
        """The network's input: ``[B, in_chans, S, S]`` normalised with timm's mean/std, where
        ``S = input_size`` (or ``H x W`` unchanged when ``input_size`` is None)."""
        assert x.ndim == 4 and x.shape[1] == self.in_chans, (
            f"Classifier expects images [batch, {self.in_chans}, height, width] in [-1, 1], "
            f"got shape {tuple(x.shape)}"
        )
        x = (x + 1) * 0.5  # timm's mean/std refer to [0, 1] images
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            # Antialias only when shrinking: it low-passes to avoid aliasing, which upscaling has none of.
            shrinking = size < x.shape[-2] or size < x.shape[-1]
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        return (x - self.mean) / self.std

    def forward(
        self,
        x: torch.Tensor,  # [B, in_chans, H, W] in [-1, 1], e.g. generator output
    ) -> torch.Tensor:
        """Logits ``[B, num_classes]``; differentiable with respect to ``x``."""
        logits = self.model(self.preprocess(x))
        assert logits.shape == (x.shape[0], self.num_classes), (
            f"timm model {self.arch!r} returned shape {tuple(logits.shape)}, expected "
            f"[{x.shape[0]}, {self.num_classes}]; check classifier.timm_kwargs"
        )
        return logits

    def probs(
        self,
        x: torch.Tensor,  # [B, in_chans, H, W] in [-1, 1]
    ) -> torch.Tensor:
        """Class probabilities ``[B, num_classes]``, rows summing to 1."""
        return self(x).softmax(dim=-1)

    # ---- freezing ---------------------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> Classifier:
        """Stop all learning: no parameter gradients and eval mode for good (see :meth:`train`)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        super().train(False)
        return self

    def unfreeze(self) -> Classifier:
        """Undo :meth:`freeze` so that the classifier can be trained (or fine-tuned) again."""
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = False
        return self

    def train(self, mode: bool = True) -> Classifier:
        """Set training mode, except that a frozen classifier stays in eval mode.

        A parent's ``.train()`` reaches here, so a frozen classifier inside a GAN keeps using its
        BatchNorm running statistics (and never updates them) and keeps dropout off.
        """
        return super().train(mode and not self._frozen)

    # ---- serialisation ----------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """Everything :meth:`from_config` needs to rebuild this classifier (bar the weights).

        JSON-serialisable as long as the timm kwargs are.
        """
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "in_chans": self.in_chans,
            "timm_kwargs": dict(self.timm_kwargs),
        }

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],  # as returned by Classifier.config
        pretrained: bool = False,
    ) -> Classifier:
        """A new classifier with randomly initialised (or timm-pretrained) weights."""
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown classifier config keys {unknown}; allowed: {list(CONFIG_KEYS)}")
        missing = [k for k in ("arch", "num_classes") if config.get(k) is None]
        if missing:
            raise ValueError(f"classifier config lacks {missing}; it has {dict(config)}")
        return cls(
            arch=config["arch"],
            num_classes=int(config["num_classes"]),
            input_size=config.get("input_size"),
            pretrained=pretrained,
            in_chans=int(config.get("in_chans") or 3),
            **_plain(config.get("timm_kwargs") or {}),
        )

    def save(
        self,
        path: str | Path,  # e.g. out/classifier.safetensors; the config goes next to it as .json
    ) -> None:
        """Write the weights (safetensors) and, beside them, the config (JSON), each atomically."""
        path = Path(path)
        if path.suffix == ".json":
            raise ValueError(f"{path}: the weights file cannot end in .json, which is the config's suffix")
        try:
            config_text = json.dumps(self.config, indent=2, sort_keys=True)
        except TypeError as err:
            raise ValueError(
                f"cannot save the classifier config: classifier.timm_kwargs must hold only JSON values "
                f"(numbers, strings, lists, dicts); {err}"
            ) from err
        # Copies: safetensors refuses tensors that share storage, which tied weights would.
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        _atomic_write(path, lambda tmp: save_file(state, tmp, metadata={_METADATA_KEY: config_text}))
        _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(config_text + "\n"))

    def load_weights(
        self,
        state: Mapping[str, torch.Tensor],  # keys as in self.state_dict()
        source: str | Path = "<state dict>",  # where the weights came from, for messages
    ) -> None:
        """Copy ``state`` into this classifier, or explain precisely why it does not fit."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [
            f"{k.removeprefix('model.')}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ]
        if missing or unexpected or wrong:

            def some(keys: list[str]) -> str:
                names = [k.removeprefix("model.") for k in keys[:6]]
                return ", ".join(names) + (", ..." if len(keys) > 6 else "")

            problems = []
            if missing:
                problems.append(f"{len(missing)} missing keys ({some(missing)})")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected keys ({some(unexpected)})")
            if wrong:
                problems.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:6])})")
            raise ValueError(
                f"weights in {source} do not fit the expected classifier: timm arch {self.arch!r} with "
                f"num_classes={self.num_classes}, in_chans={self.in_chans}, timm_kwargs={self.timm_kwargs}. "
                f"Found {', '.join(problems)}. Set classifier.arch (and classifier.timm_kwargs) to the "
                f"architecture the weights were trained with, and check the number of classes."
            )
        self.load_state_dict(state, strict=True)

    @classmethod
    def load(
        cls,
        path: str | Path,  # .safetensors (+ .json), Lightning .ckpt of ClassifierModule, or .pt/.pth
        map_location: str | torch.device = "cpu",  # device of the returned classifier
        *,
        weights_only: bool = True,  # torch.load safety; only set False for files you trust
        **overrides: Any,  # arch, num_classes, input_size, in_chans, timm_kwargs
    ) -> Classifier:
        """Rebuild a saved classifier (not frozen; call :meth:`freeze` to explain it).

        The architecture comes from the config recorded with the weights (the .json sidecar or
        safetensors header, or the ``classifier_config`` hyper-parameter of a Lightning
        checkpoint). ``overrides`` replace recorded values, and are required for a bare state
        dict, which records nothing: ``Classifier.load("w.pth", arch="resnet18", num_classes=5)``.
        """
        unknown = sorted(set(overrides) - set(CONFIG_KEYS))
        if unknown:
            raise TypeError(f"Classifier.load got unknown keyword arguments {unknown}; allowed: {list(CONFIG_KEYS)}")
        state, recorded = read_checkpoint(path, weights_only=weights_only)
        config = {**(recorded or {}), **overrides}
        if config.get("arch") is None or config.get("num_classes") is None:
            raise ValueError(
                f"{path} holds bare weights that do not say which architecture they belong to; pass "
                f"it, e.g. Classifier.load({str(path)!r}, arch='resnet18', num_classes=5)"
            )
        classifier = cls.from_config(config)
        classifier.load_weights(state, source=path)
        return classifier.to(map_location)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, input_size={self.input_size}, frozen={self._frozen}"


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = _unpack(batch)
        if self.hparams.augment:
            shift = round(self.hparams.max_shift * min(images.shape[-2:]))
            images = flip_and_shift(images, shift)
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
        classifier, lr=lr, weight_decay=weight_decay, class_weights=class_weights, augment=augment
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
        text = json.dumps(metrics, indent=2) + "\n"
        _atomic_write(out_dir / "classifier_metrics.json", lambda tmp: Path(tmp).write_text(text))
        log.info(
            "classifier: val acc %.4f, balanced %.4f after %d epochs in %.1f s",
            metrics["val_acc"],
            metrics["val_balanced_acc"],
            metrics["epochs"],
            seconds,
        )
    trainer.strategy.barrier("classifier_saved")
    return classifier, metrics


# --------------------------------------------------------------------------------------------
# From the config
# --------------------------------------------------------------------------------------------


def _head_classes(state: Mapping[str, torch.Tensor], arch: str) -> int | None:
    """Number of classes the bare weights ``state`` were trained for, if the head is findable."""
    head = timm.models.get_pretrained_cfg_value(arch.split(".")[0], "classifier")
    if isinstance(head, str):
        for suffix in ("bias", "weight"):
            tensor = state.get(f"model.{head}.{suffix}")
            if tensor is not None:
                return int(tensor.shape[0])
    return None


def build_classifier(
    cfg: Mapping[str, Any],  # the `classifier` config section (arch, pretrained, input_size, ...)
    num_classes: int,  # classes in the data
) -> Classifier:
    """The classifier the config asks for (not frozen).

    Without ``checkpoint``, a new timm model (pretrained or not). With it, the saved classifier:
    the architecture recorded in the checkpoint wins over ``cfg['arch']`` (a warning says so
    when they differ); a bare state dict, which records none, is read with ``cfg``'s arch,
    input size and timm kwargs. ``pretrained`` is ignored when a checkpoint is given.
    """
    arch = cfg.get("arch")
    input_size = cfg.get("input_size")
    in_chans = int(cfg.get("in_chans") or 3)
    timm_kwargs = _plain(cfg.get("timm_kwargs") or {})
    checkpoint = cfg.get("checkpoint")
    if not checkpoint:
        if arch is None:
            raise ValueError("classifier.arch is not set; name a timm model, e.g. classifier.arch=resnet18")
        return Classifier(
            arch,
            num_classes,
            input_size=input_size,
            pretrained=bool(cfg.get("pretrained", False)),
            in_chans=in_chans,
            **timm_kwargs,
        )

    state, recorded = read_checkpoint(checkpoint)
    if recorded is None:
        if arch is None:
            raise ValueError(f"{checkpoint} holds bare weights; set classifier.arch to their architecture")
        _check_arch(arch)
        found = _head_classes(state, arch)
        recorded = {
            "arch": arch,
            "num_classes": found if found is not None else num_classes,
            "input_size": input_size,
            "in_chans": in_chans,
            "timm_kwargs": timm_kwargs,
        }
    elif arch is not None and recorded.get("arch") != arch:
        log.warning(
            "classifier.arch=%s ignored: checkpoint %s records arch %s", arch, checkpoint, recorded.get("arch")
        )
    if int(recorded["num_classes"]) != int(num_classes):
        raise ValueError(
            f"classifier checkpoint {checkpoint} (option classifier.checkpoint) was trained for "
            f"{recorded['num_classes']} classes, but the data has {num_classes}; use a checkpoint trained "
            f"on this dataset, or set classifier.checkpoint=null to train one."
        )
    classifier = Classifier.from_config(recorded)
    classifier.load_weights(state, source=checkpoint)
    return classifier
