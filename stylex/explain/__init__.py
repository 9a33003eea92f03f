"""Explanations of a classifier through the StyleSpace of a trained StylEx generator.

- :mod:`stylex.explain.attfind`: AttFind, the search for the style coordinates that move the
  classifier (class-specific and image-specific rankings);
- :mod:`stylex.explain.metrics`: sufficiency (flip rate against baselines) and ground-truth
  recovery / purity on the synthetic data set;
- :mod:`stylex.explain.report`: panels, GIFs, the flip-rate plot, JSON and the HTML report;
- :mod:`stylex.explain.callback`: the post-training explanation as a Lightning callback;
- :mod:`stylex.explain.cli`: ``python explain.py``.
"""

from stylex.explain.attfind import (
    AttFind,
    AttFindConfig,
    AttFindResult,
    Attribute,
    EffectEvaluator,
    agreement,
    greedy_class_ranking,
)
from stylex.explain.callback import ExplainCallback
from stylex.explain.metrics import (
    FactorProbe,
    GroundTruth,
    Sufficiency,
    ground_truth,
    recovery_purity,
    sufficiency,
    train_factor_probe,
)
from stylex.explain.report import Report, explain_and_report, write_report

__all__ = [
    "AttFind",
    "AttFindConfig",
    "AttFindResult",
    "Attribute",
    "EffectEvaluator",
    "ExplainCallback",
    "FactorProbe",
    "GroundTruth",
    "Report",
    "Sufficiency",
    "agreement",
    "explain_and_report",
    "greedy_class_ranking",
    "ground_truth",
    "recovery_purity",
    "sufficiency",
    "train_factor_probe",
    "write_report",
]
