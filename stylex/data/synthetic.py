"""Synthetic fundus photographs with known causal and nuisance factors.

Each scene is a round orange-red fundus on black with a bright yellowish optic disc, dark-red
vessels branching from the disc and, possibly, two kinds of lesion: small bright-yellow
*exudates* and larger dark-red *haemorrhages*. Everything is drawn from a handful of factors, so
an explanation method can be checked against the truth: the label depends on the lesions only.

Factors (``FACTOR_NAMES``, the order of the ``"factors"`` vector):

========================  ==========  ===================================================
name                      kind        meaning and distribution
========================  ==========  ===================================================
``exudates``              causal      number of exudates; 0 with probability
                                      ``1 - lesion_prob``, else uniform in ``lesion_count``
``haemorrhages``          causal      number of haemorrhages; drawn like ``exudates``,
                                      independently of it
``brightness``            nuisance    global intensity gain, uniform in [0.75, 1.15]
``hue``                   nuisance    fundus colour, -1 = deep red ... +1 = orange
``disc_x``                nuisance    optic-disc centre x in [-1, 1] image units: left or
                                      right side (+/-0.45) with +/-0.07 jitter
``disc_y``                nuisance    optic-disc centre y (down is positive), +/-0.12
``vessel_seed``           nuisance    integer seed of the vessel tree's random shape
``vessel_angle``          nuisance    rotation of the whole vessel tree, radians, +/-0.4
``fundus_radius``         nuisance    fundus radius in image half-widths, [0.80, 0.95]
``lesion_seed``           nuisance    integer seed of the lesion positions and sizes
========================  ==========  ===================================================

Nuisance factors are drawn independently of each other and of the lesions.

Label function (``label_from_counts``), with ``e = exudates``, ``h = haemorrhages``:

- ``num_classes=2``: ``label = 1 if e > 0 or h > 0 else 0`` ("healthy" / "DR signs");
- ``num_classes=3``: ``label = [e > 0] + [h > 0]``, the number of lesion kinds present.

Lesion placement. From ``lesion_seed`` each scene draws ``MAX_LESIONS`` candidate *slots* per
kind, inside the fundus, away from the optic disc and not overlapping one another; exudate
``k`` sits in exudate slot ``k`` and haemorrhage ``k`` in haemorrhage slot ``k``. Slots do not
depend on the counts, so the same factors with fewer (or no) exudates render the same scene
minus those exudates, and the haemorrhages stay where they were.

Rendering. The scene is rasterised into a label map at ``ss`` times the output resolution
(``ss = 4`` up to 64 px, 2 above), then reduced per output pixel to the area covered by each
segment class. The colour is the coverage-weighted mix of the class colours, which is an exact
box-filter antialiasing, so a lesion of one output pixel still shows. The output segmentation
mask (``SEGMENT_NAMES``) gives a pixel to a lesion class whenever that lesion covers any of its
sub-pixels (lesions are drawn on top), and otherwise to the class covering most of it.

Coordinates are "image units": x to the right and y downwards, both in [-1, 1] across the
image, so a scene has the same geometry at every resolution. ``lesion_scale`` multiplies the
lesion radii (1 = the sizes above): at 32x32 an exudate of scale 1 is 2 to 3 pixels across, and
a quick CPU run can use larger lesions; the label and every other factor are unchanged by it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from stylex.data.base import ArrayImageDataset, ImageDataModule, is_power_of_two, show_progress

FACTOR_NAMES = [
    "exudates",
    "haemorrhages",
    "brightness",
    "hue",
    "disc_x",
    "disc_y",
    "vessel_seed",
    "vessel_angle",
    "fundus_radius",
    "lesion_seed",
]
CAUSAL_FACTORS = ["exudates", "haemorrhages"]
NUISANCE_FACTORS = [name for name in FACTOR_NAMES if name not in CAUSAL_FACTORS]

SEGMENT_NAMES = ["background", "fundus", "optic_disc", "vessel", "exudate", "haemorrhage"]
BACKGROUND, FUNDUS, OPTIC_DISC, VESSEL, EXUDATE, HAEMORRHAGE = range(6)

MAX_LESIONS = 4  # slots per lesion kind; ``lesion_count`` may not exceed it
SEED_LIMIT = 1 << 24  # integer seeds stay exact in the float32 factor vector

# Geometry, in image units.
DISC_RADIUS = 0.15
EXUDATE_RADIUS = (0.06, 0.08)
HAEMORRHAGE_RADIUS = (0.10, 0.13)
LESION_GAP = 0.12  # free space between lesions, so one never hides another
LESION_DISC_GAP = 0.10  # free space between a lesion and the optic disc
LESION_RIM_GAP = 0.06  # free space between a lesion and the fundus border

# Vessel tree: 4 trunks leave the disc (two arcades curving towards the image centre, two
# shorter nasal vessels); each trunk is a chain of short straight pieces and carries two
# branches. Short pieces keep the rasterisation windows small.
TRUNK_PIECES = 5
BRANCH_PIECES = 2
BRANCHES_AT = (1, 3)  # a branch leaves at the end of these trunk pieces
PIECE_LENGTH = 0.17  # longest straight piece (before the trunk-specific scale)
VESSEL_HALF_WIDTH = (0.034, 0.016)  # at the disc, at the tip of a trunk
BRANCH_HALF_WIDTH = 0.017
NUM_VESSEL_PIECES = 4 * (TRUNK_PIECES + len(BRANCHES_AT) * BRANCH_PIECES)

# Colours, linear RGB in [0, 1] before the brightness gain.
FUNDUS_RED = np.array([0.70, 0.20, 0.09])
FUNDUS_ORANGE = np.array([0.90, 0.42, 0.15])
DISC_COLOUR = np.array([1.00, 0.86, 0.50])
VESSEL_COLOUR = np.array([0.52, 0.09, 0.06])
EXUDATE_COLOUR = np.array([1.00, 0.95, 0.25])
HAEMORRHAGE_COLOUR = np.array([0.30, 0.02, 0.02])

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # one random stream per split


def label_from_counts(
    exudates,  # count(s), int or array
    haemorrhages,  # count(s), same shape
    num_classes: int = 2,
):
    """The documented label function (see the module docstring); works elementwise."""
    e = np.asarray(exudates) > 0
    h = np.asarray(haemorrhages) > 0
    if num_classes == 2:
        return (e | h).astype(np.int64)
    if num_classes == 3:
        return e.astype(np.int64) + h.astype(np.int64)
    raise ValueError(f"synthetic num_classes must be 2 or 3, got {num_classes!r}")


def class_names_for(num_classes: int) -> list[str]:
    if num_classes == 2:
        return ["healthy", "DR signs"]
    if num_classes == 3:
        return ["no lesions", "one lesion kind", "both lesion kinds"]
    raise ValueError(f"synthetic num_classes must be 2 or 3, got {num_classes!r}")


def _check_lesion_args(
    lesion_prob: float,
    lesion_count: Sequence[int],
) -> tuple[int, int]:
    if not 0.0 <= float(lesion_prob) <= 1.0:
        raise ValueError(f"lesion_prob must lie in [0, 1], got {lesion_prob!r}")
    lo, hi = (int(v) for v in lesion_count)
    if not 1 <= lo <= hi <= MAX_LESIONS:
        raise ValueError(
            f"lesion_count must be (min, max) with 1 <= min <= max <= {MAX_LESIONS}, "
            f"got {tuple(lesion_count)!r}"
        )
    return lo, hi


def _check_lesion_scale(lesion_scale: float) -> float:
    if not 0.25 <= float(lesion_scale) <= 3.0:
        raise ValueError(f"lesion_scale must lie in [0.25, 3] (a multiple of the lesion radii), got {lesion_scale!r}")
    return float(lesion_scale)


def sample_factors(
    rng: np.random.Generator,
    lesion_prob: float = 0.3,  # probability that each lesion kind is present
    lesion_count: Sequence[int] = (1, 4),  # inclusive range of lesions of a present kind
) -> dict[str, float]:
    """Draw one scene's factors (see the module docstring for their distributions).

    The draws happen in a fixed order, so the same generator state gives the same scene.
    Counts and seeds are returned as Python ints, the others as floats.
    """
    lo, hi = _check_lesion_args(lesion_prob, lesion_count)
    present = rng.random(2) < lesion_prob
    counts = rng.integers(lo, hi + 1, size=2)
    side = 1.0 if rng.random() < 0.5 else -1.0
    u = rng.random(7)
    seeds = rng.integers(0, SEED_LIMIT, size=2)
    return {
        "exudates": int(counts[0]) if present[0] else 0,
        "haemorrhages": int(counts[1]) if present[1] else 0,
        "brightness": 0.75 + 0.40 * float(u[0]),
        "hue": -1.0 + 2.0 * float(u[1]),
        "disc_x": side * 0.45 + 0.14 * (float(u[2]) - 0.5),
        "disc_y": 0.24 * (float(u[3]) - 0.5),
        "vessel_seed": int(seeds[0]),
        "vessel_angle": 0.8 * (float(u[4]) - 0.5),
        "fundus_radius": 0.80 + 0.15 * float(u[5]),
        "lesion_seed": int(seeds[1]),
    }


def factors_to_vector(factors: Mapping[str, float]) -> np.ndarray:
    """float32 ``[F]`` in ``FACTOR_NAMES`` order."""
    return np.array([float(factors[name]) for name in FACTOR_NAMES], dtype=np.float32)


def vector_to_factors(vector: Sequence[float]) -> dict[str, float]:
    """Inverse of :func:`factors_to_vector` (counts and seeds come back as ints)."""
    if len(vector) != len(FACTOR_NAMES):
        raise ValueError(f"expected {len(FACTOR_NAMES)} factor values, got {len(vector)}")
    out: dict[str, float] = {}
    for name, value in zip(FACTOR_NAMES, vector):
        integer = name in ("exudates", "haemorrhages", "vessel_seed", "lesion_seed")
        out[name] = int(round(float(value))) if integer else float(value)
    return out


# --------------------------------------------------------------------------- geometry
def vessel_pieces(
    vessel_seed: int,
    vessel_angle: float,  # radians
    disc_x: float,
    disc_y: float,
) -> np.ndarray:
    """float64 ``[NUM_VESSEL_PIECES, 5]``: ``(x0, y0, x1, y1, half_width)`` per straight piece."""
    rng = np.random.default_rng(int(vessel_seed))
    noise = rng.random((4, 64))  # a fixed budget of draws per trunk keeps the layout stable
    to_centre = math.atan2(-disc_y, -disc_x)
    pieces = []
    # (side, departure angle from the disc-to-centre direction, bend per piece, length scale)
    trunks = [(1.0, 1.25, -0.30, 1.0), (-1.0, 1.25, -0.30, 1.0),
              (1.0, 2.45, 0.10, 0.65), (-1.0, 2.45, 0.10, 0.65)]
    for t, (side, depart, bend, scale) in enumerate(trunks):
        r = iter(noise[t])
        heading = to_centre + vessel_angle + side * (depart + 0.35 * (next(r) - 0.5))
        x = disc_x + 0.8 * DISC_RADIUS * math.cos(heading)
        y = disc_y + 0.8 * DISC_RADIUS * math.sin(heading)
        for k in range(TRUNK_PIECES):
            length = PIECE_LENGTH * scale * (0.8 + 0.2 * next(r))
            frac = k / (TRUNK_PIECES - 1)
            width = VESSEL_HALF_WIDTH[0] + frac * (VESSEL_HALF_WIDTH[1] - VESSEL_HALF_WIDTH[0])
            nx, ny = x + length * math.cos(heading), y + length * math.sin(heading)
            pieces.append((x, y, nx, ny, width * (0.85 + 0.3 * next(r))))
            x, y = nx, ny
            if k in BRANCHES_AT:
                b_heading = heading + (1 if next(r) < 0.5 else -1) * (0.5 + 0.5 * next(r))
                bx, by = x, y
                for _ in range(BRANCH_PIECES):
                    b_len = 0.8 * PIECE_LENGTH * scale * (0.7 + 0.3 * next(r))
                    nbx, nby = bx + b_len * math.cos(b_heading), by + b_len * math.sin(b_heading)
                    pieces.append((bx, by, nbx, nby, BRANCH_HALF_WIDTH))
                    bx, by = nbx, nby
                    b_heading += 0.4 * (next(r) - 0.5)
            heading += side * bend * (0.6 + 0.8 * next(r))
    out = np.array(pieces, dtype=np.float64)
    assert out.shape == (NUM_VESSEL_PIECES, 5), out.shape
    return out


def lesion_slots(
    lesion_seed: int,
    disc_x: float,
    disc_y: float,
    fundus_radius: float,
    lesion_scale: float = 1.0,  # multiplies every lesion radius
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate lesion discs ``(exudate_slots, haemorrhage_slots)``, each ``[MAX_LESIONS, 3]``.

    Rows are ``(x, y, radius)`` in image units. Slots are placed greedily from a seeded list of
    candidate points that lie inside the fundus and clear of the optic disc: each slot takes
    the first candidate that keeps ``LESION_GAP`` from every earlier slot (or, in the rare
    crowded scene, the candidate with the most room).
    """
    rng = np.random.default_rng(int(lesion_seed))
    radii = np.empty(2 * MAX_LESIONS)
    radii[0::2] = rng.uniform(*EXUDATE_RADIUS, size=MAX_LESIONS)  # interleave the kinds so
    radii[1::2] = rng.uniform(*HAEMORRHAGE_RADIUS, size=MAX_LESIONS)  # neither gets leftovers
    radii *= float(lesion_scale)
    # Uniform points in the fundus disc (radius ~ sqrt(u) keeps the density uniform).
    u = rng.random((2, 192))
    rho = np.sqrt(u[0]) * fundus_radius
    cx, cy = rho * np.cos(2 * np.pi * u[1]), rho * np.sin(2 * np.pi * u[1])
    rim_room = fundus_radius - LESION_RIM_GAP - rho  # the largest radius that fits
    disc_room = np.hypot(cx - disc_x, cy - disc_y) - DISC_RADIUS - LESION_DISC_GAP
    room = np.minimum(rim_room, disc_room)  # shrinks as slots are placed
    slots = np.empty((2 * MAX_LESIONS, 3))
    for k, radius in enumerate(radii):
        ok = room >= radius
        i = int(np.argmax(ok)) if ok.any() else int(np.argmax(room))
        slots[k] = (cx[i], cy[i], radius)
        gap = np.hypot(cx - cx[i], cy - cy[i]) - radius - LESION_GAP
        room = np.minimum(room, gap)
    return slots[0::2], slots[1::2]


# ------------------------------------------------------------------------ rasteriser
def supersampling(resolution: int) -> int:
    """Sub-pixels per output pixel along each axis."""
    return 4 if resolution <= 64 else 2


def _paint_capsules(
    layer: np.ndarray,  # bool [B, S, S], painted in place
    pieces: np.ndarray,  # [B, K, 5]: (x0, y0, x1, y1, radius) in image units
    active: np.ndarray,  # bool [B, K]
) -> None:
    """Mark the sub-pixels whose centre lies within ``radius`` of a segment ("capsules").

    Each capsule is evaluated only in a square window around it, whose size is set by the
    largest capsule, instead of over the whole canvas.
    """
    size = layer.shape[1]
    pieces = pieces.astype(np.float32)  # half the memory traffic; sub-pixel error is ~1e-7
    x0, y0, x1, y1, rad = (pieces[..., i] for i in range(5))
    scale = size / 2.0  # sub-pixels per image unit
    extent = np.maximum(np.abs(x1 - x0), np.abs(y1 - y0)) + 2.0 * rad
    win = int(min(size, math.ceil(float(extent[active].max(initial=0.0)) * scale) + 2))
    if win <= 0:
        return
    offsets = np.arange(win)
    # Window origin: the sub-pixel just left of (above) the capsule's bounding box, moved
    # inside the canvas; that never cuts off the part of a capsule that lies on the canvas.
    left = np.floor((np.minimum(x0, x1) - rad + 1.0) * scale - 0.5).astype(np.int64)
    top = np.floor((np.minimum(y0, y1) - rad + 1.0) * scale - 0.5).astype(np.int64)
    left = np.clip(left, 0, size - win)
    top = np.clip(top, 0, size - win)
    cols = left[..., None] + offsets  # [B, K, win]
    rows = top[..., None] + offsets
    xs = ((cols + 0.5) / scale - 1.0).astype(np.float32)
    ys = ((rows + 0.5) / scale - 1.0).astype(np.float32)
    px = (xs - x0[..., None])[..., None, :]  # [B, K, 1, win]
    py = (ys - y0[..., None])[..., :, None]  # [B, K, win, 1]
    dx, dy = (x1 - x0)[..., None, None], (y1 - y0)[..., None, None]
    len2 = np.maximum(dx * dx + dy * dy, 1e-12)
    t = np.clip((px * dx + py * dy) / len2, 0.0, 1.0)
    ex, ey = px - t * dx, py - t * dy
    hit = (ex * ex + ey * ey) <= (rad * rad)[..., None, None]
    hit &= active[..., None, None]
    b, k, i, j = np.nonzero(hit)
    layer[b, rows[b, k, i], cols[b, k, j]] = True


def render_batch(
    factors: np.ndarray,  # float [B, F] in FACTOR_NAMES order
    resolution: int,  # output side R, a power of two
    lesion_scale: float = 1.0,  # multiplies every lesion radius (see the module docstring)
) -> tuple[np.ndarray, np.ndarray]:
    """Render scenes: uint8 images ``[B, R, R, 3]`` and int64 masks ``[B, R, R]``."""
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
        raise ValueError(
            f"factors must be [batch, {len(FACTOR_NAMES)}] in FACTOR_NAMES order, got "
            f"{factors.shape}"
        )
    if not is_power_of_two(resolution) or not 4 <= resolution <= 1024:
        raise ValueError(f"resolution must be a power of two in [4, 1024], got {resolution!r}")
    _check_lesion_scale(lesion_scale)
    f = {name: factors[:, i] for i, name in enumerate(FACTOR_NAMES)}
    counts = {name: np.rint(f[name]).astype(np.int64) for name in CAUSAL_FACTORS}
    for name, c in counts.items():
        if (c < 0).any() or (c > MAX_LESIONS).any():
            raise ValueError(f"factor {name!r} must be a count in [0, {MAX_LESIONS}]")
    batch, ss = factors.shape[0], supersampling(resolution)
    size = resolution * ss

    vessels = np.stack([
        vessel_pieces(s, a, x, y)
        for s, a, x, y in zip(f["vessel_seed"], f["vessel_angle"], f["disc_x"], f["disc_y"])
    ]) if batch else np.zeros((0, NUM_VESSEL_PIECES, 5))
    slots = [lesion_slots(s, x, y, r, lesion_scale) for s, x, y, r in
             zip(f["lesion_seed"], f["disc_x"], f["disc_y"], f["fundus_radius"])]
    slot_index = np.arange(MAX_LESIONS)

    def capsules_of(discs: np.ndarray) -> np.ndarray:  # [B, K, 3] discs -> [B, K, 5] capsules
        return np.concatenate([discs[..., :2], discs[..., :2], discs[..., 2:]], axis=-1)

    centre = (np.arange(size) + 0.5) * (2.0 / size) - 1.0
    r2 = centre[None, :] ** 2 + centre[:, None] ** 2  # [S, S]
    fundus = r2[None] < (f["fundus_radius"] ** 2)[:, None, None]

    def painted(pieces: np.ndarray, active: np.ndarray) -> np.ndarray:
        layer = np.zeros((batch, size, size), dtype=bool)
        _paint_capsules(layer, pieces, active)
        return layer

    disc = np.stack([f["disc_x"], f["disc_y"], np.full(batch, DISC_RADIUS)], -1)[:, None]
    exudate_discs = np.stack([s[0] for s in slots]) if batch else np.zeros((0, MAX_LESIONS, 3))
    haemorrhage_discs = np.stack([s[1] for s in slots]) if batch else np.zeros((0, MAX_LESIONS, 3))

    labels = fundus.astype(np.uint8)  # priority painting: later layers cover earlier ones
    labels[painted(capsules_of(disc), np.ones((batch, 1), bool)) & fundus] = OPTIC_DISC
    labels[painted(vessels, np.ones(vessels.shape[:2], bool)) & fundus] = VESSEL
    labels[painted(capsules_of(exudate_discs), slot_index < counts["exudates"][:, None])] = EXUDATE
    labels[painted(capsules_of(haemorrhage_discs),
                   slot_index < counts["haemorrhages"][:, None])] = HAEMORRHAGE

    # Sub-pixel counts per class in one reduction: class c adds 32**c, and at most
    # ss*ss <= 16 < 32 sub-pixels share an output pixel, so the 5-bit fields never carry.
    codes = (np.int32(1) << (5 * np.arange(len(SEGMENT_NAMES), dtype=np.int32))).astype(np.int32)
    packed = codes[labels].reshape(batch, resolution, ss, resolution, ss).sum(
        axis=(2, 4), dtype=np.int32
    )
    cover = np.stack([(packed >> (5 * c)) & 31 for c in range(len(SEGMENT_NAMES))], axis=-1)
    frac = cover.astype(np.float32) / (ss * ss)  # [B, R, R, 6]

    # Smooth shading, evaluated at output-pixel centres.
    pix = (np.arange(resolution) + 0.5) * (2.0 / resolution) - 1.0
    rr = pix[None, :] ** 2 + pix[:, None] ** 2
    vignette = 1.0 - 0.45 * np.clip(rr[None] / (f["fundus_radius"] ** 2)[:, None, None], 0, 1)
    macula = 1.0 - 0.2 * np.exp(-rr / 0.18**2)
    t = ((f["hue"] + 1.0) / 2.0)[:, None]
    fundus_colour = (1 - t) * FUNDUS_RED + t * FUNDUS_ORANGE  # [B, 3]
    gain = f["brightness"][:, None, None, None]
    image = frac[..., FUNDUS, None] * (vignette * macula)[..., None] * fundus_colour[:, None, None]
    image = image + frac[..., OPTIC_DISC, None] * DISC_COLOUR
    image = image + frac[..., VESSEL, None] * VESSEL_COLOUR
    image = image + frac[..., EXUDATE, None] * EXUDATE_COLOUR
    image = image + frac[..., HAEMORRHAGE, None] * HAEMORRHAGE_COLOUR
    image = np.rint(np.clip(image * gain, 0.0, 1.0) * 255.0).astype(np.uint8)

    # Mask: a lesion wins wherever it covers a sub-pixel (the larger one if both do);
    # otherwise the majority class, ties going to the later (thinner) structure.
    lesion = np.where(cover[..., HAEMORRHAGE] >= cover[..., EXUDATE], HAEMORRHAGE, EXUDATE)
    base = np.argmax(cover[..., :EXUDATE] * 8 + np.arange(EXUDATE), axis=-1)
    any_lesion = (cover[..., EXUDATE] + cover[..., HAEMORRHAGE]) > 0
    mask = np.where(any_lesion, lesion, base).astype(np.int64)
    return image, mask


def render_scene(
    factors: Mapping[str, float],  # factor name -> value (see FACTOR_NAMES)
    resolution: int,  # output side, a power of two
    rng: np.random.Generator | None = None,  # draws the factors missing from ``factors``
    lesion_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: ``(image uint8 [R, R, 3], mask int64 [R, R])``.

    The picture is a pure function of the factors. ``rng`` is only used to fill in factors
    that are not given (drawn as :func:`sample_factors` would), so e.g.
    ``render_scene({**f, "exudates": 0}, 32)`` shows the scene ``f`` without its exudates.
    """
    unknown = set(factors) - set(FACTOR_NAMES)
    if unknown:
        raise ValueError(f"unknown factor(s) {sorted(unknown)}; known: {FACTOR_NAMES}")
    missing = [name for name in FACTOR_NAMES if name not in factors]
    full = dict(factors)
    if missing:
        if rng is None:
            raise ValueError(f"factors {missing} are missing; give them or pass an rng")
        drawn = sample_factors(rng)
        full.update({name: drawn[name] for name in missing})
    images, masks = render_batch(factors_to_vector(full)[None], resolution, lesion_scale)
    return images[0], masks[0]


def sample_rng(
    seed: int,
    split: str,  # "train", "val" or "test"
    index: int,
) -> np.random.Generator:
    """The generator of one sample: independent streams per (seed, split, index)."""
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def generate_split(
    num: int,  # number of scenes
    seed: int,  # non-negative
    split: str,  # "train", "val" or "test"
    resolution: int,
    lesion_prob: float = 0.3,
    lesion_count: Sequence[int] = (1, 4),
    chunk_pixels: int = 1 << 22,  # sub-pixels rendered at once (bounds the memory)
    progress: bool = False,
    lesion_scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """All scenes of a split: ``images`` uint8 ``[N, R, R, 3]``, ``masks`` uint8 ``[N, R, R]``,
    ``factors`` float32 ``[N, F]``. Scene ``i`` depends only on ``(seed, split, i)``."""
    if seed < 0:
        raise ValueError(f"the synthetic dataset needs a seed >= 0, got {seed}")
    factors = np.stack([
        factors_to_vector(sample_factors(sample_rng(seed, split, i), lesion_prob, lesion_count))
        for i in range(num)
    ]) if num else np.zeros((0, len(FACTOR_NAMES)), np.float32)
    images = np.empty((num, resolution, resolution, 3), np.uint8)
    masks = np.empty((num, resolution, resolution), np.uint8)
    chunk = max(1, chunk_pixels // (resolution * supersampling(resolution)) ** 2)
    starts = range(0, num, chunk)
    bar = tqdm(starts, desc=f"rendering synthetic {split} ({num})", unit="chunk",
               disable=not progress, delay=1.0, leave=False)
    for start in bar:
        img, msk = render_batch(factors[start:start + chunk], resolution, lesion_scale)
        images[start:start + chunk] = img
        masks[start:start + chunk] = msk
    return {"images": images, "masks": masks, "factors": factors}


class SyntheticDataModule(ImageDataModule):
    """Synthetic fundus scenes with a known label function (see the module docstring).

    Samples carry ``"image"``, ``"label"``, ``"mask"`` (int64 ``[R, R]``, indices into
    ``SEGMENT_NAMES``) and ``"factors"`` (float32 ``[F]``, ``FACTOR_NAMES`` order). With
    ``hflip`` the image and mask are mirrored but the factors are not (``disc_x`` keeps
    describing the unmirrored scene).

    Args:
        num_classes: 2 (healthy / DR signs) or 3 (number of lesion kinds present).
        num_train, num_val, num_test: scenes per split; the splits draw from disjoint streams.
        lesion_prob: probability that each lesion kind is present in a scene.
        lesion_count: inclusive ``(min, max)`` number of lesions of a present kind.
        lesion_scale: multiplies every lesion radius (1 = the sizes of the module docstring).
        (the remaining arguments are those of :class:`ImageDataModule`)
    """

    generated = True  # as many scenes as asked for: no limited-data measures needed (loss.augment=auto)
    factor_names = FACTOR_NAMES
    causal_factors = CAUSAL_FACTORS
    nuisance_factors = NUISANCE_FACTORS
    segment_names = SEGMENT_NAMES

    def __init__(
        self,
        resolution: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        hflip: bool = False,
        balanced: bool = False,
        num_classes: int = 2,
        num_train: int = 4096,
        num_val: int = 512,
        num_test: int = 512,
        lesion_prob: float = 0.3,
        lesion_count: Sequence[int] = (1, 4),
        lesion_scale: float = 1.0,
    ):
        super().__init__(
            resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            seed=seed, hflip=hflip, balanced=balanced,
        )
        self.save_hyperparameters(logger=False)  # the run logs its whole config once (training.run)
        if not 8 <= resolution <= 256:
            raise ValueError(
                f"the synthetic dataset renders 8 to 256 px, got resolution={resolution}"
            )
        if seed < 0:
            raise ValueError(f"the synthetic dataset needs seed >= 0, got {seed}")
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if int(n) < 1:
                raise ValueError(f"{name} must be >= 1, got {n!r}")
        self._class_names = class_names_for(int(num_classes))
        self.lesion_prob = float(lesion_prob)
        self.lesion_count = _check_lesion_args(lesion_prob, list(lesion_count))
        self.lesion_scale = _check_lesion_scale(lesion_scale)
        self.sizes = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}

    def _split(self, split: str) -> ArrayImageDataset:
        data = generate_split(
            self.sizes[split], self.seed, split, self.resolution,
            lesion_prob=self.lesion_prob, lesion_count=self.lesion_count,
            progress=show_progress(), lesion_scale=self.lesion_scale,
        )
        factors = data["factors"]
        e = factors[:, FACTOR_NAMES.index("exudates")]
        h = factors[:, FACTOR_NAMES.index("haemorrhages")]
        labels = label_from_counts(np.rint(e), np.rint(h), self.num_classes)
        return ArrayImageDataset(
            torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels),
            extras={"mask": torch.from_numpy(data["masks"]), "factors": torch.from_numpy(factors)},
            hflip=self.hflip and split == "train",
            spatial_keys=("mask",),
        )

    def _build(self) -> tuple[Any, Any, Any, torch.Tensor]:
        train, val, test = (self._split(s) for s in ("train", "val", "test"))
        return train, val, test, train.labels
