"""Temperature calibration of a trained classifier (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017).

A classifier trained to near-zero loss is over-confident: on the synthetic data most validation
images get p = 1.0000, so its output carries no more than the label. StylEx conditions the
generator on these probabilities and AttFind measures changes of them, so a saturated output
gives both nothing to work with. One scalar ``T`` that divides the logits, chosen to minimise the
negative log-likelihood of held-out labels, makes the probabilities mean what they say; it
changes no prediction (the argmax is the same for every T > 0).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

from stylex.classifier.model import Classifier


@torch.no_grad()
def collect_logits(
    classifier: Classifier,
    batches: Iterable[Mapping[str, torch.Tensor]],  # {"image": [B, C, H, W] in [-1, 1], "label": [B]}
    max_images: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # logits at temperature 1 [N, K], labels [N]
    """The classifier's raw logits (temperature 1) and the labels of held-out images."""
    saved, classifier.temperature = classifier.temperature, 1.0
    device = next(classifier.parameters()).device
    logits, labels = [], []
    try:
        seen = 0
        for batch in batches:
            logits.append(classifier(batch["image"].to(device)).float().cpu())
            labels.append(batch["label"].long().cpu())
            seen += labels[-1].numel()
            if max_images is not None and seen >= max_images:
                break
    finally:
        classifier.temperature = saved
    if not logits:
        raise ValueError("temperature calibration needs held-out images; the validation split is empty")
    return torch.cat(logits)[:max_images], torch.cat(labels)[:max_images]


def fit_temperature(
    logits: torch.Tensor,  # [N, K] at temperature 1
    labels: torch.Tensor,  # [N] class indices
    bounds: tuple[float, float] = (0.05, 100.0),  # the temperatures considered
) -> float:
    """The T minimising the mean NLL of ``labels`` under ``softmax(logits / T)``.

    The NLL is convex in 1/T, so a one-dimensional search over log T finds the optimum; a
    golden-section search is exact enough (1e-6 in log T) and needs no step size.
    """
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-6:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def expected_calibration_error(
    probs: torch.Tensor,  # [N, K]
    labels: torch.Tensor,  # [N]
    bins: int = 15,
) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins
    (via torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs.float(), labels.long(), num_classes=probs.shape[1], n_bins=bins))
