"""Realism of generated images: FID and KID through torchmetrics, in a named feature space.

Contract:

- Images come in as ``[B, 3, R, R]`` floats in ``[-1, 1]`` (generator range), whatever the
  feature extractor; each extractor converts them to what its network reads.
- Features (:func:`feature_extractor`):

  * default: the frozen classifier's pooled features (timm ``forward_features`` then
    ``forward_head(..., pre_logits=True)`` after :meth:`Classifier.preprocess`), named
    ``"classifier:<arch>"``. A classifier that is not a timm :class:`Classifier` falls back to its
    class probabilities (bounded, unlike logits, which the cubic KID kernel would blow up), named
    ``"classifier-probs:<class name>"``. Nothing is downloaded;
  * Inception-v3 (``"inception-v3"``, torchmetrics' ``NoTrainInceptionV3`` from
    ``torch-fidelity``, the standard FID network) only from a local weights file: without one it
    would download, which a run must not do, so it is refused with the file to provide.

  Every figure carries the extractor's ``name`` (``feature``): FIDs in different feature spaces
  are not comparable, and a classifier-feature FID is not the FID of the literature.
- The extractor is the ``feature=`` module of torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``. torchmetrics passes a custom module the images as given (no
  ``normalize`` conversion) and skips its dummy forward when the module has an ``int``
  ``num_features``, which ours always have. Both metrics read the same batch; the extractor
  remembers its last batch so that the network runs once per batch.
- :class:`RealismMeter` keeps the real side: computed once, or restored from
  ``<folder>/real_<key>.pt``, where the key hashes the dataset's identity, the extractor's name
  and weights digest and the number of real images (a change of any gives a new file). Fakes
  are added batch by batch and :meth:`RealismMeter.compute` returns the figures.
- KID's ``subset_size`` follows the counts (:func:`kid_subset_size`); its random subsets are
  drawn from a seeded generator, so a figure is reproducible and the caller's RNG is untouched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from stylex.utils.io import atomic_write

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
REAL_FORMAT = 1  # bump when the cached real statistics change layout
KID_SUBSETS = 100  # random subsets KID averages over (torchmetrics' default)
KID_MAX_SUBSET = 1000  # the usual subset size when there are enough images


# ============================================================================ feature extractors
class FeatureExtractor(nn.Module):
    """``[B, 3, R, R]`` in ``[-1, 1]`` -> ``[B, num_features]`` float32, frozen, with a ``name``
    and a weights ``digest`` (its identity in cache keys). Counts the images it has read
    (``images_read``) and memoises its last batch (FID and KID read the same batch)."""

    name: str = "features"
    num_features: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.images_read = 0
        self._memo: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._digest: str | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:  # subclasses: the network itself
        raise NotImplementedError

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # [B, num_features] float32
        memo = self._memo
        if memo is not None and memo[0] is images and memo[1] == images._version:
            return memo[2]
        with torch.autocast(device_type=images.device.type, enabled=False):
            out = self.features(images.float()).float().flatten(1)
        if out.shape[1] != self.num_features:
            raise RuntimeError(f"feature extractor {self.name} returned {out.shape[1]} features, "
                               f"expected {self.num_features}")
        self.images_read += images.shape[0]
        self._memo = (images, images._version, out)
        return out

    def forget(self) -> None:
        """Drop the memoised batch (frees its memory)."""
        self._memo = None

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: BatchNorm statistics must never move

    def digest(self) -> str:
        """sha256 of the weights (names, shapes, dtypes and values), computed once: the network
        is frozen."""
        if self._digest is None:
            h = hashlib.sha256()
            for key, value in sorted(self.state_dict().items()):
                t = value.detach().cpu().contiguous()
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._digest = h.hexdigest()
        return self._digest

    def identity(self) -> dict[str, str]:
        return {"feature": self.name, "weights": self.digest()}


class ClassifierFeatures(FeatureExtractor):
    """The frozen classifier's pooled (pre-logit) features; a classifier without a timm model
    gives its class probabilities instead (and says so in its name)."""

    def __init__(
        self,
        classifier: nn.Module,  # stylex Classifier (a timm model inside) or any images -> logits module
        resolution: int = 32,  # image side of the dummy forward that sizes a classifier without timm
        role: str = "classifier",  # the name's prefix: "classifier" (the explained one) or "feature-net"
    ) -> None:
        super().__init__()
        self.classifier = classifier
        net = getattr(classifier, "model", None)
        self.pooled = all(hasattr(obj, attr) for obj, attr in (
            (net, "forward_features"), (net, "forward_head"), (classifier, "preprocess")))
        if self.pooled:
            self.name = f"{role}:{getattr(classifier, 'arch', type(net).__name__)}"
            size = getattr(net, "head_hidden_size", None) or getattr(net, "num_features", None)
            self.num_features = int(size) if size else self._count_features(resolution)
        else:
            self.name = f"{role}-probs:{type(classifier).__name__}"
            size = getattr(classifier, "num_classes", None)
            self.num_features = int(size) if isinstance(size, int) else self._count_features(resolution)

    def _count_features(self, resolution: int) -> int:
        device = next(iter(self.classifier.parameters()), torch.empty(0)).device
        with torch.no_grad():
            return int(self.features(torch.zeros(1, 3, resolution, resolution, device=device)).flatten(1).shape[1])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.pooled:
            return self.classifier(images).float().softmax(dim=-1)
        net = self.classifier.model
        return net.forward_head(net.forward_features(self.classifier.preprocess(images)), pre_logits=True)


class InceptionFeatures(FeatureExtractor):
    """The 2048 pool features of FID's Inception-v3 (torch-fidelity's network, via torchmetrics),
    from a local weights file only."""

    name = "inception-v3"
    num_features = 2048

    def __init__(
        self,
        weights: str | Path,  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    ) -> None:
        super().__init__()
        self.net = build_inception(weights)
        self._file = Path(weights)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # The network reads uint8 [0, 255] and resizes to 299 itself.
        return self.net(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))

    def digest(self) -> str:
        if self._digest is None:
            self._digest = hashlib.sha256(self._file.read_bytes()).hexdigest()
        return self._digest


def check_inception_weights(
    weights: str | Path | None,  # the option's value
    option: str = "inception_weights",  # the option's name, for the message
) -> Path | None:
    """The weights file as a Path (None when unset), or a ValueError naming the option, the file
    and the remedy: the file must exist and torch-fidelity must be installed."""
    if weights is None or str(weights) == "":
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{option}={weights}: no such file. Inception features need torch-fidelity's weights "
            f"{INCEPTION_FILE} on disk (nothing is downloaded during a run); copy that file here, or "
            f"leave {option} unset to measure in the classifier's feature space."
        )
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError(
            f"{option}={weights}: Inception features need the torch-fidelity package (pip install "
            f"torch-fidelity); or leave {option} unset to measure in the classifier's feature space."
        )
    return path


def build_inception(weights: str | Path) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 with the given weights file (never a download)."""
    path = check_inception_weights(weights)
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(path))


def feature_extractor(
    classifier: nn.Module,  # the frozen classifier
    inception_weights: str | Path | None = None,  # a local Inception weights file: use it instead
    resolution: int = 32,  # image side (only sizes a classifier without timm)
    role: str = "classifier",  # the feature space's name prefix (see ClassifierFeatures)
) -> FeatureExtractor:
    """Inception features when a weights file is given, else the classifier's features."""
    if inception_weights:
        return InceptionFeatures(inception_weights)
    return ClassifierFeatures(classifier, resolution, role)


# ============================================================================ FID and KID
def kid_subset_size(
    num_real: int,
    num_fake: int,
    cap: int = KID_MAX_SUBSET,
) -> int:
    """KID's subset size: half the smaller side (so that the subsets differ and the spread over
    them means something), at most ``cap``; every subset needs at least 2 images."""
    smaller = min(int(num_real), int(num_fake))
    if smaller < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {num_real} real and {num_fake} generated")
    return max(2, min(int(cap), smaller // 2))


def real_key(
    dataset: Mapping[str, Any],  # what identifies the real images (dataset config, split, ...)
    features: FeatureExtractor,
    num_real: int,
) -> str:
    """The cache key of real statistics: a hash of the dataset, the extractor and the count."""
    blob = json.dumps({"dataset": dict(dataset), **features.identity(), "num_real": int(num_real),
                       "format": REAL_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RealismMeter:
    """FID and KID of generated images against a fixed real set, in one feature space."""

    def __init__(
        self,
        features: FeatureExtractor,
        batch_size: int = 256,  # images per feature pass
        kid_subsets: int = KID_SUBSETS,
        seed: int = 0,  # KID's random subsets
    ) -> None:
        self.features = features
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        with warnings.catch_warnings():  # KID warns that it keeps every feature: ours are few
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            # sync_on_compute=False: a rank-zero-only measurement must not wait for other ranks.
            self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=True,
                                                sync_on_compute=False)
            self.kid = KernelInceptionDistance(feature=features, subsets=int(kid_subsets), subset_size=2,
                                               reset_real_features=False, normalize=True, sync_on_compute=False)
        self.num_real = 0
        self.num_fake = 0
        self.loaded_from: Path | None = None  # the cache file the real side came from, if any

    @property
    def name(self) -> str:
        return self.features.name

    def to(self, device: torch.device | str) -> "RealismMeter":
        self.fid.to(device)
        self.kid.to(device)
        return self

    def _batches(self, images: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            for i in range(0, images.shape[0], self.batch_size):
                yield images[i : i + self.batch_size]
        else:
            yield from images

    def _update(self, batch: torch.Tensor, real: bool) -> None:
        device = self.fid.device
        batch = batch.to(device)
        self.fid.update(batch, real=real)
        self.kid.update(batch, real=real)  # reads the extractor's memo of the same batch
        self.features.forget()

    # ---------------------------------------------------------------- the real side
    def set_real(
        self,
        images: torch.Tensor | Iterable[torch.Tensor],  # [N, 3, R, R] in [-1, 1], or batches of them
    ) -> None:
        """Compute the real side from images (replacing any earlier one)."""
        self._clear_real()
        for batch in self._batches(images):
            self._update(batch, real=True)
            self.num_real += batch.shape[0]

    def load_or_set_real(
        self,
        images: Callable[[], torch.Tensor | Iterable[torch.Tensor]],  # called only on a cache miss
        dataset: Mapping[str, Any],  # identifies the real images (see real_key)
        num_real: int,  # how many images `images` gives
        folder: str | Path,  # where real_<key>.pt lives (e.g. <run>/metrics)
    ) -> bool:  # True when the real side came from the cache
        """The real side from ``<folder>/real_<key>.pt`` when it exists, else computed from
        ``images()`` and written there (atomically)."""
        key = real_key(dataset, self.features, num_real)
        path = Path(folder) / f"real_{key}.pt"
        if path.is_file():
            try:
                self._restore(torch.load(path, map_location="cpu", weights_only=True), key)
                self.loaded_from = path
                return True
            except Exception as e:  # any unreadable file (damaged, foreign, older layout): compute again
                log.warning("real statistics %s are unusable (%s); computing them again", path, e)
        self.set_real(images())
        if self.num_real != num_real:
            raise ValueError(f"the real images gave {self.num_real} images, {num_real} were announced")
        state = {"format": REAL_FORMAT, "key": key, "feature": self.name, "num_real": self.num_real,
                 "fid": {"sum": self.fid.real_features_sum.cpu(), "cov_sum": self.fid.real_features_cov_sum.cpu(),
                         "num": self.fid.real_features_num_samples.cpu()},
                 "kid_features": torch.cat(list(self.kid.real_features)).cpu()}
        atomic_write(path, lambda p: torch.save(state, p))
        self.loaded_from = None
        return False

    def _clear_real(self) -> None:
        device = self.fid.device
        d = self.features.num_features
        self.fid.real_features_sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.fid.real_features_cov_sum = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.fid.real_features_num_samples = torch.zeros((), dtype=torch.long, device=device)
        self.kid.real_features = []
        self.num_real = 0

    def _restore(self, state: dict[str, Any], key: str) -> None:
        if state.get("format") != REAL_FORMAT or state.get("key") != key or state.get("feature") != self.name:
            raise ValueError(f"written for another key or format ({state.get('key')}, format {state.get('format')})")
        fid, feats = state["fid"], state["kid_features"]
        d = self.features.num_features
        if tuple(fid["sum"].shape) != (d,) or feats.ndim != 2 or feats.shape[1] != d:
            raise ValueError(f"holds {tuple(feats.shape)} features, the extractor gives {d}")
        device = self.fid.device
        self.fid.real_features_sum = fid["sum"].to(device, torch.float64)
        self.fid.real_features_cov_sum = fid["cov_sum"].to(device, torch.float64)
        self.fid.real_features_num_samples = fid["num"].to(device)
        self.kid.real_features = [feats.to(device)]
        self.num_real = int(state["num_real"])

    # ---------------------------------------------------------------- the generated side
    def reset_fake(self) -> None:
        """Forget the generated images (the real side stays)."""
        self.fid.reset()
        self.kid.reset()
        self.num_fake = 0

    def add_fake(
        self,
        images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    ) -> None:
        for batch in self._batches(images):
            self._update(batch, real=False)
            self.num_fake += batch.shape[0]

    def compute(
        self,
        fid: bool = True,  # False: KID only (FID needs far more images than features to be meaningful)
    ) -> dict[str, Any]:
        """``{"feature", "fid", "kid", "kid_std", "kid_subset_size", "num_real", "num_fake"}``
        (``fid`` None when not asked for)."""
        if self.num_real < 2 or self.num_fake < 2:
            raise ValueError(f"FID/KID need at least 2 real and 2 generated images, have {self.num_real} "
                             f"and {self.num_fake}")
        self.kid.subset_size = kid_subset_size(self.num_real, self.num_fake)
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets with torch.randperm (CPU)
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        out = {"feature": self.name, "fid": None, "kid": float(kid_mean), "kid_std": float(kid_std),
               "kid_subset_size": self.kid.subset_size, "num_real": self.num_real, "num_fake": self.num_fake}
        if fid:
            value = float(self.fid.compute())
            out["fid"] = value if math.isfinite(value) else float("nan")
        return out

    def measure(
        self,
        images: torch.Tensor | Iterable[torch.Tensor],  # generated images [N, 3, R, R] in [-1, 1]
        fid: bool = True,
    ) -> dict[str, Any]:
        """:meth:`reset_fake`, :meth:`add_fake` and :meth:`compute` in one call."""
        self.reset_fake()
        for batch in self._batches(images):
            self.add_fake(batch)
        return self.compute(fid=fid)


def kid_against(
    features: FeatureExtractor,
    real: torch.Tensor,  # [N, 3, R, R] in [-1, 1]
    sets: Mapping[str, torch.Tensor],  # name -> [M, 3, R, R] in [-1, 1]
    seed: int = 0,
) -> dict[str, dict[str, Any]]:  # name -> RealismMeter.compute(fid=False)
    """KID of several image sets against one real set (its features computed once)."""
    meter = RealismMeter(features, seed=seed).to(real.device)
    meter.set_real(real)
    return {name: meter.measure(images, fid=False) for name, images in sets.items()}
