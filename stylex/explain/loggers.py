"""Sending an explanation to loggers, under the same keys inside training and from explain.py.

What an explanation logs is listed once, by :func:`explanation_items`:

- ``explain/attributes``: the ranked attributes of every class, as a table;
- ``explain/panels``: the example panels, one image per ranked attribute;
- ``explain/flip_rate``: the flip-rate plot (when the flip rate was measured).

Two paths send these items:

- :func:`log_report`: to a Lightning logger of a training run (the callback), through
  :mod:`stylex.utils.loggers` (W&B natively, TensorBoard as images and a Markdown table, CSV
  not at all);
- :func:`log_to_wandb`: as a W&B run of its own next to a finished training run that logged to
  W&B (``explain.py``); :func:`wandb_settings` reads those settings from the run's config.

Logging never stops the work: a failure only warns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from pytorch_lightning.loggers import Logger

from stylex.explain.report import Report
from stylex.utils.loggers import log_images, log_table, wandb_identity

log = logging.getLogger(__name__)

ATTRIBUTES_KEY = "explain/attributes"
PANELS_KEY = "explain/panels"
FLIP_RATE_KEY = "explain/flip_rate"
FLIP_RATE_CHART_KEY = "explain/flip_rate_chart"


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Images:
    paths: list[Path]  # image files
    captions: list[str] | None = None  # one per image


def attribute_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The ranked attributes of every class as (columns, rows)."""
    columns = ["class", "rank", "coordinate", "layer", "channel", "direction", "mean_probability_change",
               "share_affected", "flip_share"]
    ranked = [(name, a) for name, cls in report.data["classes"].items() for a in cls["attributes"]]
    rows = [[name, a["rank"], a["coordinate"], a["layer"], a["channel"], a["direction"],
             a["mean_probability_change"], a["share_affected"], a["flip_share"]] for name, a in ranked]
    if any(a.get("acts_on") for _, a in ranked):  # localised by a dissection
        columns.append("acts_on")
        for r, (_, a) in zip(rows, ranked):
            r.append(a.get("acts_on") or "")
    return columns, rows


def explanation_items(report: Report) -> dict[str, Union[Table, Images]]:  # logger key -> item
    """Everything an explanation logs, by key: the one list both logging paths send."""
    columns, rows = attribute_table(report)
    panels = sorted(report.panels.items())
    items: dict[str, Union[Table, Images]] = {
        ATTRIBUTES_KEY: Table(columns, rows),
        PANELS_KEY: Images([p for _, p in panels], [f"class {c} #{r}" for (c, r), _ in panels]),
    }
    if report.plot is not None:
        items[FLIP_RATE_KEY] = Images([report.plot])
    return items


# ============================================================================ inside training
def log_report(
    logger: Logger,  # a Lightning logger of the run
    report: Report,
    step: int = 0,
) -> None:
    """Send the explanation's items to one Lightning logger; a logging failure only warns."""
    for key, item in explanation_items(report).items():
        if isinstance(item, Table):
            log_table(logger, key, item.columns, item.rows, step)
        else:
            log_images(logger, key, item.paths, step, item.captions)


# ============================================================================ a W&B run of its own
def wandb_settings(
    config: dict[str, Any],  # the run's resolved config
) -> dict[str, Any] | None:
    """The run's W&B logger settings, or None when it did not log to W&B."""
    for lcfg in (config.get("logger") or {}).values():
        if isinstance(lcfg, dict) and str(lcfg.get("_target_", "")).endswith("WandbLogger"):
            return lcfg
    return None


def training_identity(
    run_dir: Path,  # the training run
    lcfg: dict[str, Any],  # its W&B logger settings
) -> dict[str, str]:
    """The training run's W&B id and group (as :func:`stylex.training.run.build_loggers` set
    them), read from its config and folder."""
    dataset = "dataset"
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        try:
            import yaml

            dataset = str(((yaml.safe_load(config_file.read_text()) or {}).get("dataset") or {}).get("name", dataset))
        except Exception:  # an unreadable config: the id falls back to the folder's name alone
            pass
    ident = wandb_identity(dataset, run_dir)
    return {"id": str(lcfg.get("id") or ident["id"]), "group": str(lcfg.get("group") or ident["group"])}


def log_to_wandb(
    lcfg: dict[str, Any],  # the run's W&B logger settings (project, entity, offline)
    run_dir: Path,  # the training run; the W&B files go to <run>/logs
    report: Report,
) -> None:
    """Log the explanation's items as a W&B run next to the training one (offline unless the run
    logged online). Failures only warn."""
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        offline = bool(lcfg.get("offline", True)) or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun")
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        ident = training_identity(run_dir, lcfg)
        run = wandb.init(project=lcfg.get("project") or "stylex", entity=lcfg.get("entity"),
                         dir=str(run_dir / "logs"), mode="offline" if offline else "online",
                         name=f"explain-{run_dir.name}", job_type="explain", group=ident["group"],
                         tags=list(lcfg.get("tags") or []),
                         config={"training_run": ident["id"], "training_run_dir": str(run_dir),
                                 "settings": report.data.get("settings", {})})
        try:
            payload: dict[str, Any] = {}
            for key, item in explanation_items(report).items():
                if isinstance(item, Table):
                    payload[key] = wandb.Table(columns=item.columns, data=item.rows)
                else:
                    captions = item.captions or [None] * len(item.paths)
                    payload[key] = [wandb.Image(str(p), caption=c) for p, c in zip(item.paths, captions)]
            fr = report.data.get("flip_rate")
            if fr:  # a native, interactive chart of the flip-rate curves
                names = [m for m in ("attfind", "random", "variance") if m in fr]
                payload[FLIP_RATE_CHART_KEY] = wandb.plot.line_series(
                    xs=list(fr["k"]), ys=[list(fr[m]) for m in names], keys=names,
                    title="flip rate against k", xname="k: attributes changed together")
            run.log(payload)
        finally:
            run.finish()
    except Exception as e:  # the explanation is written already: W&B is a copy of it
        log.warning("could not log the explanation to W&B: %s", e)
