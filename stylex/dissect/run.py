"""Dissect a trained run's export: find it, choose the concepts, run, publish the report folder.

The report is written into a temporary sibling folder and moved into place at the end, so a run
that fails (a bad layer, a segmenter that does not fit, an interrupted process) leaves no half
report behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from stylex.errors import UsageError
from stylex.utils.io import atomic_folder

Say = Callable[[str], None]


def dissect_run(
    args: Any,  # the parsed options of stylex.dissect.cli
    say: Say,
) -> Path:  # the report's page
    from stylex.dissect.pipeline import DissectSettings, choose_segmenter, dissect_export
    from stylex.explain.inputs import resolve_export, run_config, validation_images
    from stylex.explain.pipeline import resolve_device
    from stylex.export import load_export

    export_dir, run_dir = resolve_export(args.run, args.checkpoint, args.runs_root)
    try:
        exp = load_export(export_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(int(args.threads))
    try:
        settings = DissectSettings(layers=args.layers, num_images=args.num_images,
                                   encoded_images=args.encoded_images, quantile=args.quantile,
                                   iou_threshold=args.iou_threshold, intervention_images=args.intervention_images,
                                   seed=args.seed)
        config = run_config(exp.meta, run_dir)
        # Check the layers before any expensive work (the segmenter may need training).
        from stylex.dissect.base import check_layers
        from stylex.stylespace import StyleSpace

        check_layers(StyleSpace(exp.generator), settings.layers)
        segmenter = choose_segmenter(config, exp.classifier, exp.class_names, exp.resolution,
                                     segmenter_path=args.segmenter, device=device)
        say(f"concepts: {segmenter.source}")
        real = None
        if "_target_" in (config.get("dataset") or {}):
            try:
                real, _ = validation_images(config, max(settings.encoded_images, 128), exp.resolution)
            except UsageError as e:
                say(f"note: no validation images ({e}); dissecting samples only, no artifact units")
        # The real images also give the samples their layouts when the encoder gives noise maps.
        layouts = getattr(exp.encoder, "noise_encoder", None) is not None
        if getattr(args, "no_artifacts", False) and real is not None and settings.encoded_images == 0 and not layouts:
            real = None
        base = run_dir or export_dir.parent
        out = Path(args.out) if args.out else base / "dissect"
        explanation = base / "explain" / "explanation.json"
        with atomic_folder(out) as tmp:
            data = dissect_export(exp, tmp, segmenter, settings, real_images=real,
                                  explanation=explanation if explanation.is_file() else None, device=device,
                                  say=say, title=f"StylEx dissection of {base.name}",
                                  artifacts=not args.no_artifacts)
    except ValueError as e:  # bad layers, a segmenter that does not fit, bad settings
        raise UsageError(str(e)) from e
    finally:
        torch.set_num_threads(threads)
    if run_dir is not None:
        from stylex.dissect.report import log_to_wandb
        from stylex.explain.loggers import wandb_settings

        lcfg = wandb_settings(config)
        if lcfg is not None:
            say("logging to W&B")
            log_to_wandb(lcfg, run_dir, out, data)
    return out / "report.html"
