"""Explanations of a classifier through the StyleSpace of a trained StylEx generator.

The search:

- :mod:`stylex.explain.measures`: effect measures (probability, one-vs-rest logit), the
  min/max edit targets and multi-coordinate edits;
- :mod:`stylex.explain.evaluator`: :class:`EffectEvaluator`, rendering edited styles (prefix
  reuse) and classifying the renders;
- :mod:`stylex.explain.predict`: the per-image work as Lightning predict steps, on one device or
  all of a machine;
- :mod:`stylex.explain.result`: ranked attributes and :class:`AttFindResult`;
- :mod:`stylex.explain.config`: :class:`AttFindConfig`, the settings of a search;
- :mod:`stylex.explain.attfind`: AttFind, the search for the style coordinates that move the
  classifier (class-specific and image-specific rankings).

Judging it:

- :mod:`stylex.explain.metrics`: sufficiency (flip rate against baselines, with the KID of the
  edited renders and the agreement with the real inputs beside it) and the agreement of two
  searches;
- :mod:`stylex.explain.factors`: ground truth on the synthetic data set: recovery and purity,
  read with the factor probe of :mod:`stylex.metrics.probe`.

Showing it:

- :mod:`stylex.explain.drawing`: panels and GIFs drawn with PIL (the line plot is
  :mod:`stylex.utils.plot`'s);
- :mod:`stylex.explain.report`: the report folder (panels, GIFs, plot, JSON) and
  :mod:`stylex.explain.html_page` its self-contained HTML page;
- :mod:`stylex.explain.loggers`: the explanation sent to Lightning loggers and to W&B.

Running it:

- :mod:`stylex.explain.inputs`: the export, config and images of a trained run;
- :mod:`stylex.explain.pipeline`: search + metrics + report (:func:`explain_and_report`) and a
  whole trained run (:func:`explain_run`);
- :mod:`stylex.explain.callback`: the post-training explanation as a Lightning callback;
- :mod:`stylex.explain.cli`: ``python explain.py`` (options only; nothing imports it).
"""

from stylex.explain.attfind import AttFind, AttFindConfig
from stylex.explain.callback import ExplainCallback
from stylex.explain.evaluator import EffectEvaluator
from stylex.explain.factors import (
    FactorProbe,
    GroundTruth,
    ground_truth,
    recovery_purity,
    train_factor_probe,
)
from stylex.explain.metrics import Sufficiency, agreement, sufficiency
from stylex.explain.pipeline import ExplainRequest, explain_and_report, explain_run
from stylex.explain.report import Report, write_report
from stylex.explain.result import AttFindResult, Attribute, greedy_class_ranking

__all__ = [
    "AttFind",
    "AttFindConfig",
    "AttFindResult",
    "Attribute",
    "EffectEvaluator",
    "ExplainCallback",
    "ExplainRequest",
    "FactorProbe",
    "GroundTruth",
    "Report",
    "Sufficiency",
    "agreement",
    "explain_and_report",
    "explain_run",
    "greedy_class_ranking",
    "ground_truth",
    "recovery_purity",
    "sufficiency",
    "train_factor_probe",
    "write_report",
]
