"""``train(cfg)``: one StylEx run from a composed config, start to finish.

Stages: data → classifier (loaded, or trained as its own short stage) → StylEx fit → export →
explanation.
Everything lands in one run folder::

    <runs_root>/<dataset>/<timestamp>/
        config.yaml          the resolved config (resuming reads it back)
        classifier/          classifier.safetensors + .json, classifier_metrics.json
        checkpoints/         last.ckpt and periodic step checkpoints (atomic writes)
        samples/             image grids: real | reconstruction | samples per class
        logs/                W&B (offline by default), CSV or TensorBoard
        export/              model.safetensors + stylex.json, loaded by explain.py
        explain/             AttFind report (report.html, explanation.json, panels, GIFs)
        summary.json         final figures
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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

from lightning_fabric.utilities.rank_zero import _get_rank

from stylex import ops
from stylex.utils.io import atomic_write_text
from stylex.utils.runs import latest_run

log = logging.getLogger("stylex")

RUN_DIR_ENV = "STYLEX_RUN_DIR"  # lets every DDP rank agree on the run folder chosen by rank zero
CONFIG_FILE = "config.yaml"
CONFIG_GROUPS = ("dataset", "model", "classifier", "loss", "trainer", "logger", "callbacks", "experiment")
# Strategies whose DDP wrapper must tolerate parameters without gradient: a GAN step updates the
# discriminator and the generator in separate backward passes.
_DDP_FIX = {"ddp": "ddp_find_unused_parameters_true", "ddp_spawn": "ddp_spawn_find_unused_parameters_true",
            "ddp_fork": "ddp_fork_find_unused_parameters_true"}


class ConfigError(ValueError):
    """A problem with the user's configuration; the message says which option and what to do."""


# ---------------------------------------------------------------------------------------- run folder
def _is_rank_zero() -> bool:
    """Global rank zero, from the launchers' environment (torchrun, SLURM, Lightning's own)."""
    return _get_rank() in (None, 0)


def find_latest_run(runs_root: str | Path) -> Path:
    run = latest_run(runs_root, "checkpoints/last.ckpt")
    if run is None:
        raise ConfigError(f"resume=last: no run with checkpoints/last.ckpt under {Path(runs_root).resolve()}")
    return run


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
    # Options added to these groups since the run was made take their current defaults.
    for section in ("trainer", "callbacks", "loss", "logger"):
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
        if key.split(".")[0] in ("model", "dataset", "classifier"):
            raise ConfigError(
                f"'{item}': a resumed run keeps its model, data and classifier (the checkpoint was trained "
                "with them); resume with trainer., loss., callbacks. or logger. overrides, or start a new run"
            )
        OmegaConf.update(saved, key, yaml.safe_load(value) if value else None, force_add=True)
    saved.resume = str(cfg.resume)
    return saved, run_dir, ckpt


# ---------------------------------------------------------------------------------------- checks
def validate(cfg: DictConfig) -> None:
    """Catch configuration mistakes before any work is done (and before a classifier stage is
    trained only to find the GAN stage cannot start). Resolves ``loss.perceptual_backend=auto``
    so a resumed run uses the backend it was trained with."""
    from stylex.training.module import check_loss_config
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
        loss = check_loss_config(OmegaConf.to_container(cfg.loss, resolve=True))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from e
    if loss["perceptual"] > 0:
        cfg.loss.perceptual_backend = resolve_backend(loss["perceptual_backend"])
    _encoder_fit_callback(cfg)


def _encoder_fit_callback(cfg: DictConfig):
    from stylex.training.callbacks import EncoderFit

    fit = (cfg.get("callbacks") or {}).get("encoder_fit") or {}
    options = {k: fit[k] for k in ("steps", "lr", "kl_weight", "check_images") if k in fit}  # else EncoderFit's defaults
    try:
        return EncoderFit(**options, seed=int(cfg.seed))
    except ValueError as e:
        raise ConfigError(f"callbacks.{e}") from e


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
        target = lcfg.get("_target_", "")
        if target.endswith("WandbLogger"):
            _check_wandb(lcfg)
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            lcfg.setdefault("name", None)
            lcfg["name"] = lcfg["name"] or f"{cfg.dataset.name}-{run_dir.name}"
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


def get_classifier(cfg: DictConfig, dm, run_dir: Path, loggers: list) -> tuple[torch.nn.Module, dict]:
    """The frozen classifier: from ``classifier.checkpoint``, from this run's earlier classifier
    stage (when resuming), or trained now as a short stage of its own."""
    from stylex.classifier import Classifier, train_classifier

    ccfg = OmegaConf.to_container(cfg.classifier, resolve=True)
    out_dir = run_dir / "classifier"
    saved = out_dir / "classifier.safetensors"
    if ccfg.get("checkpoint"):
        clf = _build_classifier(ccfg, dm.num_classes)
        return clf.freeze(), {"source": str(ccfg["checkpoint"])}
    if saved.is_file():
        log.info("using the classifier trained earlier in this run: %s", saved)
        clf = Classifier.load(saved)
        metrics_file = out_dir / "classifier_metrics.json"
        metrics = yaml.safe_load(metrics_file.read_text()) if metrics_file.is_file() else {}
        return clf.freeze(), {"source": str(saved), **metrics}
    clf = _build_classifier(ccfg, dm.num_classes)
    tcfg = dict(ccfg.get("train") or {})
    stage_kw = trainer_kwargs(cfg)  # train_classifier keeps the options that apply to it
    if isinstance(stage_kw.get("strategy"), str):  # every classifier parameter gets a gradient
        stage_kw["strategy"] = stage_kw["strategy"].replace("_find_unused_parameters_true", "")
    log.info("training the classifier (%s) as its own stage", ccfg["arch"])
    # The classifier stage may use its own batch size (classifier.train.batch_size).
    gan_batch = dm.batch_size
    dm.batch_size = int(tcfg.get("batch_size") or gan_batch)
    try:
        clf, metrics = train_classifier(
            clf, dm, out_dir, stage_kw,
            max_epochs=int(tcfg.get("max_epochs", 5)), lr=float(tcfg.get("lr", 1e-3)),
            weight_decay=float(tcfg.get("weight_decay", 0.05)), balanced_loss=bool(tcfg.get("balanced_loss", False)),
            augment=bool(tcfg.get("augment", True)), logger=loggers or False,
        )
    finally:
        dm.batch_size = gan_batch
    return clf, {"source": str(saved), **metrics}


def _build_classifier(ccfg: dict, num_classes: int):
    from stylex.classifier import build_classifier

    try:
        return build_classifier(ccfg, num_classes)
    except (ValueError, FileNotFoundError) as e:  # unknown arch, wrong checkpoint, class count
        raise ConfigError(f"classifier: {e}") from e


def network_kwargs(cfg: DictConfig, num_classes: int) -> tuple[dict, dict, dict]:
    m = cfg.model
    common = dict(resolution=int(m.resolution), channel_base=int(m.channel_base), channel_max=int(m.channel_max),
                  conv_clamp=m.conv_clamp)
    g = dict(z_dim=int(m.z_dim), w_dim=int(m.w_dim), c_dim=num_classes, mapping_layers=int(m.mapping_layers), **common)
    d = dict(c_dim=num_classes, **common)
    e = dict(w_dim=int(m.w_dim), **common)
    return g, d, e


def build_module(cfg: DictConfig, num_classes: int, class_names: list[str], classifier: torch.nn.Module):
    from stylex.training.module import StylexModule

    g, d, e = network_kwargs(cfg, num_classes)
    lr = float(cfg.model.lr)
    return StylexModule(
        generator=g, discriminator=d, encoder=e, classifier=classifier,
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        optim={"lr_g": lr, "lr_d": lr, "lr_e": lr},
        ema_kimg=float(cfg.model.ema_kimg), ema_rampup=cfg.model.ema_rampup, class_names=class_names,
    )


def build_callbacks(cfg: DictConfig, run_dir: Path, extra: dict) -> list[pl.Callback]:
    from stylex.explain.callback import ExplainCallback
    from stylex.training.callbacks import Exporter, FinalCheckpoint, SampleGrid, Summary, Throughput

    cb = cfg.callbacks
    throughput = Throughput()
    bar = [TQDMProgressBar(refresh_rate=int(cb.progress_bar.refresh_rate))] if cfg.trainer.get(
        "enable_progress_bar", True) else []
    return bar + [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="step{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=int(cb.checkpoint.every_n_steps), save_top_k=int(cb.checkpoint.keep),
            monitor="g_step", mode="max", save_last=True, save_on_train_epoch_end=False,
        ),
        # First of the end-of-fit work: the last samples, export and checkpoint hold the fitted encoder.
        _encoder_fit_callback(cfg),
        SampleGrid(run_dir / "samples", every_n_steps=int(cb.samples.every_n_steps),
                   num_images=int(cb.samples.num_images), seed=int(cfg.seed)),
        Exporter(run_dir / "export", extra=extra, every_n_steps=int(cb.export.every_n_steps)),
        throughput,
        Summary(run_dir / "summary.json", extra=extra, throughput=throughput),
        FinalCheckpoint(run_dir / "checkpoints" / "last.ckpt"),
        # Last: the export and the final checkpoint are on disk before the explanation starts.
        ExplainCallback(run_dir / "explain", **OmegaConf.to_container(cb.explain, resolve=True)),
    ]


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
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    validate(cfg)
    ops.set_default_impl(str(cfg.get("ops_impl", "auto")))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        log.info("run folder: %s", run_dir)

    dm = build_datamodule(cfg)
    try:
        if _is_rank_zero():
            dm.prepare_data()
        dm.setup("fit")
    except (OSError, ValueError) as e:  # missing or bad data: the user's to fix, before training starts
        raise ConfigError(f"dataset={cfg.dataset.name}: {e}") from e
    loggers = build_loggers(cfg, run_dir)
    classifier, clf_metrics = get_classifier(cfg, dm, run_dir, loggers)
    module = build_module(cfg, dm.num_classes, list(dm.class_names), classifier)
    extra = {
        "dataset": str(cfg.dataset.name),
        "model": str(cfg.model.name),
        "classifier_metrics": clf_metrics,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    for lg in loggers:
        lg.log_hyperparams({"config": extra["config"]})
        numeric = {f"clf/{k}": float(v) for k, v in clf_metrics.items() if isinstance(v, (int, float))}
        if numeric:
            lg.log_metrics(numeric, step=0)

    from stylex.training.checkpoint_io import AtomicCheckpointIO

    trainer = pl.Trainer(
        **trainer_kwargs(cfg), logger=loggers or False, callbacks=build_callbacks(cfg, run_dir, extra),
        plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir),
    )
    # Our own checkpoints hold hyper-parameters besides tensors, hence weights_only=False.
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt and ckpt.is_file() else None, weights_only=False)
    _finish_loggers(loggers)
    return run_dir


def _finish_loggers(loggers: list) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()
        else:
            lg.finalize("success")
