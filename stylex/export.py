"""The export of a trained run: what explanations and dissection load.

A folder with two files, readable without the training code's pickles:

- ``model.safetensors``: tensors prefixed ``generator.`` (the EMA generator), ``encoder.`` and
  ``classifier.`` (a copy of the frozen classifier's weights, so the export is self-contained),
  and ``feature_classifier.`` when the run judged realism in a network of its own
  (``classifier.feature_checkpoint``), so that the explanation's KID reads the same features
  wherever the export is taken;
- ``stylex.json``: the format tag, the constructor arguments of the networks, class names,
  training counters and the run's resolved config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from stylex.utils.io import atomic_write, atomic_write_json

FORMAT = "stylex-export"
VERSION = 1
META_FILE = "stylex.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Export:
    """A loaded export: networks in eval mode, frozen."""

    generator: nn.Module
    encoder: nn.Module
    classifier: nn.Module
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    feature_classifier: nn.Module | None = None  # the run's realism network, when it had one

    @property
    def networks(self) -> list[nn.Module]:
        nets = [self.generator, self.encoder, self.classifier]
        return nets + ([self.feature_classifier] if self.feature_classifier is not None else [])

    @property
    def resolution(self) -> int:
        return int(self.meta["generator"]["resolution"])

    def to(self, device) -> "Export":
        for m in self.networks:
            m.to(device)
        return self


def _state(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_export(
    out_dir: str | Path,
    generator: nn.Module,  # the EMA generator
    generator_kwargs: dict[str, Any],
    encoder: nn.Module,
    encoder_kwargs: dict[str, Any],
    classifier: nn.Module,  # stylex.classifier.Classifier
    class_names: list[str],
    extra: dict[str, Any] | None = None,
    feature_classifier: nn.Module | None = None,  # stylex.classifier.Classifier that judged realism, if any
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/stylex.json`` atomically; returns out_dir."""
    out_dir = Path(out_dir)
    tensors = {**_state("generator", generator), **_state("encoder", encoder), **_state("classifier", classifier)}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "generator": dict(generator_kwargs),
        "encoder": dict(encoder_kwargs),
        "classifier": dict(classifier.config),
        "class_names": list(class_names),
        **(extra or {}),
    }
    if feature_classifier is not None:
        tensors.update(_state("feature_classifier", feature_classifier))
        meta["feature_classifier"] = dict(feature_classifier.config)
    atomic_write(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    atomic_write_json(out_dir / META_FILE, meta)
    return out_dir


def find_export(path: str | Path) -> Path:
    """The export folder for a run folder, an export folder or a file inside one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    candidates = [path, path / "export"] if path.is_dir() else [path.parent]
    for c in candidates:
        if (c / META_FILE).is_file():
            return c
    raise ValueError(
        f"{path} is not a StylEx export: no {META_FILE} in it"
        + (" or in its export/ folder" if path.is_dir() else "")
        + ". Pass a run folder made by train.py or its export/ folder."
    )


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> Export:
    """Load an export (or a run folder holding one) into eval-mode, frozen networks."""
    from stylex.classifier import Classifier
    from stylex.networks import Encoder, Generator

    folder = find_export(path)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / META_FILE} is not valid JSON ({e}); the export is damaged") from e
    if not isinstance(meta, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(meta), "null")
        raise ValueError(
            f"{folder / META_FILE} holds {kind}, not a JSON object of export fields; the export is damaged — "
            "export the run again"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META_FILE} is not a StylEx export (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(
            f"{folder} was written by a newer StylEx (export version {meta['version']} > {VERSION}); upgrade stylex"
        )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the export in {folder} is incomplete")
    missing = [k for k in ("generator", "encoder", "classifier", "class_names") if k not in meta]
    if missing:
        raise ValueError(f"{folder / META_FILE} lacks {missing}; the export is damaged — export the run again")
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(f"{weights} cannot be read ({e}); the export is damaged — export the run again") from e

    def part(prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    modules = {
        "generator": Generator(**meta["generator"]),
        "encoder": Encoder(**meta["encoder"]),
        "classifier": Classifier.from_config(meta["classifier"]),
    }
    if meta.get("feature_classifier"):  # exports of runs without a realism network have none
        modules["feature_classifier"] = Classifier.from_config(meta["feature_classifier"])
    for name, module in modules.items():
        try:
            module.load_state_dict(part(name))
        except RuntimeError as e:
            raise ValueError(f"the {name} weights in {weights} do not match its config in {META_FILE}: {e}") from e
        module.to(map_location).eval().requires_grad_(False)
        if hasattr(module, "freeze"):
            module.freeze()
    return Export(modules["generator"], modules["encoder"], modules["classifier"], list(meta["class_names"]), meta,
                  feature_classifier=modules.get("feature_classifier"))
