"""Ground truth on the synthetic data set: which generative factor does each attribute change?

The synthetic fundus scenes (:mod:`stylex.data.synthetic`) are rendered from known factors, and
their label depends on some of them (the *causal* factors). A small CNN, the *factor probe*
(:mod:`stylex.metrics.probe`), is trained on synthetic scenes to read the factors back from an
image. An attribute's effect on a factor is the mean change of the probe's reading between
original and edited renders, in units of the factor's standard deviation over the data; its
*main factor* is the factor it moves most (None when no readable factor moves by
``min_effect``). Over a top-K list:

- recovery = share of the causal factors that are the main factor of some attribute;
- purity = share of the attributes whose main factor is causal.

:func:`single_coordinate_bound` asks the same question of *every* searched coordinate, not only
the ranked ones: the recovery no single-coordinate ranking of these images can exceed. It tells
a generator that has no coordinate for a factor apart from a ranking that missed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from stylex.explain.evaluator import EffectEvaluator
from stylex.explain.measures import apply_edits
from stylex.explain.result import AttFindResult
from stylex.stylespace import NoiseMaps, noise_rows
# The probe lives with the metrics (the generator's causal-factor fidelity reads images with it
# too); its names stay importable from here.
from stylex.metrics.probe import PROBE_FACTORS, FactorProbe, train_factor_probe  # noqa: F401


# ============================================================================ attributes -> factors
def factor_changes(
    probe: FactorProbe,
    originals: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    modified: torch.Tensor,  # [B, 3, R, R]: the same images with one attribute changed
) -> dict[str, float]:  # factor -> |mean change| in standard deviations of the factor
    """How far an edit moves each factor, as read by the probe."""
    assert originals.shape == modified.shape, (
        f"originals {tuple(originals.shape)} and modified {tuple(modified.shape)} must match"
    )
    delta = (probe.read(modified.clamp(-1, 1)) - probe.read(originals.clamp(-1, 1))).mean(0) / probe.std
    return {name: float(v.abs()) for name, v in zip(probe.factor_names, delta.cpu())}


def main_factor(
    changes: dict[str, float],  # factor -> normalised change
    readable: Sequence[str],  # factors the probe reads well enough to be trusted
    min_effect: float = 0.25,  # in standard deviations
) -> str | None:
    """The readable factor that moved most, or None when none moved by ``min_effect``."""
    candidates = {name: v for name, v in changes.items() if name in readable}
    if not candidates:
        return None
    name = max(candidates, key=candidates.get)
    return name if candidates[name] >= min_effect else None


def recovery_purity(
    main_factors: Sequence[str | None],  # main factor of each top-K attribute
    causal: Sequence[str],  # the factors the label depends on
) -> tuple[float, float]:  # (recovery, purity)
    """recovery = |causal ∩ main factors| / |causal|; purity = share of attributes whose main
    factor is causal (NaN for an empty list)."""
    causal = list(causal)
    if not causal:
        raise ValueError("recovery needs at least one causal factor")
    found = {f for f in main_factors if f in causal}
    recovery = len(found) / len(causal)
    purity = sum(f in causal for f in main_factors) / len(main_factors) if main_factors else float("nan")
    return recovery, purity


@dataclass
class GroundTruth:
    """Main factors of the ranked attributes, and recovery / purity per class and overall."""

    per_class: dict[int, dict[str, Any]]  # class -> {"factors": [...], "changes": [...], "recovery", "purity"}
    recovery: float  # over the attributes of all classes together
    purity: float
    probe_r2: dict[str, float]
    readable: list[str]
    causal: list[str]
    min_effect: float = 0.25  # the threshold the main factors were read with
    extra: dict[str, Any] = field(default_factory=dict)

    def scores_at(self, min_effect: float) -> tuple[float, float]:
        """Overall (recovery, purity) with every attribute's main factor re-read at another
        ``min_effect``: how much the figures hang on that threshold."""
        factors = [main_factor(ch, self.readable, min_effect)
                   for pc in self.per_class.values() for ch in pc["changes"]]
        return recovery_purity(factors, self.causal)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        name = (lambda c: class_names[c]) if class_names else str
        return {
            "recovery": self.recovery,
            "purity": self.purity,
            "min_effect": self.min_effect,
            "causal_factors": self.causal,
            "readable_factors": self.readable,
            "probe_r2": self.probe_r2,
            "classes": {name(c): v for c, v in self.per_class.items()},
            **self.extra,
        }


@torch.no_grad()
def ground_truth(
    result: AttFindResult,
    evaluator: EffectEvaluator,
    probe: FactorProbe,
    causal: Sequence[str] | None = None,  # default: the synthetic data's causal factors
    max_images: int = 32,  # pool images each attribute is applied to
    min_r2: float = 0.5,
    min_effect: float = 0.25,
) -> GroundTruth:
    """Which factor each class-ranked attribute changes, and recovery / purity of the rankings."""
    if causal is None:
        from stylex.data.synthetic import CAUSAL_FACTORS

        causal = CAUSAL_FACTORS
    causal = list(causal)
    readable = probe.readable(min_r2)
    missing = [f for f in causal if f not in readable]
    device = evaluator.device
    per_class: dict[int, dict[str, Any]] = {}
    everything: list[str | None] = []
    for c, attributes in result.rankings.items():
        pool = result.pools[c][:max_images]
        flat, targets = result.flat[pool], result.targets[pool]
        maps = noise_rows(result.noise, pool)  # each image keeps its own noise maps in every render
        originals = evaluator.render(flat.to(device), maps).cpu()
        factors, changes = [], []
        for a in attributes:
            coords = torch.full((pool.numel(), 1), a.coordinate, dtype=torch.long)
            dirs = torch.full_like(coords, a.direction)
            edited = apply_edits(flat, targets, coords, dirs)
            modified = evaluator.render(edited.to(device), maps).cpu()
            ch = factor_changes(probe, originals.to(next(probe.parameters()).device),
                                modified.to(next(probe.parameters()).device))
            changes.append(ch)
            factors.append(main_factor(ch, readable, min_effect))
        rec, pur = recovery_purity(factors, causal)
        per_class[c] = {"factors": factors, "changes": changes, "recovery": rec, "purity": pur}
        everything += factors
    recovery, purity = recovery_purity(everything, causal)
    extra = {"unreadable_causal_factors": missing} if missing else {}
    return GroundTruth(per_class=per_class, recovery=recovery, purity=purity, probe_r2=dict(probe.r2),
                       readable=readable, causal=causal, min_effect=float(min_effect), extra=extra)


# ============================================================================ the class in StyleSpace
@torch.no_grad()
def class_shift_concentration(
    generator: torch.nn.Module,  # a class-conditioned Generator
    probe: FactorProbe,
    counts: Sequence[int] = (1, 10, 100),  # numbers of coordinates to move, largest contrast first
    num: int = 64,  # samples the change is averaged over
    seed: int = 0,
    noise_mode: str = "const",
    noise: NoiseMaps | None = None,  # [num or 1, 1, r, r] layouts (an encoder's maps of real images)
) -> dict[str, Any]:
    """How many StyleSpace coordinates carry the class's effect on each factor.

    Switching a sample's class vector from one-hot class 0 to one-hot class k moves every style
    coordinate by a fixed amount, its class contrast (the affines read ``cat([w, c])``, so the
    move is the same for every w). This moves only the ``m`` coordinates with the largest
    contrast (relative to the coordinate's spread over the samples), renders, and reads the
    factors with the probe: the mean change in standard deviations, for each m in ``counts`` and
    for all coordinates. AttFind ranks single
    coordinates, so when one coordinate moves a causal factor by much less than the full switch
    does, no ranking can credit that factor: the generator spreads the class over many
    coordinates."""
    from stylex.stylespace import StyleSpace

    k_classes = int(getattr(generator, "c_dim", 0))
    if k_classes < 2:
        raise ValueError("the class shift needs a generator conditioned on at least two classes")
    space = StyleSpace(generator)
    device = next(generator.parameters()).device
    probe_device = next(probe.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(num, generator.z_dim, generator=gen).to(device)
    w = generator.mapping(z, truncation_psi=1.0, update_w_avg=False)
    eye = torch.eye(k_classes, device=device)
    base = space.flat_styles(w, eye[0].expand(num, -1))

    def read(flat: torch.Tensor) -> torch.Tensor:
        img = space.render(flat, noise_mode=noise_mode, noise=noise).clamp(-1, 1)
        return probe.read(img.to(probe_device)).cpu() / probe.std.cpu()

    before = read(base)
    out: dict[str, Any] = {"classes": {}, "num": num, "dim": space.dim}
    for k in range(1, k_classes):
        switched = space.flat_styles(w, eye[k].expand(num, -1))
        relative = (switched[0] - base[0]).abs() / torch.cat([base, switched]).std(0).clamp_min(1e-8)
        order = relative.argsort(descending=True)
        rows = {}
        for m in sorted({min(int(m), space.dim) for m in counts} | {space.dim}):
            moved = base.clone()
            moved[:, order[:m]] = switched[:, order[:m]]
            delta = (read(moved) - before).mean(0)
            rows[m] = {name: float(v) for name, v in zip(probe.factor_names, delta)}
        out["classes"][k] = {"changes": rows, "top_coordinates": [int(i) for i in order[:max(counts)]]}
    return out


# ============================================================================ every coordinate
class _FactorReader(EffectEvaluator):
    """The rendering engine of AttFind with the probe in the classifier's place: its "log
    probabilities" are the probe's standardised factor readings, so the prefix-reusing edit
    renderer gives every edit's factor change."""

    def classify(self, images: torch.Tensor) -> torch.Tensor:  # [B, F] in standard deviations
        probe = self.classifier
        return (probe.read(images.clamp(-1, 1)) - probe.mean) / probe.std


@torch.no_grad()
def coordinate_factor_effects(
    generator: torch.nn.Module,
    probe: FactorProbe,
    flat: torch.Tensor,  # [N, S] styles of the images
    targets: torch.Tensor,  # [N, S, 2] each coordinate's edited value toward min / max
    coords: torch.Tensor | None = None,  # [M] coordinates to measure; None = all
    batch_size: int | None = None,
    noise_mode: str = "const",
    noise: NoiseMaps | None = None,  # the N images' own noise maps; replaces noise_mode
) -> torch.Tensor:  # [M, 2, F] signed mean change of each factor, in standard deviations
    """The mean change of every factor the probe reads when each coordinate alone moves to its
    target, in each direction, over the images (the quantity :func:`factor_changes` takes the
    absolute value of, for every coordinate at once)."""
    n, s = flat.shape
    coords = torch.arange(s) if coords is None else coords.long().cpu()
    reader = _FactorReader(generator, probe, batch_size=batch_size, noise_mode=noise_mode)
    probe_device = next(probe.parameters()).device
    if probe_device != reader.device:
        raise ValueError(f"the probe ({probe_device}) and the generator ({reader.device}) must be on one device")
    m = coords.numel()
    image = torch.arange(n).repeat_interleave(2 * m)  # image-major: n, then coordinate, then direction
    cc = coords.repeat_interleave(2).repeat(n)
    dd = torch.tensor([0, 1]).repeat(n * m)
    values = targets[image, cc, dd]
    base, edited = reader.edit_log_probs(flat.to(reader.device), image.to(reader.device), cc.to(reader.device),
                                         values.to(reader.device), noise)
    delta = edited.cpu().view(n, m, 2, -1) - base.cpu()[:, None, None, :]
    return delta.mean(0)


def single_coordinate_bound(
    effects: dict[int, torch.Tensor],  # class -> [M, 2, F] from coordinate_factor_effects on its pool
    factor_names: Sequence[str],
    readable: Sequence[str],
    causal: Sequence[str],
    min_effect: float = 0.25,
    coords: torch.Tensor | None = None,  # [M] the coordinates the rows stand for; None = 0..M-1
) -> dict[str, Any]:
    """Which causal factors any single (coordinate, direction) has as its main factor.

    Returns ``recovery_bound`` (share of the causal factors that are the main factor of some
    coordinate on some class's pool: no ranking of single coordinates recovers more), and per
    class and causal factor the coordinate that moves the factor most, how far, and that
    coordinate's main factor and its change."""
    causal = list(causal)
    found: set[str] = set()
    classes: dict[int, Any] = {}
    for c, eff in effects.items():
        m = eff.shape[0]
        ids = torch.arange(m) if coords is None else coords.long().cpu()
        change = eff.abs().reshape(m * 2, -1)  # rows: coordinate-major, then direction
        mains = [main_factor(dict(zip(factor_names, row.tolist())), readable, min_effect) for row in change]
        per_factor = {}
        for f in (f for f in causal if f in factor_names):  # a factor the probe lacks is never found
            j = list(factor_names).index(f)
            best = int(change[:, j].argmax())
            row = dict(zip(factor_names, change[best].tolist()))
            top = max((n for n in row if n in readable), key=row.get, default=f)
            per_factor[f] = {"coordinate": int(ids[best // 2]), "direction": best % 2, "change": row[f],
                             "main_factor": top, "main_change": row[top],
                             "coordinates_with_it_as_main_factor": sum(x == f for x in mains)}
        found |= {x for x in mains if x in causal}
        classes[c] = per_factor
    return {"recovery_bound": len(found) / len(causal), "min_effect": float(min_effect), "classes": classes}
