"""The Hydra schemas of the training config: where the defaults of ``configs/`` come from.

Every option's default lives once, in Python: the loss options in
:class:`~stylex.training.loss.LossConfig`, the classifier section in
:class:`~stylex.classifier.ClassifierConfig`, and each callback's options in its constructor's
signature (hydra-zen turns a signature into a structured config, ``_target_`` included). They
are stored in Hydra's ConfigStore under ``schema/``; the YAML files of ``configs/`` start from
them (``defaults: [/schema/...]``) and state only what a preset changes. So a Python user of
``ExplainCallback()`` and a command-line user of ``callbacks.explain.top_k`` get the same
default, Hydra checks the types of every override, and ``python train.py --cfg job`` prints
every value.

:func:`register` must run before a config is composed; importing :mod:`stylex.training.run`
or ``train.py`` does it.

The sections without a schema (``model``, ``trainer``, ``dataset``) compose whatever is written;
:func:`check_model` and :func:`check_arguments` (against the signature of ``pl.Trainer`` or of
the data module) check their types and ranges before a run does any work, and raise
:class:`~stylex.errors.ConfigError` naming the option.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Callable

from hydra.core.config_store import ConfigStore
from hydra_zen import builds

from stylex.errors import ConfigError

_registered = False


def callback_targets() -> dict[str, type]:
    """Schema name -> callback class, in the order ``configs/callbacks/default.yaml`` uses."""
    from stylex.dissect.callback import DissectCallback
    from stylex.explain.callback import ExplainCallback
    from stylex.training.callbacks import (
        EncoderFit,
        ExceptionCheckpoint,
        Exporter,
        FinalCheckpoint,
        SampleGrid,
        StepCheckpoint,
        Summary,
        Throughput,
    )
    from stylex.training.progress import StepProgressBar
    from stylex.training.quality import GeneratorQuality

    return {
        "progress_bar": StepProgressBar,
        "checkpoint": StepCheckpoint,
        "encoder_fit": EncoderFit,
        "samples": SampleGrid,
        "export": Exporter,
        "throughput": Throughput,
        "quality": GeneratorQuality,
        "summary": Summary,
        "final_checkpoint": FinalCheckpoint,
        "exception_checkpoint": ExceptionCheckpoint,
        "explain": ExplainCallback,
        "dissect": DissectCallback,
    }


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (once per process)."""
    global _registered
    if _registered:
        return
    from stylex.classifier import ClassifierConfig
    from stylex.training.loss import LossConfig

    store = ConfigStore.instance()
    store.store(group="schema", name="loss", node=LossConfig)
    store.store(group="schema", name="classifier", node=ClassifierConfig)
    for name, target in callback_targets().items():
        store.store(group="schema/callbacks", name=name, node=builds(target, populate_full_signature=True))
    _registered = True


# ---------------------------------------------------------------------------------------------
# Checks of the sections that have no schema: the model preset, the Trainer arguments and the
# data module's arguments. Hydra does not type these (any value composes), so the run checks
# them itself before any work, and says which option is wrong in the project's own words.
# ---------------------------------------------------------------------------------------------

_NO = object()  # "does not conform"


def _args(hint: Any) -> tuple:
    return typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def conform(
    value: Any,  # a plain value (OmegaConf containers already turned into dicts and lists)
    hint: Any,  # a type annotation: int, Optional[int], Union[...], Literal[...], list[int], ...
) -> Any:
    """``value`` as the annotation wants it, or ``_NO``.

    Whole floats become ints where an int is wanted (Hydra reads ``2e3`` as 2000.0), ints become
    floats where only a float is, and strings pass for paths. Types a config cannot hold
    (classes such as ``Accelerator``) accept only instances of themselves.
    """
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, typing.TypeVar):
        return value
    if hint is None or hint is type(None):
        return None if value is None else _NO
    if _is_union(hint):
        options = _args(hint)
        for option in options:  # an exact fit first: 1 stays an int in Union[int, float]
            if _exact(value, option):
                return value
        for option in options:
            out = conform(value, option)
            if out is not _NO:
                return out
        return _NO
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        for choice in _args(hint):
            if type(choice) is type(value) and choice == value:
                return value
        return _NO
    if origin in (list, tuple, Sequence, Iterable, set) or hint in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            return _NO
        inner = _args(hint)
        if not inner or (origin is tuple and len(inner) == 2 and inner[1] is Ellipsis):
            inner = inner[:1]
        if len(inner) != 1:
            return list(value)
        out = [conform(v, inner[0]) for v in value]
        return _NO if any(v is _NO for v in out) else out
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return dict(value) if isinstance(value, Mapping) else _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        return _NO
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _NO
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else _NO
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return value if isinstance(value, (str, PurePath)) else _NO
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _NO
    return value  # an annotation this check does not know: leave it to the callee


def _exact(value: Any, hint: Any) -> bool:
    if hint is type(None) or hint is None:
        return value is None
    if hint in (int, float, str, bool):
        return type(value) is hint
    return False


def describe(hint: Any) -> str:
    """An annotation in the user's words: ``Optional[int]`` -> "a whole number or null"."""
    if hint is None or hint is type(None):
        return "null"
    if _is_union(hint):
        parts, choices = [], []
        for option in _args(hint):
            if typing.get_origin(option) is typing.Literal:
                choices += [c for c in _args(option) if c not in choices]
                continue
            text = describe(option)
            if text and text not in parts:
                parts.append(text)
        if choices:
            parts.insert(0, "one of " + ", ".join(repr(c) for c in choices))
        if "null" in parts:  # "null" last reads best
            parts.remove("null")
            parts.append("null")
        return " or ".join(parts)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in _args(hint))
    if origin in (list, tuple, Sequence, Iterable, set) or hint in (list, tuple):
        inner = _args(hint)
        return f"a list of {_plural(describe(inner[0]))}" if inner else "a list"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "a path"
    if isinstance(hint, type):
        return ""  # classes (Accelerator, Profiler, ...) cannot be written in a config
    return str(hint)


def _plural(text: str) -> str:
    for one, many in (("a whole number", "whole numbers"), ("a number", "numbers"), ("a string", "strings")):
        text = text.replace(one, many)
    return text


def check_arguments(
    values: Mapping[str, Any],  # the section, as plain data
    target: Callable,  # the class or function the section's values are passed to
    section: str,  # the section as the user writes it, e.g. "trainer" or "dataset"
    skip: Sequence[str] = (),  # keys that are not arguments of ``target`` (e.g. "_target_", "name")
) -> dict[str, Any]:
    """Each value checked against ``target``'s signature: unknown keys (unless ``target`` takes
    ``**kwargs``) and values of the wrong type raise :class:`ConfigError` naming
    ``section.key``. Returns the values with whole floats turned into ints where ints are wanted
    (see :func:`conform`)."""
    init = target.__init__ if isinstance(target, type) else target
    signature = inspect.signature(init)
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    name = getattr(target, "__qualname__", str(target))
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key in skip:
            out[key] = value
            continue
        if key not in signature.parameters or key == "self":
            if open_ended:
                out[key] = value
                continue
            known = [k for k in signature.parameters if k != "self" and k not in skip]
            raise ConfigError(f"{section}.{key} is not an option of {name}; its options are {', '.join(known)}")
        hint = hints.get(key, signature.parameters[key].annotation)
        got = conform(value, hint)
        if got is _NO:
            wanted = describe(hint)
            raise ConfigError(f"{section}.{key} must be {wanted}, got {value!r}" if wanted else
                              f"{section}.{key}={value!r} cannot be given in a config")
        out[key] = got
    return out


def _whole(option: str, value: Any, minimum: int) -> int:
    got = conform(value, int)
    if got is _NO:
        raise ConfigError(f"{option} must be a whole number, got {value!r}")
    if got < minimum:
        raise ConfigError(f"{option} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {got}")
    return got


def _number(option: str, value: Any, positive: bool, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    got = conform(value, float)
    if got is _NO or not math.isfinite(got):
        raise ConfigError(f"{option} must be a finite number{' or null' if optional else ''}, got {value!r}")
    if positive and got <= 0:
        raise ConfigError(f"{option} must be > 0, got {value!r}")
    if got < 0:
        raise ConfigError(f"{option} must be >= 0, got {value!r}")
    return got


def check_model(
    model: Mapping[str, Any],  # the `model` section, resolved to plain data
) -> None:
    """The model preset's values (``model.*``): types and ranges the networks need, so that a
    wrong value stops the run before the data or the classifier stage; raises ConfigError."""
    resolution = _whole("model.resolution", model.get("resolution"), minimum=1)
    if resolution < 8 or resolution & (resolution - 1):
        raise ConfigError(f"model.resolution must be a power of two >= 8 (8, 16, 32, 64, ...), got {resolution}")
    batch = _whole("model.batch_size", model.get("batch_size"), minimum=1)
    if batch % min(4, batch):
        raise ConfigError(
            f"model.batch_size={batch} must be a multiple of 4 (the discriminator's minibatch-std groups)"
        )
    for key in ("z_dim", "w_dim", "mapping_layers", "channel_max"):
        _whole(f"model.{key}", model.get(key), minimum=1)
    base = _whole("model.channel_base", model.get("channel_base"), minimum=1)
    if base < resolution:
        raise ConfigError(
            f"model.channel_base={base} gives no channels at {resolution}x{resolution}; "
            f"use model.channel_base >= {resolution}"
        )
    _number("model.conv_clamp", model.get("conv_clamp"), positive=True, optional=True)
    _number("model.noise_init", model.get("noise_init"), positive=False, optional=True)
    _number("model.lr", model.get("lr"), positive=True)
    _number("model.class_gain", model.get("class_gain"), positive=True, optional=True)
    if model.get("encoder_latent", "w") not in ("w", "w+"):
        raise ConfigError(f"model.encoder_latent must be w or w+ (one latent for all style layers, or one per "
                          f"layer), got {model.get('encoder_latent')!r}")
    for key in ("encoder_noise", "noise_per_channel"):
        if not isinstance(model.get(key, False), bool):
            raise ConfigError(f"model.{key} must be true or false, got {model.get(key)!r}")
    if model.get("encoder_noise", False) and not float(model.get("noise_init") or 0.0) > 0:
        raise ConfigError("model.encoder_noise=true needs noise inputs that start above zero: add "
                          "model.noise_init=1 (at 0 no gradient reaches the encoder's noise maps)")
    for key in ("r1_gamma", "ema_kimg"):
        if key in model:
            _number(f"model.{key}", model[key], positive=False)
    if "r1_interval" in model:
        _whole("model.r1_interval", model["r1_interval"], minimum=0)
    if "ema_rampup" in model:
        _number("model.ema_rampup", model["ema_rampup"], positive=False, optional=True)
    if not isinstance(model.get("name", ""), str):
        raise ConfigError(f"model.name must be a string, got {model.get('name')!r}")
