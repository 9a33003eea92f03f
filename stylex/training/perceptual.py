"""Perceptual distance for the reconstruction loss.

Two backends:

- ``lpips``: the LPIPS metric (Zhang et al. 2018) from the optional ``lpips`` package. It needs
  the ImageNet backbone weights in the local torch hub cache, since nothing may be downloaded
  during training; without them it raises a clear error.
- ``classifier``: an LPIPS-style distance in the feature space of the frozen classifier itself.
  Each hooked stage's features are unit-normalised along channels, and the mean squared
  difference is summed over stages. This needs no extra weights, and it measures exactly the
  differences the explained classifier can see, which is what StylEx's reconstruction must keep.
- ``auto`` (the default) takes ``lpips`` when it is available offline and ``classifier`` otherwise.
- ``none`` turns the term off.

Every backend is frozen: it never changes during training, and it never uses random weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

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


def feature_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance between two lists of feature maps: sum over stages of the mean
    squared difference of channel-normalised features. Returns [B]."""
    if len(a) != len(b) or not a:
        raise ValueError("feature lists must be non-empty and of equal length")
    total = 0.0
    for fa, fb in zip(a, b):
        total = total + (_unit_normalise(fa.float()) - _unit_normalise(fb.float())).square().mean(dim=[1, 2, 3])
    return total


def _lpips_weights_present(net: str) -> bool:
    """Whether torchvision's backbone for LPIPS is in the local hub cache (so nothing downloads)."""
    names = {"alex": "alexnet-owt", "vgg": "vgg16-", "squeeze": "squeezenet1_1"}
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.startswith(names[net]) for p in ckpt_dir.iterdir())


def lpips_available(net: str = "alex") -> bool:
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    return _lpips_weights_present(net)


class LPIPSDistance(nn.Module):
    """LPIPS on [-1, 1] images via the optional ``lpips`` package; weights must be local."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if not lpips_available(net):
            raise RuntimeError(
                f"loss.perceptual_backend=lpips needs the 'lpips' package and torchvision's '{net}' weights in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'} (nothing is downloaded during training). "
                "Install them, or use loss.perceptual_backend=classifier."
            )
        import lpips

        self.net = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)

    def train(self, mode: bool = True):  # stays frozen
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a.float(), b.float()).flatten()


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"loss.perceptual_backend={name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "lpips" if lpips_available() else "classifier"
    return name
