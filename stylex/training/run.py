"""``train(cfg)``: one StylEx run from a composed config, start to finish.

Stages: check the config → data → classifier (loaded, or trained as its own short stage) →
StylEx fit (the callbacks of ``cfg.callbacks`` write samples, checkpoints, the export, the
summary and the explanation) → loggers closed. Everything lands in one run folder::

    <runs_root>/<dataset>/<timestamp>/
        config.yaml          the resolved config (resuming reads it back)
        overrides.yaml       the command-line overrides of each train.py invocation on the run
        classifier/          classifier.safetensors + .json, classifier_metrics.json
        checkpoints/         last.ckpt, periodic step checkpoints (atomic writes), on_exception.ckpt
        samples/             image grids: real | reconstruction | samples per class
        logs/                W&B (offline by default), CSV or TensorBoard
        export/              model.safetensors + stylex.json, loaded by explain.py
        explain/             AttFind report (report.html, explanation.json, panels, GIFs)
        summary.json         final figures

The module (``cfg.module``), the data, the loggers and every callback come from the config
through ``hydra.utils.instantiate``; this file only checks the config and orders the stages.

Everything that can be refused is refused before the run folder exists: the config's values,
the data, the classifier checkpoint, the folder itself. A resumed run changes nothing in its
folder until the same checks have passed. Failures a user can act on (a full disk, training
that diverged, a damaged file) reach the command line as :class:`~stylex.errors.UsageError`.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytorch_lightning as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import WandbLogger

from stylex import ops
from stylex.config import check_arguments, check_model, register
from stylex.errors import ConfigError, RunError, UsageError, disk_full_error, is_disk_full
from stylex.ops.dispatch import IMPLS
from stylex.networks import Generator
from stylex.networks.encoder import complete_kwargs
from stylex.utils.dist import is_rank_zero
from stylex.utils.io import atomic_write_text
from stylex.utils.loggers import finish, wandb_identity
from stylex.utils.runs import find_latest_run as _find_latest_run
from stylex.utils.runs import latest_run

log = logging.getLogger("stylex")
register()  # the schemas of configs/ must be in Hydra's store before any config is composed

RUN_DIR_ENV = "STYLEX_RUN_DIR"  # lets every DDP rank agree on the run folder chosen by rank zero
SWEEP_JOB_ENV = "STYLEX_SWEEP_JOB"  # the -m sweep job whose DDP group a process was started for
CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
CHECKPOINTS = "checkpoints"
CONFIG_GROUPS = ("dataset", "model", "classifier", "loss", "trainer", "logger", "callbacks", "experiment")
# Groups a resumed run may switch (logger=csv); the others fix what the checkpoint was trained on.
RESUMABLE_GROUPS = ("trainer", "loss", "logger", "callbacks")
# Sections whose values a resumed run keeps from its saved config, whatever the command line says.
KEPT_SECTIONS = ("model", "dataset", "classifier", "module")
# Sections a resumed run takes from today's composition where its saved config lacks an option;
# those of named entries take new options of the entries they have (and new callbacks).
RESUMABLE_SECTIONS = ("trainer", "loss", "module")
NAMED_ENTRY_SECTIONS = ("logger", "callbacks")
# Trainer arguments the run sets itself.
RUN_TRAINER_ARGS = ("logger", "callbacks", "plugins", "default_root_dir")
# trainer.* options that are StylEx's own, not pl.Trainer arguments.
OWN_TRAINER_OPTIONS = ("threads",)
# Strategies whose DDP wrapper must tolerate parameters without gradient: a GAN step updates the
# discriminator and the generator in separate backward passes.
_DDP_FIX = {"ddp": "ddp_find_unused_parameters_true", "ddp_spawn": "ddp_spawn_find_unused_parameters_true",
            "ddp_fork": "ddp_fork_find_unused_parameters_true"}


# ---------------------------------------------------------------------------------------- run folder
def find_latest_run(runs_root: str | Path) -> Path:
    """The run under ``runs_root`` whose newest checkpoint is newest (``resume=last``): its
    ``last.ckpt``, or the ``on_exception.ckpt`` of a run that crashed before its first one."""
    run = latest_run(runs_root, f"{CHECKPOINTS}/*.ckpt")
    return run or _find_latest_run(runs_root, "checkpoints/last.ckpt", context="resume=last", error=ConfigError)


def resolve_resume(resume: str, runs_root: str | Path) -> tuple[Path, Path | None]:
    """(run folder, the checkpoint file ``resume`` names, or None) for
    ``resume=<run folder | checkpoint file | last>``."""
    if resume == "last":
        return find_latest_run(runs_root), None
    p = Path(resume)
    if p.is_file():
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS else p.parent
        return run_dir, p
    if p.is_dir():
        folder = p / CHECKPOINTS
        if not any(folder.glob("*.ckpt")):
            raise ConfigError(
                f"resume={resume}: {folder / 'last.ckpt'} does not exist and {folder} holds no other checkpoint; "
                "is this a run folder made by train.py?"
            )
        return p, None
    raise ConfigError(f"resume={resume}: no such run folder or checkpoint file")


def _checkpoint_step(path: Path) -> int:
    """The global step recorded in a Lightning checkpoint; raises when the file does not load."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "state_dict" not in state or "global_step" not in state:
        raise ValueError("not a Lightning checkpoint of a StylEx run")
    return int(state["global_step"])


def _why(error: BaseException) -> str:
    """``Type: message`` in one line: the first line, cut after its first sentence when long."""
    lines = str(error).strip().strip("'\"").splitlines()
    text = lines[0] if lines else ""
    if len(text) > 120 and ". " in text:
        text = text[: text.index(". ") + 1]
    return f"{type(error).__name__}: {text}".rstrip(": ")


_STEP_FILE = re.compile(r"^step(\d+)(-v\d+)?\.ckpt$")


def choose_checkpoint(
    run_dir: Path,  # the run folder
    named: Path | None = None,  # a checkpoint the user named (resume=<file>); None: the newest
    option: str = "resume",  # how the user asked, for the messages (e.g. "resume=last")
) -> Path:
    """The checkpoint a resumed run continues from: ``named`` if it loads, else the checkpoint of
    ``<run>/checkpoints`` with the highest global step that loads (``last.ckpt`` on a tie).
    Logs which one it took and why it passed over the others; raises ConfigError when none
    loads. Reads files only."""
    if named is not None:
        try:
            step = _checkpoint_step(named)
        except Exception as e:
            raise ConfigError(
                f"{option}: {named} cannot be read ({_why(e)}); name another checkpoint of "
                f"{named.parent}, or give the run folder to take the newest one that loads"
            ) from e
        log.info("resuming from %s (step %d)", named, step)
        return named
    folder = run_dir / CHECKPOINTS
    files = sorted(p for p in folder.glob("*.ckpt") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise ConfigError(
            f"{option}: {folder / 'last.ckpt'} does not exist and {folder} holds no other checkpoint; "
            "is this a run folder made by train.py?"
        )
    # Files whose name gives no step are read first; step files newest first, and only while
    # they could still beat what was found.
    unnamed = [p for p in files if not _STEP_FILE.match(p.name)]
    named_steps = sorted(((int(_STEP_FILE.match(p.name).group(1)), p) for p in files if _STEP_FILE.match(p.name)),
                         key=lambda t: -t[0])
    found: list[tuple[int, int, Path]] = []  # (step, preference, path)
    damaged: list[str] = []

    def consider(path: Path) -> None:
        try:
            step = _checkpoint_step(path)
        except Exception as e:
            damaged.append(f"{path.name} ({_why(e)})")
            log.warning("not resuming from %s: it cannot be read (%s)", path, _why(e))
            return
        found.append((step, 2 if path.name == "last.ckpt" else 1 if not _STEP_FILE.match(path.name) else 0, path))

    for path in unnamed:
        consider(path)
    for step, path in named_steps:
        best = max((f[0] for f in found), default=-1)
        if step <= best:  # neither it nor an older one can be newer than what loaded
            break
        consider(path)
    if not found:
        raise ConfigError(
            f"{option}: no checkpoint in {folder} can be read ({'; '.join(damaged)}); the run cannot be "
            "resumed. Start a new run, or restore a checkpoint from a copy."
        )
    step, _, chosen = max(found, key=lambda f: (f[0], f[1], f[2].stat().st_mtime))
    others = [f"{p.name} (step {s})" for s, _, p in found if p != chosen]
    log.info("resuming from %s (step %d, the newest checkpoint that loads%s)", chosen, step,
             f"; older: {', '.join(others)}" if others else "")
    return chosen


def new_run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    base = Path(cfg.runs_root) / str(cfg.dataset.get("name", "run")) / time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir, k = base, 1
    while run_dir.exists():
        run_dir, k = base.with_name(f"{base.name}_{k}"), k + 1
    return run_dir


def _parse_overrides(overrides: Sequence[str]) -> list:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # hydra's OverrideParseException; Hydra itself refuses these earlier
        raise ConfigError(f"cannot read the overrides {list(overrides)}: {e}") from e


def _composed_value(cfg: DictConfig, key: str, parsed: Any) -> Any:
    """The value Hydra composed for ``key`` (typed by the schemas, interpolations kept as
    written), or the override's own parsed value when the composition lacks the key."""
    parent, leaf = _parent(cfg, key)
    if isinstance(parent, DictConfig) and leaf in parent:
        return OmegaConf.to_container(parent, resolve=False)[leaf]
    return parsed


def _parent(config: DictConfig, key: str) -> tuple[Any, str]:
    parent_key, _, leaf = key.rpartition(".")
    return (OmegaConf.select(config, parent_key) if parent_key else config), leaf


def _has(config: DictConfig, key: str) -> bool:
    parent, leaf = _parent(config, key)
    return isinstance(parent, DictConfig) and leaf in parent


def _delete(config: DictConfig, key: str) -> None:
    parent, leaf = _parent(config, key)
    if isinstance(parent, DictConfig) and leaf in parent:
        del parent[leaf]


def _deleted_before(run_dir: Path) -> set[str]:
    """Keys the run's earlier command lines deleted (``~callbacks.samples``)."""
    record = run_dir / OVERRIDES_FILE
    if not record.is_file():
        return set()
    try:
        entries = OmegaConf.to_container(OmegaConf.load(record))
        items = [o for entry in entries or [] for o in (entry.get("overrides") or [])]
        return {o.key_or_group for o in _parse_overrides(items) if o.is_delete()}
    except Exception:  # a damaged record only loses this refinement
        return set()


def _same_target(a: Any, b: Any) -> bool:
    return isinstance(a, dict) and isinstance(b, dict) and a.get("_target_") == b.get("_target_")


def _with_new_options(saved: DictConfig, current: dict) -> None:
    """Give ``saved`` the options added since the run was made, with today's defaults; the
    saved values and the saved choice of loggers win."""
    for key, value in current.items():
        if key not in saved:
            saved[key] = value
    for section in RESUMABLE_SECTIONS:
        if isinstance(current.get(section), dict) and section in saved:
            saved[section] = OmegaConf.merge(current[section], saved[section] or {})
    for section in NAMED_ENTRY_SECTIONS:
        mine = OmegaConf.to_container(saved.get(section) or OmegaConf.create({}), resolve=False)
        theirs = current.get(section) or {}
        merged: dict[str, Any] = {}
        for name, entry in theirs.items():
            if name in mine:
                merged[name] = OmegaConf.merge(entry, mine[name]) if _same_target(entry, mine[name]) else mine[name]
            elif section == "callbacks":
                merged[name] = entry  # a callback added since; loggers stay the run's choice
        for name, entry in mine.items():
            merged.setdefault(name, entry)
        saved[section] = merged


def apply_resume(cfg: DictConfig, overrides: Sequence[str]) -> tuple[DictConfig, Path | None, Path | None]:
    """For ``resume=...``: the run's saved config with this command's overrides on top, and the
    checkpoint to continue from (:func:`choose_checkpoint`).

    The saved config wins: its config-group choices (the logger, above all) and its values.
    Options added to ``trainer``, ``loss``, ``callbacks``, ``logger`` and ``module`` since the run
    was made take today's defaults. This command's overrides apply as Hydra composed them
    (``trainer.max_steps=2e3`` is the number 2000.0; ``~key`` deletes ``key``); its group choices
    for ``trainer``, ``loss``, ``logger`` and ``callbacks`` replace those sections. The dataset,
    model and classifier stay the run's: a group choice or value for them is an error rather than
    a silent change of what is being trained.
    """
    if not cfg.get("resume"):
        return cfg, None, None
    option = f"resume={cfg.resume}"
    run_dir, named = resolve_resume(str(cfg.resume), cfg.runs_root)
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        raise ConfigError(f"{option}: {saved_file} is missing, so the run's settings are unknown")
    try:
        saved = OmegaConf.load(saved_file)
    except Exception as e:
        raise ConfigError(f"{option}: {saved_file} cannot be read ({_why(e)})") from e
    if not isinstance(saved, DictConfig):
        raise ConfigError(f"{option}: {saved_file} does not hold a run's config")

    parsed = [o for o in _parse_overrides(overrides)
              if not o.key_or_group.startswith("hydra") and o.key_or_group not in ("resume", "run_dir")]
    groups = []
    for o in parsed:
        key, item = o.key_or_group, o.input_line
        if key in CONFIG_GROUPS or "/" in key:
            if key in RESUMABLE_GROUPS and o.package is None and not o.is_delete():
                groups.append(key)
                continue
            raise ConfigError(
                f"'{item}': a resumed run keeps its config groups for the dataset, model, classifier and "
                f"experiment; switch only {', '.join(f'{g}=' for g in RESUMABLE_GROUPS)}, override single "
                "values (e.g. trainer.max_steps=2000), or start a new run without resume="
            )
        if key.split(".")[0] in KEPT_SECTIONS:
            raise ConfigError(
                f"'{item}': a resumed run keeps its model, data and classifier (the checkpoint was trained "
                "with them); resume with trainer., loss., callbacks. or logger. overrides, or start a new run"
            )

    current = OmegaConf.to_container(cfg, resolve=False)
    deleted = {key for key in _deleted_before(run_dir) if not _has(saved, key)}
    _with_new_options(saved, current)
    for key in deleted:  # what the run's own command lines deleted stays deleted
        _delete(saved, key)
    for group in groups:  # logger=csv on the resume line: the section as composed now
        saved[group] = current[group]
    for o in parsed:
        key = o.key_or_group
        if key in groups:
            continue
        if o.is_delete():
            _delete(saved, key)
        else:
            OmegaConf.update(saved, key, _composed_value(cfg, key, o.value()), merge=False, force_add=True)
    saved.resume = str(cfg.resume)
    ckpt = choose_checkpoint(run_dir, named, option)
    max_steps = OmegaConf.select(saved, "trainer.max_steps", default=None)
    if isinstance(max_steps, int) and max_steps > 0:
        step = _checkpoint_step(ckpt)
        if step >= max_steps:  # Lightning would stop at once, skipping the end of training
            raise ConfigError(
                f"{option}: the run is at step {step} already, which reaches trainer.max_steps={max_steps}; "
                f"give a larger trainer.max_steps to continue it (e.g. trainer.max_steps={step + max(1, step // 2)})"
            )
    return saved, run_dir, ckpt


# ---------------------------------------------------------------------------------------- checks
def _check_top_level(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {seed!r}")
    impl = cfg.get("ops_impl", "auto")
    if impl not in IMPLS:
        raise ConfigError(f"ops_impl={impl!r} is not one of {', '.join(IMPLS)}")
    for key in ("runs_root", "run_dir", "resume"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{key} must be a path, got {value!r}")
    if not cfg.get("runs_root"):
        raise ConfigError("runs_root must be a folder, e.g. runs_root=runs")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notes ("GPU available: ...") belong to the real Trainer only."""
    names = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
             "lightning_fabric.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_trainer(cfg: DictConfig) -> None:
    """``trainer.*``: pl.Trainer arguments of the right types and ranges, and a Trainer that can
    be built from them (an unknown strategy, a GPU that is not there), before any work."""
    accepted = set(inspect.signature(pl.Trainer).parameters)
    unknown = sorted(set(cfg.trainer) - accepted - set(OWN_TRAINER_OPTIONS))
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]} is not a pytorch_lightning.Trainer argument")
    own = sorted(set(cfg.trainer) & set(RUN_TRAINER_ARGS))
    if own:
        raise ConfigError(f"trainer.{own[0]} is set by train.py itself; remove it (loggers: logger=..., "
                          "callbacks: callbacks.<name>=...)")
    threads = cfg.trainer.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"trainer.threads must be a whole number >= 1 or null (automatic), got {threads!r}")
    values = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in OWN_TRAINER_OPTIONS:
        values.pop(key, None)
    checked = check_arguments(values, pl.Trainer, "trainer")
    for key, value in checked.items():
        if type(value) is not type(values[key]) or value != values[key]:
            cfg.trainer[key] = value  # 2e3 -> 2000: Lightning wants a whole number
    for key, low in (("max_steps", -1), ("max_epochs", -1), ("min_steps", 0), ("min_epochs", 0), ("num_nodes", 1),
                     ("accumulate_grad_batches", 1), ("log_every_n_steps", 0), ("num_sanity_val_steps", -1),
                     ("check_val_every_n_epoch", 1), ("reload_dataloaders_every_n_epochs", 0)):
        value = checked.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"trainer.{key} must be >= {low}, got {value}")
    for key in ("val_check_interval", "limit_train_batches", "limit_val_batches", "overfit_batches"):
        value = checked.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"trainer.{key} must be >= 0, got {value}")
    if str(cfg.trainer.get("precision")) in ("16", "16-mixed", "16-true"):
        raise ConfigError(
            "trainer.precision=16-mixed is not supported (three optimisers and lazy regularisation do not "
            "fit one gradient scaler); use trainer.precision=bf16-mixed or 32-true"
        )
    if int(cfg.trainer.get("num_nodes") or 1) > 1 and not cfg.get("run_dir") and not cfg.get("resume"):
        raise ConfigError("trainer.num_nodes > 1 needs run_dir=<a folder every node can reach>")
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    kwargs = trainer_kwargs(cfg)
    kwargs.pop("enable_checkpointing", None)
    try:
        with _quiet_lightning():
            pl.Trainer(**kwargs, logger=False, callbacks=[], enable_checkpointing=False)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"trainer: {_why(e).partition(': ')[2] or _why(e)} (see trainer.accelerator, "
                          "trainer.devices, trainer.strategy and the other trainer options)") from e


def _check_dataset(cfg: DictConfig) -> None:
    """``dataset.*``: arguments of the data module of the right types, and a data module that
    accepts them (nothing is read or generated yet)."""
    section = OmegaConf.to_container(cfg.dataset, resolve=True)
    target = section.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception as e:
        raise ConfigError(f"dataset._target_={target!r} is not a data module class ({_why(e)})") from e
    checked = check_arguments(section, cls, "dataset", skip=("_target_", "name"))
    checked.pop("_target_", None)
    checked.pop("name", None)
    try:
        cls(**checked)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"dataset={section.get('name', target)}: {e}") from e


def _check_loggers(cfg: DictConfig) -> None:
    """``logger.*``: logger classes that exist, arguments of the right types, and W&B
    credentials when it is to log online."""
    for name, entry in (cfg.get("logger") or {}).items():
        lcfg = OmegaConf.to_container(entry, resolve=True)
        if not isinstance(lcfg, dict) or "_target_" not in lcfg:
            raise ConfigError(f"logger.{name} must be a logger with a _target_, got {lcfg!r}")
        try:
            cls = get_class(str(lcfg["_target_"]))
        except Exception as e:
            raise ConfigError(f"logger.{name}._target_={lcfg['_target_']!r} is not a logger class ({_why(e)})") from e
        check_arguments(lcfg, cls, f"logger.{name}", skip=("_target_", "save_dir"))
        if issubclass(cls, WandbLogger):
            _check_wandb(lcfg)


def _check_run_folder(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> None:
    """The run folder can be made and written: the nearest folder that exists on its path is a
    folder, and writable. A new run never starts in a folder that holds another run's generator
    checkpoints or export (it would overwrite them); a classifier trained there is reused."""
    option = "run_dir" if cfg.get("run_dir") else "resume" if cfg.get("resume") else "runs_root"
    given = cfg.get(option) if option != "resume" else str(run_dir)
    if not resuming and is_rank_zero() and run_dir.is_dir():
        held = sorted(p.name for p in (run_dir / CHECKPOINTS).glob("*.ckpt")) if (run_dir / CHECKPOINTS).is_dir() else []
        held += ["export"] if (run_dir / "export").is_dir() else []
        if held:
            raise ConfigError(
                f"{option}={given}: {run_dir} already holds a run ({', '.join(held[:3])}"
                f"{', ...' if len(held) > 3 else ''}), which a new run would overwrite; continue it with "
                f"resume={run_dir}, or give a run_dir= that is new"
            )
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{option}={given}: {probe} is a file, not a folder; point {option}= at a folder")
    if not probe.exists():
        raise ConfigError(f"{option}={given}: {probe} cannot be made into the run folder; point {option}= elsewhere")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option}={given}: {probe} is not writable, so the run folder {run_dir} cannot be made or written; "
            f"point {option}= at a folder you can write"
        )


def check(cfg: DictConfig) -> tuple[Any, Any, list[pl.Callback]]:
    """Everything that can be refused before work starts (before a classifier stage is trained
    only to find the GAN stage cannot start): every value's type and range, the Trainer, the data
    module's arguments, the loss, the classifier section and the callbacks. Returns the checked
    loss and classifier configs and the callbacks; resolves ``loss.perceptual_backend=auto`` and
    ``loss.augment=auto`` in ``cfg`` so that a resumed run uses what it was trained with."""
    from stylex.classifier import ClassifierConfig
    from stylex.training.loss import LossConfig
    from stylex.training.perceptual import resolve_backend

    from omegaconf.errors import MissingMandatoryValue

    _check_top_level(cfg)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e}".splitlines()[0] + " — set it on the command line, e.g. dataset.root=<folder>") from e
    except Exception as e:  # an interpolation that does not resolve, or a value of the wrong type behind one
        raise ConfigError(f"{e}".splitlines()[0]) from e
    check_model(OmegaConf.to_container(cfg.model, resolve=True))
    _check_trainer(cfg)
    try:
        loss = LossConfig.coerce(OmegaConf.to_container(cfg.loss, resolve=True))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from e
    if loss.perceptual > 0:
        loss.perceptual_backend = cfg.loss.perceptual_backend = resolve_backend(loss.perceptual_backend)
    if loss.augment == "auto":  # ADA is for limited data; a generated dataset is not limited
        generated = bool(getattr(get_class(cfg.dataset._target_), "generated", False))
        loss.augment = cfg.loss.augment = "none" if generated else "ada"
    classifier = ClassifierConfig.from_mapping(OmegaConf.to_container(cfg.classifier, resolve=True))
    _check_dataset(cfg)
    _check_loggers(cfg)
    return loss, classifier, build_callbacks(cfg)


def _check_data(cfg: DictConfig, dm: Any, classifier: Any, run_dir: Path) -> None:
    """The training split holds a batch for the GAN stage and for the classifier stage (when it
    will run), so that neither fails after the work before it."""
    n = len(dm.train_dataset)
    name = cfg.dataset.get("name", "the dataset")
    batch = int(cfg.model.batch_size)
    if n < batch:
        raise ConfigError(
            f"model.batch_size={batch} is larger than the {n} training images of dataset={name}; "
            f"set model.batch_size to at most {n} (a multiple of 4), or add data"
        )
    trains_classifier = not classifier.checkpoint and not (run_dir / "classifier" / "classifier.safetensors").is_file()
    stage_batch = int(classifier.train.batch_size or batch)
    if trains_classifier and n < stage_batch:
        raise ConfigError(
            f"classifier.train.batch_size={stage_batch} is larger than the {n} training images of "
            f"dataset={name}: the classifier stage would get no batch. Set classifier.train.batch_size={min(n, batch)} "
            "(or lower), or add data"
        )


def _check_classifier(classifier: Any, run_dir: Path) -> None:
    """``classifier.checkpoint`` loads (a damaged file is named now, not after the data), or the
    classifier a resumed run trained earlier does, or ``classifier.arch`` names a timm model; and
    ``classifier.feature_checkpoint``, when set, loads."""
    from stylex.classifier.checkpoint import read_checkpoint
    from stylex.classifier.model import check_arch

    if classifier.feature_checkpoint:  # the realism network: read now, before any stage runs
        from stylex.classifier import load_feature_classifier

        load_feature_classifier(classifier)
    own = run_dir / "classifier" / "classifier.safetensors"
    if not classifier.checkpoint and own.is_file():
        try:
            read_checkpoint(own)
        except Exception as e:
            raise ConfigError(
                f"the classifier this run trained earlier, {own}, cannot be read ({_why(e)}); the file is "
                "damaged. Delete it to train the classifier again, or set classifier.checkpoint= to a good copy"
            ) from e
        return
    if not classifier.checkpoint:
        if classifier.arch is None:
            raise ConfigError("classifier.arch is not set; name a timm model, e.g. classifier.arch=resnet18")
        try:
            check_arch(classifier.arch)
        except ValueError as e:
            raise ConfigError(f"classifier: {e}") from e
        return

    try:
        read_checkpoint(classifier.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"classifier: {e}") from e
    except Exception as e:  # safetensors' SafetensorError, torch's "PytorchStreamReader ... enforce fail"
        raise ConfigError(
            f"classifier.checkpoint={classifier.checkpoint} cannot be read ({_why(e)}); the file is damaged "
            "or not a classifier checkpoint. Point classifier.checkpoint= at a good copy, or set "
            "classifier.checkpoint=null to train a classifier"
        ) from e


# ---------------------------------------------------------------------------------------- builders
def build_datamodule(cfg: DictConfig):
    dcfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    dcfg.pop("name", None)
    return instantiate(dcfg, _convert_="all")


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in OWN_TRAINER_OPTIONS:
        kw.pop(key, None)
    if isinstance(kw.get("strategy"), str) and kw["strategy"] in _DDP_FIX:
        kw["strategy"] = _DDP_FIX[kw["strategy"]]
    return kw


def cpu_threads(cfg: DictConfig) -> int | None:
    """Intra-op CPU threads for this process: ``trainer.threads``, or when it is null (the
    default) the CPUs this process may run on divided by the processes the run starts on this
    machine, never more than PyTorch's own choice; None leaves PyTorch as it is (when
    ``OMP_NUM_THREADS`` is set, PyTorch follows it). Other work on the machine is not guessed at
    (a load average would count this very process too): measured on 2 cores, two training
    processes of 2 threads each took 22 s a step where each alone takes 2.2 s, and 2.6 s at 1
    thread each, so the README tells users of a shared machine to set ``trainer.threads=1``."""
    threads = cfg.trainer.get("threads")
    if threads is not None:
        return int(threads)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    devices = cfg.trainer.get("devices")
    local = devices if isinstance(devices, int) and devices > 0 else len(devices) if isinstance(devices, Sequence) \
        and not isinstance(devices, str) and len(devices) else 1
    return max(1, min(torch.get_num_threads(), cpus // local))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        lcfg = OmegaConf.to_container(lcfg, resolve=True)
        if issubclass(get_class(lcfg["_target_"]), WandbLogger):
            _check_wandb(lcfg)
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            ident = wandb_identity(str(cfg.dataset.name), run_dir)
            lcfg["name"] = lcfg.get("name") or f"{cfg.dataset.name}-{run_dir.name}"
            lcfg["id"] = lcfg.get("id") or ident["id"]
            lcfg["group"] = lcfg.get("group") or ident["group"]
            lcfg["job_type"] = lcfg.get("job_type") or "train"
            lcfg["resume"] = lcfg.get("resume") or "allow"  # a resumed run continues its W&B run
            if lcfg.get("offline", True):
                # Said to wandb.init itself: Lightning's WANDB_MODE variable is not read by a wandb
                # that an earlier run in this process has set up already.
                lcfg["mode"] = "offline"
            arch = OmegaConf.select(cfg, "classifier.arch", default=None)
            tags = [str(cfg.dataset.name), str(OmegaConf.select(cfg, "model.name", default="model"))]
            tags += [str(arch)] if arch else []
            lcfg["tags"] = list(dict.fromkeys([*tags, *(lcfg.get("tags") or [])]))
            # log_model: the export goes up as an artifact (training.callbacks.log_export_artifact),
            # offline too; Lightning's own log_model (checkpoints, online only) stays off.
            log_export = bool(lcfg.pop("log_model", False))
            logger = instantiate(lcfg, save_dir=str(run_dir / "logs"))
            logger.log_export = log_export
            loggers.append(logger)
            continue
        loggers.append(instantiate(lcfg, save_dir=str(run_dir / "logs")))
    for logger in loggers:  # the resolved config, once (the module and data modules log none)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers


def _check_wandb(lcfg: dict) -> None:
    """W&B must never prompt for a login or hang: online mode needs credentials up front."""
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = os.environ.get("WANDB_MODE")
    if lcfg.get("offline", True) or mode in ("offline", "disabled", "dryrun"):
        return
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and "api.wandb.ai" in (
        Path.home() / ".netrc"
    ).read_text()
    if not has_key:
        raise ConfigError(
            "logger.wandb.offline=false needs W&B credentials: set WANDB_API_KEY or run `wandb login` once. "
            "Without them keep the default offline mode (and `wandb sync` later) or use logger=csv."
        )


def network_kwargs(cfg: DictConfig, num_classes: int) -> tuple[dict, dict, dict]:
    """Generator, discriminator and encoder kwargs of the config's module for ``num_classes``."""
    m = OmegaConf.to_container(cfg.module, resolve=True)
    generator = {**m["generator"], "c_dim": num_classes}
    with torch.device("meta"):  # the layer count without allocating the weights
        g = Generator(**generator)
    return (generator, {**m["discriminator"], "c_dim": num_classes},
            complete_kwargs(m["encoder"], g.num_ws, g.noise_layers))


def build_module(
    cfg: DictConfig,
    num_classes: int,
    class_names: Sequence[str],
    classifier: torch.nn.Module,
    loss: Any = None,  # a checked LossConfig; None = cfg.loss
    info: dict[str, Any] | None = None,  # what the run records with the model (export, summary)
):
    """The LightningModule of ``cfg.module`` around the frozen ``classifier`` (and the realism
    network of ``classifier.feature_checkpoint``, when set)."""
    from stylex.classifier import load_feature_classifier

    # _partial_: the classifier and the checked loss reach the constructor as they are, not as config
    factory = instantiate(cfg.module, _partial_=True, _convert_="all")
    extra = {"loss": loss} if loss is not None else {}
    features = load_feature_classifier(OmegaConf.to_container(cfg.classifier, resolve=True)) if "classifier" in cfg else None
    if features is not None:
        extra["feature_classifier"] = features
    return factory(classifier=classifier, num_classes=num_classes, class_names=list(class_names), info=info, **extra)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Every ``cfg.callbacks`` entry with a ``_target_``, in config order; a progress bar only
    when ``trainer.enable_progress_bar`` is on."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            callback = instantiate(node)
        except Exception as e:  # hydra wraps the constructor's error; show the user the cause
            cause = e.__cause__ or e
            text = str(cause)
            raise ConfigError(f"callbacks.{text}" if text.startswith(f"{name} ") else f"callbacks.{name}: {text}") from e
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue
        callbacks.append(callback)
    return callbacks


# ---------------------------------------------------------------------------------------- train
def _sweep_job() -> str | None:
    """The job number of a ``-m`` sweep this process runs, or None outside a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        return str(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None
    except Exception:  # not under @hydra.main
        return None


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """Run a whole StylEx training from a composed config; returns the run folder.

    ``overrides`` are the command line's overrides: recorded in ``<run>/overrides.yaml``, and
    applied on top of the saved config when ``cfg.resume`` is set. Errors the user can act on
    (a full disk, a diverged step, a folder that cannot be written) are raised as
    :class:`~stylex.errors.UsageError`.
    """
    from stylex.training.module import NonFiniteGradientError

    overrides = list(overrides)
    env_dir = os.environ.get(RUN_DIR_ENV)
    job = _sweep_job()
    started_for = os.environ.get(SWEEP_JOB_ENV)
    if env_dir and job is not None and started_for is not None and started_for != job:
        # A DDP rank that Lightning started (with the sweep's command line) for another job of
        # the sweep: that job's group is done, and this job starts a group of its own.
        return Path(env_dir)
    cfg, resume_dir, ckpt = apply_resume(cfg, overrides)
    run_dir = Path(env_dir) if env_dir else (resume_dir or new_run_dir(cfg))
    set_env = env_dir is None
    if set_env:
        environ = dict(os.environ)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        if job is not None:
            os.environ[SWEEP_JOB_ENV] = job
    try:
        return _train(cfg, run_dir, ckpt, overrides)
    except UsageError:
        raise
    except NonFiniteGradientError as e:  # its message says what to do
        raise RunError(str(e)) from e
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise disk_full_error(getattr(e, "filename", None) or f"a file under {run_dir}", e) from e
        if isinstance(e, PermissionError):
            raise RunError(f"permission denied on {e.filename or run_dir} ({e.strerror}); make the run folder "
                           f"{run_dir} writable, then continue with resume={run_dir}") from e
        raise
    finally:
        if set_env:
            os.environ.pop(RUN_DIR_ENV, None)
            os.environ.pop(SWEEP_JOB_ENV, None)
            if job is not None:
                _leave_distributed(environ)


def _leave_distributed(environ: dict[str, str]) -> None:
    """After one job of a ``-m`` sweep: end its DDP group and forget the variables Lightning's
    launcher set (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...), so that the next job
    launches a group of its own instead of joining the finished one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


# Lightning warnings that do not apply to a StylEx run: checkpoints after the step are what a
# resume needs, and they are taken mid-epoch on purpose (an epoch is only a pass over shuffled
# data; a resumed run reshuffles); a resumed run writes into its own checkpoint folder; the
# frozen classifier and the EMA generator are in eval mode on purpose.
_QUIET = (
    r"Using ModelCheckpoint with manual optimization",
    r"Found \d+ module\(s\) in eval mode",
    r".*isinstance\(treespec, LeafSpec\)",
    r"Checkpoint directory .* exists and is not empty",
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


def _make_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(run_dir, e) from e
        raise RunError(f"the run folder {run_dir} cannot be made ({e.strerror or e}); point runs_root= or "
                       "run_dir= at a folder you can write") from e


def _remove_partial_files(run_dir: Path) -> None:
    """Temporary files of atomic writes that a kill interrupted (``.<name>.<random>.tmp``)."""
    for path in run_dir.rglob(".*.tmp"):
        if "logs" in path.relative_to(run_dir).parts or not path.is_file():
            continue
        try:
            path.unlink()
            log.info("removed %s, the partial file of an interrupted write", path)
        except OSError as e:
            log.warning("could not remove the partial file %s: %s", path, e)


def _record_overrides(run_dir: Path, overrides: Sequence[str]) -> None:
    """Append this invocation's command-line overrides to ``<run>/overrides.yaml``."""
    record = run_dir / OVERRIDES_FILE
    entries: list = []
    if record.is_file():
        try:
            entries = list(OmegaConf.to_container(OmegaConf.load(record)) or [])
        except Exception:  # a damaged record is started again rather than stopping the run
            entries = []
    entries.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": list(overrides)})
    header = "# The command-line overrides of each train.py invocation on this run, oldest first.\n"
    atomic_write_text(record, header + OmegaConf.to_yaml(OmegaConf.create(entries)))


def _prepare_classifier(classifier_cfg: Any, dm: Any, run_dir: Path, cfg: DictConfig, loggers: list):
    from stylex.classifier import prepare_classifier

    try:
        return prepare_classifier(classifier_cfg, dm, run_dir / "classifier", trainer_kwargs(cfg), loggers)
    except UsageError:
        raise
    except Exception as e:
        text = f"{type(e).__name__} {e}"
        if type(e).__name__ != "SafetensorError" and not any(
                m in text for m in ("PytorchStreamReader", "enforce fail", "invalid load key", "Unpickl")):
            raise
        source = classifier_cfg.checkpoint or run_dir / "classifier" / "classifier.safetensors"
        raise RunError(
            f"the classifier {source} cannot be read ({_why(e)}); the file is damaged. Point "
            "classifier.checkpoint= at a good copy, or delete the file to train the classifier again"
        ) from e


def _train(cfg: DictConfig, run_dir: Path, ckpt: Path | None, overrides: Sequence[str] = ()) -> Path:
    from stylex.training.checkpoint_io import AtomicCheckpointIO

    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    loss, classifier_cfg, callbacks = check(cfg)
    _check_run_folder(cfg, run_dir, resuming=ckpt is not None)
    ops.set_default_impl(str(cfg.get("ops_impl", "auto")))
    threads = cpu_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    dm = build_datamodule(cfg)
    try:
        if is_rank_zero():
            dm.prepare_data()
        dm.setup("fit")
    except (OSError, ValueError) as e:  # missing or bad data: the user's to fix, before training starts
        raise ConfigError(f"dataset={cfg.dataset.name}: {e}") from e
    _check_data(cfg, dm, classifier_cfg, run_dir)
    _check_classifier(classifier_cfg, run_dir)

    # Every check has passed: only now is the run folder made or, for a resumed run, changed.
    _make_run_dir(cfg, run_dir)
    if is_rank_zero():
        if ckpt is not None:
            _remove_partial_files(run_dir)
        atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        _record_overrides(run_dir, overrides)
        log.info("run folder: %s (%d CPU threads)", run_dir, torch.get_num_threads())

    loggers = build_loggers(cfg, run_dir)
    classifier, clf_metrics = _prepare_classifier(classifier_cfg, dm, run_dir, cfg, loggers)
    numeric = {f"clf/{k}": float(v) for k, v in clf_metrics.items() if isinstance(v, (int, float))}
    for lg in loggers:
        if numeric:
            lg.log_metrics(numeric, step=0)
    # Logged once, as the module's hyper-parameters, and kept with the export and the summary.
    info = {"dataset": str(cfg.dataset.name), "model": str(cfg.model.name), "classifier_metrics": clf_metrics,
            "config": OmegaConf.to_container(cfg, resolve=True)}
    module = build_module(cfg, dm.num_classes, dm.class_names, classifier, loss=loss, info=info)

    trainer = pl.Trainer(
        **trainer_kwargs(cfg), logger=loggers or False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir),
    )
    # Our own checkpoints hold hyper-parameters besides tensors, hence weights_only=False.
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt and ckpt.is_file() else None, weights_only=False)
    finish(loggers)
    return run_dir
