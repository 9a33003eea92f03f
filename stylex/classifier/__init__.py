"""The image classifier that StylEx explains, and everything needed to get one.

Modules, one concept each:

- :mod:`~stylex.classifier.model`: :class:`Classifier`, a timm model that reads generator-range
  images (``[-1, 1]``), with freezing, saving and loading; and the timm helpers it uses.
- :mod:`~stylex.classifier.checkpoint`: :func:`read_checkpoint`, reading weights and recorded
  config from every accepted file format (safetensors, Lightning .ckpt, torch state dict).
- :mod:`~stylex.classifier.training`: the classifier's own training stage:
  :func:`train_classifier`, :class:`ClassifierModule` and its pieces
  (:func:`flip_and_shift`, :func:`inverse_frequency_weights`).
- :mod:`~stylex.classifier.stage`: the ``classifier`` config section
  (:class:`ClassifierConfig`, :class:`ClassifierTraining`, the one source of its defaults),
  :func:`build_classifier` from it, and :func:`prepare_classifier`, the stage policy: the
  configured checkpoint, else this run's earlier stage, else train one now.

Layering: checkpoint <- model <- training <- stage. Nothing here imports the GAN training
(:mod:`stylex.training`).
"""

from stylex.classifier.checkpoint import read_checkpoint
from stylex.classifier.model import Classifier
from stylex.classifier.stage import (
    ClassifierConfig,
    ClassifierTraining,
    build_classifier,
    load_feature_classifier,
    prepare_classifier,
)
from stylex.classifier.training import (
    ClassifierModule,
    add_pixel_noise,
    jitter_colour,
    flip_and_shift,
    inverse_frequency_weights,
    train_classifier,
)

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "ClassifierModule",
    "ClassifierTraining",
    "build_classifier",
    "add_pixel_noise",
    "jitter_colour",
    "flip_and_shift",
    "inverse_frequency_weights",
    "load_feature_classifier",
    "prepare_classifier",
    "read_checkpoint",
    "train_classifier",
]
