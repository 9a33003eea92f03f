"""Streaming statistics of dissection: per-unit top-quantile thresholds and unit/concept overlaps.

Both statistics are accumulated batch by batch, so a dissection over many images never holds
more than one batch of activations.

Top-quantile threshold
    For unit ``u`` let ``a`` range over its activations at every position of every image (at the
    unit's own resolution). Its threshold is the upper ``q`` quantile

        t_u = Q_{1-q}(a),        P(a > t_u) ≈ q          (q = 0.01: the 99th percentile)

    :class:`RunningQuantile` estimates it from a per-unit histogram of ``bins`` equal bins over a
    range ``[lo_u, lo_u + bins · w_u)`` that adapts to the data: the first batch sets it to the
    batch's min and max; a later value outside it doubles the range (``w_u ← 2 w_u``, extended
    up or down) and merges neighbouring bins in pairs, until every value fits. Quantiles follow
    ``torch.quantile``'s rule: at probability ``p`` the (1-based, fractional) rank is
    ``r = 1 + p (n - 1)`` and the values of the integer ranks around it are interpolated
    linearly. The k-th value lies in the bin ``j_k`` with ``C_{j_k - 1} < k ≤ C_{j_k}`` (``C`` the
    cumulative counts), inside which the bin's ``c_j`` values are taken as evenly spread::

        V(k) ≈ lo_u + w_u (j_k + (k - C_{j_k - 1} - 1/2) / c_{j_k})
        Q_p  ≈ (1 - f) V(⌊r⌋) + f V(⌈r⌉),        f = r - ⌊r⌋

    Each ``V(k)`` lies in the bin of the true k-th value, so the error is below one bin width
    ``w_u`` = (final range) / bins. Memory is ``units × bins`` counts whatever the number of
    images. Two histograms merge (e.g. across processes) by re-binning the other's bin centres
    into this one's range (up to one more bin of error).

Overlap with concepts (GAN Dissection, Bau et al., ICLR 2019)
    Unit maps ``A_u`` are upsampled bilinearly to the segmentation's resolution and thresholded:
    ``M_u = A_u↑ > t_u``. With concept masks ``S_c`` (booleans per pixel), sums run over every
    pixel of every image::

        I_{u,c} = Σ |M_u ∧ S_c|,    U_{u,c} = Σ |M_u ∨ S_c| = Σ|M_u| + Σ|S_c| − I_{u,c}
        IoU_{u,c} = I_{u,c} / U_{u,c}                        (0 where the union is empty)
        k_{u,c}   = Σ A_u↑ · S_c / Σ S_c                     (NaN where the concept never occurs)

    ``I`` and ``Σ A↑ · S`` are one batched matrix product, ``[B, U, H·W] @ [B, H·W, C]``, summed
    over the batch.
    ``k_{u,c}`` is the unit's mean (upsampled) activation where the concept is present: the value
    that inserting the concept sets the unit to. :class:`IoUAccumulator` keeps these sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def interpolation_matrix(
    size_in: int,  # h
    size_out: int,  # R
    device: torch.device | str | None = None,
) -> torch.Tensor:  # [R, h] float32: row i holds the weights of output pixel i
    """1-D linear interpolation (``align_corners=False``, edges clamped) as a matrix:
    ``M @ v`` resamples a length-``h`` signal ``v`` to length ``R`` exactly as
    ``F.interpolate(mode="linear")`` does."""
    eye = torch.eye(size_in, device=device)[:, None, :]  # [h, 1, h]: every unit impulse
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


_MATRICES: dict[tuple[int, int, str], torch.Tensor] = {}


def upsample_maps(
    maps: torch.Tensor,  # [B, U, h, w] unit maps
    size: int,  # the segmentation's side R
) -> torch.Tensor:  # [B, U, R, R] float32
    """Bilinear upsampling (``align_corners=False``) to ``size``; maps already that size are
    returned as they are.

    Bilinear interpolation is separable, so it is computed as ``M_h A M_w^T`` with the 1-D
    interpolation matrices of :func:`interpolation_matrix`: the same weights as
    ``F.interpolate(mode="bilinear")`` (results agree to float rounding) at a fraction of the
    cost on a CPU.
    """
    if maps.ndim != 4:
        raise ValueError(f"unit maps must have shape [batch, units, height, width], got {tuple(maps.shape)}")
    maps = maps.float()
    h, w = maps.shape[-2:]
    if (h, w) == (size, size):
        return maps

    def matrix(n: int) -> torch.Tensor:
        key = (n, size, str(maps.device))
        if key not in _MATRICES:
            _MATRICES[key] = interpolation_matrix(n, size, maps.device)
        return _MATRICES[key]

    return matrix(h) @ maps @ matrix(w).T


def _overlaps(
    values: torch.Tensor,  # [B, U, R*R] float32 (0/1 for counts)
    masks: torch.Tensor,  # [B, R*R, C] float32 0/1
) -> torch.Tensor:  # [U, C] float64: Σ_b Σ_p values · masks
    # One matrix product per image; float32 sums of at most R*R 0/1 values are exact (R < 4096),
    # and the sum over images is taken in float64.
    return torch.bmm(values, masks).double().sum(dim=0)


def overlap_counts(
    active: torch.Tensor,  # bool [B, U, R, R] where each unit (or map) is on
    masks: torch.Tensor,  # bool [B, C, R, R] concept masks
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # inter [U, C], area of active [U], of masks [C]
    """Pixel counts ``Σ|active_u ∧ mask_c|``, ``Σ|active_u|`` and ``Σ|mask_c|`` over the batch
    (float64)."""
    if active.ndim != 4 or masks.ndim != 4 or active.shape[0] != masks.shape[0] or active.shape[2:] != masks.shape[2:]:
        raise ValueError(
            f"maps {tuple(active.shape)} and masks {tuple(masks.shape)} must be [B, U, R, R] and [B, C, R, R] "
            "with the same batch and side"
        )
    b, u = active.shape[:2]
    c = masks.shape[1]
    a = active.reshape(b, u, -1).float()
    s = masks.reshape(b, c, -1).float()
    return _overlaps(a, s.transpose(1, 2)), a.sum(dim=2).double().sum(dim=0), s.sum(dim=2).double().sum(dim=0)


class RunningQuantile:
    """Per-unit quantiles of a stream of activations, from adaptive-range histograms.

    ``add`` takes batches ``[B, U, ...]`` (units on dim 1, any positions after) or ``[N, U]``;
    ``quantile(p)`` gives ``[U]``. See the module docstring for the method and its error bound
    (one bin width, :attr:`bin_width`).
    """

    def __init__(
        self,
        units: int,  # U
        bins: int = 2048,  # histogram bins per unit (even); the error bound is range / bins
        device: torch.device | str | None = None,
    ) -> None:
        if units < 1:
            raise ValueError(f"RunningQuantile needs at least one unit, got {units}")
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.units = int(units)
        self.bins = int(bins)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.counts = torch.zeros(self.units, self.bins, dtype=torch.int64, device=self.device)
        self.lo = torch.zeros(self.units, dtype=torch.float64, device=self.device)
        self.width = torch.ones(self.units, dtype=torch.float64, device=self.device)
        self.initialised = False

    @property
    def count(self) -> int:
        """Values seen per unit."""
        return int(self.counts[0].sum()) if self.initialised else 0

    @property
    def bin_width(self) -> torch.Tensor:  # [U]
        return self.width.clone()

    @property
    def hi(self) -> torch.Tensor:  # [U] the (exclusive) top of each unit's range
        return self.lo + self.bins * self.width

    def add(
        self,
        x: torch.Tensor,  # [B, U, ...] or [N, U] activations
    ) -> None:
        if x.ndim < 2 or x.shape[1] != self.units:
            raise ValueError(f"RunningQuantile of {self.units} units got a batch of shape {tuple(x.shape)}; "
                             f"units must be dim 1")
        if x.numel() == 0:
            return
        x = x.detach().to(self.device).float().reshape(x.shape[0], self.units, -1)  # [B, U, P]
        low = x.amin(dim=(0, 2)).double()  # [U]
        high = x.amax(dim=(0, 2)).double()
        if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):  # NaN propagates to min / max
            raise ValueError("RunningQuantile got non-finite activations (NaN or inf)")
        if not self.initialised:
            span = high - low
            # A constant unit still gets a (tiny) positive width, relative to its magnitude.
            floor = torch.maximum(low.abs(), high.abs()).clamp_min(1.0) * 2.0**-20
            self.lo = low.clone()
            self.width = torch.maximum(span, floor) * (1.0 + 1e-6) / self.bins
            self.initialised = True
        self._cover(low, high)
        self.counts += self._histogram(x)

    def _histogram(
        self,
        x: torch.Tensor,  # [B, U, P] float32, inside the current ranges
    ) -> torch.Tensor:  # [U, bins] int64
        inv = 1.0 / self.width
        shift = -self.lo * inv
        # float32 resolves (x - lo) / w to a small part of a bin unless |lo| / w is huge (a range
        # far narrower than its offset from 0, e.g. a near-constant unit); then use float64.
        if bool((shift.abs() > 2.0**20).any()):
            x = x.double()
        # (x - lo) / w in one pass; after the clamp to [0, bins - 1], truncation is the floor
        idx = torch.addcmul(shift.to(x.dtype)[None, :, None], x, inv.to(x.dtype)[None, :, None])
        idx = idx.clamp_(0, self.bins - 1).long()
        idx += (torch.arange(self.units, device=x.device) * self.bins)[None, :, None]
        return torch.bincount(idx.flatten(), minlength=self.units * self.bins).view(self.units, self.bins)

    def _cover(
        self,
        low: torch.Tensor,  # [U] float64 values that must fit
        high: torch.Tensor,  # [U]
    ) -> None:
        """Double the ranges (merging bin pairs) until ``[low, high]`` fits in every unit's."""
        half = self.bins // 2
        while True:
            up = high >= self.hi
            down = low < self.lo
            grow = up | down
            if not bool(grow.any()):
                return
            merged = self.counts[grow].view(-1, half, 2).sum(dim=2)  # [G, half]
            new = torch.zeros(merged.shape[0], self.bins, dtype=torch.int64, device=self.device)
            g_up = up[grow]
            new[g_up, :half] = merged[g_up]  # extend upward: lo stays, old bins fill the lower half
            new[~g_up, half:] = merged[~g_up]  # extend downward: old bins fill the upper half
            self.counts[grow] = new
            only_down = grow & ~up
            self.lo[only_down] -= self.bins * self.width[only_down]
            self.width[grow] *= 2.0

    def merge(
        self,
        other: "RunningQuantile",
    ) -> None:
        """Add another histogram of the same units (e.g. from another process)."""
        if other.units != self.units:
            raise ValueError(f"cannot merge a RunningQuantile of {other.units} units into one of {self.units}")
        if not other.initialised:
            return
        if not self.initialised:
            self.counts = other.counts.to(self.device).clone()
            self.lo = other.lo.to(self.device).clone()
            self.width = other.width.to(self.device).clone()
            self.bins = other.bins
            self.initialised = True
            return
        o_lo = other.lo.to(self.device)
        o_w = other.width.to(self.device)
        o_counts = other.counts.to(self.device)
        steps = torch.arange(other.bins, device=self.device, dtype=torch.float64) + 0.5
        centres = o_lo[:, None] + steps * o_w[:, None]  # [U, other bins]
        used = o_counts > 0
        big = torch.finfo(torch.float64).max
        self._cover(torch.where(used, centres, big).amin(dim=1).clamp_max(self.lo),
                    torch.where(used, centres, -big).amax(dim=1).clamp_min(self.lo))
        idx = ((centres - self.lo[:, None]) / self.width[:, None]).floor().clamp(0, self.bins - 1).long()
        self.counts.scatter_add_(1, idx, o_counts)

    def quantile(
        self,
        p: float,  # probability in [0, 1] (0.99 = the 99th percentile)
    ) -> torch.Tensor:  # [U] float64, torch.quantile's linear rule up to one bin width
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"quantile probability must be in [0, 1], got {p}")
        if not self.initialised:
            raise ValueError("RunningQuantile has seen no values yet")
        counts = self.counts.double()
        cum = counts.cumsum(dim=1)  # [U, bins]
        rank = 1.0 + p * (cum[:, -1] - 1.0)  # 1-based, fractional
        below = rank.floor()
        frac = rank - below
        return (1.0 - frac) * self._at_rank(counts, cum, below) + frac * self._at_rank(counts, cum, rank.ceil())

    def _at_rank(
        self,
        counts: torch.Tensor,  # [U, bins] float64
        cum: torch.Tensor,  # [U, bins] cumulative counts
        k: torch.Tensor,  # [U] integral 1-based ranks
    ) -> torch.Tensor:  # [U] the k-th smallest value, within its bin (error < one bin width)
        j = torch.searchsorted(cum, k[:, None]).clamp_(max=self.bins - 1)  # [U, 1]: C_{j-1} < k <= C_j
        before = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(k[:, None]))
        in_bin = counts.gather(1, j).clamp_min(1.0)
        pos = ((k[:, None] - before - 0.5) / in_bin).clamp(0.0, 1.0)
        return (self.lo[:, None] + self.width[:, None] * (j.double() + pos))[:, 0]

    def top_quantile(
        self,
        q: float,  # share of values above the threshold, in (0, 1)
    ) -> torch.Tensor:  # [U] float64: t with P(a > t) ≈ q
        if not 0.0 < q < 1.0:
            raise ValueError(f"the top quantile must be in (0, 1), got {q}")
        return self.quantile(1.0 - q)


class IoUAccumulator:
    """Streaming overlap of thresholded unit maps with concept masks.

    ``add(maps, masks)`` upsamples ``maps`` to the masks' side, thresholds them at
    ``thresholds`` (strictly above) and adds to the sums of the module docstring; :meth:`iou`
    and :meth:`conditional_mean` read them out. Units are processed in chunks so that at most
    ``max_values`` upsampled values exist at once.
    """

    def __init__(
        self,
        thresholds: torch.Tensor,  # [U] per-unit thresholds t_u
        concepts: int,  # C
        max_values: int = 2**25,  # upsampled values held at once (memory bound, 128 MiB of float32)
    ) -> None:
        if thresholds.ndim != 1:
            raise ValueError(f"thresholds must be [units], got {tuple(thresholds.shape)}")
        if concepts < 1:
            raise ValueError(f"IoUAccumulator needs at least one concept, got {concepts}")
        self.thresholds = thresholds.detach().double()
        self.units = thresholds.shape[0]
        self.concepts = int(concepts)
        self.max_values = int(max_values)
        dev = thresholds.device
        self.intersection = torch.zeros(self.units, self.concepts, dtype=torch.float64, device=dev)
        self.activation_sum = torch.zeros(self.units, self.concepts, dtype=torch.float64, device=dev)
        self.unit_area = torch.zeros(self.units, dtype=torch.float64, device=dev)
        self.concept_area = torch.zeros(self.concepts, dtype=torch.float64, device=dev)
        self.pixels = 0  # pixels per unit seen (images x R x R)

    def add(
        self,
        maps: torch.Tensor,  # [B, U, h, w] raw unit maps
        masks: torch.Tensor,  # bool [B, C, R, R] concept masks
    ) -> None:
        if maps.ndim != 4 or maps.shape[1] != self.units:
            raise ValueError(f"unit maps must be [batch, {self.units}, h, w], got {tuple(maps.shape)}")
        if masks.ndim != 4 or masks.shape[1] != self.concepts or masks.shape[2] != masks.shape[3]:
            raise ValueError(f"concept masks must be [batch, {self.concepts}, R, R], got {tuple(masks.shape)}")
        if maps.shape[0] != masks.shape[0]:
            raise ValueError(f"{maps.shape[0]} unit maps but {masks.shape[0]} concept masks: the batches must match")
        dev = self.intersection.device
        maps = maps.detach().to(dev)
        b, _, r, _ = masks.shape
        s = masks.to(dev).bool().reshape(b, self.concepts, r * r).float()  # [B, C, RR]
        s_t = s.transpose(1, 2)  # [B, RR, C]
        self.concept_area += s.sum(dim=2).double().sum(dim=0)
        self.pixels += b * r * r
        chunk = max(1, self.max_values // max(1, b * r * r))
        for start in range(0, self.units, chunk):
            sl = slice(start, min(self.units, start + chunk))
            part = maps[:, sl]
            up = upsample_maps(part, r)
            if up.shape == part.shape:  # not upsampled: a view of the caller's maps, not to be overwritten
                up = up.clone()
            up = up.reshape(b, -1, r * r)  # [B, u, RR]
            self.activation_sum[sl] += _overlaps(up, s_t)
            on = up.gt_(self.thresholds[sl].to(up.dtype)[None, :, None])  # in place: 1.0 above t_u, else 0.0
            self.intersection[sl] += _overlaps(on, s_t)
            self.unit_area[sl] += on.sum(dim=2).double().sum(dim=0)

    def union(self) -> torch.Tensor:  # [U, C] float64
        return self.unit_area[:, None] + self.concept_area[None, :] - self.intersection

    def iou(self) -> torch.Tensor:  # [U, C] float64 in [0, 1]
        union = self.union()
        return torch.where(union > 0, self.intersection / union.clamp_min(1.0), torch.zeros_like(union))

    def conditional_mean(self) -> torch.Tensor:  # [U, C] float64: k_{u,c}, NaN where S_c is never on
        area = self.concept_area[None, :]
        return torch.where(area > 0, self.activation_sum / area.clamp_min(1.0),
                           torch.full_like(self.activation_sum, math.nan))
