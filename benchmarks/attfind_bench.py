"""AttFind speed, and how well pre-screening reproduces the exhaustive search.

    python benchmarks/attfind_bench.py [--model cpu32] [--run <run folder>] [--num-images 64]
                                       [--prescreen 16] [--exhaustive-images 2] [--device auto]

Builds the preset's generator and classifier (random weights: the speed does not depend on them;
``--run`` explains a trained export instead, which the agreement figures need to be meaningful),
encodes nothing (styles come from the mapping network) and measures:

1. the exhaustive search (every coordinate, both directions) on ``--exhaustive-images`` images,
   with and without prefix reuse (the fastest of ``--repeats`` interleaved runs): seconds per
   image;
2. the pre-screened search over ``--num-images`` images: total seconds and seconds per image
   (targets: <= 60 s for 64 images of the cpu32 preset on a 2-core CPU; <= 0.5 s per image for
   all coordinates of a 64x64 model on a GPU);
3. agreement of the pre-screened rankings with the exhaustive ones on the exhaustive images
   (top-k overlap of the class rankings, top-1 / top-k agreement of the image rankings).

Results are printed and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from stylex.classifier import build_classifier  # noqa: E402
from stylex.explain.attfind import AttFind, AttFindConfig  # noqa: E402
from stylex.explain.metrics import agreement  # noqa: E402
from stylex.networks import Generator  # noqa: E402
from stylex.training.run import network_kwargs  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build_networks(model: str, num_classes: int, device: str):
    """The preset's generator (random, EMA-like: eval and frozen) and an untrained classifier."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(config_name="train", overrides=[f"model={model}", "logger=none"])
    g_kw, _, _ = network_kwargs(cfg, num_classes)
    torch.manual_seed(0)
    g = Generator(**g_kw).eval().requires_grad_(False).to(device)
    from omegaconf import OmegaConf

    c = build_classifier(OmegaConf.to_container(cfg.classifier, resolve=True), num_classes).freeze().to(device)
    return g, c, g_kw


def exhaustive_timings(args, base: AttFindConfig, ex_images: torch.Tensor, timed, results: dict, dim: int):
    """Exhaustive search with and without prefix reuse, interleaved; returns its result."""
    no_reuse = AttFindConfig(batch_size=args.batch_size, reuse_prefix=False)
    t_ex, t_nr = [], []
    for _ in range(args.repeats):  # interleaved, so that a change of machine load hits both alike
        exhaustive, t = timed(base, ex_images)
        t_ex.append(t)
        if not args.skip_no_reuse:
            t_nr.append(timed(no_reuse, ex_images)[1])
    per_image = min(t_ex) / ex_images.shape[0]
    results["exhaustive"] = {"images": ex_images.shape[0], "seconds": min(t_ex), "seconds_per_image": per_image,
                             "edits_per_image": 2 * dim, "repeats": t_ex}
    print(f"exhaustive, prefix reuse: {per_image:.3f} s/image ({2 * dim / per_image:.0f} edits/s)")
    if t_nr:
        results["exhaustive_no_reuse"] = {"seconds_per_image": min(t_nr) / ex_images.shape[0], "repeats": t_nr}
        print(f"exhaustive, full renders: {min(t_nr) / ex_images.shape[0]:.3f} s/image")
    return exhaustive


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu32", help="model preset (configs/model), ignored with --run")
    ap.add_argument("--run", type=Path, default=None, help="a trained run (or export) instead of random networks")
    ap.add_argument("--num-classes", type=int, default=2)
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--prescreen", type=int, default=16, help="candidate edits per class under pre-screening")
    ap.add_argument("--exhaustive-images", type=int, default=2, help="images for the exhaustive timing and agreement (0 = skip)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-no-reuse", action="store_true", help="skip the exhaustive run without prefix reuse")
    ap.add_argument("--repeats", type=int, default=2, help="exhaustive timings repeated; the fastest counts")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.exhaustive_images < 0 or args.num_images < 1 or args.repeats < 1:
        ap.error("--exhaustive-images must be >= 0 (0 = skip the exhaustive search), --num-images and --repeats >= 1")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.run is not None:
        from stylex.export import load_export

        exp = load_export(args.run, map_location=device)
        g, c, g_kw = exp.generator, exp.classifier, exp.meta["generator"]
        model = f"run {args.run}"
    else:
        g, c, g_kw = build_networks(args.model, args.num_classes, device)
        model = args.model
    base = AttFindConfig(batch_size=args.batch_size)
    finder = AttFind(g, c, base)
    flat = finder.sample(args.num_images, seed=0)
    dim = finder.space.dim
    info = {"model": model, "resolution": g_kw["resolution"], "style_coordinates": dim, "device": device,
            "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    print(json.dumps(info))
    finder.run(flat[:1], top_k=1, reference=flat)  # warm-up (allocator, kernels)

    def timed(config: AttFindConfig, images: torch.Tensor):
        f = AttFind(g, c, config)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = f.run(images, top_k=args.top_k, reference=flat)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return r, time.perf_counter() - t

    results: dict = {"info": info}
    ex_images = flat[: args.exhaustive_images]
    exhaustive = None
    if ex_images.shape[0]:
        exhaustive = exhaustive_timings(args, base, ex_images, timed, results, dim)

    screened_cfg = AttFindConfig(batch_size=args.batch_size, prescreen=args.prescreen)
    screened, t_sc = timed(screened_cfg, flat)
    results["prescreen"] = {"images": flat.shape[0], "candidates_per_class": args.prescreen, "seconds": t_sc,
                            "seconds_per_image": t_sc / flat.shape[0], "timings": screened.timings,
                            "edits_per_image": float(screened.evaluated.sum(dim=(1, 2)).double().mean())}
    print(f"pre-screened ({args.prescreen}/class): {t_sc:.1f} s for {flat.shape[0]} images = "
          f"{t_sc / flat.shape[0]:.3f} s/image, {results['prescreen']['edits_per_image']:.0f} edits/image")

    if exhaustive is not None:  # agreement on the same images and targets as the exhaustive search
        same, _ = timed(screened_cfg, ex_images)
        results["agreement"] = agreement(same, exhaustive)
        print("agreement with the exhaustive search:", json.dumps(results["agreement"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
