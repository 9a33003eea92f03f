"""The ADA controller: adapts the augmentation probability p to how much D overfits.

Karras et al. (NeurIPS 2020) measure overfitting by ``r_t = E[sign(D(x_real))]`` over D's raw
logits on the (augmented) real images: 0 when D cannot tell reals from fakes, 1 when it is
certain of every real image, which on a small dataset means it has memorised them. Every
``interval`` discriminator steps the controller sets

    p ← clamp(p + sign(r_t − target) · N / (kimg · 1000), 0, 1)

where N is the number of real images the signs were taken over (batch · interval on one
process, summed over every rank under DDP), so that p can move from 0 to 1 in ``kimg``
thousand images whatever the batch size. The sums are reduced over ranks with the caller's
``reduce`` before the update, so every rank applies the same step and p stays equal everywhere.

The controller holds the signs between updates on the device (no read until an update is due)
and writes p through :meth:`~stylex.training.augment.AugmentPipe.set_p`; p itself lives in the
pipe's buffer and so in the checkpoint. Signs gathered since the last update are not saved: a
resumed run starts a fresh interval.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from stylex.training.augment import AugmentPipe

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over ranks (identity on one process)


class AdaController:
    """Adapts ``pipe``'s p from D's logits on real images (see the module docstring)."""

    def __init__(
        self,
        pipe: AugmentPipe,  # whose p is adapted
        target: float = 0.6,  # the r_t that p steers toward
        interval: int = 4,  # discriminator steps between updates
        kimg: float = 10.0,  # thousands of images over which p can move from 0 to 1
    ) -> None:
        if interval < 1 or not kimg > 0:
            raise ValueError(f"ADA needs interval >= 1 and kimg > 0, got interval={interval}, kimg={kimg}")
        self.pipe, self.target, self.interval, self.kimg = pipe, float(target), int(interval), float(kimg)
        self._stats: torch.Tensor | None = None  # [2] (sum of signs, count) since the last update
        self._steps = 0

    def accumulate(self, real_logits: torch.Tensor) -> None:  # [B, 1] D's raw logits on augmented reals
        """Add one discriminator step's signs (no device read)."""
        signs = torch.sign(real_logits.detach().float())
        stats = torch.stack([signs.sum(), signs.new_tensor(float(signs.numel()))])  # [2]
        self._stats = stats if self._stats is None else self._stats + stats
        self._steps += 1

    def update(self, reduce: Reduce | None = None) -> float | None:
        """Update p if ``interval`` steps have been accumulated; returns that interval's r_t, or
        None when no update was due. One device read per update."""
        if self._steps < self.interval or self._stats is None:
            return None
        stats = self._stats if reduce is None else reduce(self._stats.clone())
        sign_sum, count = (float(v) for v in stats.tolist())
        self._stats, self._steps = None, 0
        rt = sign_sum / count
        adjust = math.copysign(1.0, rt - self.target) if rt != self.target else 0.0
        self.pipe.set_p(min(1.0, max(0.0, self.pipe.p_value + adjust * count / (self.kimg * 1000))))
        return rt

    def step(
        self,
        real_logits: torch.Tensor,  # [B, 1] D's raw logits on augmented reals
        reduce: Reduce | None = None,  # sums over ranks (DDP); None on one process
    ) -> float | None:
        """:meth:`accumulate` then :meth:`update`: call once after each discriminator step."""
        self.accumulate(real_logits)
        return self.update(reduce)
