"""``stylex-explain`` (``python explain.py`` in a checkout): explain a trained run's classifier
with AttFind.

Examples::

    python explain.py --top-k 4                       # the latest run under ./runs
    python explain.py --run runs/synthetic/2025-01-01_12-00-00 --classes "DR signs"
    python explain.py --checkpoint runs/retina/<ts>/export/model.safetensors --num-images 128
    python explain.py --image eye1.png --image eye2.png   # image-specific explanations

The report lands in ``<run>/explain`` (``--out`` to change); the last printed line is the path
of its HTML page. Problems with the input (no run, not an export, a bad option, an unreadable
image) end with a one-line message and exit status 2.

This module only parses and checks the options: the work is
:func:`stylex.explain.pipeline.explain_run`, whose :class:`ExplainRequest` holds the defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from stylex.errors import UsageError
from stylex.explain.request import ExplainRequest

EXIT_USAGE = 2


PROG = "stylex-explain"  # the console script; ``python explain.py`` passes its own name

EXAMPLES = """\
examples:
  %(prog)s --top-k 4                           # the latest run under ./runs
  %(prog)s --run runs/synthetic/2025-01-01_12-00-00 --classes "DR signs"
  %(prog)s --checkpoint runs/retina/<ts>/export/model.safetensors --num-images 128
  %(prog)s --image eye1.png --image eye2.png   # explain given images
  %(prog)s --ground-truth                      # synthetic data: the factor each attribute changes
  %(prog)s --refine-steps 100                  # optimise each image's latent first
  %(prog)s --dissect                           # GAN Dissection of the run (--dissect --help)

The report lands in <run>/explain (--out to change); the last line printed is the path of its
HTML page. A problem with the input ends with one line, "error: ...", and exit status 2."""


# ============================================================================ arguments
def build_parser(
    prog: str = PROG,  # the program name in the usage line and the examples
) -> argparse.ArgumentParser:
    d = ExplainRequest()  # the defaults
    p = argparse.ArgumentParser(
        prog=prog,
        description="Explain which attributes a trained StylEx run's classifier uses (AttFind).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", type=Path, default=d.run,
                     help="run folder made by train.py (default: the latest run)")
    src.add_argument("--checkpoint", type=Path, default=d.checkpoint,
                     help="a file of a StylEx export (export/model.safetensors or stylex.json)")
    p.add_argument("--runs-root", type=Path, default=d.runs_root,
                   help=f"where to look for the latest run (default: {d.runs_root})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"attributes ranked per class (default: {d.top_k})")
    p.add_argument("--num-images", type=int, default=d.num_images, help=f"images explained (default: {d.num_images})")
    p.add_argument("--classes", action="append", default=d.classes,
                   help="class names or indices to explain, comma-separated or repeated (default: all)")
    p.add_argument("--shift-size", type=float, default=d.shift_size,
                   help=f"fraction of the way to a coordinate's min/max each edit moves (default: {d.shift_size:g})")
    p.add_argument("--out", type=Path, default=d.out, help="report folder (default: <run>/explain)")
    p.add_argument("--image", action="append", type=Path, default=d.images,
                   help="explain this image file (repeatable); resized to the model's resolution")
    p.add_argument("--source", choices=("auto", "val", "generated"), default=d.source,
                   help="images to explain without --image: the validation split of the run's dataset, "
                        "or generated samples (default: val when the run's dataset can be rebuilt)")
    p.add_argument("--measure", choices=("prob", "logit"), default=d.measure,
                   help="effect measure: class probability change or one-vs-rest logit change")
    p.add_argument("--layers", choices=("all", "conv"), default=d.layers,
                   help="style coordinates searched: all, or conv (the convolutions' only, without the "
                        f"to-RGB layers', whose edits recolour; default: {d.layers})")
    p.add_argument("--prescreen", default=d.prescreen,
                   help="'none' renders every coordinate for every image; N renders only the N best "
                        "gradient-ranked edits per class; 'auto' picks none when it fits --time-budget")
    p.add_argument("--time-budget", type=float, default=d.time_budget,
                   help=f"seconds the exhaustive search may take before --prescreen auto screens "
                        f"(default: {d.time_budget:g})")
    p.add_argument("--flip-k", type=int, default=d.flip_k,
                   help=f"flip-rate curve for k = 1..N (0 = skip; default: {d.flip_k})")
    p.add_argument("--examples", type=int, default=d.examples,
                   help=f"example pairs per attribute panel (default: {d.examples})")
    p.add_argument("--ground-truth", action="store_true",
                   help="synthetic dataset only: train a factor probe and report recovery and purity")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--devices", type=int, default=d.devices,
                   help=f"spread the images over this many devices with Lightning's predict loop "
                        f"(default: {d.devices})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="renders per forward pass (default: by device)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of generated samples (default: {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy machine)")
    p.add_argument("--refine-steps", type=int, default=d.refine_steps,
                   help="optimise each real image's latent for N steps from the encoder's before explaining "
                        f"(reconstruction L1 + class-keeping KL; default: {d.refine_steps} = off)")
    p.add_argument("--refine-lr", type=float, default=d.refine_lr, help=f"refinement learning rate (default: {d.refine_lr:g})")
    p.add_argument("--refine-kl", type=float, default=d.refine_kl,
                   help=f"weight of the refinement's class-keeping KL term (default: {d.refine_kl:g})")
    p.add_argument("--no-wandb", action="store_true", help="do not log to W&B even when the run used it")
    p.add_argument("--quiet", action="store_true", help="print only the report path")
    return p


def request_from_args(args: argparse.Namespace) -> ExplainRequest:
    """The parsed options as an :class:`ExplainRequest`."""
    return ExplainRequest(
        run=args.run, checkpoint=args.checkpoint, runs_root=args.runs_root, top_k=args.top_k,
        num_images=args.num_images, classes=args.classes, shift_size=args.shift_size, out=args.out,
        images=args.image, source=args.source, measure=args.measure, layers=args.layers, prescreen=args.prescreen,
        time_budget=args.time_budget, flip_k=args.flip_k, examples=args.examples, ground_truth=args.ground_truth,
        device=args.device, devices=args.devices, batch_size=args.batch_size, seed=args.seed,
        threads=args.threads, wandb=not args.no_wandb, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
        refine_kl=args.refine_kl,
    )


# ============================================================================ main
def main(
    argv: Sequence[str] | None = None,  # the options; None: sys.argv[1:]
    prog: str = PROG,  # how the help names the command: "stylex-explain", "python explain.py"
) -> int:
    """Run the command line; returns the exit status (0, or 2 for a problem with the input).

    The ``stylex-explain`` console script, and ``python explain.py`` in a checkout."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def say(msg: str) -> None:  # progress and notes
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    def show(msg: str) -> None:  # the summary
        if not args.quiet:
            print(msg, flush=True)

    try:
        request = request_from_args(args)
        request.check()
        from stylex.explain.pipeline import explain_run  # torch and the models load only now

        report, _ = explain_run(request, say=say, show=show)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(report.html.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
