"""Reading classifier checkpoints, in every format :meth:`Classifier.load` accepts.

:func:`read_checkpoint` returns the weights (CPU tensors, keys as :class:`Classifier` names
them: ``model.<timm key>``) and the classifier config recorded with them, or ``None`` when the
file records none. Accepted files:

- ``.safetensors`` written by :meth:`Classifier.save`: the config comes from the ``.json``
  sidecar, else from the safetensors header (under :data:`METADATA_KEY`);
- a Lightning ``.ckpt`` of ``ClassifierModule``: weights under ``classifier.``, config in the
  ``classifier_config`` hyper-parameter;
- a torch state dict (``torch.save(model.state_dict())``), of the timm model or of a
  :class:`Classifier`, possibly wrapped by DDP (``module.``) or torch.compile (``_orig_mod.``);
  it records no config.

This module knows nothing of the :class:`Classifier` class itself (``model.py`` imports from
here, never the reverse), so reading a file never builds a network.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# Name under which Classifier.save also embeds the config in the safetensors header, so that the
# weights file alone is enough to rebuild the classifier if its .json sidecar gets lost.
METADATA_KEY = "stylex_classifier_config"


def plain_data(value: Any) -> Any:
    """``value`` with mappings turned into dicts and sequences into lists (e.g. OmegaConf nodes).

    Lives here, the package's lowest layer, because checkpoints, the model and the config
    building all need it.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain_data(v) for v in value]
    return value


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
        return _normalise_keys(state), (plain_data(config) if config is not None else None)

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
        text = (f.metadata() or {}).get(METADATA_KEY)
    return json.loads(text) if text else None
