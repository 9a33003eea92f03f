"""Command-line front ends of training; ``train.py`` and the ``stylex-train`` console script
only call :func:`train_main` (explanations: :mod:`stylex.explain.cli`).

The configs come from :func:`stylex.resources.configs_dir`: the package's copy when StylEx is
installed, the checkout's ``configs/`` otherwise, so both commands work from any folder.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Sequence

from omegaconf import DictConfig

CONFIG_NAME = "train"
EXIT_USAGE = 2


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under @hydra.main
        return []


def compose_config(
    overrides: Sequence[str] = (),  # the command line's items: "dataset=retina", "trainer.max_steps=2000", ...
) -> DictConfig:
    """The training config ``stylex-train OVERRIDES`` would run, composed from the shipped configs.

    Example::

        from stylex import compose_config, train

        cfg = compose_config(["trainer.max_steps=200", "logger=csv"])
        run_dir = train(cfg)      # the run folder, as the command line prints it
    """
    from hydra import compose, initialize_config_dir

    from stylex.config import register
    from stylex.resources import configs_dir

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(configs_dir()), job_name="stylex"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def check_optional_packages(cfg: DictConfig) -> None:
    """Name an optional package the config needs but the environment lacks, with its install
    command, before training starts (instead of an import error from deep inside a logger)."""
    from stylex.errors import UsageError

    for name, logger in (cfg.get("logger") or {}).items():
        target = str(logger.get("_target_", "")) if isinstance(logger, DictConfig) else ""
        if target.endswith("TensorBoardLogger") and not any(
            importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX")
        ):
            raise UsageError(
                f"logger={name} needs the tensorboard package, which is not installed: "
                "pip install 'stylex[tensorboard]' (or choose logger=wandb, csv or none)"
            )


def run_training(cfg: DictConfig) -> None:
    """Train, then print the run folder as the last line (rank zero). Configuration and data
    errors end the program with their message and exit status 2, not a traceback."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from stylex.errors import UsageError
    from stylex.training.run import train
    from stylex.utils.dist import is_rank_zero

    logging.getLogger("stylex").setLevel(logging.INFO)
    try:
        check_optional_packages(cfg)
        run_dir = train(cfg, _overrides())
    except (UsageError, FileNotFoundError, MisconfigurationException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if is_rank_zero():
        print(run_dir.resolve(), flush=True)


def train_main() -> None:
    """``stylex-train [group=option ...] [key=value ...]`` and ``python train.py ...``: Hydra
    composes the config from the shipped configs and the command line (``--help``, ``--cfg job``
    and every other Hydra flag work), then :func:`run_training` runs it."""
    import hydra

    from stylex.config import register
    from stylex.resources import configs_dir

    try:
        folder = configs_dir()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    args = sys.argv[1:]
    if args in (["--help"], ["-h"]):
        # The help is a fixed text (its template shows no config values), so it is printed from
        # the YAML without registering the schemas, which import torch, Lightning and timm: a
        # second instead of many on a small machine. Hydra prints the same text.
        print(help_text(folder))
        return
    register()  # the schemas configs/ is built on
    if args and not any(a.startswith(("-", "hydra.", "+hydra.", "~hydra.")) for a in args):
        # Plain overrides: compose them once first, so that a value the schemas reject (a typed
        # loss.*, classifier.* or callbacks.* option, an unknown group option) gets the project's
        # one-line error and exit status 2 instead of Hydra's report (exit 1). Hydra's flags
        # (--help, --cfg, -m sweeps) and its own hydra.* settings go to Hydra unchanged.
        try:
            compose_config(args)
        except Exception as e:
            line = config_error_line(e)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
    hydra.main(version_base="1.3", config_path=str(folder), config_name=CONFIG_NAME)(run_training)()


def help_text(
    folder,  # the configs folder (stylex.resources.configs_dir())
) -> str:
    """``stylex-train --help``: the help template of the training config."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(folder / f"{CONFIG_NAME}.yaml").hydra.help.template)


def config_error_line(
    error: BaseException,  # what composing the command line's overrides raised
) -> str | None:  # one line for the user; None when it is no configuration error
    """Hydra's and OmegaConf's composition errors as one line naming the override."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(error, (HydraException, OmegaConfBaseException)):
        return None
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        detail = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
        if len(lines) > 1:  # Hydra's own hint (e.g. "To append to your config use +key=value") first
            return " ".join(lines) + f" ({detail[0]})"
        head = lines[0].removeprefix("Error merging override ") if lines else ""
        return f"{head}: {detail[0]}" + (f" ({detail[1]})" if len(detail) > 1 and "full_key" in detail[1] else "")
    if "Config search path" in str(error):  # an unknown group option: keep the options Hydra lists
        text = str(error).split("Config search path")[0]
        parts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return f"{parts[0]}; " + " ".join(parts[1:2]).rstrip(":") + ": " + ", ".join(parts[2:])
    return "; ".join(lines[:2])


def explain_main(
    argv: Sequence[str] | None = None,  # the options; None: sys.argv[1:]
    prog: str = "stylex-explain",
) -> int:
    """``stylex-explain``: AttFind (:mod:`stylex.explain.cli`), or with ``--dissect`` the GAN
    Dissection of the run (:mod:`stylex.dissect.cli`). Neither imports torch before parsing."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--dissect" in args:
        from stylex.dissect.cli import main as dissect_main

        try:
            return dissect_main(args, prog=prog)
        except SystemExit as e:  # argparse has printed its message
            return int(e.code or 0)
    from stylex.explain.cli import main as attfind_main

    return attfind_main(args, prog=prog)
