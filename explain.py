"""Explain a trained run's classifier: ``python explain.py --top-k 4`` (see stylex/explain/cli.py; --dissect: stylex/dissect/cli.py).

The same as the ``stylex-explain`` command of an installed StylEx.
"""

import sys

from stylex.cli import explain_main

if __name__ == "__main__":
    sys.exit(explain_main(prog="python explain.py"))
