"""Temperature calibration and label smoothing: softer classifier outputs, same predictions."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from stylex.classifier import Classifier, prepare_classifier
from stylex.classifier.calibration import collect_logits, expected_calibration_error, fit_temperature
from stylex.classifier.training import ClassifierModule
from test_classifier import _STAGE_TRAINER, _PlantedDataModule


def test_fitted_temperature_recovers_the_one_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(20000, 3, generator=g)
    true_t = 2.5
    labels = torch.multinomial((logits / true_t).softmax(dim=1), 1, generator=g).flatten()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    # it is the minimum of the NLL: a little more or less is worse
    nll = lambda temp: float(F.cross_entropy(logits / temp, labels))  # noqa: E731
    assert nll(t) <= min(nll(t * 1.1), nll(t / 1.1))
    # calibrating lowers the calibration error of over-confident logits
    ece_raw = expected_calibration_error(logits.softmax(dim=1), labels)
    ece_cal = expected_calibration_error((logits / t).softmax(dim=1), labels)
    assert ece_cal < 0.5 * ece_raw


def test_temperature_divides_the_logits_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    clf = Classifier("test_resnet", 2).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = clf(x)
        clf.temperature = 3.0
        soft = clf(x)
    torch.testing.assert_close(soft, raw / 3.0)
    assert torch.equal(soft.argmax(1), raw.argmax(1))
    clf.save(tmp_path / "c.safetensors")
    again = Classifier.load(tmp_path / "c.safetensors").eval()
    assert again.temperature == 3.0
    with torch.no_grad():
        torch.testing.assert_close(again(x), soft)
    logits, _ = collect_logits(again, [{"image": x, "label": torch.zeros(4)}])
    torch.testing.assert_close(logits, raw)  # collected at temperature 1, whatever is set
    assert again.temperature == 3.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Classifier("test_resnet", 2, temperature=0)


def test_label_smoothing_is_the_cross_entropy_against_softened_labels():
    module = ClassifierModule(Classifier("test_resnet", 3), label_smoothing=0.2)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    target = torch.full((5, 3), 0.2 / 3)
    target[torch.arange(5), labels] += 0.8
    expected = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(module._loss(logits, labels), expected)


def test_calibrated_stage_saves_the_temperature_and_a_resumed_run_keeps_it(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = _PlantedDataModule(num_train=256, num_val=64)
    out_dir = tmp_path / "classifier"
    config = {"arch": "test_resnet", "calibrate": True,
              "train": {"max_epochs": 2, "lr": 3e-3, "label_smoothing": 0.1}}
    clf, metrics = prepare_classifier(config, dm, out_dir, _STAGE_TRAINER, [])
    assert clf.temperature == pytest.approx(metrics["temperature"]) and clf.temperature != 1.0
    assert metrics["nll_after"] <= metrics["nll_before"] + 1e-9
    # the figures are the NLL of the validation labels at those temperatures
    logits, labels = collect_logits(clf, dm.val_dataloader())
    assert metrics["nll_after"] == pytest.approx(float(F.cross_entropy(logits / clf.temperature, labels)), rel=1e-5)
    saved = json.loads((out_dir / "classifier_metrics.json").read_text())
    assert saved["temperature"] == pytest.approx(clf.temperature)
    again, metrics_again = prepare_classifier(config, dm, out_dir, _STAGE_TRAINER, [])
    assert again.temperature == pytest.approx(clf.temperature)
    assert metrics_again["temperature"] == pytest.approx(clf.temperature)
    assert math.isfinite(metrics["ece_after"])


def test_bad_label_smoothing_is_refused():
    from stylex.classifier import ClassifierTraining
    from stylex.errors import ConfigError

    with pytest.raises(ConfigError, match=r"classifier.train.label_smoothing must lie in \[0, 1\)"):
        ClassifierTraining(label_smoothing=1.0)
