"""Perceptual distance for the reconstruction loss.

Backends (``loss.perceptual_backend``):

- ``classifier``: an LPIPS-style distance in the feature space of the frozen classifier itself.
  Each hooked stage's features are unit-normalised along channels, and the mean squared
  difference is summed over stages. This needs no extra weights, and it measures exactly the
  differences the explained classifier can see, which is what StylEx's reconstruction must keep.
- ``lpips``: LPIPS (Zhang et al. 2018) as torchmetrics implements it
  (:class:`~torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity`). Its linear layers
  ship with torchmetrics; its backbone is torchvision's ImageNet network (AlexNet by default),
  which torchvision would download on first use. Nothing may be downloaded during training, so
  the backbone's weights file must already be on the machine: in torchvision's cache,
  ``<torch.hub.get_dir()>/checkpoints/<file>`` (e.g. ``alexnet-owt-7be5be79.pth``), or wherever
  ``$STYLEX_LPIPS_WEIGHTS`` (or the ``weights`` argument) says. Without it the backend raises
  an error that names the file and where to put it.
- ``auto`` (the default) takes ``lpips`` when its weights are on the machine and ``classifier``
  otherwise.
- ``none`` turns the term off.

Every backend is frozen: it never changes during training, and it never uses random weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from stylex.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "lpips", "classifier", "none")


def _unit_normalise(f: torch.Tensor) -> torch.Tensor:
    return f / (f.square().sum(dim=1, keepdim=True).add(1e-10).sqrt())


class ClassifierFeatures(nn.Module):
    """Runs the frozen classifier once and returns its logits and its intermediate features.

    The stages are the modules timm lists in ``feature_info`` (the ends of the network's stages);
    a model without it falls back to its top-level children with 4-D outputs.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        net = getattr(classifier, "model", classifier)
        names: list[str] = []
        info = getattr(net, "feature_info", None)
        if info is not None:
            try:
                names = [d["module"] for d in info]
            except (TypeError, KeyError):
                names = [d["module"] for d in info.get_dicts()] if hasattr(info, "get_dicts") else []
        modules = dict(net.named_modules())
        names = [n for n in names if n in modules and n != ""]
        if not names:
            names = [n for n, _ in net.named_children()]
        self._names = names
        self._captured: list[torch.Tensor] = []
        for n in names:
            modules[n].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and self._capturing:
            self._captured.append(output)

    _capturing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._captured = []
        self._capturing = True
        try:
            logits = self.classifier(x)
        finally:
            self._capturing = False
        feats, self._captured = self._captured, []
        return logits, feats

    @torch.no_grad()
    def channels(self, resolution: int, in_chans: int = 3) -> list[int]:
        """Channel counts of the feature maps :meth:`forward` returns for ``resolution``-pixel
        images (one probe forward on zeros, on the classifier's device)."""
        param = next(self.classifier.parameters(), None)
        device = param.device if param is not None else None
        _, feats = self(torch.zeros(1, in_chans, resolution, resolution, device=device))
        return [int(f.shape[1]) for f in feats]


def feature_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance between two lists of feature maps: sum over stages of the mean
    squared difference of channel-normalised features. Returns [B]."""
    if len(a) != len(b) or not a:
        raise ValueError("feature lists must be non-empty and of equal length")
    total = 0.0
    for fa, fb in zip(a, b):
        total = total + (_unit_normalise(fa.float()) - _unit_normalise(fb.float())).square().mean(dim=[1, 2, 3])
    return total


# ---------------------------------------------------------------------------------------------
# LPIPS (torchmetrics), from local weights only
# ---------------------------------------------------------------------------------------------

LPIPS_WEIGHTS_ENV = "STYLEX_LPIPS_WEIGHTS"
# LPIPS backbone -> (torchvision model, torchvision weights enum)
LPIPS_BACKBONES = {
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}
# The backbones' smallest input side at which every stage LPIPS reads still has a feature map
# (AlexNet's fourth pooling leaves nothing of a 16-pixel image); smaller images are upsampled.
LPIPS_MIN_SIDE = 64


def _backbone(net: str) -> tuple[str, str]:
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS backbone must be one of {', '.join(LPIPS_BACKBONES)}, got {net!r}")
    return LPIPS_BACKBONES[net]


def lpips_backbone_url(net: str = "alex") -> str:
    """Where torchvision downloads the ImageNet weights of LPIPS's ``net`` backbone from."""
    import torchvision

    return getattr(torchvision.models, _backbone(net)[1]).DEFAULT.url


def lpips_weights_path(
    net: str = "alex",  # LPIPS backbone: alex | vgg | squeeze
    weights: str | Path | None = None,  # a local copy of the backbone's torchvision weights file
) -> Path:
    """The file LPIPS would read its backbone from; it may not exist.

    ``weights`` when given, else ``$STYLEX_LPIPS_WEIGHTS``, else torchvision's own cache file
    ``<torch.hub.get_dir()>/checkpoints/<name of the download>``.
    """
    chosen = weights or os.environ.get(LPIPS_WEIGHTS_ENV)
    if chosen:
        return Path(chosen).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(lpips_backbone_url(net)).path).name


def lpips_available(
    net: str = "alex",
    weights: str | Path | None = None,
) -> bool:
    """Whether LPIPS can be built without a download (its backbone's weights are local)."""
    return lpips_weights_path(net, weights).is_file()


@contextmanager
def _torchvision_reads(
    file: Path,  # the backbone's weights
    name: str,  # the file name torchvision expects in its cache
) -> Iterator[None]:
    """Make torchvision's weight loader find ``file`` in its cache, for the length of the block.

    torchvision reads ``<torch.hub.get_dir()>/checkpoints/<name>`` and downloads only when that
    is missing. A file elsewhere is linked (or copied) into a temporary cache folder that
    ``torch.hub`` points at until the block ends.
    """
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file() and cached.resolve() == file.resolve():
        yield
        return
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="stylex-lpips-") as tmp:
        link = Path(tmp) / "checkpoints" / name
        link.parent.mkdir()
        try:
            link.symlink_to(file.resolve())
        except OSError:  # no symlinks on this file system
            shutil.copyfile(file, link)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


class LPIPSDistance(nn.Module):
    """LPIPS between images in [-1, 1]: ``forward(a [B, 3, H, W], b [B, 3, H, W]) -> [B]``.

    torchmetrics' :class:`~torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity`
    network (its ``net``), built from a local copy of the backbone's weights (see
    :func:`lpips_weights_path`); a missing file raises :class:`~stylex.errors.ConfigError`
    before anything could be downloaded. Images smaller than ``LPIPS_MIN_SIDE`` pixels are
    upsampled to it (bilinear). Frozen, and always in eval mode.
    """

    def __init__(
        self,
        net: str = "alex",  # backbone: alex | vgg | squeeze
        weights: str | Path | None = None,  # the backbone's torchvision weights file (default: see lpips_weights_path)
    ) -> None:
        super().__init__()
        model, enum = _backbone(net)
        path = lpips_weights_path(net, weights)
        url = lpips_backbone_url(net)
        name = Path(urlparse(url).path).name
        if not path.is_file():
            raise ConfigError(
                f"loss.perceptual_backend=lpips needs the ImageNet weights of torchvision's {model} (the LPIPS "
                f"'{net}' backbone) on this machine, and nothing is downloaded during training: {path} does not "
                f"exist. Download {url} once and put it at {lpips_weights_path(net)} (torchvision's cache), or "
                f"set {LPIPS_WEIGHTS_ENV} to the file; or use loss.perceptual_backend=classifier."
            )
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        try:
            with _torchvision_reads(path, name):
                metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none")
        except Exception as err:  # torch.load and load_state_dict fail in many ways on a damaged or foreign file
            raise ConfigError(
                f"{path} cannot be read as the weights of torchvision's {model} (torchvision.models.{enum}): {err}"
            ) from err
        self.net = metric.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # stays frozen
        return super().train(False)

    def forward(
        self,
        a: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
        b: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
    ) -> torch.Tensor:  # [B] distances, 0 for identical images
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS compares two [B, 3, H, W] batches, got {tuple(a.shape)} and {tuple(b.shape)}")
        a, b = a.float(), b.float()
        if min(a.shape[-2:]) < LPIPS_MIN_SIDE:
            scale = LPIPS_MIN_SIDE / min(a.shape[-2:])
            size = (round(a.shape[-2] * scale), round(a.shape[-1] * scale))
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return self.net(a, b).flatten()


def resolve_backend(name: str) -> str:
    """The backend ``name`` stands for: ``auto`` becomes ``lpips`` when LPIPS's weights are
    local (:func:`lpips_available`) and ``classifier`` otherwise; other names are checked."""
    if name not in BACKENDS:
        raise ValueError(f"loss.perceptual_backend={name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "lpips" if lpips_available() else "classifier"
    return name
