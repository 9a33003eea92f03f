"""Explain a trained run's classifier: ``python explain.py --top-k 4`` (see stylex/explain/cli.py)."""

import sys

from stylex.explain.cli import main

if __name__ == "__main__":
    sys.exit(main())
