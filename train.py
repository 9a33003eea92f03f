"""Train StylEx: ``python train.py [group=option ...] [key=value ...]`` (see README.md).

The same as the ``stylex-train`` command of an installed StylEx: both call
:func:`stylex.cli.train_main`.
"""

import sys

from stylex.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
