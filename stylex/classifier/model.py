"""The classifier that StylEx explains: a timm model that reads generator-range images.

A :class:`Classifier` wraps a timm model so that it reads images the way the generator writes
them: ``[B, 3, R, R]`` in ``[-1, 1]``. It maps them to ``[0, 1]``, optionally resizes them to the
size the network was built for, and applies the per-channel mean/std that the architecture's
timm configuration names. All of this is differentiable, because StylEx back-propagates the
classifier's output into the generator.

While StylEx trains, the classifier is *frozen* (:meth:`Classifier.freeze`): its weights never
receive gradients and it stays in eval mode, so BatchNorm running statistics never move, even
when a parent module is switched to training mode. Gradients still flow through it to its input.

:meth:`Classifier.save` writes ``.safetensors`` weights plus a ``.json`` config beside them;
:meth:`Classifier.load` reads every format :mod:`stylex.classifier.checkpoint` accepts.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from stylex.classifier.checkpoint import METADATA_KEY, plain_data, read_checkpoint
from stylex.utils.io import atomic_write, atomic_write_text

# The keys of Classifier.config; they are also the overrides Classifier.load accepts.
CONFIG_KEYS = ("arch", "num_classes", "input_size", "in_chans", "timm_kwargs", "temperature")

# timm_kwargs may not repeat what Classifier passes to timm.create_model itself.
_RESERVED_TIMM_KWARGS = ("model_name", "pretrained", "num_classes", "in_chans")


# --------------------------------------------------------------------------------------------
# timm helpers
# --------------------------------------------------------------------------------------------


def _suggest_archs(arch: str, limit: int = 12) -> list[str]:
    """timm architectures whose names contain ``arch`` or resemble it."""
    base = arch.split(".")[0]
    contained = timm.list_models(f"*{base}*")
    similar = difflib.get_close_matches(base, timm.list_models(), n=limit, cutoff=0.6)
    merged = list(dict.fromkeys(similar + contained))
    return merged[:limit]


def check_arch(arch: str) -> None:
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
        temperature: float = 1.0,  # logits are divided by it (calibration; see stylex.classifier.calibration)
        **timm_kwargs: Any,  # passed on to timm.create_model (e.g. drop_rate=0.1)
    ) -> None:
        super().__init__()
        check_arch(arch)
        if not float(temperature) > 0:
            raise ValueError(f"the classifier's temperature must be > 0, got {temperature}")
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
        self.temperature = float(temperature)
        self.timm_kwargs = plain_data(dict(timm_kwargs))
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
        """Logits ``[B, num_classes]`` (divided by the temperature); differentiable with respect
        to ``x``."""
        logits = self.model(self.preprocess(x))
        if self.temperature != 1.0:
            logits = logits / self.temperature
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
        config = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "in_chans": self.in_chans,
            "timm_kwargs": dict(self.timm_kwargs),
        }
        if self.temperature != 1.0:  # only a calibrated classifier records one
            config["temperature"] = self.temperature
        return config

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
            temperature=float(config.get("temperature") or 1.0),
            **plain_data(config.get("timm_kwargs") or {}),
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
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={METADATA_KEY: config_text}))
        atomic_write_text(path.with_suffix(".json"), config_text + "\n")

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
