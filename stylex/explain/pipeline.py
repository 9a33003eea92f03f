"""The whole explanation: search, metrics and report, for a model in memory or a trained run.

- :func:`explain_and_report`: AttFind on given styles, the flip-rate curves with the realism
  of the edited renders (KID against real images) and the agreement of the unedited ones beside
  them, optionally the ground truth, and the report folder (the callback and
  :func:`explain_run` both call it);
- :func:`explain_run`: everything ``explain.py`` does once its options are parsed, taking them
  as an :class:`ExplainRequest`: find and load the export, choose the images (given files, the
  validation split or generated samples), choose between the exhaustive and the pre-screened
  search, load (or train and cache) the factor probe when asked, explain and report, log to W&B
  when the run did,
  and give the summary lines to a callback.

:class:`ExplainRequest` mirrors the options of ``explain.py`` and holds their defaults (the
command line takes its defaults from it). Problems the user can fix raise
:class:`~stylex.errors.UsageError` naming the option and the remedy.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stylex.errors import UsageError
from stylex.explain.attfind import AttFind, AttFindConfig
from stylex.explain.factors import FactorProbe, ground_truth
from stylex.explain.inputs import load_image_files, realism_network, resolve_export, run_config, validation_images
from stylex.explain.loggers import log_to_wandb, wandb_settings
from stylex.explain.metrics import agreement, sufficiency
from stylex.explain.refine import refine_latents
from stylex.explain.request import ExplainRequest, positive
from stylex.explain.report import Report, run_figures, write_report
from stylex.explain.result import AttFindResult
from stylex.metrics.probe import cached_factor_probe
from stylex.stylespace import noise_rows

IMAGE_PANELS = 4  # images of a data set sample that get a panel of their own (every given image does)
AUTO_PRESCREEN = 32  # candidate edits per class when "auto" finds the exhaustive search too slow

Say = Callable[[str], None]


# ============================================================================ search + metrics + report
def explain_and_report(
    finder: AttFind,
    flat: torch.Tensor,  # [N, S] styles of the explained images
    out_dir: str | Path,
    class_names: Sequence[str],
    top_k: int = 4,
    classes: Sequence[int] | None = None,
    reference: torch.Tensor | None = None,  # [M, S] styles setting the min/max targets (None = flat)
    flip_k: int = 10,  # flip-rate curve for k = 1..flip_k (0 = none)
    examples: int = 4,
    image_info: Sequence[dict[str, Any]] | None = None,
    inputs: torch.Tensor | None = None,  # [N, 3, R, R] the real images `flat` encodes (None: generated)
    real_images: torch.Tensor | None = None,  # [M, 3, R, R] real set of the KID figures (None: `inputs`)
    image_panels: Sequence[int] = (),
    settings: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    ground_truth_probe: FactorProbe | None = None,  # also score against the synthetic factors
    progress: Say | None = None,  # progress messages
    title: str = "StylEx explanation",
    sections: dict[str, Any] | None = None,  # more sections of explanation.json (e.g. "refinement")
    feature_classifier: torch.nn.Module | None = None,  # the KID's features (None: the explained classifier's)
    noise: dict[str, torch.Tensor] | None = None,  # the images' own noise maps (AttFind.noise_maps)
) -> tuple[Report, AttFindResult]:
    """AttFind on ``flat``, the flip-rate curves (with KID and agreement beside them), optionally
    the ground truth, and the report. Every render of an image, edited or not, uses its noise
    maps when ``noise`` gives them."""
    say = progress or (lambda msg: None)
    result = finder.run(flat, top_k=top_k, classes=classes, reference=reference,
                        trainer_kwargs=trainer_kwargs, progress=say, noise=noise)
    say(f"AttFind: {result.seconds:.1f} s for {result.num_images} images ({result.mode})")
    suff = None
    if flip_k > 0:
        suff = sufficiency(result, finder.evaluator, ks=range(1, flip_k + 1), inputs=inputs, real_images=real_images,
                           feature_classifier=feature_classifier)
        say(f"flip rates, KID and agreement: {suff.seconds:.1f} s")
    gt = ground_truth(result, finder.evaluator, ground_truth_probe) if ground_truth_probe is not None else None
    report = write_report(out_dir, result, finder.evaluator, class_names, examples=examples, sufficiency=suff,
                          ground_truth=gt, image_info=image_info, inputs=inputs, image_panels=image_panels,
                          settings=settings, title=title, sections=sections)
    return report, result


# ============================================================================ a trained run
def explain_run(
    request: ExplainRequest,
    say: Say | None = None,  # progress messages and notes (explain.py: stderr unless --quiet)
    show: Say | None = None,  # the summary: ranked attributes and flip rates (explain.py: stdout)
) -> tuple[Report, AttFindResult]:
    """Explain the classifier of a trained run's export; see the module docstring."""
    say = say or (lambda msg: None)
    show = show or (lambda msg: None)
    request.check()
    threads = torch.get_num_threads()
    if request.threads is not None:
        torch.set_num_threads(request.threads)
    try:
        report, result, names = _explain_run(request, say)
    finally:
        torch.set_num_threads(threads)
    for c in result.classes:
        ranked = ", ".join(f"{a.layer}[{a.channel}] {a.direction_name} ({a.probability_change:+.3f})"
                           for a in result.rankings[c])
        show(f"{names[c]}: {ranked}")
    if report.data.get("flip_rate"):
        fr = report.data["flip_rate"]
        show("flip rate at k=" + str(fr["k"][-1]) + ": " +
             ", ".join(f"{m} {fr[m][-1]:.2f}" for m in ("attfind", "random", "variance")))
        for line in manifold_lines(fr):
            show(line)
    for w in result.warnings:
        say(f"note: {w}")
    return report, result


def _explain_run(request: ExplainRequest, say: Say) -> tuple[Report, AttFindResult, list[str]]:
    from stylex.export import load_export

    req = request
    export_dir, run_dir = resolve_export(req.run, req.checkpoint, req.runs_root)
    say(f"explaining {run_dir or export_dir}")
    try:
        exp = load_export(export_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    names = list(exp.class_names)
    dim = exp.generator.num_styles
    if req.top_k > dim:
        raise UsageError(f"--top-k {req.top_k} is larger than the number of style coordinates ({dim}) of this model")
    classes = parse_classes(req.classes, names)
    device = resolve_device(req.device)
    trainer_kwargs = None
    if req.devices > 1:
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        trainer_kwargs = {"accelerator": accelerator, "devices": req.devices, "strategy": "ddp_spawn"}

    config = run_config(exp.meta, run_dir)
    resolution = exp.resolution
    exp.to(device)
    finder = AttFind(exp.generator, exp.classifier, AttFindConfig(
        shift_size=req.shift_size, measure=req.measure, batch_size=req.batch_size, layers=req.layers))

    # ---- the images
    inputs, reference, info, real_images = None, None, None, None
    panels: Sequence[int] = ()
    source = req.source
    if source == "auto":
        source = "val" if "_target_" in (config.get("dataset") or {}) else "generated"
    if req.images:
        inputs = load_image_files(req.images, resolution)
        info = [{"source": str(p)} for p in req.images]
        flat = finder.encode(exp.encoder, inputs)
        noise = finder.noise_maps(exp.encoder, inputs)
        panels = range(len(req.images))
        # The min/max targets need a spread of images: the given ones alone may be too few.
        if source == "val":
            ref_images, _ = validation_images(config, req.num_images, resolution)
            reference = finder.encode(exp.encoder, ref_images)
            real_images = ref_images  # more real images for KID than the few given ones
        else:
            reference = finder.sample(req.num_images, seed=req.seed)
    elif source == "val":
        inputs, info = validation_images(config, req.num_images, resolution)
        flat = finder.encode(exp.encoder, inputs)
        noise = finder.noise_maps(exp.encoder, inputs)
        panels = range(min(IMAGE_PANELS, flat.shape[0]))
    else:
        flat = finder.sample(req.num_images, seed=req.seed)
        info = [{"source": f"generated:{i}"} for i in range(flat.shape[0])]
        panels = range(min(IMAGE_PANELS, flat.shape[0]))
        needs_layouts = getattr(exp.encoder, "noise_encoder", None) is not None
        if (req.flip_k > 0 or needs_layouts) and "_target_" in (config.get("dataset") or {}):
            try:  # real images for KID beside the flip rate; without them the report says so
                real_images, _ = validation_images(config, req.num_images, resolution)
            except UsageError as e:
                say(f"note: no real images for the KID figures or the layouts ({e})")
        noise = None
        if needs_layouts:
            # The generator draws its layouts from noise maps of real images (as in training):
            # sample i takes those of real image i (cycling).
            if real_images is None:
                say("note: this generator takes its layouts from the encoder's noise maps of real images, and "
                    "there are none: the samples are rendered with constant noise, without layouts")
            else:
                layouts = finder.noise_maps(exp.encoder, real_images)
                noise = noise_rows(layouts, torch.arange(flat.shape[0]) % real_images.shape[0])

    finder.config = replace(finder.config, prescreen=choose_prescreen(req, finder, flat.shape[0], say))
    sections: dict[str, Any] = {}
    if req.refine_steps > 0:
        if inputs is None:
            say("note: --refine-steps refines encodings of real images; generated samples need none")
        else:
            flat, sections["refinement"] = refine_and_compare(
                finder, exp.encoder, inputs, flat, req.refine_steps, req.refine_lr, req.refine_kl, req.top_k,
                classes, reference, say, noise=noise)

    probe = None
    if req.ground_truth:
        target = str((config.get("dataset") or {}).get("_target_", ""))
        if not target.endswith("SyntheticDataModule"):
            raise UsageError("--ground-truth needs a run on the synthetic dataset (its factors are the truth)")
        say("factor probe: from the cache, or trained on synthetic scenes and cached")
        scale = float((config.get("dataset") or {}).get("lesion_scale", 1.0))  # lesions of the run's size
        probe = cached_factor_probe(resolution, device=finder.device,
                                    **({"lesion_scale": scale} if scale != 1.0 else {}))

    out_dir = req.out or ((run_dir or export_dir.parent) / "explain")
    settings = {"run": str(run_dir or export_dir), "source": "images" if req.images else source,
                "num_images": int(flat.shape[0]), "top_k": req.top_k, "shift_size": req.shift_size,
                "measure": req.measure, "layers": req.layers, "affect_threshold": finder.config.affect_threshold,
                "prescreen": finder.config.prescreen, "device": str(finder.device)}
    if run_dir is not None:
        figures = read_run_figures(run_dir)
        if figures:
            sections["run"] = figures
    report, result = explain_and_report(
        finder, flat, out_dir, names, top_k=req.top_k, classes=classes, reference=reference,
        flip_k=req.flip_k, examples=req.examples, image_info=info, inputs=inputs, real_images=real_images,
        image_panels=panels, settings=settings, trainer_kwargs=trainer_kwargs, ground_truth_probe=probe,
        progress=say, title=f"StylEx explanation of {(run_dir or export_dir).name}", sections=sections,
        feature_classifier=realism_network(config, say, exp) if req.flip_k > 0 else None, noise=noise,
    )
    if run_dir is not None and req.wandb:
        lcfg = wandb_settings(config)
        if lcfg is not None:
            say("logging to W&B")
            log_to_wandb(lcfg, run_dir, report)
    return report, result, names


def refine_and_compare(
    finder: AttFind,
    encoder: torch.nn.Module,
    inputs: torch.Tensor,  # [N, 3, R, R] the real images
    flat: torch.Tensor,  # [N, S] their encoder styles
    steps: int,
    lr: float,
    kl_weight: float,
    top_k: int,
    classes: Sequence[int] | None,
    reference: torch.Tensor | None,
    say: Say,
    noise: dict[str, torch.Tensor] | None = None,  # the images' own noise maps (held fixed)
) -> tuple[torch.Tensor, dict[str, Any]]:  # refined styles [N, S], the report's "refinement" section
    """Refine every image's latent (:mod:`stylex.explain.refine`) and say what it changed: the
    reconstruction error and class agreement before and after, and how far the class rankings
    of the refined styles agree with those of the encoder's (a second, pre-screened search)."""
    g, clf = finder.evaluator.generator, finder.evaluator.classifier
    refinement = refine_latents(g, encoder, clf, inputs, steps=steps, lr=lr, kl_weight=kl_weight,
                                batch_size=finder.evaluator.batch_size)
    refined = finder.styles_of(refinement.w, refinement.c)
    b, a = refinement.before, refinement.after
    say(f"refined {inputs.shape[0]} latents ({steps} steps, {refinement.seconds_per_image:.3f} s per image): "
        f"reconstruction L1 {b['recon_l1']:.4f} -> {a['recon_l1']:.4f}, class agreement "
        f"{b['agreement']:.2f} -> {a['agreement']:.2f}")
    section = refinement.to_dict()
    config = finder.config
    finder.config = replace(config, prescreen=config.prescreen or AUTO_PRESCREEN)
    try:
        on_encoder = finder.run(flat, top_k=top_k, classes=classes, reference=reference, noise=noise)
        on_refined = finder.run(refined, top_k=top_k, classes=classes, reference=reference, noise=noise)
    finally:
        finder.config = config
    section["rankings_vs_encoder"] = agreement(on_refined, on_encoder)
    say(f"class rankings after refinement share {section['rankings_vs_encoder']['class_overlap']:.0%} of their "
        f"top-{top_k} with the encoder's")
    return refined, section


def read_run_figures(
    run_dir: Path,  # a training run's folder
) -> dict[str, Any]:
    """The run's figures for the top of a report (see :func:`stylex.explain.report.run_figures`),
    read from its ``summary.json``; empty when the run wrote none (yet) or it is unreadable."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return run_figures(summary) if isinstance(summary, dict) else {}


def manifold_lines(
    flip_rate: dict[str, Any],  # explanation.json's "flip_rate"
) -> list[str]:
    """The realism and agreement figures beside the flip rate, as lines for a terminal."""
    lines = []
    r = flip_rate.get("realism")
    if r:
        lines.append(f"KID against {r['num_real']} real images ({r['feature']} features, {r['num_images']} images): "
                     f"unedited {r['kid_unedited']:.4f} ± {r['kid_unedited_std']:.4f}, top-{r['k']} edited "
                     f"{r['kid_edited']:.4f} ± {r['kid_edited_std']:.4f}")
    if flip_rate.get("agreement") is not None:
        lines.append(f"agreement of the unedited renders with their real inputs: {flip_rate['agreement']:.2f}")
    lines += [f"note: {n}" for n in flip_rate.get("notes") or []]
    return lines


# ============================================================================ choices
def parse_classes(
    values: Sequence[str] | None,  # --classes values: names or indices, comma-separated or repeated
    names: Sequence[str],  # the classifier's class names
) -> list[int] | None:  # class indices (None = every class)
    if not values:
        return None
    out = []
    for item in (v.strip() for value in values for v in str(value).split(",")):
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


def resolve_device(name: str) -> torch.device:
    """``--device``: "auto" = cuda when available, else cpu; a device that is not there is a
    UsageError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    return dev


def choose_prescreen(
    request: ExplainRequest,
    finder: AttFind,
    n: int,  # images to explain
    say: Say,
) -> int | None:  # candidates per class, or None for the exhaustive search
    """``--prescreen``: a number, "none", or "auto": time a batch of renders, extrapolate the
    exhaustive search and pre-screen when it would exceed ``--time-budget``."""
    value = str(request.prescreen).lower()
    if value == "none":
        return None
    if value != "auto":
        try:
            m = int(value)
        except ValueError:
            raise UsageError(f"--prescreen must be 'auto', 'none' or a number of candidates, "
                             f"got {request.prescreen!r}") from None
        return positive(m, "--prescreen")
    ev = finder.evaluator
    b = min(ev.batch_size, 64)
    flat = finder.sample(1, seed=request.seed).to(finder.device).expand(b, -1).contiguous()
    with torch.no_grad():
        ev.log_probs(flat)  # warm-up
        t = time.perf_counter()
        ev.log_probs(flat)
    per_render = (time.perf_counter() - t) / b
    estimate = per_render * n * 2 * finder.space.dim
    if estimate <= request.time_budget:
        say(f"exhaustive search: about {estimate:.0f} s (budget {request.time_budget:.0f} s)")
        return None
    say(f"an exhaustive search would take about {estimate:.0f} s > --time-budget {request.time_budget:.0f} s: "
        f"pre-screening {AUTO_PRESCREEN} candidate edits per class")
    return AUTO_PRESCREEN
