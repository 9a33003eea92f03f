"""``train(cfg)``: one StylEx run from a composed config, start to finish.

Stages: check the config → data → classifier (loaded, or trained as its own short stage) →
StylEx fit (the callbacks of ``cfg.callbacks`` write samples, checkpoints, the export, the
summary and the explanation) → loggers closed. Everything lands in one run folder::

    <runs_root>/<dataset>/<timestamp>/
        config.yaml          the resolved config (resuming reads it back)
        classifier/          classifier.safetensors + .json, classifier_metrics.json
        checkpoints/         last.ckpt and periodic step checkpoints (atomic writes)
        samples/             image grids: real | reconstruction | samples per class
        logs/                W&B (offline by default), CSV or TensorBoard
        export/              model.safetensors + stylex.json, loaded by explain.py
        explain/             AttFind report (report.html, explanation.json, panels, GIFs)
        summary.json         final figures

The module (``cfg.module``), the data, the loggers and every callback come from the config
through ``hydra.utils.instantiate``; this file only checks the config and orders the stages.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import yaml
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import WandbLogger

from stylex import ops
from stylex.config import register
from stylex.errors import ConfigError
from stylex.utils.dist import is_rank_zero
from stylex.utils.io import atomic_write_text
from stylex.utils.loggers import finish
from stylex.utils.runs import find_latest_run as _find_latest_run

log = logging.getLogger("stylex")
register()  # the schemas of configs/ must be in Hydra's store before any config is composed

RUN_DIR_ENV = "STYLEX_RUN_DIR"  # lets every DDP rank agree on the run folder chosen by rank zero
CONFIG_FILE = "config.yaml"
CONFIG_GROUPS = ("dataset", "model", "classifier", "loss", "trainer", "logger", "callbacks", "experiment")
# Sections a resumed run takes from today's composition where its saved config lacks an option.
RESUMABLE_SECTIONS = ("trainer", "callbacks", "loss", "logger", "module")
# Strategies whose DDP wrapper must tolerate parameters without gradient: a GAN step updates the
# discriminator and the generator in separate backward passes.
_DDP_FIX = {"ddp": "ddp_find_unused_parameters_true", "ddp_spawn": "ddp_spawn_find_unused_parameters_true",
            "ddp_fork": "ddp_fork_find_unused_parameters_true"}


# ---------------------------------------------------------------------------------------- run folder
def find_latest_run(runs_root: str | Path) -> Path:
    """The run under ``runs_root`` whose ``last.ckpt`` is newest (``resume=last``)."""
    return _find_latest_run(runs_root, "checkpoints/last.ckpt", context="resume=last", error=ConfigError)


def resolve_resume(resume: str, runs_root: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) for ``resume=<run folder | checkpoint file | last>``."""
    if resume == "last":
        run_dir = find_latest_run(runs_root)
        return run_dir, run_dir / "checkpoints" / "last.ckpt"
    p = Path(resume)
    if p.is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return run_dir, p
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"resume={resume}: {ckpt} does not exist; is this a run folder made by train.py?")
        return p, ckpt
    raise ConfigError(f"resume={resume}: no such run folder or checkpoint file")


def new_run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    base = Path(cfg.runs_root) / str(cfg.dataset.get("name", "run")) / time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir, k = base, 1
    while run_dir.exists():
        run_dir, k = base.with_name(f"{base.name}_{k}"), k + 1
    return run_dir


def apply_resume(cfg: DictConfig, overrides: Sequence[str]) -> tuple[DictConfig, Path | None, Path | None]:
    """For ``resume=...``: the run's saved config with this command's ``key=value`` overrides on top.

    A resumed run keeps its dataset, model and classifier: a config-group override
    (``dataset=retina``) is an error rather than a silent change of what is being trained.
    """
    if not cfg.get("resume"):
        return cfg, None, None
    run_dir, ckpt = resolve_resume(str(cfg.resume), cfg.runs_root)
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        raise ConfigError(f"resume={cfg.resume}: {saved_file} is missing, so the run's settings are unknown")
    saved = OmegaConf.load(saved_file)
    # Options added to these sections since the run was made take their current defaults.
    for section in RESUMABLE_SECTIONS:
        if section in cfg:
            saved[section] = OmegaConf.merge(cfg[section], saved.get(section) or {})
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key in ("resume", "run_dir") or key.startswith("hydra"):
            continue
        if key in CONFIG_GROUPS or "/" in key:
            raise ConfigError(
                f"'{item}': a resumed run keeps its config groups; override single values instead "
                f"(e.g. trainer.max_steps=2000), or start a new run without resume="
            )
        if key.split(".")[0] in ("model", "dataset", "classifier", "module"):
            raise ConfigError(
                f"'{item}': a resumed run keeps its model, data and classifier (the checkpoint was trained "
                "with them); resume with trainer., loss., callbacks. or logger. overrides, or start a new run"
            )
        OmegaConf.update(saved, key, yaml.safe_load(value) if value else None, force_add=True)
    saved.resume = str(cfg.resume)
    return saved, run_dir, ckpt


# ---------------------------------------------------------------------------------------- checks
def check(cfg: DictConfig) -> tuple[Any, Any, list[pl.Callback]]:
    """Everything that can be refused before work starts (before a classifier stage is trained
    only to find the GAN stage cannot start). Returns the checked loss and classifier configs and
    the callbacks; resolves ``loss.perceptual_backend=auto`` in ``cfg`` so that a resumed run
    uses the backend it was trained with."""
    from stylex.classifier import ClassifierConfig
    from stylex.training.loss import LossConfig
    from stylex.training.perceptual import resolve_backend

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # omegaconf's MissingMandatoryValue / InterpolationResolutionError
        raise ConfigError(f"{e}".splitlines()[0] + " — set it on the command line, e.g. dataset.root=<folder>") from e
    accepted = set(inspect.signature(pl.Trainer).parameters)
    unknown = sorted(set(cfg.trainer) - accepted)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]} is not a pytorch_lightning.Trainer argument")
    if str(cfg.trainer.get("precision")) in ("16", "16-mixed", "16-true"):
        raise ConfigError(
            "trainer.precision=16-mixed is not supported (three optimisers and lazy regularisation do not "
            "fit one gradient scaler); use trainer.precision=bf16-mixed or 32-true"
        )
    if int(cfg.trainer.get("num_nodes") or 1) > 1 and not cfg.get("run_dir") and not cfg.get("resume"):
        raise ConfigError("trainer.num_nodes > 1 needs run_dir=<a folder every node can reach>")
    batch = int(cfg.model.batch_size)
    if batch < 1 or batch % min(4, batch):
        raise ConfigError(f"model.batch_size={batch} must be a multiple of 4 (the discriminator's minibatch-std groups)")
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
    return loss, classifier, build_callbacks(cfg)


# ---------------------------------------------------------------------------------------- builders
def build_datamodule(cfg: DictConfig):
    dcfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    dcfg.pop("name", None)
    return instantiate(dcfg, _convert_="all")


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(kw.get("strategy"), str) and kw["strategy"] in _DDP_FIX:
        kw["strategy"] = _DDP_FIX[kw["strategy"]]
    return kw


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        lcfg = OmegaConf.to_container(lcfg, resolve=True)
        if issubclass(get_class(lcfg["_target_"]), WandbLogger):
            _check_wandb(lcfg)
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            lcfg["name"] = lcfg.get("name") or f"{cfg.dataset.name}-{run_dir.name}"
        loggers.append(instantiate(lcfg, save_dir=str(run_dir / "logs")))
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
    return ({**m["generator"], "c_dim": num_classes}, {**m["discriminator"], "c_dim": num_classes},
            dict(m["encoder"]))


def build_module(
    cfg: DictConfig,
    num_classes: int,
    class_names: Sequence[str],
    classifier: torch.nn.Module,
    loss: Any = None,  # a checked LossConfig; None = cfg.loss
    info: dict[str, Any] | None = None,  # what the run records with the model (export, summary)
):
    """The LightningModule of ``cfg.module`` around the frozen ``classifier``."""
    # _partial_: the classifier and the checked loss reach the constructor as they are, not as config
    factory = instantiate(cfg.module, _partial_=True, _convert_="all")
    extra = {"loss": loss} if loss is not None else {}
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
def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """Run a whole StylEx training from a composed config; returns the run folder.

    ``overrides`` are the command line's ``key=value`` items, applied on top of the saved
    config when ``cfg.resume`` is set.
    """
    cfg, resume_dir, ckpt = apply_resume(cfg, overrides)
    env_dir = os.environ.get(RUN_DIR_ENV)
    run_dir = Path(env_dir) if env_dir else (resume_dir or new_run_dir(cfg))
    set_env = env_dir is None
    if set_env:
        os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        return _train(cfg, run_dir, ckpt)
    finally:
        if set_env:
            os.environ.pop(RUN_DIR_ENV, None)


# Lightning warnings that do not apply to a StylEx run: checkpoints after the step are what a
# resume needs; the frozen classifier and the EMA generator are in eval mode on purpose.
_QUIET = (
    r"Using ModelCheckpoint with manual optimization",
    r"Found \d+ module\(s\) in eval mode",
    r".*isinstance\(treespec, LeafSpec\)",
)


def _train(cfg: DictConfig, run_dir: Path, ckpt: Path | None) -> Path:
    from stylex.classifier import prepare_classifier
    from stylex.training.checkpoint_io import AtomicCheckpointIO

    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    loss, classifier_cfg, callbacks = check(cfg)
    ops.set_default_impl(str(cfg.get("ops_impl", "auto")))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        log.info("run folder: %s", run_dir)

    dm = build_datamodule(cfg)
    try:
        if is_rank_zero():
            dm.prepare_data()
        dm.setup("fit")
    except (OSError, ValueError) as e:  # missing or bad data: the user's to fix, before training starts
        raise ConfigError(f"dataset={cfg.dataset.name}: {e}") from e
    loggers = build_loggers(cfg, run_dir)
    classifier, clf_metrics = prepare_classifier(classifier_cfg, dm, run_dir / "classifier", trainer_kwargs(cfg),
                                                 loggers)
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
