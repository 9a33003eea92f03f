"""What an explanation reads: the export of a run, the run's config and the images to explain.

- :func:`resolve_export`: the export folder (and run folder) named by ``--run``,
  ``--checkpoint`` or, by default, the latest run under ``--runs-root``;
- :func:`run_config`: the run's resolved training config (from the export, else
  ``<run>/config.yaml``);
- :func:`load_image_files`: image files decoded to the model's resolution;
- :func:`validation_images`: a spread-out sample of the run's validation split, rebuilt from its
  dataset config.

Problems the user can fix (a missing run, a file that is not an export or not an image, a data
set that cannot be rebuilt) raise :class:`~stylex.errors.UsageError` naming the option and the
remedy; the messages speak in ``explain.py``'s option names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stylex.errors import UsageError
from stylex.utils.runs import find_latest_run


# ============================================================================ the export
def latest_export_run(
    runs_root: str | Path,  # where train.py puts runs: <runs_root>/<dataset>/<timestamp>/
) -> Path:
    """The newest run folder ``<runs_root>/*/*`` that holds an export."""
    from stylex.export import META_FILE

    return find_latest_run(
        runs_root, f"export/{META_FILE}",
        remedy="Train one with `python train.py`, or pass --run <run folder> or --checkpoint <export file>.",
    )


def resolve_export(
    run: Path | None,  # --run: a run folder made by train.py
    checkpoint: Path | None,  # --checkpoint: a file of an export
    runs_root: Path,  # where to look for the latest run when neither is given
) -> tuple[Path, Path | None]:  # (export folder, run folder or None)
    """The export to explain, from ``--run`` / ``--checkpoint`` / the latest run."""
    from stylex.export import find_export

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise UsageError(f"--checkpoint {path}: no such file")
        if path.suffix == ".ckpt":
            raise UsageError(
                f"--checkpoint {path} is a training checkpoint, not a StylEx export. Explanations read "
                "the export a run writes at the end of training: pass --run <run folder> or "
                "--checkpoint <run>/export/model.safetensors."
            )
    else:
        path = Path(run) if run is not None else latest_export_run(runs_root)
        if not path.exists():
            raise UsageError(f"--run {path}: no such folder")
    try:
        export_dir = find_export(path)
    except (FileNotFoundError, ValueError) as e:
        option = "--checkpoint" if checkpoint is not None else "--run"
        raise UsageError(f"{option}: {e}") from e
    run_dir = export_dir.parent if export_dir.name == "export" else None
    return export_dir, run_dir


def run_config(
    meta: dict[str, Any],  # the export's metadata (stylex.json)
    run_dir: Path | None,
) -> dict[str, Any]:
    """The run's resolved config: from the export, else from ``<run>/config.yaml``."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return {}


def realism_network(
    config: dict[str, Any],  # the run's resolved config (run_config)
    say: Any = None,  # callable for a note when the network is named but cannot be loaded
    export: Any = None,  # the loaded Export: its own copy of the network wins over the file
) -> torch.nn.Module | None:
    """The run's ``classifier.feature_checkpoint`` network, which judged realism in training, so
    that the explanation's KID is read in the same features; None when the run had none. The
    export's copy is used when it carries one; otherwise the file named in the config, and when
    that is gone or unreadable (with a note) the explained classifier's features."""
    own = getattr(export, "feature_classifier", None)
    if own is not None:
        return own
    path = (config.get("classifier") or {}).get("feature_checkpoint")
    if not path:
        return None
    from stylex.classifier import load_feature_classifier
    from stylex.errors import ConfigError

    try:
        return load_feature_classifier({"feature_checkpoint": path})
    except ConfigError as e:
        if say is not None:
            say(f"note: the KID figures use the explained classifier's features: {e}")
        return None


# ============================================================================ images
def load_image_files(
    paths: Sequence[Path],
    resolution: int,
) -> torch.Tensor:  # [N, 3, R, R] in [-1, 1]
    """Decode, centre-crop and resize image files; an unreadable file is a UsageError."""
    from stylex.data.folder import load_image

    out = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"--image {path} is a folder; give image files (--image a.png --image b.png, or a "
                             f"shell glob such as --image {path}/*.png)")
        if not path.is_file():
            raise UsageError(f"--image {path}: no such file")
        try:
            arr = load_image(path, resolution)
        except Exception as e:  # PIL raises many kinds of error for a damaged or foreign file
            raise UsageError(f"--image {path}: cannot read it as an image ({type(e).__name__}: {e})") from e
        out.append(torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def validation_images(
    config: dict[str, Any],  # the run's config
    count: int,
    resolution: int,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:  # images [N, 3, R, R], per-image info
    """A spread-out sample of the run's validation split, rebuilt from its dataset config."""
    from hydra.utils import instantiate

    from stylex.data.base import spread_indices

    dcfg = dict(config.get("dataset") or {})
    if "_target_" not in dcfg:
        raise UsageError("the run's config has no dataset section, so its validation split cannot be rebuilt; "
                         "pass --image <file> or --source generated")
    name = dcfg.pop("name", "dataset")
    if dcfg.get("resolution") not in (None, resolution):
        dcfg["resolution"] = resolution
    if dcfg["_target_"].endswith("SyntheticDataModule"):
        # Every split draws from its own random stream: a tiny training split leaves the
        # validation scenes unchanged and saves rendering thousands of images.
        dcfg["num_train"] = 16
    try:
        dm = instantiate(dcfg)
        dm.setup("validate")
    except Exception as e:  # missing files, moved folders, ...: the user's to fix
        raise UsageError(f"cannot rebuild the validation split of dataset '{name}' ({type(e).__name__}: {e}); "
                         "pass --image <file> or --source generated") from e
    ds = dm.val_dataset
    idx = spread_indices(len(ds), count)
    samples = [ds[i] for i in idx]
    info = [{"source": f"{name}/val:{i}", "label": int(s["label"])} for i, s in zip(idx, samples)]
    return torch.stack([s["image"] for s in samples]), info
