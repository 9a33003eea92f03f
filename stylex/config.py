"""The Hydra schemas of the training config: where the defaults of ``configs/`` come from.

Every option's default lives once, in Python: the loss options in
:class:`~stylex.training.loss.LossConfig`, the classifier section in
:class:`~stylex.classifier.ClassifierConfig`, and each callback's options in its constructor's
signature (hydra-zen turns a signature into a structured config, ``_target_`` included). They
are stored in Hydra's ConfigStore under ``schema/``; the YAML files of ``configs/`` start from
them (``defaults: [/schema/...]``) and state only what a preset changes. So a Python user of
``ExplainCallback()`` and a command-line user of ``callbacks.explain.top_k`` get the same
default, Hydra checks the types of every override, and ``python train.py --cfg job`` prints
every value.

:func:`register` must run before a config is composed; importing :mod:`stylex.training.run`
or ``train.py`` does it.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from hydra_zen import builds

_registered = False


def callback_targets() -> dict[str, type]:
    """Schema name -> callback class, in the order ``configs/callbacks/default.yaml`` uses."""
    from pytorch_lightning.callbacks import TQDMProgressBar

    from stylex.explain.callback import ExplainCallback
    from stylex.training.callbacks import (
        EncoderFit,
        Exporter,
        FinalCheckpoint,
        SampleGrid,
        StepCheckpoint,
        Summary,
        Throughput,
    )
    from stylex.training.quality import GeneratorQuality

    return {
        "progress_bar": TQDMProgressBar,
        "checkpoint": StepCheckpoint,
        "encoder_fit": EncoderFit,
        "samples": SampleGrid,
        "export": Exporter,
        "throughput": Throughput,
        "quality": GeneratorQuality,
        "summary": Summary,
        "final_checkpoint": FinalCheckpoint,
        "explain": ExplainCallback,
    }


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (once per process)."""
    global _registered
    if _registered:
        return
    from stylex.classifier import ClassifierConfig
    from stylex.training.loss import LossConfig

    store = ConfigStore.instance()
    store.store(group="schema", name="loss", node=LossConfig)
    store.store(group="schema", name="classifier", node=ClassifierConfig)
    for name, target in callback_targets().items():
        store.store(group="schema/callbacks", name=name, node=builds(target, populate_full_signature=True))
    _registered = True
