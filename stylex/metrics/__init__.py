"""How good is a generator? Figures shared by training, the explanation and later analyses.

- :mod:`stylex.metrics.realism`: FID and KID (torchmetrics) in a named feature space (the
  frozen classifier's pooled features by default, Inception-v3 from a local weights file), with
  the real side cached on disk per dataset, extractor and image count;
- :mod:`stylex.metrics.fidelity`: conditioning fidelity (does the classifier see the class a
  sample was drawn for?) and causal-factor fidelity on the synthetic data (lesion counts of
  generated vs real images per class);
- :mod:`stylex.metrics.probe`: the factor probe that reads the synthetic scenes' factors from
  pixels, and its on-disk cache.

This package may import the classifier, data, networks and utils layers, never training or
explain (both import it).
"""

from stylex.metrics.fidelity import (
    ConditioningFidelity,
    FactorFidelity,
    conditioning_fidelity,
    conditioning_from_predictions,
    factor_fidelity,
    factor_from_readings,
)
from stylex.metrics.probe import FactorProbe, cached_factor_probe, train_factor_probe
from stylex.metrics.realism import (
    ClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    RealismMeter,
    feature_extractor,
    kid_against,
    kid_subset_size,
)

__all__ = [
    "ClassifierFeatures",
    "ConditioningFidelity",
    "FactorFidelity",
    "FactorProbe",
    "FeatureExtractor",
    "InceptionFeatures",
    "RealismMeter",
    "cached_factor_probe",
    "conditioning_fidelity",
    "conditioning_from_predictions",
    "factor_fidelity",
    "factor_from_readings",
    "feature_extractor",
    "kid_against",
    "kid_subset_size",
    "train_factor_probe",
]
