"""Artifact units: the units whose ablation makes generated images look more real.

A full FID per unit is too costly, so the per-unit score is the drop of a cheap
distance when the unit is ablated: the Frechet distance between *diagonal* Gaussians fitted to the
classifier features (the features of :mod:`stylex.metrics.realism`) of generated and real images,
``d = ||mu_g - mu_r||^2 + sum_j (sigma_g,j - sigma_r,j)^2`` (FID without the cross-covariances:
no matrix square root, and stable on the few images a per-unit score can afford). The units whose
ablation lowers ``d`` most are the artifact units; FID and KID (torchmetrics, through
:class:`~stylex.metrics.realism.RealismMeter`) with the top ones ablated are reported against the
same number of random units. Every render of a generated image (ablated or not) uses its noise
maps where ``noise`` gives them, and ``noise_mode="const"`` otherwise.

Typical use::

    found = artifact_units(space, flat, "b16.conv1", real_images, classifier=classifier)
    found.ranking()[:20], found.realism["top"]["fid"], found.realism["random"]["fid"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from stylex.dissect.edits import (
    check_batch_size,
    check_styles,
    float_json,
    image_resolution,
    layer_width,
    noise_on,
    render_intervened,
    space_device,
    sweep,
    tensor_json,
)
from stylex.stylespace import NoiseMaps, StyleSpace, check_noise, noise_rows

# ============================================================================ artifact units
@dataclass
class ArtifactUnits:
    """Units ranked by how much ablating each brings generated features closer to real ones."""

    layer: str
    feature: str  # the feature space's name
    score: torch.Tensor  # [C] d(plain) - d(unit ablated): > 0 = ablating it looks more real
    base_distance: float  # d(plain): diagonal Frechet distance of the scoring images
    count: int  # units ablated for the FID comparison
    top: list[int]  # the `count` best-scoring units
    random_sets: list[list[int]]  # the random unit sets compared against
    realism: dict[str, dict[str, Any]] = field(default_factory=dict)  # "plain" / "top" / "random" -> FID, KID

    def ranking(self) -> list[int]:
        return torch.argsort(-self.score, stable=True).tolist()

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "feature": self.feature, "score": tensor_json(self.score),
                "base_distance": self.base_distance, "ranking": self.ranking(), "count": self.count,
                "top": list(self.top), "random_sets": [list(s) for s in self.random_sets],
                "realism": self.realism}


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def diagonal_frechet(
    fake: torch.Tensor,  # [M, F] features of generated images
    real_mean: torch.Tensor,  # [F]
    real_std: torch.Tensor,  # [F] population standard deviation
) -> torch.Tensor:  # [] ||mu_g - mu_r||^2 + ||sigma_g - sigma_r||^2
    """The Frechet distance between diagonal Gaussians (FID without cross-covariances)."""
    fake = fake.double()
    mu = fake.mean(dim=0)
    sd = fake.std(dim=0, correction=0)
    return ((mu - real_mean.double()) ** 2).sum() + ((sd - real_std.double()) ** 2).sum()


def artifact_units(
    space: StyleSpace,
    styles: torch.Tensor,  # [N, S] flat styles of the generated images
    layer: str,  # a unit layer
    real_images: torch.Tensor,  # [M, 3, R, R] in [-1, 1]
    classifier: nn.Module | None = None,  # the frozen classifier (its pooled features)
    features: nn.Module | None = None,  # a stylex.metrics.realism FeatureExtractor instead
    count: int = 20,  # units ablated together for the FID comparison (capped at the layer width)
    random_draws: int = 3,  # random unit sets the FID is averaged over
    score_images: int | None = 64,  # styles used for the per-unit score (the first ones); None = all
    seed: int = 0,
    batch_size: int = 64,  # images per render and per feature pass
    progress: bool = True,
    noise: NoiseMaps | None = None,  # the generated images' noise maps [N or 1, 1, r, r]; None = "const"
) -> ArtifactUnits:
    """Rank units by the drop of the diagonal Frechet distance when each is ablated, then FID/KID
    of all ``styles`` with the top ``count`` units ablated against ``count`` random units."""
    from stylex.metrics.realism import RealismMeter, feature_extractor

    styles = check_styles(space, styles)
    width = layer_width(space, layer)
    if features is None:
        if classifier is None:
            raise ValueError("artifact units need the frozen classifier (its features) or a feature extractor")
        features = feature_extractor(classifier, resolution=image_resolution(space))
    res = image_resolution(space)
    if not isinstance(real_images, torch.Tensor) or tuple(real_images.shape[1:]) != (3, res, res):
        got = tuple(real_images.shape) if isinstance(real_images, torch.Tensor) else type(real_images).__name__
        raise ValueError(f"real_images must be [M, 3, {res}, {res}] in [-1, 1], got {got}")
    if real_images.shape[0] < 2 or styles.shape[0] < 2:
        raise ValueError(f"realism needs at least 2 real and 2 generated images, got {real_images.shape[0]} "
                         f"and {styles.shape[0]}")
    if int(count) < 1 or int(random_draws) < 0:
        raise ValueError(f"need count >= 1 and random_draws >= 0, got count={count}, random_draws={random_draws}")
    batch_size = check_batch_size(batch_size)
    noise = check_noise(noise, styles.shape[0])
    device = space_device(space)
    features = features.to(device)

    def feats(img: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        out = features(img.float())
        features.forget()
        return out

    real = torch.cat([feats(real_images[i : i + batch_size].to(device)).cpu()
                      for i in range(0, real_images.shape[0], batch_size)])
    real_mean, real_std = real.double().mean(dim=0), real.double().std(dim=0, correction=0)
    scoring = styles if score_images is None else styles[: max(2, int(score_images))]
    alpha = torch.eye(width)
    base, out = sweep(space, scoring, layer, alpha, torch.zeros_like(alpha), None, feats, feats, "nearest",
                       batch_size, progress, f"artifact units of {layer}",
                       noise=noise_rows(noise, slice(0, scoring.shape[0])))
    assert base is not None
    d_base = float(diagonal_frechet(base, real_mean, real_std))
    score = torch.tensor([d_base - float(diagonal_frechet(out[u], real_mean, real_std)) for u in range(width)])
    result = ArtifactUnits(layer=layer, feature=str(getattr(features, "name", type(features).__name__)),
                           score=score, base_distance=d_base, count=min(int(count), width), top=[], random_sets=[])
    result.top = result.ranking()[: result.count]
    gen = torch.Generator().manual_seed(int(seed))
    result.random_sets = [torch.randperm(width, generator=gen)[: result.count].tolist()
                          for _ in range(int(random_draws))]

    meter = RealismMeter(features, batch_size=batch_size, seed=int(seed)).to(device)
    meter.set_real(real_images)

    def realism(units: list[int] | None) -> dict[str, Any]:
        if units is None:
            with torch.no_grad():
                images = torch.cat([space.render(styles[i : i + batch_size].to(device), noise_mode="const",
                                                 noise=noise_on(noise_rows(noise, slice(i, i + batch_size)), device))
                                    .cpu() for i in range(0, styles.shape[0], batch_size)])
        else:
            images = render_intervened(space, styles, layer, units, batch_size=batch_size, noise=noise)
        m = meter.measure(images)
        return {"fid": float_json(m["fid"]), "kid": float_json(m["kid"]), "kid_std": float_json(m["kid_std"])}

    bar = tqdm(total=2 + len(result.random_sets), desc="FID with artifact units ablated", disable=not progress,
               leave=False)
    try:
        result.realism["plain"] = realism(None)
        bar.update(1)
        result.realism["top"] = realism(result.top)
        bar.update(1)
        draws = []
        for units in result.random_sets:
            draws.append(realism(units))
            bar.update(1)
    finally:
        bar.close()
    if draws:
        result.realism["random"] = {"fid": _mean_or_none([d["fid"] for d in draws]),
                                    "kid": _mean_or_none([d["kid"] for d in draws]),
                                    "fids": [d["fid"] for d in draws], "kids": [d["kid"] for d in draws]}
    return result

