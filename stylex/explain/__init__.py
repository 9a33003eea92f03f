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
- :mod:`stylex.explain.refine`: per-image latent refinement before the search;
- :mod:`stylex.explain.request`: :class:`ExplainRequest`, the options of ``explain.py``;
- :mod:`stylex.explain.pipeline`: search + metrics + report (:func:`explain_and_report`) and a
  whole trained run (:func:`explain_run`);
- :mod:`stylex.explain.callback`: the post-training explanation as a Lightning callback;
- :mod:`stylex.explain.cli`: ``python explain.py`` (options only; nothing imports it).
"""

# The names below are imported on first use (PEP 562), so that ``explain.py --help`` and other
# light users of a submodule do not pay for torch, Lightning and timm.
_WHERE = {
    "AttFind": "attfind", "AttFindConfig": "config", "ExplainCallback": "callback", "EffectEvaluator": "evaluator",
    "FactorProbe": "factors", "GroundTruth": "factors", "ground_truth": "factors", "recovery_purity": "factors",
    "train_factor_probe": "factors", "Sufficiency": "metrics", "agreement": "metrics", "sufficiency": "metrics",
    "ExplainRequest": "request", "explain_and_report": "pipeline", "explain_run": "pipeline", "Report": "report",
    "write_report": "report", "AttFindResult": "result", "Attribute": "result", "greedy_class_ranking": "result",
    "Refinement": "refine", "refine_latents": "refine",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'stylex.explain' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"stylex.explain.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
