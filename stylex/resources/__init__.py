"""The data files StylEx ships: the Hydra configs of training and the sources of the fused ops.

A source checkout keeps them at the top of the repository, ``configs/`` and ``custom_ops/``. A
wheel holds the same files as ``stylex/resources/configs/`` and ``stylex/resources/custom_ops/``:
``setup.py`` maps the two folders into this package when it builds, so git holds one copy. An
editable install (``pip install -e .``) imports ``stylex`` from the checkout and therefore finds
the top-level folders, like a checkout on ``sys.path`` does.

:func:`configs_dir` and :func:`custom_ops_dir` answer with the installed copy when there is one,
else with the checkout's. Both are real folders: Hydra and the C++ compiler read files, so a
zipped install (which pip never makes) is not supported.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS = "configs"
CUSTOM_OPS = "custom_ops"


def _candidates(name: str) -> list[Path]:
    """Where ``name`` can be: inside the installed package, then at the top of a checkout."""
    out = []
    installed = resources.files(__name__) / name
    if isinstance(installed, Path):  # an unpacked install, the only kind pip makes
        out.append(installed)
    out.append(Path(__file__).resolve().parents[2] / name)  # <checkout>/stylex/resources/__init__.py
    return out


def _find(name: str, marker: str) -> Path | None:
    return next((p for p in _candidates(name) if (p / marker).is_file()), None)


def configs_dir() -> Path:
    """The folder of the training configs (``train.yaml`` and its groups).

    Raises FileNotFoundError when neither the installed package nor a checkout has them.
    """
    found = _find(CONFIGS, "train.yaml")
    if found is None:
        tried = ", ".join(str(p) for p in _candidates(CONFIGS))
        raise FileNotFoundError(
            f"the StylEx training configs are missing (looked in {tried}). The installation is incomplete: "
            "reinstall stylex (pip install --force-reinstall stylex), or run from a source checkout."
        )
    return found


def custom_ops_dir() -> Path:
    """The folder of the fused ops' C++/CUDA sources.

    Never raises: when no copy is found it returns the installed location, and the build names
    the missing file (and ``$STYLEX_CUSTOM_OPS_DIR``) when it reads the sources.
    """
    return _find(CUSTOM_OPS, "stylex_ops.cpp") or _candidates(CUSTOM_OPS)[0]
