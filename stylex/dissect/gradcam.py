"""Class evidence: Grad-CAM maps of the explained classifier, as concepts for dissection.

A dataset without a segmenter still has the classifier's own view of where each class shows.
Grad-CAM (Selvaraju et al., ICCV 2017) takes the classifier's last convolutional feature maps
``A_k`` (``[h, w]`` each) and a class score ``y_c``; each map is weighted by the spatial mean of
the score's gradient with respect to it, and the weighted sum is rectified::

    alpha_ck = mean_ij  d y_c / d A_k[i, j]
    L_c      = ReLU( sum_k alpha_ck A_k )                       [h, w], upsampled to the image

so ``L_c`` is high where features that raise the class score are active. :class:`ClassEvidence`
turns these maps into the boolean masks of a :class:`~stylex.dissect.base.Segmenter`: concept
``"evidence: <class>"`` marks, per image, the pixels at or above the map's ``quantile`` (the top
10 % by default) that hold any positive evidence at all (an image without evidence for a class
gets an empty mask). Masks of different classes may overlap.

The classifier is a :class:`stylex.classifier.Classifier` (its timm model's ``forward_features``
gives the feature map and ``forward_head`` the logits; its resize, normalisation and temperature
apply), or any module with timm's ``forward_features`` / ``forward_head`` that reads ``[-1, 1]``
images as they come.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("logit", "log_prob")


def _parts(
    classifier: nn.Module,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """``(features, head, timm_model)``: images in [-1, 1] -> feature maps ``[B, D, h, w]``, and
    feature maps -> logits ``[B, K]``, with the classifier's own preprocessing and temperature."""
    model = getattr(classifier, "model", None)
    if hasattr(classifier, "preprocess") and hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        temperature = float(getattr(classifier, "temperature", 1.0))

        def features(x: torch.Tensor) -> torch.Tensor:
            return model.forward_features(classifier.preprocess(x))

        def head(f: torch.Tensor) -> torch.Tensor:
            logits = model.forward_head(f)
            return logits / temperature if temperature != 1.0 else logits

        return features, head, model
    if hasattr(classifier, "forward_features") and hasattr(classifier, "forward_head"):
        return classifier.forward_features, classifier.forward_head, classifier
    raise TypeError(
        f"Grad-CAM needs a stylex Classifier or a timm-style model with forward_features and forward_head; "
        f"got {type(classifier).__name__}"
    )


def _as_nchw(
    feats: torch.Tensor,  # the output of forward_features
    model: nn.Module,  # the timm model (its output_fmt says the layout)
) -> torch.Tensor:  # [B, D, h, w]
    if feats.ndim != 4:
        raise ValueError(
            f"Grad-CAM needs a convolutional feature map [batch, channels, height, width], but "
            f"{type(model).__name__}.forward_features returned shape {tuple(feats.shape)} (a transformer's tokens?); "
            "explain a convolutional classifier, or give dissection a segmenter"
        )
    if str(getattr(model, "output_fmt", "NCHW")) == "NHWC":  # e.g. timm's Swin and ConvNeXt-V2 variants
        feats = feats.permute(0, 3, 1, 2)
    return feats


def grad_cam(
    classifier: nn.Module,  # a stylex Classifier, or a timm-style module (see the module docstring)
    images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
    target: str = "logit",  # the class score: "logit" (as in the paper) or "log_prob" (log-softmax)
    classes: Sequence[int] | None = None,  # class indices to map; None = all
    check: bool = False,  # verify that forward_head(forward_features(x)) is the classifier's output
) -> torch.Tensor:  # float [B, len(classes), H, W], >= 0
    """Grad-CAM maps per class, bilinearly upsampled to the images' size (see the module docstring).

    The classifier is run in eval mode (its previous mode is restored afterwards); gradients are
    taken with respect to the feature maps only, so no parameter gradient is touched.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown Grad-CAM target {target!r}; use one of {', '.join(TARGETS)}")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"Grad-CAM reads float images [batch, 3, height, width] in [-1, 1], got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    features, head, model = _parts(classifier)
    param = next(iter(classifier.parameters()), None)
    device = param.device if param is not None else images.device
    was_training = classifier.training
    classifier.train(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().to(device).clone()  # a normal tensor even if images are inference tensors
            with torch.no_grad():  # no gradient is needed below the feature map
                feats = _as_nchw(features(x), model)
            feats = feats.detach().requires_grad_(True)  # [B, D, h, w]
            layout = feats
            if str(getattr(model, "output_fmt", "NCHW")) == "NHWC":
                layout = feats.permute(0, 2, 3, 1)  # the head reads the model's own layout
            logits = head(layout)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"the classifier head returned shape {tuple(logits.shape)}, expected [batch, classes]")
            if check:
                _check_consistent(classifier, x, logits)
            scores = logits.log_softmax(-1) if target == "log_prob" else logits  # [B, K]
            index = list(range(scores.shape[1])) if classes is None else [int(c) for c in classes]
            bad = [c for c in index if not 0 <= c < scores.shape[1]]
            if bad:
                raise ValueError(f"class indices {bad} out of range for a classifier of {scores.shape[1]} classes")
            maps = []
            for n, c in enumerate(index):
                # Images are independent in eval mode, so the gradient of the batch sum holds each
                # image's own gradient.
                (grad,) = torch.autograd.grad(scores[:, c].sum(), feats, retain_graph=n < len(index) - 1)
                alpha = grad.mean((2, 3), keepdim=True)  # [B, D, 1, 1]
                maps.append(F.relu((alpha * feats.detach()).sum(1)))  # [B, h, w]
    finally:
        classifier.train(was_training)
    if not maps:
        return images.new_zeros((images.shape[0], 0, *images.shape[-2:]))
    cam = torch.stack(maps, 1)  # [B, K, h, w]
    cam = F.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    return cam.clamp_min(0).to(images.device)


def _check_consistent(classifier: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> None:
    with torch.no_grad():
        direct = classifier(x)
    if direct.shape != logits.shape or not torch.allclose(direct, logits.detach(), rtol=1e-3, atol=1e-4):
        raise ValueError(
            "the classifier's forward_head(forward_features(x)) differs from its output, so Grad-CAM would explain "
            "another function; give dissection a segmenter instead"
        )


def evidence_masks(
    cam: torch.Tensor,  # float [B, K, H, W] >= 0, e.g. from grad_cam
    quantile: float,  # in (0, 1): the share of pixels left out of each mask
) -> torch.Tensor:  # bool [B, K, H, W]
    """Per image and class: the pixels at or above the map's ``quantile`` that hold positive
    evidence (a map without any is an empty mask)."""
    flat = cam.flatten(2).float()  # [B, K, HW]
    threshold = torch.quantile(flat, float(quantile), dim=-1)  # [B, K]
    return (cam >= threshold[..., None, None]) & (cam > 0)


class ClassEvidence:
    """Concept masks from Grad-CAM, for datasets without a segmenter (see the module docstring).

    ``concepts`` are ``"evidence: <class name>"``, one per class of the classifier. Images of
    any size are read (the classifier resizes them itself); masks come at the images' size.
    ``resolution`` is the image side it is meant for (the generator's).
    """

    def __init__(
        self,
        classifier: nn.Module,  # a stylex Classifier (frozen or not) or a timm-style module
        class_names: Sequence[str],  # K names, in the classifier's logit order
        quantile: float = 0.9,  # each mask keeps the top (1 - quantile) of its map's pixels
        resolution: int | None = None,  # the image side; None = the classifier's input_size
        target: str = "logit",  # the class score differentiated: "logit" or "log_prob"
        batch_size: int = 64,  # images per Grad-CAM pass
    ) -> None:
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"the class-evidence quantile must lie in (0, 1), got {quantile!r} "
                             "(0.9 keeps the top 10 %)")
        if target not in TARGETS:
            raise ValueError(f"unknown Grad-CAM target {target!r}; use one of {', '.join(TARGETS)}")
        _parts(classifier)  # a TypeError now rather than on the first images
        names = [str(n) for n in class_names]
        num_classes = getattr(classifier, "num_classes", None)
        if num_classes is not None and int(num_classes) != len(names):
            raise ValueError(f"{len(names)} class names given for a classifier of {num_classes} classes: {names}")
        if resolution is None:
            resolution = getattr(classifier, "input_size", None)
        if resolution is None:
            raise ValueError("ClassEvidence needs resolution= (the generator's image side): the classifier reads "
                             "images of any size")
        self.classifier = classifier
        self.class_names = names
        self.concepts = [f"evidence: {n}" for n in names]
        self.quantile = float(quantile)
        self.resolution = int(resolution)
        self.target = target
        self.batch_size = int(batch_size)
        arch = getattr(classifier, "arch", type(classifier).__name__)
        self.source = (f"Grad-CAM of the classifier ({arch}, class {target}), top {100 * (1 - self.quantile):.0f} % "
                       "of each map")
        self._checked = False

    def _chunks(
        self,
        images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
        masks: bool,  # threshold each chunk's maps into masks
    ) -> torch.Tensor:
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            # The first chunk also checks that the feature/head split reproduces the classifier.
            cam = grad_cam(self.classifier, images[i : i + self.batch_size], self.target, check=not self._checked)
            self._checked = True
            if cam.shape[1] != len(self.class_names):
                raise ValueError(f"the classifier has {cam.shape[1]} classes but {len(self.class_names)} class "
                                 f"names were given: {self.class_names}")
            out.append(evidence_masks(cam, self.quantile) if masks else cam)
        if not out:
            dtype = torch.bool if masks else images.dtype
            return torch.zeros((0, len(self.class_names), *images.shape[-2:]), dtype=dtype, device=images.device)
        return torch.cat(out)

    def maps(
        self,
        images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
    ) -> torch.Tensor:  # float [B, K, H, W] >= 0
        """The Grad-CAM map of every class."""
        return self._chunks(images, masks=False)

    def __call__(
        self,
        images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]
    ) -> torch.Tensor:  # bool [B, K, H, W]
        return self._chunks(images, masks=True)

    def __repr__(self) -> str:
        return f"ClassEvidence({self.source!r}, concepts={self.concepts})"
