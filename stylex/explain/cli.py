"""``python explain.py``: explain a trained run's classifier with AttFind.

Examples::

    python explain.py --top-k 4                       # the latest run under ./runs
    python explain.py --run runs/synthetic/2025-01-01_12-00-00 --classes "DR signs"
    python explain.py --checkpoint runs/retina/<ts>/export/model.safetensors --num-images 128
    python explain.py --image eye1.png --image eye2.png   # image-specific explanations

The report lands in ``<run>/explain`` (``--out`` to change); the last printed line is the path
of its HTML page. Problems with the input (no run, not an export, a bad option, an unreadable
image) end with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger("stylex.explain")

EXIT_USAGE = 2
IMAGE_PANELS = 4  # images of a data set sample that get a panel of their own (every --image does)


class UsageError(Exception):
    """A problem with what the user asked for; the message says what to do."""


# ============================================================================ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="explain.py",
        description="Explain which attributes a trained StylEx run's classifier uses (AttFind).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", type=Path, help="run folder made by train.py (default: the latest run)")
    src.add_argument("--checkpoint", type=Path, help="a file of a StylEx export (export/model.safetensors or stylex.json)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="where to look for the latest run (default: runs)")
    p.add_argument("--top-k", type=int, default=4, help="attributes ranked per class (default: 4)")
    p.add_argument("--num-images", type=int, default=64, help="images explained (default: 64)")
    p.add_argument("--classes", action="append", default=None,
                   help="class names or indices to explain, comma-separated or repeated (default: all)")
    p.add_argument("--shift-size", type=float, default=1.0,
                   help="fraction of the way to a coordinate's min/max each edit moves (default: 1)")
    p.add_argument("--out", type=Path, help="report folder (default: <run>/explain)")
    p.add_argument("--image", action="append", type=Path, default=None,
                   help="explain this image file (repeatable); resized to the model's resolution")
    p.add_argument("--source", choices=("auto", "val", "generated"), default="auto",
                   help="images to explain without --image: the validation split of the run's dataset, "
                        "or generated samples (default: val when the run's dataset can be rebuilt)")
    p.add_argument("--measure", choices=("prob", "logit"), default="prob",
                   help="effect measure: class probability change or one-vs-rest logit change")
    p.add_argument("--prescreen", default="auto",
                   help="'none' renders every coordinate for every image; N renders only the N best "
                        "gradient-ranked edits per class; 'auto' picks none when it fits --time-budget")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="seconds the exhaustive search may take before --prescreen auto screens (default: 120)")
    p.add_argument("--flip-k", type=int, default=10, help="flip-rate curve for k = 1..N (0 = skip; default: 10)")
    p.add_argument("--examples", type=int, default=4, help="example pairs per attribute panel (default: 4)")
    p.add_argument("--ground-truth", action="store_true",
                   help="synthetic dataset only: train a factor probe and report recovery and purity")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--devices", type=int, default=1,
                   help="spread the images over this many devices with Lightning's predict loop (default: 1)")
    p.add_argument("--batch-size", type=int, default=None, help="renders per forward pass (default: by device)")
    p.add_argument("--seed", type=int, default=0, help="seed of generated samples (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy machine)")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B even when the run used it")
    p.add_argument("--quiet", action="store_true", help="print only the report path")
    return p


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value


# ============================================================================ finding the export
def find_latest_run(runs_root: Path) -> Path:
    """The newest folder ``<runs_root>/*/*`` that holds ``export/stylex.json``."""
    from stylex.export import META_FILE

    from stylex.utils.runs import latest_run

    run = latest_run(runs_root, f"export/{META_FILE}")
    if run is None:
        raise UsageError(
            f"no run found under {Path(runs_root).resolve()} (looked for */*/export/{META_FILE}). "
            "Train one with `python train.py`, or pass --run <run folder> or --checkpoint <export file>."
        )
    return run


def resolve_export(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(export folder, run folder or None) from --run / --checkpoint / the latest run."""
    from stylex.export import find_export

    if args.checkpoint is not None:
        path = args.checkpoint
        if not path.exists():
            raise UsageError(f"--checkpoint {path}: no such file")
        if path.suffix == ".ckpt":
            raise UsageError(
                f"--checkpoint {path} is a training checkpoint, not a StylEx export. Explanations read "
                "the export a run writes at the end of training: pass --run <run folder> or "
                "--checkpoint <run>/export/model.safetensors."
            )
    else:
        path = args.run if args.run is not None else find_latest_run(args.runs_root)
        if not path.exists():
            raise UsageError(f"--run {path}: no such folder")
    try:
        export_dir = find_export(path)
    except (FileNotFoundError, ValueError) as e:
        option = "--checkpoint" if args.checkpoint is not None else "--run"
        raise UsageError(f"{option}: {e}") from e
    run_dir = export_dir.parent if export_dir.name == "export" else None
    return export_dir, run_dir


def run_config(meta: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """The run's resolved config: from the export, else from ``<run>/config.yaml``."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return {}


# ============================================================================ images
def load_image_files(
    paths: Sequence[Path],
    resolution: int,
) -> torch.Tensor:  # [N, 3, R, R] in [-1, 1]
    """Decode, centre-crop and resize image files; an unreadable file is a UsageError."""
    from stylex.data.folder import load_image

    out = []
    for path in paths:
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


# ============================================================================ W&B
def uses_wandb(config: dict[str, Any]) -> dict[str, Any] | None:
    """The run's W&B logger settings, or None when it did not log to W&B."""
    for lcfg in (config.get("logger") or {}).values():
        if isinstance(lcfg, dict) and str(lcfg.get("_target_", "")).endswith("WandbLogger"):
            return lcfg
    return None


def log_to_wandb(lcfg: dict[str, Any], run_dir: Path, report: Any) -> None:
    """Log the table, panels and plot as a W&B run next to the training one (offline unless the
    run logged online). Failures only warn."""
    try:
        import wandb

        from stylex.explain.callback import attribute_table

        os.environ.setdefault("WANDB_SILENT", "true")
        offline = bool(lcfg.get("offline", True)) or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun")
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=lcfg.get("project") or "stylex", entity=lcfg.get("entity"),
                         dir=str(run_dir / "logs"), mode="offline" if offline else "online",
                         name=f"explain-{run_dir.name}", job_type="explain")
        try:
            columns, rows = attribute_table(report)
            payload: dict[str, Any] = {
                "explain/attributes": wandb.Table(columns=columns, data=rows),
                "explain/panels": [wandb.Image(str(p), caption=f"class {c} #{r}")
                                   for (c, r), p in sorted(report.panels.items())],
            }
            if report.plot is not None:
                payload["explain/flip_rate"] = wandb.Image(str(report.plot))
            run.log(payload)
        finally:
            run.finish()
    except Exception as e:
        log.warning("could not log the explanation to W&B: %s", e)


# ============================================================================ main
def _parse_classes(values: Sequence[str] | None, names: Sequence[str]) -> list[int] | None:
    if not values:
        return None
    out = []
    for item in (v.strip() for value in values for v in value.split(",")):
        if not item:
            continue
        if item in names:
            out.append(list(names).index(item))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(names):
            out.append(int(item))
        else:
            raise UsageError(f"--classes: unknown class {item!r}; the classes are "
                             + ", ".join(f"{i}={n!r}" for i, n in enumerate(names)))
    return list(dict.fromkeys(out))


def _prescreen(args: argparse.Namespace, finder: Any, n: int, say) -> int | None:
    value = str(args.prescreen).lower()
    if value == "none":
        return None
    if value != "auto":
        try:
            m = int(value)
        except ValueError:
            raise UsageError(f"--prescreen must be 'auto', 'none' or a number of candidates, got {args.prescreen!r}") from None
        return _positive(m, "--prescreen")
    # auto: time a batch of renders and extrapolate the exhaustive search
    ev = finder.evaluator
    b = min(ev.batch_size, 64)
    flat = finder.sample(1, seed=args.seed).to(finder.device).expand(b, -1).contiguous()
    with torch.no_grad():
        ev.log_probs(flat)  # warm-up
        t = time.perf_counter()
        ev.log_probs(flat)
    per_render = (time.perf_counter() - t) / b
    estimate = per_render * n * 2 * finder.space.dim
    if estimate <= args.time_budget:
        say(f"exhaustive search: about {estimate:.0f} s (budget {args.time_budget:.0f} s)")
        return None
    say(f"an exhaustive search would take about {estimate:.0f} s > --time-budget {args.time_budget:.0f} s: "
        "pre-screening 32 candidate edits per class")
    return 32


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for a problem with the input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _main(args: argparse.Namespace) -> int:
    from stylex.explain.attfind import AttFind, AttFindConfig
    from stylex.explain.report import explain_and_report
    from stylex.export import load_export

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    for option, value in (("--top-k", args.top_k), ("--num-images", args.num_images), ("--devices", args.devices)):
        _positive(value, option)
    if args.batch_size is not None:
        _positive(args.batch_size, "--batch-size")
    if args.threads is not None:
        torch.set_num_threads(_positive(args.threads, "--threads"))
    if not args.shift_size > 0:
        raise UsageError(f"--shift-size must be > 0 (1 = move to the min/max), got {args.shift_size}")
    if args.flip_k < 0 or args.examples < 1:
        raise UsageError("--flip-k must be >= 0 and --examples >= 1")

    export_dir, run_dir = resolve_export(args)
    say(f"explaining {run_dir or export_dir}")
    try:
        exp = load_export(export_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    names = list(exp.class_names)
    dim = exp.generator.num_styles
    if args.top_k > dim:
        raise UsageError(f"--top-k {args.top_k} is larger than the number of style coordinates ({dim}) of this model")
    classes = _parse_classes(args.classes, names)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: not a device name (cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda devices are supported")
    trainer_kwargs = None
    if args.devices > 1:
        accelerator = "gpu" if device.startswith("cuda") else "cpu"
        trainer_kwargs = {"accelerator": accelerator, "devices": args.devices, "strategy": "ddp_spawn"}

    config = run_config(exp.meta, run_dir)
    resolution = exp.resolution
    exp.to(device)
    finder = AttFind(exp.generator, exp.classifier, AttFindConfig(
        shift_size=args.shift_size, measure=args.measure, batch_size=args.batch_size))

    # ---- the images
    inputs, reference, info, panels = None, None, None, ()
    source = args.source
    if source == "auto":
        source = "val" if "_target_" in (config.get("dataset") or {}) else "generated"
    if args.image:
        inputs = load_image_files(args.image, resolution)
        info = [{"source": str(p)} for p in args.image]
        flat = finder.encode(exp.encoder, inputs)
        panels = range(len(args.image))
        # The min/max targets need a spread of images: the given ones alone may be too few.
        if source == "val":
            ref_images, _ = validation_images(config, args.num_images, resolution)
            reference = finder.encode(exp.encoder, ref_images)
        else:
            reference = finder.sample(args.num_images, seed=args.seed)
    elif source == "val":
        images, info = validation_images(config, args.num_images, resolution)
        inputs = images
        flat = finder.encode(exp.encoder, images)
        panels = range(min(IMAGE_PANELS, flat.shape[0]))
    else:
        flat = finder.sample(args.num_images, seed=args.seed)
        info = [{"source": f"generated:{i}"} for i in range(flat.shape[0])]
        panels = range(min(IMAGE_PANELS, flat.shape[0]))

    finder.config = AttFindConfig(shift_size=args.shift_size, measure=args.measure, batch_size=args.batch_size,
                                  prescreen=_prescreen(args, finder, flat.shape[0], say))

    probe = None
    if args.ground_truth:
        target = str((config.get("dataset") or {}).get("_target_", ""))
        if not target.endswith("SyntheticDataModule"):
            raise UsageError("--ground-truth needs a run on the synthetic dataset (its factors are the truth)")
        from stylex.explain.metrics import train_factor_probe

        say("training the factor probe on synthetic scenes")
        probe = train_factor_probe(resolution, device=finder.device)

    out_dir = args.out or ((run_dir or export_dir.parent) / "explain")
    settings = {"run": str(run_dir or export_dir), "source": "images" if args.image else source,
                "num_images": int(flat.shape[0]), "top_k": args.top_k, "shift_size": args.shift_size,
                "measure": args.measure, "prescreen": finder.config.prescreen, "device": str(finder.device)}
    report, result = explain_and_report(
        finder, flat, out_dir, names, top_k=args.top_k, classes=classes, reference=reference,
        flip_k=args.flip_k, examples=args.examples, image_info=info, inputs=inputs,
        image_panels=panels, settings=settings, trainer_kwargs=trainer_kwargs, ground_truth_probe=probe,
        progress=say, title=f"StylEx explanation of {(run_dir or export_dir).name}",
    )
    if run_dir is not None and not args.no_wandb:
        lcfg = uses_wandb(config)
        if lcfg is not None:
            say("logging to W&B")
            log_to_wandb(lcfg, run_dir, report)
    if not args.quiet:
        for c in result.classes:
            ranked = ", ".join(f"{a.layer}[{a.channel}] {a.direction_name} ({a.probability_change:+.3f})"
                               for a in result.rankings[c])
            print(f"{names[c]}: {ranked}")
        if report.data.get("flip_rate"):
            fr = report.data["flip_rate"]
            print("flip rate at k=" + str(fr["k"][-1]) + ": " +
                  ", ".join(f"{m} {fr[m][-1]:.2f}" for m in ("attfind", "random", "variance")))
        for w in result.warnings:
            print(f"note: {w}", file=sys.stderr)
    print(report.html.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
