"""The classifier: freezing, preprocessing, saving/loading, errors, its training stage and the
stage policy (checkpoint, this run's earlier stage, or train now)."""

from __future__ import annotations

import json
import re
import time

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

import stylex.classifier.model as model_mod
import stylex.classifier.stage as stage_mod
from stylex.classifier import (
    Classifier,
    ClassifierConfig,
    ClassifierModule,
    ClassifierTraining,
    build_classifier,
    add_pixel_noise,
    jitter_colour,
    flip_and_shift,
    inverse_frequency_weights,
    prepare_classifier,
    train_classifier,
)
from stylex.errors import ConfigError

from helpers import CONFIGS

# timm's tiny test network: BatchNorm, ImageNet mean/std (not 0.5, so normalisation is visible).
TINY = "test_efficientnet"

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
    "ignore:.*smaller than the logging interval.*",
    "ignore:.*no `val_dataloader`.*",
)


def tiny(num_classes: int = 3, **kwargs) -> Classifier:
    torch.manual_seed(0)
    return Classifier(TINY, num_classes, **kwargs)


def images(n: int = 4, size: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------------------------- freezing
def test_frozen_classifier_passes_gradients_to_its_input_but_never_changes():
    clf = tiny()
    parent = nn.ModuleDict({"clf": clf, "other": nn.Linear(2, 2)})
    assert clf.freeze() is clf and clf.frozen
    before = snapshot(clf)
    parent.train()  # what Lightning does to the module that holds the frozen classifier
    assert not clf.training and all(not bn.training for bn in batchnorms(clf))
    assert parent["other"].training  # only the classifier refuses training mode

    x = (images() * 3).requires_grad_(True)  # far from the BN statistics: a moving update would show
    for _ in range(3):
        clf(x).logsumexp(dim=1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clf.parameters())
    after = clf.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen classifier's weights or BN stats moved"


def test_unfrozen_classifier_in_training_mode_does_update_batchnorm_statistics():
    # Control for the test above: the same forward passes do move BN statistics when not frozen.
    clf = tiny()
    before = snapshot(clf)
    nn.Sequential(clf).train()
    clf(images() * 3)
    changed = [k for k in before if "running_mean" in k and not torch.equal(before[k], clf.state_dict()[k])]
    assert changed


# -------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("in_size, net_size", [(40, 24), (16, 24), (24, None)])
def test_forward_is_the_timm_model_on_resized_normalised_images(in_size, net_size):
    clf = tiny(input_size=net_size).eval()
    x = images(size=in_size)
    mean = torch.tensor(timm.get_pretrained_cfg(TINY).mean)
    std = torch.tensor(timm.get_pretrained_cfg(TINY).std)
    assert not torch.allclose(mean, torch.full((3,), 0.5))
    by_hand = (x + 1) / 2
    if net_size is not None:
        by_hand = TF.resize(by_hand, [net_size, net_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    by_hand = TF.normalize(by_hand, mean.tolist(), std.tolist())
    with torch.no_grad():
        expected = clf.model(by_hand)
        logits = clf(x)
        assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-4)
        assert torch.allclose(clf.probs(x), F.softmax(expected, dim=1), atol=1e-6)


def test_forward_rejects_inputs_that_are_not_rgb_batches():
    clf = tiny()
    with pytest.raises(AssertionError, match=r"\[batch, 3, height, width\]"):
        clf(torch.zeros(3, 16, 16))
    with pytest.raises(AssertionError, match="got shape \\(2, 1, 16, 16\\)"):
        clf(torch.zeros(2, 1, 16, 16))


# ----------------------------------------------------------------------------- saving / loading
def test_save_load_round_trip_gives_identical_logits(tmp_path):
    clf = tiny(num_classes=4, input_size=20, drop_rate=0.1).eval()
    path = tmp_path / "sub" / "classifier.safetensors"
    clf.save(path)
    assert json.loads(path.with_suffix(".json").read_text()) == clf.config
    assert not list(path.parent.glob("*.tmp")), "temporary files left behind"

    x = images(size=32)
    loaded = Classifier.load(path).eval()
    expected = {"arch": TINY, "num_classes": 4, "input_size": 20, "in_chans": 3, "timm_kwargs": {"drop_rate": 0.1}}
    assert loaded.config == clf.config == expected
    with torch.no_grad():
        assert torch.equal(loaded(x), clf(x))

    path.with_suffix(".json").unlink()  # the weights file records the config too
    with torch.no_grad():
        assert torch.equal(Classifier.load(path).eval()(x), clf(x))


def test_loads_bare_timm_state_dict_given_the_architecture(tmp_path):
    clf = tiny(num_classes=2).eval()
    path = tmp_path / "weights.pth"
    torch.save(clf.model.state_dict(), path)
    with pytest.raises(ValueError, match="pass it, e.g. Classifier.load"):
        Classifier.load(path)
    loaded = Classifier.load(path, arch=TINY, num_classes=2).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), clf(x))


def test_loads_a_lightning_checkpoint_of_classifier_module(tmp_path):
    torch.manual_seed(0)
    module = ClassifierModule(Classifier(TINY, 3), lr=1e-3)
    data = [{"image": images(8, 16, seed=s), "label": torch.randint(0, 3, (8,))} for s in range(2)]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    path = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(path)
    assert all(k.startswith("classifier.") for k in torch.load(path, weights_only=True)["state_dict"])

    loaded = Classifier.load(path).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), module.classifier.eval()(x))
    again = ClassifierModule.load_from_checkpoint(path)  # Lightning's own route works too
    assert again.classifier.config == module.classifier.config


def test_mismatching_architecture_is_reported_with_keys_and_expected_arch(tmp_path):
    path = tmp_path / "classifier.safetensors"
    tiny(num_classes=3).save(path)
    with pytest.raises(ValueError, match=r"'test_byobnet'.*missing keys.*unexpected keys"):
        Classifier.load(path, arch="test_byobnet")
    with pytest.raises(ValueError, match=r"shape mismatches \(classifier.weight: file \[3, \d+\] vs model \[5, \d+\]"):
        Classifier.load(path, num_classes=5)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Classifier.load(missing)
    with pytest.raises(FileNotFoundError, match="classifier.checkpoint"):
        build_classifier({"arch": TINY, "checkpoint": str(tmp_path / "nope.ckpt")}, num_classes=2)


# --------------------------------------------------------------------------------------- errors
def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown classifier architecture 'resnt18'.*resnet18") as info:
        Classifier("resnt18", 2)
    assert "classifier.arch" in str(info.value)


def test_offline_pretrained_download_explains_the_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        raise AssertionError("only the pretrained call should reach timm here")

    monkeypatch.setattr(model_mod.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"could not be fetched.*classifier.checkpoint=<file>.*classifier.pretrained=false"):
        Classifier(TINY, 2, pretrained=True)

    def bad_kwarg(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'foo'")

    monkeypatch.setattr(model_mod.timm, "create_model", bad_kwarg)
    with pytest.raises(TypeError, match="foo"):  # not a download problem: not disguised as one
        Classifier(TINY, 2, pretrained=True, foo=1)


# --------------------------------------------------------------------------------- from config
def test_build_classifier_from_checkpoint_checks_the_class_count(tmp_path):
    clf = tiny(num_classes=3).eval()
    path = tmp_path / "classifier.safetensors"
    clf.save(path)
    built = build_classifier({"arch": TINY, "pretrained": False, "input_size": None, "checkpoint": str(path)}, 3)
    x = images()
    with torch.no_grad():
        assert torch.equal(built.eval()(x), clf(x))
    with pytest.raises(ValueError, match=r"trained for 3 classes, but the data has 5.*classifier.checkpoint"):
        build_classifier({"arch": TINY, "checkpoint": str(path)}, 5)

    bare = tmp_path / "bare.pt"  # records no config: the class count is read off the head
    torch.save(clf.model.state_dict(), bare)
    with pytest.raises(ValueError, match=r"trained for 3 classes, but the data has 2"):
        build_classifier({"arch": TINY, "checkpoint": str(bare)}, 2)


def test_build_classifier_without_checkpoint_follows_the_config():
    built = build_classifier({"arch": TINY, "input_size": 12, "checkpoint": None, "timm_kwargs": {"drop_rate": 0.2}}, 4)
    assert built.config == {"arch": TINY, "num_classes": 4, "input_size": 12, "in_chans": 3, "timm_kwargs": {"drop_rate": 0.2}}
    assert not built.frozen


# ----------------------------------------------------------------------------- training pieces
def test_inverse_frequency_weights_equalise_class_totals():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = inverse_frequency_weights(labels, 3)
    counts = torch.bincount(labels, minlength=3).float()
    totals = w * counts
    assert torch.allclose(totals, totals[0].expand(3))  # every class weighs the same in total
    assert torch.isclose(w[labels].mean(), torch.tensor(1.0))  # average sample weight is one
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        inverse_frequency_weights(torch.tensor([0, 3]), 3)


def test_flip_and_shift_mirrors_and_translates_within_bounds():
    torch.manual_seed(0)
    n, size, s = 64, 12, 2
    x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size).repeat(n, 2, 1, 1)
    out = flip_and_shift(x, s)
    assert out.shape == x.shape
    seen = set()
    inner = slice(s, size - s)  # pixels that stay inside the image for every allowed shift
    for i in range(n):
        matches = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(-s, s + 1)
            for dx in range(-s, s + 1)
            if torch.equal(
                out[i, :, inner, inner],
                torch.roll(x[i].flip(-1) if flip else x[i], (-dy, -dx), dims=(1, 2))[:, inner, inner],
            )
        ]
        assert len(matches) == 1, f"sample {i} is not a mirrored/shifted copy of its input"
        seen.add(matches[0])
    assert {f for f, _, _ in seen} == {False, True}
    assert len({(dy, dx) for _, dy, dx in seen}) > 5


def test_pixel_noise_has_a_per_image_std_uniform_up_to_the_maximum():
    torch.manual_seed(0)
    x = torch.rand(400, 3, 32, 32)
    assert torch.equal(add_pixel_noise(x, 0.0), x)
    stds = (add_pixel_noise(x, 0.3) - x).flatten(1).std(dim=1)
    assert float(stds.max()) <= 0.3 * 1.05 and float(stds.min()) < 0.03  # spans [0, 0.3]
    assert float(stds.mean()) == pytest.approx(0.15, abs=0.02)  # the mean of U[0, 0.3]
    assert float(stds.std()) == pytest.approx(0.3 / 12 ** 0.5, abs=0.015)  # and its spread
    with pytest.raises(ConfigError, match="classifier.train.noise_std must be >= 0"):
        ClassifierTraining(noise_std=-0.1)


def test_colour_jitter_is_a_per_image_brightness_contrast_and_tint_change_within_its_strength():
    torch.manual_seed(0)
    x = torch.rand(500, 3, 8, 8) * 2 - 1
    assert torch.equal(jitter_colour(x, 0.0), x)
    s = 0.3
    y = jitter_colour(x, s)
    # Each image is (x - mean) * k + mean + shift_c: recover k and the per-channel shift by least
    # squares from the definition, and check that they explain the image exactly and lie in range.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    centred = (x - mean).flatten(2)  # [B, C, P]
    target = (y - mean).flatten(2)
    dev_x = centred - centred.mean(2, keepdim=True)
    dev_y = target - target.mean(2, keepdim=True)
    k = (dev_x * dev_y).sum(dim=(1, 2)) / dev_x.pow(2).sum(dim=(1, 2))
    shift = (target - k[:, None, None] * centred).mean(2)  # [B, C]
    rebuilt = k[:, None, None] * centred + shift[..., None]
    torch.testing.assert_close(rebuilt, target, atol=1e-4, rtol=0)
    assert float(k.log().abs().max()) <= s + 1e-4 and float(k.log().abs().max()) > 0.9 * s
    assert float(shift.abs().max()) <= 1.5 * s + 1e-4
    common = shift.mean(1)  # brightness plus the mean tint: spread over [-1.5 s, 1.5 s], not constant
    assert float(common.std()) > 0.5 * s / 3 ** 0.5
    tint = shift - common[:, None]
    assert float(tint.abs().max()) > 0.2 * s, "the channels must be shifted apart"
    with pytest.raises(ConfigError, match="classifier.train.color_jitter must be >= 0"):
        ClassifierTraining(color_jitter=-0.1)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step outside a Trainer logs nothing
@pytest.mark.parametrize("option, strength", [("noise_std", 0.5), ("color_jitter", 0.4)])
def test_the_classifier_trains_on_augmented_images_when_asked(option, strength):
    x = torch.zeros(8, 3, 16, 16)
    labels = torch.zeros(8, dtype=torch.long)
    for value, changed in ((0.0, False), (strength, True)):
        module = ClassifierModule(Classifier("test_resnet", 2), augment=False, **{option: value})
        assert module.hparams[option] == value
        seen = []
        module.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        module.training_step({"image": x, "label": labels}, 0)
        assert bool(seen[-1].abs().sum() > 0) is changed


# ----------------------------------------------------------------------------- training stage
class _Planted(Dataset):
    """Class 1 when the image's top half is brighter than its bottom half; mirror-invariant, so
    the default augmentation keeps the labels right."""

    def __init__(self, n: int, seed: int, size: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.labels = (torch.rand(n, generator=g) < 0.3).long()  # imbalanced on purpose
        x = torch.rand(n, 3, size, size, generator=g) * 1.2 - 0.6
        sign = torch.where(self.labels == 1, 1.0, -1.0)[:, None, None, None]
        margin = 0.15 + 0.25 * torch.rand(n, 1, 1, 1, generator=g)
        x[:, :, : size // 2] += sign * margin
        x[:, :, size // 2 :] -= sign * margin
        self.images = x.clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class _PlantedDataModule(pl.LightningDataModule):
    num_classes = 2
    class_names = ["bottom brighter", "top brighter"]

    def __init__(self, num_train: int = 384, num_val: int = 128):
        super().__init__()
        self.train_set, self.val_set = _Planted(num_train, seed=0), _Planted(num_val, seed=1)
        self.batch_size = 32  # the GAN's batch size; the classifier stage may set its own
        self.train_batch_sizes: list[int] = []  # batch size in force at each train_dataloader()

    def train_labels(self) -> torch.Tensor:
        return self.train_set.labels

    def train_dataloader(self) -> DataLoader:
        self.train_batch_sizes.append(self.batch_size)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


def test_train_classifier_learns_a_planted_rule_and_saves_a_frozen_classifier(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = _PlantedDataModule()
    clf = Classifier("test_resnet", 2)
    # GAN-run options in trainer_kwargs (max_steps, ...) must not cut the classifier stage short.
    trainer_kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "max_steps": 3,
        "val_check_interval": 2,
        "limit_val_batches": 1,
    }
    start = time.perf_counter()
    trained, metrics = train_classifier(
        clf,
        dm,
        tmp_path,
        trainer_kwargs,
        max_epochs=4,
        lr=3e-3,
        weight_decay=0.05,
        balanced_loss=True,
        augment=True,
    )
    assert time.perf_counter() - start < 60
    assert trained is clf and trained.frozen and not trained.training
    assert metrics["epochs"] == 4
    assert metrics["val_acc"] > 0.9 and metrics["val_balanced_acc"] > 0.9, metrics

    # The reported accuracy is the accuracy of the returned classifier on the whole val split.
    with torch.no_grad():
        pred = trained(dm.val_set.images).argmax(dim=1)
    assert abs((pred == dm.val_set.labels).float().mean().item() - metrics["val_acc"]) < 1e-6

    assert json.loads((tmp_path / "classifier_metrics.json").read_text()) == metrics
    saved = Classifier.load(tmp_path / "classifier.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(saved(dm.val_set.images[:8]), trained(dm.val_set.images[:8]))


# ------------------------------------------------------------------------------- stage policy
_STAGE_TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "max_steps": 3}


def test_prepare_classifier_uses_the_configured_checkpoint(tmp_path):
    ckpt = tmp_path / "given.safetensors"
    given = tiny(num_classes=2).eval()
    given.save(ckpt)
    out_dir = tmp_path / "classifier"
    torch.manual_seed(1)  # another classifier saved by an earlier stage: the checkpoint wins over it
    Classifier(TINY, 2).save(out_dir / "classifier.safetensors")
    dm = _PlantedDataModule(num_train=64, num_val=32)

    clf, metrics = prepare_classifier({"arch": TINY, "checkpoint": str(ckpt)}, dm, out_dir, _STAGE_TRAINER, [])
    assert metrics == {"source": str(ckpt)}
    assert clf.frozen and not clf.training
    x = images()
    with torch.no_grad():
        assert torch.equal(clf(x), given(x))
    assert dm.batch_size == 32 and dm.train_batch_sizes == []


def test_prepare_classifier_trains_once_then_reuses_the_saved_classifier(tmp_path, monkeypatch):
    pl.seed_everything(0, verbose=False)
    dm = _PlantedDataModule(num_train=256, num_val=64)
    out_dir = tmp_path / "classifier"
    config = {"arch": "test_resnet", "train": {"max_epochs": 1, "lr": 3e-3, "balanced_loss": True, "batch_size": 64}}

    clf, metrics = prepare_classifier(config, dm, out_dir, _STAGE_TRAINER, [])
    saved = out_dir / "classifier.safetensors"
    written = json.loads((out_dir / "classifier_metrics.json").read_text())
    assert set(written) == {"val_acc", "val_balanced_acc", "epochs", "seconds"} and written["epochs"] == 1
    assert metrics == {"source": str(saved), **written}
    assert clf.frozen and not clf.training
    assert dm.train_batch_sizes == [64], "the stage did not train with classifier.train.batch_size"
    assert dm.batch_size == 32, "the data module's batch size was not restored"

    def no_training(*args, **kwargs):
        raise AssertionError("the classifier was trained again although this run saved one")

    monkeypatch.setattr(stage_mod, "train_classifier", no_training)
    again, metrics_again = prepare_classifier(config, dm, out_dir, _STAGE_TRAINER, [])
    assert metrics_again == metrics
    assert again.frozen and not again.training
    x = dm.val_set.images[:8]
    with torch.no_grad():
        assert torch.equal(again(x), clf(x))
    assert dm.train_batch_sizes == [64] and dm.batch_size == 32


def test_prepare_classifier_hands_the_stage_its_options_and_restores_the_batch_size(tmp_path, monkeypatch):
    seen = {}

    def fake_train(classifier, datamodule, out_dir, trainer_kwargs, **options):
        seen.update(options, trainer_kwargs=trainer_kwargs, batch_size=datamodule.batch_size, out_dir=out_dir)
        raise RuntimeError("stop here")

    monkeypatch.setattr(stage_mod, "train_classifier", fake_train)
    dm = _PlantedDataModule(num_train=64, num_val=32)
    main_run = {"accelerator": "cpu", "strategy": "ddp_find_unused_parameters_true", "max_steps": 100}
    config = ClassifierConfig(arch=TINY, train=ClassifierTraining(max_epochs=2, batch_size=16, color_jitter=0.25,
                                                                  noise_std=0.1))
    with pytest.raises(RuntimeError, match="stop here"):
        prepare_classifier(config, dm, tmp_path, main_run, [])
    assert seen["color_jitter"] == 0.25 and seen["noise_std"] == 0.1
    assert dm.batch_size == 32, "the data module's batch size was not restored after a failure"
    assert seen["batch_size"] == 16 and seen["out_dir"] == tmp_path
    # Every classifier parameter gets a gradient, so DDP need not look for unused ones.
    assert seen["trainer_kwargs"]["strategy"] == "ddp"
    assert main_run["strategy"] == "ddp_find_unused_parameters_true", "the caller's options were modified"
    defaults = ClassifierTraining()
    assert {k: seen[k] for k in ("max_epochs", "lr", "weight_decay", "balanced_loss", "augment")} == {
        "max_epochs": 2,
        "lr": defaults.lr,
        "weight_decay": defaults.weight_decay,
        "balanced_loss": defaults.balanced_loss,
        "augment": defaults.augment,
    }
    assert seen["logger"] is None  # no loggers: the stage logs nothing


def test_classifier_training_rejects_zero_epochs():
    with pytest.raises(ConfigError, match=re.escape("classifier.train.max_epochs must be >= 1, got 0")):
        ClassifierTraining(max_epochs=0)


@pytest.mark.parametrize(
    "train, message",
    [
        ({"max_epochs": 0}, "classifier.train.max_epochs must be >= 1, got 0"),
        ({"lr": 0}, "classifier.train.lr must be > 0"),
        ({"weight_decay": -0.1}, "classifier.train.weight_decay must be >= 0"),
        ({"batch_size": 0}, "classifier.train.batch_size must be >= 1, got 0"),
        ({"balanced_loss": "false"}, "classifier.train.balanced_loss must be true or false"),
        ({"max_epoch": 3}, "classifier.train.max_epoch is not an option"),
    ],
)
def test_classifier_config_names_the_bad_option(tmp_path, train, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ClassifierConfig.from_mapping({"arch": TINY, "train": train})
    with pytest.raises(ConfigError, match=re.escape(message)):  # the stage checks a mapping the same way
        prepare_classifier({"arch": TINY, "train": train}, _PlantedDataModule(8, 8), tmp_path, _STAGE_TRAINER, [])


def test_prepare_classifier_reports_an_unknown_arch_as_a_config_error(tmp_path):
    dm = _PlantedDataModule(num_train=8, num_val=8)
    with pytest.raises(ConfigError, match=r"^classifier: unknown classifier architecture 'resnt18'.*resnet18"):
        prepare_classifier({"arch": "resnt18"}, dm, tmp_path, _STAGE_TRAINER, [])
    with pytest.raises(ConfigError, match=r"^classifier: .*classifier.checkpoint"):
        prepare_classifier({"arch": TINY, "checkpoint": str(tmp_path / "nope.pt")}, dm, tmp_path, _STAGE_TRAINER, [])
    assert dm.batch_size == 32


def test_classifier_presets_hold_only_valid_options():
    presets = sorted((CONFIGS / "classifier").glob("*.yaml"))
    assert presets
    for preset in presets:
        options = OmegaConf.to_container(OmegaConf.load(preset))
        options.pop("defaults", None)  # Hydra's composition list (the schema), not an option
        ClassifierConfig.from_mapping(options)
