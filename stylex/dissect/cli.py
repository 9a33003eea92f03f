"""``stylex-explain --dissect`` (``python explain.py --dissect``): dissect a trained run.

Examples::

    python explain.py --dissect                                   # the latest run under ./runs
    python explain.py --dissect --run runs/synthetic/<ts> --layers b16.conv0 b16.conv1
    python explain.py --dissect --segmenter my_unet.json          # concepts from your segmenter

The report lands in ``<run>/dissect`` (``--out`` to change); the last printed line is its
``report.html``. Bad input (no run, an unknown layer, a segmenter that does not fit, N < 1)
ends with one line, ``error: ...``, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from stylex.errors import UsageError

EXIT_USAGE = 2
EXAMPLES = """\
examples:
  %(prog)s --dissect                                  # the latest run under ./runs
  %(prog)s --dissect --run runs/synthetic/<ts> --layers b16.conv0 b16.conv1
  %(prog)s --dissect --segmenter my_unet.json         # concepts from your own segmenter
  %(prog)s --dissect --num-images 200 --no-artifacts  # a quick look

Concepts: the synthetic data's U-Net (trained once per resolution and cached), a segmenter you
give, or else the classifier's own class evidence (Grad-CAM). The report lands in <run>/dissect;
the last line printed is its report.html."""


def build_parser(prog: str = "stylex-explain") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Dissect a trained StylEx run's generator (GAN Dissection).")
    p.add_argument("--dissect", action="store_true", required=True, help="dissect instead of explaining")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", type=Path, help="a run folder made by train.py (default: the latest under --runs-root)")
    src.add_argument("--checkpoint", type=Path, help="an export folder or file (<run>/export)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="where to look for the latest run")
    p.add_argument("--out", type=Path, help="report folder (default: <run>/dissect)")
    p.add_argument("--layers", nargs="+", help="unit layers to dissect (default: every one)")
    p.add_argument("--num-images", type=int, default=1000, help="generated samples dissected (default 1000)")
    p.add_argument("--encoded-images", type=int, default=200,
                   help="validation images dissected through the encoder (default 200; 0 = none)")
    p.add_argument("--segmenter", type=Path, help="a segmenter file (TorchScript, or safetensors + JSON)")
    p.add_argument("--quantile", type=float, default=0.01, help="unit threshold: top quantile (default 0.01)")
    p.add_argument("--iou-threshold", type=float, default=0.05, help="interpretable from this IoU (default 0.05)")
    p.add_argument("--intervention-images", type=int, default=128, help="samples per intervention measurement")
    p.add_argument("--no-artifacts", action="store_true", help="skip the artifact-unit FID comparison")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="only the report's path")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "stylex-explain") -> int:
    args = build_parser(prog).parse_args(argv)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.num_images < 1:
            raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
        for name in ("intervention_images", "encoded_images"):
            if getattr(args, name) < (1 if name == "intervention_images" else 0):
                raise UsageError(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")
        if not 0.0 < args.quantile < 1.0:
            raise UsageError(f"--quantile must lie in (0, 1), got {args.quantile}")
        if args.segmenter is not None and not args.segmenter.exists():
            raise UsageError(f"--segmenter {args.segmenter}: no such file")
        from stylex.dissect.run import dissect_run

        page = dissect_run(args, say)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(page, flush=True)
    return 0
