"""Which process of a distributed run this is."""

from __future__ import annotations

from pytorch_lightning.utilities import rank_zero_only


def is_rank_zero() -> bool:
    """Whether this process is global rank zero.

    Lightning sets ``rank_zero_only.rank`` when it is imported, from the variables of the
    launchers (torchrun, SLURM, its own subprocess launcher), and again when a strategy starts,
    so this is right before a Trainer exists as well as inside one.
    """
    return getattr(rank_zero_only, "rank", 0) == 0
