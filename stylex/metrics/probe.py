"""The factor probe: a small CNN that reads the synthetic scenes' generative factors from pixels.

The synthetic fundus scenes (:mod:`stylex.data.synthetic`) are rendered from known factors. The
probe is trained on freshly rendered scenes to read the factors back, ``[B, 3, R, R] in [-1, 1]
-> [B, F]`` in factor units, and records its held-out R^2 per factor. The explanation's ground
truth (:mod:`stylex.explain.factors`) and the generator's causal-factor fidelity
(:mod:`stylex.metrics.fidelity`) both read images with it.

Training takes tens of seconds on a CPU, so :func:`cached_factor_probe` keeps trained probes on
disk, in ``$STYLEX_CACHE_DIR/probes`` (default ``~/.cache/stylex/probes``): one file per
resolution and probe settings, keyed also by a hash of ``stylex/data/synthetic.py``'s source (a
changed renderer draws other scenes, so its probe is trained afresh). Files are written
atomically, so concurrent runs at worst train the same probe twice.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from stylex.utils.io import atomic_write

log = logging.getLogger(__name__)

# Factors a probe can read from pixels; the integer seeds only reshuffle shapes and are left out.
PROBE_FACTORS = ["exudates", "haemorrhages", "brightness", "hue", "disc_x", "disc_y", "vessel_angle", "fundus_radius"]
CACHE_ENV = "STYLEX_CACHE_DIR"  # replaces ~/.cache/stylex
PROBE_FORMAT = 1  # bump when FactorProbe's layers change: older cached files then miss


class FactorProbe(nn.Module):
    """Reads generative factors back from images: ``[B, 3, R, R] in [-1, 1] -> [B, F]`` in factor
    units (the network predicts standardised values; ``mean``/``std`` undo that)."""

    def __init__(
        self,
        factor_names: Sequence[str] = PROBE_FACTORS,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.factor_names = list(factor_names)
        self.width = int(width)
        f = len(self.factor_names)
        w = self.width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        )
        # Position factors (disc_x, disc_y) need to know *where* things are: keep a coarse map
        # instead of averaging space away.
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * w * 16, 128),
                                  nn.LeakyReLU(0.2), nn.Linear(128, f))
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.r2: dict[str, float] = {}

    def forward(
        self,
        images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # [B, F] standardised factors
        return self.head(self.net(images))

    @torch.no_grad()
    def read(
        self,
        images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # [B, F] in factor units
        out = [self(images[i : i + 256].float()) for i in range(0, images.shape[0], 256)]
        return torch.cat(out) * self.std + self.mean

    def readable(self, min_r2: float) -> list[str]:
        """Factors the probe reads with held-out R^2 >= ``min_r2``."""
        return [name for name in self.factor_names if self.r2.get(name, -math.inf) >= min_r2]


def _synthetic_arrays(num: int, seed: int, split: str, resolution: int, names: Sequence[str],
                      lesion_scale: float = 1.0):
    from stylex.data.synthetic import FACTOR_NAMES, generate_split

    # The keyword only when it differs from the renderer's default lesion size.
    extra = {"lesion_scale": float(lesion_scale)} if float(lesion_scale) != 1.0 else {}
    data = generate_split(num, seed, split, resolution, **extra)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    cols = [FACTOR_NAMES.index(n) for n in names]
    return images, torch.from_numpy(data["factors"][:, cols]).float()


def train_factor_probe(
    resolution: int,
    num_train: int = 2048,
    num_val: int = 256,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    factor_names: Sequence[str] = PROBE_FACTORS,
    device: str | torch.device = "cpu",
    data_seed: int = 12345,  # scenes independent of any training run's default seed
    lesion_scale: float = 1.0,  # lesion radii of the scenes (a run's dataset.lesion_scale)
) -> FactorProbe:
    """Train a probe on freshly rendered synthetic scenes; its ``r2`` holds the held-out R^2 of
    every factor. Gradients are switched on here, so callers under ``no_grad`` (a callback) can
    train one too."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train_factor_probe(resolution, num_train, num_val, epochs, batch_size, lr, seed, factor_names,
                                   device, data_seed, lesion_scale)


def _train_factor_probe(resolution, num_train, num_val, epochs, batch_size, lr, seed, factor_names, device,
                        data_seed, lesion_scale) -> FactorProbe:
    torch.manual_seed(seed)
    x, y = _synthetic_arrays(num_train, data_seed, "train", resolution, factor_names, lesion_scale)
    xv, yv = _synthetic_arrays(num_val, data_seed, "val", resolution, factor_names, lesion_scale)
    probe = FactorProbe(factor_names).to(device)
    probe.mean.copy_(y.mean(0))
    probe.std.copy_(y.std(0).clamp_min(1e-6))
    yz = (y - y.mean(0)) / probe.std.cpu()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    steps = epochs * math.ceil(num_train / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    probe.train()
    bar = tqdm(total=steps, desc="factor probe", unit="step", disable=not sys.stderr.isatty(), leave=False)
    for _ in range(epochs):
        order = torch.randperm(num_train, generator=gen)
        for i in range(0, num_train, batch_size):
            idx = order[i : i + batch_size]
            loss = F.mse_loss(probe(x[idx].to(device)), yz[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    probe.eval().requires_grad_(False)
    pred = probe.read(xv.to(device)).cpu()
    var = yv.var(0, correction=0).clamp_min(1e-12)
    r2 = 1 - (pred - yv).square().mean(0) / var
    probe.r2 = {name: float(v) for name, v in zip(factor_names, r2)}
    return probe


# ============================================================================ the on-disk cache
def cache_dir() -> Path:
    """Where trained probes are kept: ``$STYLEX_CACHE_DIR/probes``, else ``~/.cache/stylex/probes``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "stylex") / "probes"


def _renderer_digest() -> str:
    """sha256 of ``stylex/data/synthetic.py``: the scenes a probe learns from depend on it."""
    from stylex.data import synthetic

    return hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()


def probe_key(
    resolution: int,
    settings: dict[str, Any],  # the keyword arguments of train_factor_probe (device excluded)
) -> str:
    """The cache key of a probe: resolution, settings, renderer source and probe format."""
    blob = json.dumps({"resolution": int(resolution), "settings": settings, "renderer": _renderer_digest(),
                       "format": PROBE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_probe(probe: FactorProbe, path: Path) -> None:
    """The probe's weights, factor names, width and R^2 in one torch file (written atomically)."""
    state = {"format": PROBE_FORMAT, "factor_names": list(probe.factor_names), "width": probe.width,
             "r2": dict(probe.r2), "state_dict": {k: v.detach().cpu() for k, v in probe.state_dict().items()}}
    atomic_write(path, lambda p: torch.save(state, p))


def load_probe(path: Path, device: str | torch.device = "cpu") -> FactorProbe:
    """A probe written by :func:`save_probe` (ValueError when the file does not hold one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        probe = FactorProbe(state["factor_names"], width=int(state["width"]))
        probe.load_state_dict(state["state_dict"])
    except Exception as e:  # any unreadable file (damaged, foreign, older layout) is a miss, never a crash
        raise ValueError(f"{path} does not hold a factor probe of this version ({type(e).__name__}: {e})") from e
    probe.r2 = {str(k): float(v) for k, v in state["r2"].items()}
    return probe.to(device).eval().requires_grad_(False)


def cached_factor_probe(
    resolution: int,
    device: str | torch.device = "cpu",
    folder: str | Path | None = None,  # default: cache_dir()
    **settings: Any,  # train_factor_probe's keyword arguments (defaults apply to the rest)
) -> FactorProbe:
    """The probe for ``resolution`` and ``settings``: read from the cache, or trained and stored.

    A file that cannot be read (an older format, a partial copy) is replaced by a fresh probe;
    a cache folder that cannot be written only costs the next caller a new training.
    """
    if "device" in settings:
        raise TypeError("pass device as its own argument: it does not change the probe, only where it trains")
    folder = Path(folder) if folder is not None else cache_dir()
    key_settings = {**_TRAIN_DEFAULTS, **settings}
    key_settings["factor_names"] = list(key_settings["factor_names"])
    path = folder / f"probe_r{int(resolution)}_{probe_key(resolution, key_settings)}.pt"
    if path.is_file():
        try:
            return load_probe(path, device)
        except ValueError as e:
            log.warning("factor probe cache: %s; training a new one", e)
    log.info("training the factor probe at %dx%d (cached in %s)", resolution, resolution, folder)
    probe = train_factor_probe(resolution, device=device, **settings)
    try:
        save_probe(probe, path)
    except OSError as e:  # a read-only home must not stop a run: the probe is still usable
        log.warning("could not cache the factor probe in %s (%s); set %s to a writable folder", folder, e, CACHE_ENV)
    return probe


# train_factor_probe's defaults, part of every cache key (a changed default trains a new probe).
_TRAIN_DEFAULTS = {
    name: p.default for name, p in inspect.signature(train_factor_probe).parameters.items()
    if name not in ("resolution", "device")
}
