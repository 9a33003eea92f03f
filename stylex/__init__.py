"""StylEx: explain an image classifier through the StyleSpace of a classifier-conditioned StyleGAN2.

The Python API, in the order a user meets it (README.md, "Python API", has a runnable example)::

    from stylex import AttFind, StyleSpace, load_export, load_images

    export = load_export("runs/synthetic/<timestamp>")     # generator, encoder, classifier, class names
    images = load_images(["eye.png"], export.resolution)  # [N, 3, R, R] in [-1, 1]
    finder = AttFind(export.generator, export.classifier)
    styles = finder.encode(export.encoder, images)        # [N, S] StyleSpace coordinates
    result = finder.run(styles, top_k=4)                  # ranked attributes per class

- models: :class:`Export`, :func:`load_export`, :func:`save_export`, :func:`find_export`, and
  the networks :class:`Generator`, :class:`Encoder`, :class:`Classifier`;
- StyleSpace: :class:`StyleSpace` (flat style coordinates: render, edit, index, trace);
- explanations: :class:`AttFind`, :class:`AttFindConfig`, :class:`AttFindResult`,
  :class:`Attribute`; the whole ``stylex-explain`` pipeline as :func:`explain_run` with an
  :class:`ExplainRequest`; image files as tensors with :func:`load_images`;
- dissection: :func:`dissect` (which unit draws which concept) with a segmenter
  (:func:`synthetic_segmenter`, :func:`load_segmenter`, :class:`ClassEvidence`), giving a
  :class:`Dissection`; a whole run's dissection and report with :func:`dissect_export`;
- training: :func:`compose_config` (the config ``stylex-train`` would run) and :func:`train`.

Each name is imported on first use (PEP 562), so ``import stylex`` loads neither torch nor
Lightning; ``from stylex import AttFind`` loads what AttFind needs.
"""

__version__ = "0.1.0"

# public name -> (module, attribute)
_WHERE = {
    "Export": ("stylex.export", "Export"),
    "load_export": ("stylex.export", "load_export"),
    "save_export": ("stylex.export", "save_export"),
    "find_export": ("stylex.export", "find_export"),
    "Generator": ("stylex.networks", "Generator"),
    "Encoder": ("stylex.networks", "Encoder"),
    "Classifier": ("stylex.classifier", "Classifier"),
    "StyleSpace": ("stylex.stylespace", "StyleSpace"),
    "AttFind": ("stylex.explain.attfind", "AttFind"),
    "AttFindConfig": ("stylex.explain.config", "AttFindConfig"),
    "AttFindResult": ("stylex.explain.result", "AttFindResult"),
    "Attribute": ("stylex.explain.result", "Attribute"),
    "ExplainRequest": ("stylex.explain.request", "ExplainRequest"),
    "explain_run": ("stylex.explain.pipeline", "explain_run"),
    "load_images": ("stylex.explain.inputs", "load_image_files"),
    "dissect": ("stylex.dissect.dissection", "dissect"),
    "Dissection": ("stylex.dissect.dissection", "Dissection"),
    "dissect_export": ("stylex.dissect.pipeline", "dissect_export"),
    "synthetic_segmenter": ("stylex.dissect.segmenter", "synthetic_segmenter"),
    "load_segmenter": ("stylex.dissect.segmenter", "load_segmenter"),
    "ClassEvidence": ("stylex.dissect.gradcam", "ClassEvidence"),
    "compose_config": ("stylex.cli", "compose_config"),
    "train": ("stylex.training.run", "train"),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'stylex' has no attribute {name!r}")
    import importlib

    module, attribute = _WHERE[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
