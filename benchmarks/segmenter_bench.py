"""Held-out IoU per concept, training time and inference speed of the synthetic segmenter.

    python benchmarks/segmenter_bench.py                         # 32x32, lesion scales 1.6 and 1.0 (cached)
    python benchmarks/segmenter_bench.py --retrain               # train afresh, in a temporary cache
    python benchmarks/segmenter_bench.py --resolution 64 --lesion-scale 1.6

Trains (or loads from the cache) one segmenter per lesion scale with the default settings, then
measures it on scenes of the "test" split, which training never sees (it learns from "train" and
records its IoU on "val"), at its own lesion scale and at the others. On a CPU shared with other
jobs, pass --threads 1: two threads fighting other processes for two cores trained ten times
slower in one measurement (947 s against 86 s).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stylex.dissect.segmenter import (  # noqa: E402
    SegmenterTrainConfig,
    cached_segmenter_path,
    segmenter_iou,
    synthetic_scenes,
    synthetic_segmenter,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--lesion-scale", type=float, nargs="+", default=[1.6, 1.0])
    parser.add_argument("--num-test", type=int, default=1024, help="held-out test scenes per lesion scale")
    parser.add_argument("--retrain", action="store_true", help="train in a temporary cache instead of reusing one")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SegmenterTrainConfig()
    print(f"settings: {config}")
    print(f"torch threads: {torch.get_num_threads()}")
    folder = Path(tempfile.mkdtemp(prefix="segmenters_")) if args.retrain else None
    try:
        run(args, config, folder)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def run(
    args: argparse.Namespace,  # the parsed command line
    config: SegmenterTrainConfig,  # training settings
    folder: Path | None,  # cache folder; None = the user's cache
) -> None:
    r = args.resolution
    scenes = {s: synthetic_scenes(args.num_test, r, s, split="test") for s in args.lesion_scale}
    for scale in args.lesion_scale:
        cached = cached_segmenter_path(r, scale, config, folder).is_file()
        start = time.perf_counter()
        segmenter = synthetic_segmenter(r, scale, folder=folder, config=config, progress=True)
        wall = time.perf_counter() - start
        how = f"loaded from the cache in {wall:.1f} s" if cached else f"{wall:.1f} s including rendering"
        print(f"\n== {r}x{r}, lesion scale {scale:g}: {segmenter.source}")
        print(f"training: {segmenter.train_seconds:.1f} s recorded ({how}); loss per epoch "
              + " ".join(f"{v:.3f}" for v in segmenter.loss_history))
        images, _ = scenes[scale]
        segmenter(images[:64])  # warm-up
        start = time.perf_counter()
        segmenter(images)
        speed = images.shape[0] / (time.perf_counter() - start)
        print(f"inference: {speed:.0f} images/s (batches of {segmenter.batch_size})")
        names = segmenter.concepts
        print(f"{'test scenes':>22} " + " ".join(f"{n:>11}" for n in names) + f" {'mean':>7}")
        print(f"{'val (recorded)':>22} " + " ".join(f"{segmenter.iou[n]:11.3f}" for n in names)
              + f" {segmenter.mean_iou:7.3f}")
        for other, (images, masks) in scenes.items():
            iou = segmenter_iou(segmenter, images, masks)
            mean = sum(iou.values()) / len(iou)
            print(f"{f'test, lesion scale {other:g}':>22} " + " ".join(f"{iou[n]:11.3f}" for n in names)
                  + f" {mean:7.3f}")


if __name__ == "__main__":
    main()
