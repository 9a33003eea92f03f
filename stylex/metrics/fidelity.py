"""Does the generator draw what it is asked for? Conditioning and causal-factor fidelity.

Contract:

- Samples are noise-path samples ``G(z, one-hot c)`` (:func:`sample_generator`): ``z`` drawn
  from a seeded CPU generator (the same samples on every device), classes given by the caller,
  images ``[B, 3, R, R]`` in ``[-1, 1]``.
- **Conditioning fidelity**: the share of samples drawn for class ``c`` that the frozen
  classifier assigns to ``c``, per class, and overall as the mean of the per-class shares (so
  a generator that draws every class as the majority class cannot score well, whatever the
  class mix of the samples). :func:`conditioning_fidelity` samples the classes balanced;
  :func:`conditioning_from_predictions` takes predictions of samples drawn elsewhere.
- **Causal-factor fidelity** (synthetic data): the mean exudate and haemorrhage counts per class,
  read by the factor probe (:mod:`stylex.metrics.probe`) on generated samples and on real
  images of the same class, and their ratio generated / real. Reading both sides with the same
  probe cancels its bias. A ratio needs a real mean of at least ``min_real`` lesions (a
  healthy class has none: its ratio is None and the difference says how many lesions the
  generator adds). The **class contrast** asks whether the lesions follow the class: for every
  class after the first (the reference, e.g. "healthy"), the generated difference of its mean
  count from the reference class's over the real difference, ``(g_k - g_0) / (r_k - r_0)``
  (given where the real difference is at least ``min_real``). A generator that puts lesion-like
  marks into every class can match each class's count and still have a contrast near 0.
- **Class-swap fidelity** (:func:`swap_fidelity`): the counterfactual StylEx explains. Real
  images are encoded (``w = E(x)``, and E's noise maps when it gives them) and rendered under
  every other class's one-hot vector; the share of those renders the classifier assigns to the
  class asked for, per source class and target class, and (with a probe) the lesion counts of
  the renders under their own class and under the swapped one. A generator that ignores the
  class on real content scores near 0 however well it reconstructs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from stylex.data.synthetic import CAUSAL_FACTORS

MIN_REAL_LESIONS = 0.25  # real mean count below which a generated / real ratio is not given


def key_name(name: str) -> str:
    """A class or factor name as a log-key part: ``"DR signs"`` -> ``"dr_signs"``."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "class"


# ============================================================================ sampling
def balanced_classes(
    num: int,  # samples
    num_classes: int,
) -> torch.Tensor:  # [num] int64: 0, 1, ..., K-1, 0, 1, ...
    return torch.arange(int(num)) % int(num_classes)


def matched_classes(
    labels: torch.Tensor,  # [N] int64 labels of a real set
    num: int,  # samples wanted
) -> torch.Tensor:  # [num] int64 with the class mix of `labels` (cycled)
    """Classes for ``num`` samples in the proportions of ``labels``, so that generated and real
    sets have the same class mix (FID and KID compare distributions, class mix included)."""
    if labels.numel() == 0:
        raise ValueError("matched_classes needs at least one real label")
    return labels.long().flatten()[torch.arange(int(num)) % labels.numel()]


@torch.no_grad()
def sample_generator(
    generator: nn.Module,  # G(z [B, z_dim], c [B, K]) -> [B, 3, R, R]; has z_dim
    classes: torch.Tensor,  # [N] int64 class of each sample
    num_classes: int,
    seed: int = 0,
    batch_size: int = 64,
    noise_mode: str = "random",
    device: torch.device | str | None = None,  # default: the generator's
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # batches of (images [B, 3, R, R] in [-1, 1], classes [B])
    """Noise-path samples, ``batch_size`` at a time. The per-pixel noise (``noise_mode="random"``)
    comes from the global RNG: fork and seed it around the call for reproducible images."""
    if device is None:
        device = next(generator.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(classes.numel(), int(generator.z_dim), generator=gen)
    for i in range(0, classes.numel(), int(batch_size)):
        c = classes[i : i + batch_size]
        onehot = F.one_hot(c.to(device), int(num_classes)).float()
        images = generator(z[i : i + batch_size].to(device), onehot, noise_mode=noise_mode)
        yield images.float().clamp(-1, 1), c


@torch.no_grad()
def predict(
    classifier: nn.Module,  # images [B, 3, R, R] in [-1, 1] -> logits [B, K]
    images: torch.Tensor,
) -> torch.Tensor:  # [B] int64 on the CPU
    return classifier(images).argmax(dim=1).cpu()


# ============================================================================ conditioning fidelity
@dataclass
class ConditioningFidelity:
    """Share of samples of each class that the classifier puts in that class."""

    overall: float  # mean of the per-class shares (NaN when no class has samples)
    per_class: list[float | None]  # [K] (None: no samples of that class)
    counts: list[int]  # [K] samples per class

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(class_names) if class_names else [str(k) for k in range(len(self.counts))]
        return {"overall": self.overall, "classes": {n: v for n, v in zip(names, self.per_class)},
                "counts": {n: c for n, c in zip(names, self.counts)}}


def conditioning_from_predictions(
    predicted: torch.Tensor,  # [N] int64 classifier's class of each sample
    intended: torch.Tensor,  # [N] int64 class each sample was drawn for
    num_classes: int,
) -> ConditioningFidelity:
    predicted, intended = predicted.long().cpu().flatten(), intended.long().cpu().flatten()
    if predicted.shape != intended.shape:
        raise ValueError(f"{predicted.numel()} predictions for {intended.numel()} samples")
    hits = predicted == intended
    per_class: list[float | None] = []
    counts = []
    for k in range(int(num_classes)):
        mask = intended == k
        counts.append(int(mask.sum()))
        per_class.append(float(hits[mask].double().mean()) if counts[-1] else None)
    present = [v for v in per_class if v is not None]
    overall = sum(present) / len(present) if present else float("nan")
    return ConditioningFidelity(overall=overall, per_class=per_class, counts=counts)


def conditioning_fidelity(
    generator: nn.Module,
    classifier: nn.Module,
    num_classes: int,
    num: int = 512,  # samples, drawn balanced over the classes
    seed: int = 0,
    batch_size: int = 64,
    noise_mode: str = "random",
) -> ConditioningFidelity:
    """Draw ``num`` balanced samples and measure how many the classifier assigns to their class."""
    intended = balanced_classes(num, num_classes)
    predicted = torch.cat([predict(classifier, images) for images, _ in
                           sample_generator(generator, intended, num_classes, seed, batch_size, noise_mode)])
    return conditioning_from_predictions(predicted, intended, num_classes)


# ============================================================================ causal-factor fidelity
@dataclass
class FactorFidelity:
    """Mean causal-factor readings per class, generated vs real, and their ratio."""

    # class name -> factor -> {"generated", "real", "ratio" (None below min_real), "difference"}
    classes: dict[str, dict[str, dict[str, float | None]]]
    factors: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> {"generated", "real"}
    min_real: float = MIN_REAL_LESIONS
    # class (after the first) -> factor -> (g_k - g_0) / (r_k - r_0), None where undefined
    contrast: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"factors": list(self.factors), "min_real": self.min_real, "classes": self.classes,
                "counts": self.counts, "contrast": self.contrast}

    def flat(self) -> dict[str, float]:
        """``factor_ratio/<class>/<factor>`` (where defined), ``factor_diff/<class>/<factor>`` and
        ``factor_contrast/<class>/<factor>`` (where defined)."""
        out = {}
        for cname, per_factor in self.classes.items():
            for fname, v in per_factor.items():
                if v["ratio"] is not None:
                    out[f"factor_ratio/{key_name(cname)}/{fname}"] = float(v["ratio"])
                if v["difference"] is not None:
                    out[f"factor_diff/{key_name(cname)}/{fname}"] = float(v["difference"])
        for cname, per_factor in self.contrast.items():
            for fname, v in per_factor.items():
                if v is not None:
                    out[f"factor_contrast/{key_name(cname)}/{fname}"] = float(v)
        return out


def factor_from_readings(
    generated: torch.Tensor,  # [N, F] probe readings of generated samples
    generated_classes: torch.Tensor,  # [N] class each was drawn for
    real: torch.Tensor,  # [M, F] probe readings of real images
    real_labels: torch.Tensor,  # [M] their labels
    factor_names: Sequence[str],  # the F columns
    class_names: Sequence[str],
    min_real: float = MIN_REAL_LESIONS,
) -> FactorFidelity:
    generated, real = generated.double().cpu(), real.double().cpu()
    gc, rl = generated_classes.long().cpu().flatten(), real_labels.long().cpu().flatten()
    classes: dict[str, dict[str, dict[str, float | None]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for k, cname in enumerate(class_names):
        g, r = generated[gc == k], real[rl == k]
        counts[cname] = {"generated": int(g.shape[0]), "real": int(r.shape[0])}
        per_factor = {}
        for j, fname in enumerate(factor_names):
            gm = float(g[:, j].mean()) if g.shape[0] else None
            rm = float(r[:, j].mean()) if r.shape[0] else None
            ratio = gm / rm if gm is not None and rm is not None and rm >= min_real else None
            diff = gm - rm if gm is not None and rm is not None else None
            per_factor[fname] = {"generated": gm, "real": rm, "ratio": ratio, "difference": diff}
        classes[cname] = per_factor
    contrast: dict[str, dict[str, float | None]] = {}
    if class_names:
        base = classes[class_names[0]]
        for cname in class_names[1:]:
            contrast[cname] = {}
            for fname in factor_names:
                a, b = classes[cname][fname], base[fname]
                known = None not in (a["generated"], b["generated"], a["real"], b["real"])
                real_gap = a["real"] - b["real"] if known else None
                contrast[cname][fname] = ((a["generated"] - b["generated"]) / real_gap
                                          if real_gap is not None and abs(real_gap) >= min_real else None)
    return FactorFidelity(classes=classes, factors=list(factor_names), counts=counts, min_real=float(min_real),
                          contrast=contrast)


def probe_columns(
    probe: nn.Module,  # a FactorProbe
    factors: Sequence[str] = CAUSAL_FACTORS,
) -> list[int]:
    """Columns of ``probe.read`` holding ``factors`` (a ValueError names a factor it cannot read)."""
    missing = [f for f in factors if f not in probe.factor_names]
    if missing:
        raise ValueError(f"the factor probe does not read {missing}; it reads {probe.factor_names}")
    return [probe.factor_names.index(f) for f in factors]


@torch.no_grad()
def read_factors(
    probe: nn.Module,  # a FactorProbe
    images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    factors: Sequence[str] = CAUSAL_FACTORS,
) -> torch.Tensor:  # [B, len(factors)] on the CPU
    device = next(probe.parameters()).device
    return probe.read(images.to(device))[:, probe_columns(probe, factors)].cpu()


def factor_fidelity(
    generator: nn.Module,
    probe: nn.Module,  # a FactorProbe trained at the generator's resolution
    real_images: torch.Tensor,  # [M, 3, R, R] in [-1, 1]
    real_labels: torch.Tensor,  # [M]
    class_names: Sequence[str],
    num: int = 512,  # generated samples, in the class mix of real_labels
    seed: int = 0,
    batch_size: int = 64,
    noise_mode: str = "random",
    factors: Sequence[str] = CAUSAL_FACTORS,
) -> FactorFidelity:
    """Draw ``num`` samples in the real class mix and compare their causal factors with the real
    images' per class."""
    k = len(class_names)
    intended = matched_classes(real_labels, num)
    gen = torch.cat([read_factors(probe, images, factors) for images, _ in
                     sample_generator(generator, intended, k, seed, batch_size, noise_mode)])
    real = torch.cat([read_factors(probe, real_images[i : i + 256], factors)
                      for i in range(0, real_images.shape[0], 256)])
    return factor_from_readings(gen, intended, real, real_labels, factors, class_names)


# ============================================================================ the class swapped on real images
@dataclass
class SwapFidelity:
    """What the class vector does to encoded real images (see :func:`swap_fidelity`)."""

    # source class -> target class -> share of the source class's images rendered under the
    # target's one-hot vector that the classifier assigns to the target
    shares: dict[str, dict[str, float]]
    overall: float  # mean of the shares over (source, target) pairs with images
    counts: dict[str, int]  # images per source class (by the classifier's prediction of the real image)
    # source class -> factor -> {"real", "own", "swapped"} mean probe readings (None without a probe)
    factors: dict[str, dict[str, dict[str, float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shares": self.shares, "overall": self.overall, "counts": self.counts, "factors": self.factors}


@torch.no_grad()
def swap_fidelity(
    generator: nn.Module,  # Generator: generate(w, c, noise_mode, noise=maps)
    encoder: nn.Module,  # images -> w; noise_maps(images) -> maps or None
    classifier: nn.Module,  # images -> logits [B, K]
    images: torch.Tensor,  # [N, 3, R, R] real images in [-1, 1]
    class_names: Sequence[str],
    probe: nn.Module | None = None,  # factor probe: lesion counts of own-class and swapped renders
    factors: Sequence[str] = CAUSAL_FACTORS,
    batch_size: int = 64,
) -> SwapFidelity:
    """Encode real images, render each under every other class's one-hot vector (constant
    noise, or the encoder's maps of the image), and classify the renders."""
    k = len(class_names)
    if k < 2:
        raise ValueError("the class swap needs at least two classes")
    device = next(generator.parameters()).device
    eye = torch.eye(k, device=device)
    hits = torch.zeros(k, k)  # [source, target] renders assigned to the target
    seen = torch.zeros(k)
    cols = probe_columns(probe, factors) if probe is not None else []
    sums = torch.zeros(k, 3, len(cols))  # [source, real / own / swapped (mean over targets), factor]
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device, torch.float32)
        src = classifier(x).argmax(dim=1)
        w = encoder(x)
        maps = encoder.noise_maps(x) if getattr(encoder, "noise_encoder", None) is not None else None

        def render(c: torch.Tensor) -> torch.Tensor:
            return generator.generate(w, c, noise_mode="const", noise=maps).clamp(-1, 1)

        seen += torch.bincount(src.cpu(), minlength=k).float()
        if probe is not None:
            real_read = probe.read(x.to(next(probe.parameters()).device))[:, cols].cpu()
            own_read = probe.read(render(eye[src]).to(next(probe.parameters()).device))[:, cols].cpu()
            swapped_read = torch.zeros_like(own_read)
        for t in range(1, k):
            target = (src + t) % k  # every other class in turn
            img = render(eye[target])
            pred = classifier(img).argmax(dim=1)
            hits.index_put_((src.cpu(), target.cpu()), (pred == target).float().cpu(), accumulate=True)
            if probe is not None:
                swapped_read += probe.read(img.to(next(probe.parameters()).device))[:, cols].cpu() / (k - 1)
        if probe is not None:
            for j, part in enumerate((real_read, own_read, swapped_read)):
                sums[:, j].index_add_(0, src.cpu(), part)
    shares: dict[str, dict[str, float]] = {}
    pairs = []
    for a in range(k):
        if seen[a] == 0:
            continue
        shares[str(class_names[a])] = {str(class_names[b]): float(hits[a, b] / seen[a]) for b in range(k) if b != a}
        pairs += list(shares[str(class_names[a])].values())
    out = SwapFidelity(shares=shares, overall=sum(pairs) / len(pairs) if pairs else float("nan"),
                       counts={str(class_names[a]): int(seen[a]) for a in range(k)})
    if probe is not None:
        out.factors = {str(class_names[a]): {f: {part: float(sums[a, j, c] / seen[a])
                                                 for j, part in enumerate(("real", "own", "swapped"))}
                                             for c, f in enumerate(factors)}
                       for a in range(k) if seen[a] > 0}
    return out
