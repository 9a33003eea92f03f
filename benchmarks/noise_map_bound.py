"""What single style coordinates do to the lesions of a run's own reconstructions.

    python benchmarks/noise_map_bound.py --run runs/synthetic/<timestamp>
    python benchmarks/noise_map_bound.py --run <run> --images 8 --min-effect 0.25

For a run on the synthetic data, this reads the validation images through the run's encoder
(with its noise maps when the run was trained with ``model.encoder_noise=true``), moves every
style coordinate alone to its minimum and to its maximum over those images (AttFind's edits,
shift size 1), renders each edit with *that image's* noise maps, and reads the factors with the
factor probe of ``explain_quality.py``. It prints:

- what the unedited renders carry: the probe's lesion counts on the real images and on their
  renders, per predicted class (a render without the lesions gives AttFind nothing to find);
- the single-coordinate bound of ``explain_quality.py`` (:func:`stylex.explain.factors.single_coordinate_bound`):
  per class pool (the images not predicted as that class, AttFind's pool) and causal factor, the
  coordinate that moves the factor most, how far in standard deviations, and whether it is that
  coordinate's main factor. No ranking of single coordinates recovers a factor no coordinate moves.

``explain_quality.py`` reports the same bound beside AttFind's rankings; this script is its
quick part, without the search.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from stylex.data.synthetic import CAUSAL_FACTORS  # noqa: E402
from stylex.explain.factors import coordinate_factor_effects, single_coordinate_bound  # noqa: E402
from stylex.explain.inputs import run_config, validation_images  # noqa: E402
from stylex.explain.measures import shift_targets  # noqa: E402
from stylex.export import load_export  # noqa: E402
from stylex.metrics.probe import cached_factor_probe  # noqa: E402
from stylex.stylespace import StyleSpace, noise_rows  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder with export/ (synthetic data)")
    ap.add_argument("--num-images", type=int, default=128, help="validation images encoded (the min/max set)")
    ap.add_argument("--images", type=int, default=8, help="images per class pool on which every coordinate is moved")
    ap.add_argument("--min-effect", type=float, default=0.25)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    exp = load_export(args.run, map_location="cpu")
    config = run_config(exp.meta, args.run)
    if not str((config.get("dataset") or {}).get("_target_", "")).endswith("SyntheticDataModule"):
        raise SystemExit(f"{args.run} was not trained on the synthetic dataset: there is no ground truth "
                         "to compare with")
    G, E, C = exp.generator.eval(), exp.encoder.eval(), exp.classifier.eval()
    images, _ = validation_images(config, args.num_images, exp.resolution)
    space = StyleSpace(G)
    c = C(images).float().softmax(dim=1)
    flat = space.flat_styles(E(images), c)
    maps = E.noise_maps(images)
    print(f"{args.run}: encoder noise maps {'on' if maps is not None else 'off'}, {space.dim} style coordinates")
    stats = space.statistics(flat)
    targets = shift_targets(flat, stats["min"], stats["max"], 1.0)
    scale = float(config["dataset"].get("lesion_scale", 1.0))
    probe = cached_factor_probe(exp.resolution, **({"lesion_scale": scale} if scale != 1.0 else {}))
    names = list(probe.factor_names)
    readable = probe.readable(0.5)
    renders = G.synthesize(space.unflatten(flat), noise_mode="const", noise=maps).clamp(-1, 1)
    real_read, rec_read = probe.read(images), probe.read(renders)
    pred = c.argmax(dim=1)
    class_names = list(exp.class_names)
    print("what the renders carry (probe reading, real -> render), per predicted class:")
    for k, name in enumerate(class_names):
        sel = pred == k
        if not sel.any():
            continue
        def mean(read, f):
            return float(read[sel, names.index(f)].mean())

        parts = [f"{f} {mean(real_read, f):.2f} -> {mean(rec_read, f):.2f}" for f in CAUSAL_FACTORS if f in names]
        print(f"  {name!r} ({int(sel.sum())} images): " + ", ".join(parts))
    agreement = float((C(renders).argmax(dim=1) == pred).float().mean())
    print(f"  reconstruction L1 {float((renders - images).abs().mean()):.4f}, class agreement {agreement:.2f}")

    start = time.perf_counter()
    effects = {}
    for k in range(len(class_names)):
        pool = torch.nonzero(pred != k).flatten()[: args.images]
        if pool.numel() == 0:
            continue
        effects[k] = coordinate_factor_effects(G, probe, flat[pool], targets[pool], noise=noise_rows(maps, pool))
    bound = single_coordinate_bound(effects, names, readable, CAUSAL_FACTORS, args.min_effect)
    print(f"every coordinate alone, on up to {args.images} images per class pool ({time.perf_counter() - start:.0f} s): "
          f"recovery <= {bound['recovery_bound']:.2f} at {args.min_effect} std")
    for k, rows in bound["classes"].items():
        for f, row in rows.items():
            layer, channel = space.coordinate(row["coordinate"])
            print(f"  pool of {class_names[k]!r}: {f} moved most by {layer}[{channel}] "
                  f"{'to min' if row['direction'] == 0 else 'to max'}: {row['change']:.2f} std; its main factor "
                  f"{row['main_factor']} ({row['main_change']:.2f} std); {row['coordinates_with_it_as_main_factor']} "
                  f"coordinate-directions have {f} as main factor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
