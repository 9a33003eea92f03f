"""How effects are measured, and the edits they are measured under.

An *edit* moves style coordinate ``i`` of an image in direction ``d`` (0 = toward the
coordinate's minimum over a reference image set, 1 = toward its maximum)::

    s_i  <-  s_i + shift_size * (target_d[i] - s_i)        (shift_size 1 = exactly the min/max)

:func:`shift_targets` gives the edited value of every coordinate in both directions;
:func:`apply_edits` applies several such edits to each image at once (the top-k attributes of
the flip rate, the panels of the report).

An *effect* is the change of the classifier's output under an edit, relative to the unedited
render, in one of two measures:

- ``"prob"``: the change of the class probability;
- ``"logit"``: the change of the one-vs-rest logit ``log p_c - log(1 - p_c)``.

Everything here is pure tensor arithmetic (no networks), shared by the search, the metrics
and the report.
"""

from __future__ import annotations

import math

import torch

MEASURES = ("prob", "logit")


# ============================================================================ measures
def log1mexp(
    logp: torch.Tensor,  # log p, p in [0, 1]
) -> torch.Tensor:  # log(1 - p)
    """``log(1 - exp(logp))`` without cancellation near p = 0 or p = 1."""
    logp = logp.clamp(max=0.0)
    return torch.where(
        logp > -math.log(2.0),
        torch.log(-torch.expm1(logp)),
        torch.log1p(-torch.exp(logp)),
    )


def ovr_logit(
    logp: torch.Tensor,  # [..., K] log-probabilities
) -> torch.Tensor:  # [..., K]
    """One-vs-rest logit of every class: ``log p_c - log(1 - p_c)``, clamped to +-30 so that a
    saturated classifier gives large but finite numbers."""
    return (logp - log1mexp(logp)).clamp(-30.0, 30.0)


def to_measure(
    logp: torch.Tensor,  # [..., K] log-probabilities
    measure: str,  # "prob" | "logit"
) -> torch.Tensor:  # [..., K]
    if measure == "prob":
        return logp.exp()
    if measure == "logit":
        return ovr_logit(logp)
    raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def measure_change(
    logp_edit: torch.Tensor,  # [N, ..., K] log-probabilities of edited renders (NaN = not rendered)
    logp_base: torch.Tensor,  # [N, K] log-probabilities of the unedited renders
    measure: str,
) -> torch.Tensor:  # [N, ..., K]: effect on every class, NaN where not rendered
    """Effect of each edit on each class, in ``measure`` units."""
    n, k = logp_base.shape
    assert logp_edit.shape[0] == n and logp_edit.shape[-1] == k, (
        f"edited log-probabilities {tuple(logp_edit.shape)} do not match the base {tuple(logp_base.shape)}"
    )
    base = logp_base.view(n, *([1] * (logp_edit.ndim - 2)), k)
    return to_measure(logp_edit, measure) - to_measure(base, measure)


# ============================================================================ edits and targets
def shift_targets(
    flat: torch.Tensor,  # [N, S] styles of the explained images
    low: torch.Tensor,  # [S] per-coordinate minimum over the reference set
    high: torch.Tensor,  # [S] per-coordinate maximum over the reference set
    shift_size: float = 1.0,
) -> torch.Tensor:  # [N, S, 2]: the edited value of every coordinate, toward min (0) / max (1)
    """``s + shift_size * (extreme - s)`` for both extremes."""
    assert flat.ndim == 2 and low.shape == high.shape == flat.shape[1:], (
        f"styles {tuple(flat.shape)} and min/max {tuple(low.shape)}/{tuple(high.shape)} must be [N, S] and [S]"
    )
    extremes = torch.stack([low, high], dim=-1).to(flat)  # [S, 2]
    return flat[:, :, None] + shift_size * (extremes[None] - flat[:, :, None])


def apply_edits(
    flat: torch.Tensor,  # [N, S] styles
    targets: torch.Tensor,  # [N, S, 2] the edited value of every coordinate in each direction
    coords: torch.Tensor,  # [N, k] int64 coordinates to change per image (-1 = none)
    dirs: torch.Tensor,  # [N, k] int64 direction of each (0 = toward min, 1 = toward max)
) -> torch.Tensor:  # [N, S]
    """``flat`` with, in row n, every listed coordinate set to its target in its direction."""
    n, s = flat.shape
    assert targets.shape == (n, s, 2), f"targets must be [{n}, {s}, 2], got {tuple(targets.shape)}"
    assert coords.shape == dirs.shape and coords.shape[0] == n, (
        f"coords and dirs must both be [{n}, k], got {tuple(coords.shape)} and {tuple(dirs.shape)}"
    )
    out = flat.clone()
    for j in range(coords.shape[1]):  # one column at a time: k is small, and -1 slots are skipped
        rows = torch.nonzero(coords[:, j] >= 0).flatten()
        c, d = coords[rows, j], dirs[rows, j]
        out[rows, c] = targets[rows, c, d].to(out.dtype)
    return out


def farther_direction(
    flat: torch.Tensor,  # [N, S]
    targets: torch.Tensor,  # [N, S, 2]
) -> torch.Tensor:  # [N, S] int64: the direction whose target lies farther from the value
    return ((targets[..., 1] - flat).abs() > (targets[..., 0] - flat).abs()).long()
