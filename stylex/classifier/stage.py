"""The ``classifier`` section of the config, and the classifier stage of a run.

:class:`ClassifierConfig` (with :class:`ClassifierTraining` for ``classifier.train``) is the one
source of the section's defaults and of its checks: the YAML presets in ``configs/classifier/``
only need to state what differs from it. Building one from a mapping checks every value once
and raises :class:`stylex.errors.ConfigError` naming the option as the user writes it
(``classifier.train.max_epochs must be >= 1, got 0``).

:func:`build_classifier` turns the section into a classifier, new or read from
``classifier.checkpoint``.

:func:`prepare_classifier` is the stage policy, i.e. where the frozen classifier that a StylEx
run explains comes from, in this order:

1. ``classifier.checkpoint``, when set;
2. the run's own earlier classifier stage (``<out_dir>/classifier.safetensors``), when a run
   resumes after the stage finished;
3. otherwise a classifier trained now, as a short Lightning run of its own
   (:func:`stylex.classifier.training.train_classifier`), saved into ``out_dir``.

Nothing here depends on the GAN training: the caller hands over the Trainer options and loggers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch

from stylex.classifier.calibration import collect_logits, expected_calibration_error, fit_temperature
from stylex.classifier.checkpoint import plain_data, read_checkpoint
from stylex.classifier.model import Classifier, check_arch
from stylex.classifier.training import train_classifier
from stylex.errors import ConfigError
from stylex.utils.dist import is_rank_zero
from stylex.utils.io import atomic_write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The config section
# --------------------------------------------------------------------------------------------


def _whole(
    option: str,  # the option as the user writes it, e.g. "classifier.train.max_epochs"
    value: Any,
    minimum: int,
) -> int:
    """``value`` as an int of at least ``minimum``, or a ConfigError naming ``option``."""
    try:
        number = int(value)
        whole = not isinstance(value, bool) and number == float(value)
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ConfigError(f"{option} must be a whole number, got {value!r}")
    if number < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {number}")
    return number


def _real(
    option: str,  # the option as the user writes it, e.g. "classifier.train.lr"
    value: Any,
    positive: bool,  # True: must be > 0; False: must be >= 0
) -> float:
    """``value`` as a finite float (> 0 or >= 0), or a ConfigError naming ``option``."""
    try:
        number = float(value)
        ok = not isinstance(value, bool) and math.isfinite(number)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{option} must be a finite number, got {value!r}")
    if positive and number <= 0:
        raise ConfigError(f"{option} must be > 0, got {number}")
    if not positive and number < 0:
        raise ConfigError(f"{option} must be >= 0, got {number}")
    return number


def _flag(option: str, value: Any) -> bool:
    # bool("false") is True: a string that slipped through would silently mean the opposite.
    if not isinstance(value, bool):
        raise ConfigError(f"{option} must be true or false, got {value!r}")
    return value


def _from_mapping(
    cls: type,  # ClassifierConfig or ClassifierTraining
    mapping: Mapping[str, Any],  # e.g. a plain dict or an OmegaConf node of the section
    section: str,  # the section as the user writes it, e.g. "classifier.train"
) -> Any:
    """``cls(**mapping)``, refusing keys the section does not have (a typo would be ignored)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, mapping)) - set(names))
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]} is not an option; {section} takes {', '.join(names)}"
        )
    return cls(**{str(k): v for k, v in mapping.items()})


@dataclass
class ClassifierTraining:
    """``classifier.train``: the options of the classifier's own training stage."""

    max_epochs: int = 5  # epochs over the training split
    lr: float = 1e-3  # AdamW peak learning rate, cosine-decayed to 0 over the run
    weight_decay: float = 0.05  # AdamW decoupled weight decay, on weights only (not norms/biases)
    balanced_loss: bool = False  # weight cross-entropy by inverse class frequency
    augment: bool = True  # random mirror + translation by up to 1/16 of the image side
    batch_size: Optional[int] = None  # the classifier stage's batch size (None = the data module's)
    label_smoothing: float = 0.0  # cross-entropy against softened labels, in [0, 1) (a less saturated classifier)
    noise_std: float = 0.0  # Gaussian pixel noise of std uniform in [0, noise_std] on training images (0 = off)
    color_jitter: float = 0.0  # per-image brightness, contrast and tint jitter of this strength (0 = off)

    def __post_init__(self) -> None:
        section = "classifier.train"
        self.noise_std = _real(f"{section}.noise_std", self.noise_std, positive=False)
        self.color_jitter = _real(f"{section}.color_jitter", self.color_jitter, positive=False)
        self.label_smoothing = _real(f"{section}.label_smoothing", self.label_smoothing, positive=False)
        if self.label_smoothing >= 1:
            raise ConfigError(f"{section}.label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        self.max_epochs = _whole(f"{section}.max_epochs", self.max_epochs, minimum=1)
        self.lr = _real(f"{section}.lr", self.lr, positive=True)
        self.weight_decay = _real(f"{section}.weight_decay", self.weight_decay, positive=False)
        self.balanced_loss = _flag(f"{section}.balanced_loss", self.balanced_loss)
        self.augment = _flag(f"{section}.augment", self.augment)
        if self.batch_size is not None:
            self.batch_size = _whole(f"{section}.batch_size", self.batch_size, minimum=1)


@dataclass
class ClassifierConfig:
    """``classifier``: which classifier StylEx explains, and how to train it if need be."""

    arch: Optional[str] = None  # timm model name, e.g. resnet18 (may be None with a checkpoint that records it)
    pretrained: bool = False  # true downloads ImageNet weights from the Hugging Face hub
    input_size: Optional[int] = None  # None = use images at the data resolution; N = resize to NxN first
    in_chans: int = 3  # image channels
    checkpoint: Optional[str] = None  # a trained classifier (.safetensors, ClassifierModule .ckpt, or state_dict)
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model, e.g. {drop_rate: 0.1}
    train: ClassifierTraining = field(default_factory=ClassifierTraining)  # the training stage's options
    calibrate: bool = False  # fit a temperature on the validation split (softer, calibrated probabilities)
    # A second frozen classifier (a checkpoint that records its architecture: .safetensors or a
    # ClassifierModule .ckpt) whose features judge realism in place of the explained one's: the
    # perceptual distance (backend "classifier"), FID/KID, and D's feature heads. None = the
    # explained classifier. Its class count need not match the data's.
    feature_checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        if self.arch is not None and (not isinstance(self.arch, str) or not self.arch):
            raise ConfigError(f"classifier.arch must be a timm model name such as resnet18, got {self.arch!r}")
        self.pretrained = _flag("classifier.pretrained", self.pretrained)
        self.calibrate = _flag("classifier.calibrate", self.calibrate)
        if self.input_size is not None:
            self.input_size = _whole("classifier.input_size", self.input_size, minimum=1)
        self.in_chans = _whole("classifier.in_chans", self.in_chans, minimum=1)
        # An empty string means "no checkpoint", as it always has (the stage tests truthiness).
        self.checkpoint = str(self.checkpoint) if self.checkpoint else None
        self.feature_checkpoint = str(self.feature_checkpoint) if self.feature_checkpoint else None
        if not isinstance(self.timm_kwargs, Mapping):
            raise ConfigError(
                f"classifier.timm_kwargs must be a mapping of timm.create_model arguments, "
                f"e.g. {{drop_rate: 0.1}}, got {self.timm_kwargs!r}"
            )
        self.timm_kwargs = plain_data(self.timm_kwargs)
        if isinstance(self.train, Mapping):
            self.train = _from_mapping(ClassifierTraining, self.train, "classifier.train")
        elif not isinstance(self.train, ClassifierTraining):
            raise ConfigError(f"classifier.train must be a section of options, got {self.train!r}")

    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[str, Any],  # the `classifier` section: a dict or an OmegaConf node
    ) -> ClassifierConfig:
        """The checked config; keys left out take the defaults above."""
        return _from_mapping(cls, mapping, "classifier")


# --------------------------------------------------------------------------------------------
# Building the classifier
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
    cfg: ClassifierConfig | Mapping[str, Any],  # the `classifier` section (arch, pretrained, ...)
    num_classes: int,  # classes in the data
) -> Classifier:
    """The classifier the config asks for (not frozen).

    Without ``checkpoint``, a new timm model (pretrained or not). With it, the saved classifier:
    the architecture recorded in the checkpoint wins over ``cfg['arch']`` (a warning says so
    when they differ); a bare state dict, which records none, is read with ``cfg``'s arch,
    input size and timm kwargs. ``pretrained`` is ignored when a checkpoint is given.
    """
    if isinstance(cfg, ClassifierConfig):
        cfg = dataclasses.asdict(cfg)
    arch = cfg.get("arch")
    input_size = cfg.get("input_size")
    in_chans = int(cfg.get("in_chans") or 3)
    timm_kwargs = plain_data(cfg.get("timm_kwargs") or {})
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
        check_arch(arch)
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


def _build(
    config: ClassifierConfig,
    num_classes: int,  # classes in the data
) -> Classifier:
    """:func:`build_classifier`, with the errors a user can fix in the config as ConfigError."""
    try:
        return build_classifier(config, num_classes)
    except (ValueError, FileNotFoundError) as e:  # unknown arch, wrong checkpoint, class count
        raise ConfigError(f"classifier: {e}") from e


def load_feature_classifier(
    config: ClassifierConfig | Mapping[str, Any],  # the `classifier` section
) -> Classifier | None:
    """The frozen classifier of ``classifier.feature_checkpoint``, or None when it is not set.

    Why a second network: the explained classifier is often made blind to what does not decide
    its class (colour jitter, pixel noise, invariance on purpose). Used as the perceptual
    distance and the FID features it would make the reconstruction and the realism measure
    blind to the same things, and the generator would stop drawing them.
    """
    if not isinstance(config, ClassifierConfig):
        config = ClassifierConfig.from_mapping(config)
    path = config.feature_checkpoint
    if not path:
        return None
    if not Path(path).is_file():
        raise ConfigError(
            f"classifier.feature_checkpoint={path} does not exist; point it at a classifier checkpoint "
            "(.safetensors written by Classifier.save, or a ClassifierModule .ckpt), or set it to null "
            "to judge realism with the explained classifier"
        )
    try:
        classifier = Classifier.load(path)
    except Exception as e:  # bare weights, not a checkpoint, damaged, pickled objects
        if isinstance(e, ValueError) and "bare weights" in str(e):
            raise ConfigError(
                f"classifier.feature_checkpoint={path} holds bare weights that record no architecture; save "
                "the network with Classifier.save (a .safetensors file with its .json), or use a "
                "ClassifierModule .ckpt"
            ) from e
        raise ConfigError(
            f"classifier.feature_checkpoint={path} cannot be read ({type(e).__name__}: {e}); point it at "
            "a good copy, or set it to null"
        ) from e
    return classifier.freeze()


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def prepare_classifier(
    config: ClassifierConfig | Mapping[str, Any],  # the `classifier` section
    datamodule: Any,  # has num_classes and a settable batch_size; trained on: train_labels(), loaders
    out_dir: str | Path,  # the run's classifier/ folder: the stage saves there, a resumed run looks there
    trainer_kwargs: Mapping[str, Any],  # the main run's pl.Trainer options (not modified)
    loggers: Sequence[Any],  # Lightning loggers for the stage's metrics; may be empty
) -> tuple[Classifier, dict[str, Any]]:
    """The frozen classifier and a description of where it came from (see the module docstring).

    Returns ``(classifier, metrics)`` with ``metrics`` one of:

    - ``{"source": checkpoint}`` for ``classifier.checkpoint``;
    - ``{"source": <out_dir>/classifier.safetensors, **classifier_metrics.json}`` for a
      classifier this run trained earlier;
    - ``{"source": <out_dir>/classifier.safetensors, "val_acc", "val_balanced_acc", "epochs",
      "seconds"}`` for one trained now.

    Training uses ``classifier.train.batch_size`` when set; the data module's batch size is
    restored afterwards, whatever happens. Problems with the config raise ConfigError.
    """
    if not isinstance(config, ClassifierConfig):
        config = ClassifierConfig.from_mapping(config)
    out_dir = Path(out_dir)
    saved = out_dir / "classifier.safetensors"

    if config.checkpoint:
        classifier = _build(config, datamodule.num_classes)
        metrics = {"source": str(config.checkpoint)}
        if config.calibrate:
            metrics.update(calibrate(classifier, datamodule))
        return classifier.freeze(), metrics

    if saved.is_file():
        log.info("using the classifier trained earlier in this run: %s", saved)
        classifier = Classifier.load(saved)
        metrics_file = out_dir / "classifier_metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return classifier.freeze(), {"source": str(saved), **metrics}

    classifier = _build(config, datamodule.num_classes)
    stage_kwargs = dict(trainer_kwargs)  # train_classifier keeps the options that apply to it
    if isinstance(stage_kwargs.get("strategy"), str):  # every classifier parameter gets a gradient
        stage_kwargs["strategy"] = stage_kwargs["strategy"].replace("_find_unused_parameters_true", "")
    log.info("training the classifier (%s) as its own stage", config.arch)
    train = config.train
    gan_batch = datamodule.batch_size
    datamodule.batch_size = int(train.batch_size or gan_batch)
    try:
        classifier, metrics = train_classifier(
            classifier,
            datamodule,
            out_dir,
            stage_kwargs,
            max_epochs=train.max_epochs,
            lr=train.lr,
            weight_decay=train.weight_decay,
            balanced_loss=train.balanced_loss,
            augment=train.augment,
            logger=list(loggers) or None,
            label_smoothing=train.label_smoothing,
            noise_std=train.noise_std,
            color_jitter=train.color_jitter,
        )
    finally:
        datamodule.batch_size = gan_batch
    metrics = {"source": str(saved), **metrics}
    if config.calibrate:
        metrics.update(calibrate(classifier, datamodule))
        if is_rank_zero():  # the saved classifier and its figures carry the temperature
            classifier.save(saved)
            atomic_write_json(out_dir / "classifier_metrics.json",
                              {k: v for k, v in metrics.items() if k != "source"})
    return classifier, metrics


def calibrate(
    classifier: Classifier,  # its temperature is set in place
    datamodule: Any,  # its val_dataloader() gives the held-out images
) -> dict[str, float]:
    """Fit the classifier's temperature on the validation split; returns the temperature and the
    expected calibration error and NLL before and after."""
    logits, labels = collect_logits(classifier, datamodule.val_dataloader())
    temperature = fit_temperature(logits, labels)
    classifier.temperature = temperature
    figures = {"temperature": temperature}
    for tag, t in (("before", 1.0), ("after", temperature)):
        probs = (logits / t).softmax(dim=1)
        figures[f"ece_{tag}"] = expected_calibration_error(probs, labels)
        figures[f"nll_{tag}"] = float(torch.nn.functional.cross_entropy(logits / t, labels))
    log.info("classifier temperature %.3f: expected calibration error %.4f -> %.4f, NLL %.4f -> %.4f",
             temperature, figures["ece_before"], figures["ece_after"], figures["nll_before"], figures["nll_after"])
    return figures
