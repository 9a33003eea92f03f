"""Unit dissection speed and memory: every unit layer of a preset's generator over many images.

    python benchmarks/dissect_bench.py [--model cpu32] [--num-images 1000] [--batch-size N]
                                       [--device auto] [--threads N] [--out dissect_bench.json]

Builds the preset's generator with random weights (``configs/model/<model>.yaml``, two classes:
the speed does not depend on the weights) and dissects every unit layer against a cheap stand-in
segmenter (colour thresholds: dark, bright, red-dominant, green-dominant pixels), two passes over
the images as :func:`stylex.dissect.dissection.dissect` does. Prints the wall time, images per
second (counting each image once) and the peak resident memory of the process
(``resource.getrusage``). Target: <= 2 minutes for 1,000 images of ``cpu32`` on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from stylex.dissect.base import unit_counts  # noqa: E402
from stylex.dissect.dissection import dissect  # noqa: E402
from stylex.networks import Generator  # noqa: E402
from stylex.stylespace import StyleSpace  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ColourSegmenter:
    """Stand-in concepts from colour thresholds of generator-range images."""

    concepts = ["dark", "bright", "red", "green"]
    source = "colour thresholds (benchmark stand-in)"

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, R, R] -> bool [B, 4, R, R]
        lum = images.mean(dim=1)
        r, g, b = images.unbind(dim=1)
        return torch.stack([lum < -0.3, lum > 0.3, (r > g + 0.1) & (r > b + 0.1), (g > r + 0.1) & (g > b + 0.1)], dim=1)


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (1024.0 * 1024.0) if sys.platform == "darwin" else kib / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cpu32", help="model preset in configs/model/")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=None, help="renders per batch (default: the dissection's)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = OmegaConf.load(CONFIGS / "model" / f"{args.model}.yaml")
    kwargs = dict(z_dim=cfg.z_dim, w_dim=cfg.w_dim, c_dim=2, resolution=cfg.resolution, channel_base=cfg.channel_base,
                  channel_max=cfg.channel_max, mapping_layers=cfg.mapping_layers, conv_clamp=cfg.conv_clamp)
    torch.manual_seed(0)
    g = Generator(**kwargs).eval().requires_grad_(False).to(device)
    space = StyleSpace(g)
    counts = unit_counts(space)
    print(f"{args.model}: {cfg.resolution}x{cfg.resolution}, {len(counts)} unit layers, {sum(counts.values())} units; "
          f"{args.num_images} images on {device} ({torch.get_num_threads()} threads)")

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    d = dissect(space, ColourSegmenter(cfg.resolution), num_images=args.num_images, batch_size=args.batch_size,
                device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    figures = {
        "model": args.model,
        "device": device,
        "threads": torch.get_num_threads(),
        "num_images": args.num_images,
        "units": sum(counts.values()),
        "seconds": round(seconds, 2),
        "images_per_second": round(args.num_images / seconds, 1),
        "timings": {k: round(v, 2) for k, v in d.timings.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(d.summary())
    print(f"time {figures['seconds']} s ({', '.join(f'{k} {v} s' for k, v in figures['timings'].items())}), "
          f"{figures['images_per_second']} images/s, peak RSS {figures['peak_rss_mib']} MiB"
          + (f", peak GPU {figures['peak_gpu_mib']} MiB" if figures["peak_gpu_mib"] is not None else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
