"""Explanation quality on the synthetic data set: ground truth and sufficiency.

    python benchmarks/explain_quality.py                       # the latest run under ./runs
    python benchmarks/explain_quality.py --run runs/synthetic/<ts>
    python benchmarks/explain_quality.py --train-steps 600     # train the quickstart first
    python benchmarks/explain_quality.py --train-steps 3000    # a longer run
    python benchmarks/explain_quality.py --train-steps 600 --seeds 0,1,2   # mean and spread of 3 runs
    python benchmarks/explain_quality.py --run R --source generated   # the generator's own samples
    python benchmarks/explain_quality.py --run R --layers conv  # search the convolutions' styles only

For a run trained on the synthetic fundus scenes, runs AttFind on validation images and reports

- recovery and purity of the class rankings against the known causal factors (exudates,
  haemorrhages), with the factor read off the renders by a probe trained on synthetic scenes
  (:mod:`stylex.explain.factors`); the probe's held-out R^2 per factor is printed too, since a
  factor it cannot read cannot be credited;
- the flip rate against k for AttFind's image rankings and the two classifier-free baselines,
  and beside it the KID (in the classifier's features) against the validation images of the
  renders with the top-k attributes applied and of the unedited renders (a flip won by leaving
  the data manifold shows as a higher edited KID), and the agreement of the unedited renders
  with the classifier's prediction on their real inputs;
- the class swapped on real content (:func:`stylex.metrics.fidelity.swap_fidelity`): every
  encoded validation image rendered under the other classes' one-hot vectors, the share of
  those renders the classifier assigns to the class asked for, and the lesion counts of the
  renders under their own class and under the swapped one. StylEx explains through this
  counterfactual: where the class vector does not change the lesions of a real image, no style
  coordinate the class moves will;
- how concentrated the class is in StyleSpace: switching generated samples from class 0 to
  class k on only the 1, 10 or 100 coordinates of largest class contrast, and on all of them,
  and the change of the causal factors each gives (:func:`stylex.explain.factors.
  class_shift_concentration`). A single coordinate can only be credited with a factor when one
  coordinate carries a good part of the class's effect on it;
- the bound on recovery of any ranking of single coordinates: every searched coordinate is
  moved alone, in both directions, on ``--bound-images`` images of each class's pool, and the
  probe reads what it changes (:func:`stylex.explain.factors.single_coordinate_bound`). Where no
  coordinate has a causal factor as its main factor, the generator has no attribute for AttFind
  to find; where some do and the ranking missed them, the search is at fault. It renders
  ``2 x coordinates x images`` edits (162 s for 8 images per class on 2 AVX2 cores);
- how often global brightness, contrast, tint and noise changes of the validation images change
  the classifier's prediction (:func:`stylex.explain.metrics.photometric_sensitivity`): where
  they do, a colour attribute is a true explanation of the classifier, though not of the data;
- what the explained (unedited) renders carry of their inputs, per predicted class: the
  classifier's probability and the lesion counts the probe reads, real -> render. Renders that
  keep "DR signs" without the lesions show a generator that satisfies the classifier some other
  way, and an explanation of those renders cannot find the lesions.

``--source generated`` explains the generator's own samples (one-hot class vectors, every class in
turn) instead of encoded validation images (the validation images stay the real set of the KID,
and there is no agreement or renders line, since samples have no real inputs). It separates what
the generator can draw from what the encoder brings back of a real image.

For a run trained with ``model.encoder_noise=true`` every render of an encoded image, edited or
not, uses the encoder's noise maps of that image, and generated samples take those of the
validation images (sample i those of image i), as on the training's noise path.

The probe comes from the probe cache (``$STYLEX_CACHE_DIR/probes``) when one with these settings
was trained before (its training time is then ~0).

``--train-steps N`` first runs ``python train.py trainer.max_steps=N`` (plus any ``--override``)
and evaluates the run it prints; with ``--seeds`` it does so once per seed (``seed=k``) and prints
the mean and spread of recovery, purity, the flip rates at the largest k, FID, conditioning
fidelity, the causal-factor ratios and the training time. The generator figures come from the
run's ``summary.json`` and ``metrics/quality.json``. Results go to stdout and, with ``--out``, to
a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from stylex.explain.attfind import AttFind, AttFindConfig  # noqa: E402
from stylex.explain.factors import (  # noqa: E402
    class_shift_concentration,
    coordinate_factor_effects,
    ground_truth,
    single_coordinate_bound,
)
from stylex.explain.inputs import latest_export_run as find_latest_run  # noqa: E402
from stylex.explain.inputs import realism_network, run_config, validation_images  # noqa: E402
from stylex.explain.metrics import photometric_sensitivity, sufficiency  # noqa: E402
from stylex.explain.pipeline import manifold_lines  # noqa: E402
from stylex.explain.refine import refine_latents  # noqa: E402
from stylex.explain.result import searched_coordinates  # noqa: E402
from stylex.export import load_export  # noqa: E402
from stylex.metrics.fidelity import swap_fidelity  # noqa: E402
from stylex.metrics.probe import cached_factor_probe  # noqa: E402
from stylex.stylespace import noise_rows  # noqa: E402


def train_run(steps: int, runs_root: Path, overrides: list[str]) -> Path:
    cmd = [sys.executable, str(REPO / "train.py"), f"trainer.max_steps={steps}", f"runs_root={runs_root}",
           "trainer.enable_progress_bar=false", *overrides]
    print("training:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed with exit status {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="run folder (default: the latest under --runs-root)")
    ap.add_argument("--runs-root", type=Path, default=Path("runs"))
    ap.add_argument("--train-steps", type=int, default=None, help="train a new run of this many steps first")
    ap.add_argument("--seeds", default=None,
                    help="with --train-steps: train and evaluate one run per seed, e.g. 0,1,2, and print the "
                         "mean and spread of every figure")
    ap.add_argument("--override", action="append", default=[], help="extra train.py overrides (repeatable)")
    ap.add_argument("--num-images", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--prescreen", default="32", help="candidates per class, or 'none' for the exhaustive search")
    ap.add_argument("--flip-k", type=int, default=10)
    ap.add_argument("--measure", choices=("prob", "logit"), default="prob", help="AttFind's effect measure")
    ap.add_argument("--layers", choices=("all", "conv"), default="all",
                    help="style coordinates AttFind searches (conv: without the to-RGB layers')")
    ap.add_argument("--shift-size", type=float, default=AttFindConfig.shift_size,
                    help="fraction of the way to a coordinate's min/max each edit moves (explain.py --shift-size)")
    ap.add_argument("--source", choices=("val", "generated"), default="val",
                    help="explain encoded validation images (val) or the generator's own samples (generated)")
    ap.add_argument("--refine-steps", type=int, default=0,
                    help="refine each image's latent for N steps before the search (explain.py --refine-steps)")
    ap.add_argument("--probe-train", type=int, default=2048, help="synthetic scenes the factor probe learns from")
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument("--min-effect", type=float, default=0.25,
                    help="factor change (in standard deviations) an attribute needs for a main factor")
    ap.add_argument("--bound-images", type=int, default=8,
                    help="images per class on which every searched coordinate is tried, for the bound on "
                         "recovery of any single-coordinate ranking (0: skip it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.seeds is not None:
        if not args.train_steps:
            raise SystemExit("--seeds needs --train-steps: each seed is a new training run")
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        results = []
        for seed in seeds:
            start = time.perf_counter()
            run = train_run(args.train_steps, args.runs_root, [*args.override, f"seed={seed}"])
            train_seconds = time.perf_counter() - start
            results.append({"seed": seed, "train_seconds": train_seconds, **evaluate(run, args, device)})
        table = seed_table(results)
        out = {"seeds": results, "summary": table}
    else:
        run = train_run(args.train_steps, args.runs_root, args.override) if args.train_steps else (
            args.run or find_latest_run(args.runs_root))
        out = evaluate(run, args, device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


def evaluate(run: Path, args: argparse.Namespace, device: str) -> dict:
    """Ground truth, flip rates and the run's own generator figures; printed and returned."""
    exp = load_export(run, map_location=device)
    config = run_config(exp.meta, run)
    if not str((config.get("dataset") or {}).get("_target_", "")).endswith("SyntheticDataModule"):
        raise SystemExit(f"{run} was not trained on the synthetic dataset: there is no ground truth to compare with")
    t0 = time.perf_counter()
    prescreen = None if args.prescreen == "none" else int(args.prescreen)
    finder = AttFind(exp.generator, exp.classifier,
                     AttFindConfig(prescreen=prescreen, measure=args.measure, shift_size=args.shift_size,
                                   layers=args.layers), device=device)
    images, _ = validation_images(config, args.num_images, exp.resolution)
    # A run trained with model.encoder_noise draws each image's layout from the encoder's noise
    # maps: real images keep their own in every render; generated samples take those of the
    # validation images, as on the training's noise path (None for other runs: constant noise).
    noise = finder.noise_maps(exp.encoder, images)
    if args.source == "generated":
        # The generator's own samples, every class in turn: what G draws on its noise path, where
        # the encoder's reconstruction error plays no part. The validation images stay KID's real set.
        flat = finder.sample(args.num_images, seed=0)
        noise = noise_rows(noise, torch.arange(flat.shape[0]) % images.shape[0])
    else:
        flat = finder.encode(exp.encoder, images)
    refinement = None
    if args.refine_steps > 0 and args.source == "generated":
        raise SystemExit("--refine-steps refines encoded images; it does not apply to --source generated")
    if args.refine_steps > 0:
        refined = refine_latents(exp.generator, exp.encoder, exp.classifier, images, steps=args.refine_steps)
        flat = finder.styles_of(refined.w, refined.c)
        refinement = refined.to_dict()
    result = finder.run(flat, top_k=args.top_k, noise=noise)
    encoded = args.source == "val"
    suff = sufficiency(result, finder.evaluator, ks=range(1, args.flip_k + 1),
                       inputs=images if encoded else None, real_images=images,
                       feature_classifier=realism_network(config, print, exp))
    t_probe = time.perf_counter()
    scale = float(config["dataset"].get("lesion_scale", 1.0))  # the probe learns lesions of the run's size
    probe = cached_factor_probe(exp.resolution, device=device, num_train=args.probe_train, epochs=args.probe_epochs,
                                **({"lesion_scale": scale} if scale != 1.0 else {}))
    t_probe = time.perf_counter() - t_probe
    gt = ground_truth(result, finder.evaluator, probe, min_effect=args.min_effect)
    # Renders of generated samples have no real inputs to compare with.
    carried = what_renders_carry(finder, flat, images, exp.classifier, probe, noise) if encoded else {}
    swap = swap_fidelity(exp.generator, exp.encoder, exp.classifier, images, list(exp.class_names), probe=probe)
    concentration = class_shift_concentration(exp.generator, probe, counts=(1, 10, 100),
                                              noise=noise_rows(noise, torch.arange(64) % images.shape[0]))
    bound, t_bound = None, time.perf_counter()
    if args.bound_images > 0:
        coords = torch.nonzero(searched_coordinates(finder.space, args.layers)).flatten()
        pools = {c: result.pools[c][:args.bound_images] for c in result.classes if result.pools[c].numel()}
        effects = {c: coordinate_factor_effects(exp.generator, probe, result.flat[pool], result.targets[pool], coords,
                                                noise=noise_rows(noise, pool))
                   for c, pool in pools.items()}
        bound = single_coordinate_bound(effects, probe.factor_names, gt.readable, gt.causal, args.min_effect, coords)
    t_bound = time.perf_counter() - t_bound
    photometric = photometric_sensitivity(exp.classifier, images)
    thresholds = sorted({args.min_effect, 0.25, 0.1, 0.05}, reverse=True)
    sensitivity = {t: gt.scores_at(t) for t in thresholds}
    summary_file = run / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    history_file = run / "metrics" / "quality.json"
    history = json.loads(history_file.read_text()).get("history", []) if history_file.is_file() else []

    names = exp.class_names
    out = {
        "run": str(run), "g_steps": exp.meta.get("g_steps"), "images": result.num_images,
        "stable_images": int(result.stable.sum()), "attfind_mode": result.mode, "source": args.source,
        "measure": args.measure, "shift_size": args.shift_size,
        "attfind_seconds": result.seconds, "probe_seconds": t_probe,
        "classifier_metrics": exp.meta.get("classifier_metrics"), "refinement": refinement,
        "ground_truth": gt.to_dict(names), "flip_rate": suff.to_dict(),
        "ground_truth_by_min_effect": {str(t): {"recovery": r, "purity": p} for t, (r, p) in sensitivity.items()},
        "rankings": {names[c]: [a.to_dict() for a in result.rankings[c]] for c in result.classes},
        "renders_carry": {names[k]: v for k, v in carried.items()},
        "class_shift": {names[k]: v for k, v in concentration["classes"].items()},
        "class_swap": swap.to_dict(),
        "single_coordinate_bound": None if bound is None else {
            **bound, "classes": {names[k]: v for k, v in bound["classes"].items()}, "seconds": t_bound},
        "classifier_photometric_flips": photometric,
        "generator": {k: v for k, v in summary.items() if k.startswith("val/")},
        "fid_history": [(h.get("g_steps"), h.get("val/fid")) for h in history],
        "fit_seconds": summary.get("fit_seconds"),
        "total_seconds": time.perf_counter() - t0,
    }
    print(f"run {run} ({exp.meta.get('g_steps')} generator steps), {result.num_images} images, "
          f"{int(result.stable.sum())} stable")
    if refinement:
        print(f"refinement: L1 {refinement['recon_l1_before']:.4f} -> {refinement['recon_l1_after']:.4f}, agreement "
              f"{refinement['agreement_before']:.2f} -> {refinement['agreement_after']:.2f}")
    print("probe R^2:", ", ".join(f"{k} {v:.2f}" for k, v in probe.r2.items()))
    for c in result.classes:
        pc = gt.per_class[c]
        print(f"class '{names[c]}': main factors {pc['factors']}  recovery {pc['recovery']:.2f} purity {pc['purity']:.2f}")
    print(f"overall: recovery {gt.recovery:.2f}  purity {gt.purity:.2f}  (main factor: a move of >= {args.min_effect} std)")
    print("by threshold: " + ", ".join(f">= {t} std: recovery {r:.2f} purity {p:.2f}"
                                       for t, (r, p) in sensitivity.items()))
    if gt.extra.get("unreadable_causal_factors"):
        print(f"note: the probe cannot read {gt.extra['unreadable_causal_factors']} (R^2 < 0.5), so attributes "
              "changing them cannot be credited; raise --probe-train / --probe-epochs")
    print("k        " + " ".join(f"{k:5d}" for k in suff.ks))
    for name, curve in suff.curves.items():
        print(f"{name:8s} " + " ".join(f"{v:5.2f}" for v in curve))
    for line in manifold_lines(suff.to_dict()):
        print(line)
    for k, row in carried.items():
        lesions = ", ".join(f"{n} {v['real']:.2f} -> {v['render']:.2f}" for n, v in row.items() if isinstance(v, dict))
        print(f"explained renders of the {row['images']} images predicted '{names[k]}': p {row['p_real']:.3f} -> "
              f"{row['p_render']:.3f}; lesions read by the probe, real -> render: {lesions}")
    print("classifier's predictions changed by global image changes: "
          + ", ".join(f"{name} {v:.2f}" for name, v in photometric.items()))
    causal = gt.causal
    print(f"class swap on the encoded validation images (each rendered under the other classes): "
          f"{swap.overall:.2f} of the renders follow the class asked for (" + "; ".join(
              f"{a} -> {b} {v:.2f}" for a, row in swap.shares.items() for b, v in row.items()) + ")")
    for a, per in (swap.factors or {}).items():
        print(f"  lesions of the images predicted '{a}' (real / own class / swapped): " + ", ".join(
            f"{f} {v['real']:.2f} / {v['own']:.2f} / {v['swapped']:.2f}" for f, v in per.items()))
    for k, row in concentration["classes"].items():
        parts = [f"{m} coordinate{'s' if m > 1 else ''}: " + ", ".join(f"{f} {ch[f]:+.2f}" for f in causal)
                 for m, ch in row["changes"].items()]
        print(f"class switch {names[0]} -> {names[k]} on generated samples, moving the coordinates of largest "
              f"class contrast (factor change in std): " + "; ".join(parts))
    if bound is not None:
        print(f"every searched coordinate alone, on {args.bound_images} images per class ({t_bound:.0f} s): recovery "
              f"<= {bound['recovery_bound']:.2f} for any single-coordinate ranking")
        for k, row in bound["classes"].items():
            print(f"  class '{names[k]}': " + "; ".join(
                f"{f} at most {v['change']:.2f} std (coordinate {v['coordinate']}, whose main factor is "
                f"{v['main_factor']} at {v['main_change']:.2f}; {v['coordinates_with_it_as_main_factor']} "
                f"edits have {f} as main factor)" for f, v in row.items()))
    if out["generator"]:
        g = out["generator"]
        print("generator: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in g.items()
                                        if k.split("/")[1] in ("fid", "kid", "cond_fidelity", "factor_ratio", "factor_contrast")))
    if history:
        print("FID by step: " + ", ".join(f"{s}: {f:.4g}" for s, f in out["fid_history"] if f is not None))
    return out


@torch.no_grad()
def what_renders_carry(finder: AttFind, flat: torch.Tensor, images: torch.Tensor, classifier, probe,
                       noise=None) -> dict:
    """What the explained renders carry of their inputs, per predicted class: the classifier's
    probability of that class and the lesion counts the probe reads, on the real images and on
    their renders. A render the classifier puts in "DR signs" without the lesions is a render the
    generator made to satisfy the classifier, and AttFind explains that, not the lesions."""
    device = next(classifier.parameters()).device

    def batched(fn, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[i : i + 64].to(device)).float().cpu() for i in range(0, x.shape[0], 64)])

    renders = torch.cat([finder.evaluator.render(flat[i : i + 64].to(device), noise_rows(noise, slice(i, i + 64)))
                         .float().cpu() for i in range(0, flat.shape[0], 64)])
    p_real, p_render = (batched(lambda b: classifier(b).softmax(1), x) for x in (images, renders))
    f_real, f_render = (batched(probe.read, x) for x in (images, renders))
    causal = [n for n in ("exudates", "haemorrhages") if n in probe.factor_names]
    out = {}
    for k in range(p_real.shape[1]):
        m = p_real.argmax(1) == k
        if not bool(m.any()):
            continue
        row = {"images": int(m.sum()), "p_real": float(p_real[m, k].mean()), "p_render": float(p_render[m, k].mean())}
        for n in causal:
            j = probe.factor_names.index(n)
            row[n] = {"real": float(f_real[m, j].mean()), "render": float(f_render[m, j].mean())}
        out[k] = row
    return out


def seed_table(results: list[dict]) -> dict:
    """Mean and spread over seeds of the figures the issue's targets name; printed."""
    def figures(r: dict) -> dict:
        fr, gt, g = r["flip_rate"], r["ground_truth"], r["generator"]
        row = {"recovery": gt["recovery"], "purity": gt["purity"], "flip_attfind": fr["attfind"][-1],
               "flip_variance": fr["variance"][-1], "flip_random": fr["random"][-1],
               "fid": g.get("val/fid"), "cond_fidelity": g.get("val/cond_fidelity"),
               "train_seconds": r["train_seconds"]}
        row.update({k[len("val/factor_ratio/"):]: v for k, v in g.items() if k.startswith("val/factor_ratio/")})
        row.update({"contrast/" + k[len("val/factor_contrast/"):]: v for k, v in g.items()
                    if k.startswith("val/factor_contrast/")})
        return row

    rows = [figures(r) for r in results]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    table = {}
    print(f"\nover {len(rows)} seeds ({', '.join(str(r['seed']) for r in results)}):")
    for k in keys:
        values = [row[k] for row in rows if row.get(k) is not None]
        if not values:
            continue
        mean = statistics.fmean(values)
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        table[k] = {"mean": mean, "std": spread, "min": min(values), "max": max(values), "values": values}
        print(f"  {k:28s} {mean:9.3f} ± {spread:.3f}   (min {min(values):.3f}, max {max(values):.3f})")
    return table


if __name__ == "__main__":
    sys.exit(main())
