"""Concept segmenters: the synthetic U-Net (training, cache), user files, IoU and class evidence."""

from __future__ import annotations

import dataclasses
import json
import math
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stylex.data.synthetic import SEGMENT_NAMES
from stylex.dissect import segmenter as seg
from stylex.dissect.base import Segmenter
from stylex.dissect.gradcam import ClassEvidence, evidence_masks, grad_cam
from stylex.dissect.segmenter import (
    CACHE_ENV,
    NetworkSegmenter,
    SegmenterTrainConfig,
    cache_dir,
    cached_segmenter_path,
    check_normalisation,
    load_segmenter,
    normalise,
    save_segmenter,
    segmenter_iou,
    synthetic_scenes,
    synthetic_segmenter,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # the tests script their own models

RES = 16
# A few optimiser steps: enough to exercise training and the cache, not to segment well.
TINY = SegmenterTrainConfig(num_train=16, num_val=8, epochs=1, batch_size=16)
# About 50 steps on 16x16 scenes: a few seconds, and well above a trivial segmenter.
SMALL = SegmenterTrainConfig(num_train=192, num_val=96, epochs=4, batch_size=16, lr=5e-3)


def _refuse_network(mp: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the segmenter tried to reach the network")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The SMALL synthetic segmenter, trained with every socket refused."""
    with pytest.MonkeyPatch.context() as mp:
        _refuse_network(mp)
        folder = tmp_path_factory.mktemp("segmenters")
        return synthetic_segmenter(RES, config=SMALL, folder=folder, progress=False)


@pytest.fixture(scope="module")
def scenes():
    return synthetic_scenes(24, RES, split="test")


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = seg.train_synthetic_segmenter

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "train_synthetic_segmenter", counting)
    return calls


class ConstantSegmenter:
    """Labels every pixel with one concept (a trivial baseline)."""

    def __init__(self, index: int) -> None:
        self.concepts = list(SEGMENT_NAMES)
        self.resolution = RES
        self.source = f"everything is {SEGMENT_NAMES[index]}"
        self.index = index

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        masks = torch.zeros(images.shape[0], len(self.concepts), *images.shape[-2:], dtype=torch.bool)
        masks[:, self.index] = True
        return masks


# ============================================================================ synthetic segmenter
def test_training_lowers_the_loss_and_beats_a_trivial_segmenter(trained, scenes):
    images, masks = scenes
    assert isinstance(trained, Segmenter)
    assert trained.concepts == SEGMENT_NAMES and trained.resolution == RES
    assert len(trained.loss_history) == SMALL.epochs
    assert trained.loss_history[-1] < 0.7 * trained.loss_history[0]
    assert list(trained.iou) == SEGMENT_NAMES
    assert f"mean IoU {trained.mean_iou:.2f}" in trained.source
    iou = segmenter_iou(trained, images, masks)
    trivial = max(math.fsum(v for v in segmenter_iou(ConstantSegmenter(i), images, masks).values()
                            if not math.isnan(v)) / len(SEGMENT_NAMES) for i in range(len(SEGMENT_NAMES)))
    mean = sum(iou.values()) / len(iou)
    assert mean > trivial + 0.2, (iou, trivial)
    assert iou["background"] > 0.8 and iou["fundus"] > 0.6


def test_masks_are_one_hot_booleans(trained, scenes):
    images, _ = scenes
    masks = trained(images[:5])
    assert masks.dtype == torch.bool and masks.shape == (5, len(SEGMENT_NAMES), RES, RES)
    assert torch.equal(masks.sum(1), torch.ones(5, RES, RES, dtype=torch.long))
    assert torch.equal(masks.float().argmax(1), trained.logits(images[:5]).argmax(1))


def test_images_of_another_size_are_refused_unless_resize(trained, scenes):
    images, _ = scenes
    big = F.interpolate(images[:2], scale_factor=2, mode="nearest")
    with pytest.raises(ValueError, match=r"reads 16x16 images, got 32x32.*resize=True"):
        trained(big)
    with pytest.raises(ValueError, match="float images"):
        trained(((images[:2] + 1) * 127.5).to(torch.uint8))
    resizing = NetworkSegmenter(trained.network, trained.concepts, RES, "resizing", resize=True)
    masks = resizing(big)
    assert masks.shape == (2, len(SEGMENT_NAMES), 2 * RES, 2 * RES)
    # Nearest-upsampled images go back to the same 16x16 input, so the masks are the original's, upsampled.
    same = F.interpolate(trained(images[:2]).float(), scale_factor=2, mode="nearest").bool()
    assert (masks == same).float().mean() > 0.9


def test_training_settings_are_checked():
    with pytest.raises(ValueError, match="one entry per encoder stage"):
        SegmenterTrainConfig(encoder_depth=4, decoder_channels=(64, 32, 16))
    with pytest.raises(ValueError, match="num_train must be >= 1"):
        SegmenterTrainConfig(num_train=0)
    with pytest.raises(ValueError, match="divisible by 8"):
        seg.train_synthetic_segmenter(12, config=TINY, progress=False)


# ============================================================================ the cache
def test_second_call_loads_the_cached_segmenter(tmp_path, count_trainings, scenes):
    first = synthetic_segmenter(RES, config=TINY, folder=tmp_path, progress=False)
    path = cached_segmenter_path(RES, config=TINY, folder=tmp_path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    stamps = (path.stat().st_mtime_ns, path.with_suffix(".json").stat().st_mtime_ns)
    second = synthetic_segmenter(RES, config=TINY, folder=tmp_path, progress=False)
    assert len(count_trainings) == 1
    assert (path.stat().st_mtime_ns, path.with_suffix(".json").stat().st_mtime_ns) == stamps
    assert type(second) is type(first) and second.iou == first.iou and second.config == TINY
    assert second.loss_history == first.loss_history and second.source == first.source
    images, _ = scenes
    assert torch.equal(second(images), first(images))


def test_changed_key_trains_anew(tmp_path, count_trainings, monkeypatch):
    synthetic_segmenter(RES, config=TINY, folder=tmp_path, progress=False)
    synthetic_segmenter(RES, config=dataclasses.replace(TINY, epochs=2), folder=tmp_path,
                        progress=False)
    synthetic_segmenter(RES, lesion_scale=1.0, config=TINY, folder=tmp_path, progress=False)
    synthetic_segmenter(8, config=TINY, folder=tmp_path, progress=False)
    assert len(count_trainings) == 4
    with monkeypatch.context() as mp:
        mp.setattr(seg, "renderer_digest", lambda: "another renderer")
        synthetic_segmenter(RES, config=TINY, folder=tmp_path, progress=False)
    assert len(count_trainings) == 5
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    synthetic_segmenter(RES, config=TINY, folder=tmp_path, progress=False)  # the first key again: cached
    synthetic_segmenter(RES, lesion_scale=1.0, config=TINY, folder=tmp_path, progress=False)
    assert len(count_trainings) == 5


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch, count_trainings):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path / "segmenters"
    synthetic_segmenter(RES, config=TINY, progress=False)
    assert cached_segmenter_path(RES, config=TINY).parent == tmp_path / "segmenters"
    assert cached_segmenter_path(RES, config=TINY).is_file()
    synthetic_segmenter(RES, config=TINY, progress=False)
    assert len(count_trainings) == 1


def test_damaged_cache_is_replaced(tmp_path, count_trainings, caplog):
    synthetic_segmenter(RES, config=TINY, folder=tmp_path, progress=False)
    path = cached_segmenter_path(RES, config=TINY, folder=tmp_path)
    path.write_bytes(b"not safetensors")
    again = synthetic_segmenter(RES, config=TINY, folder=tmp_path, progress=False)
    assert len(count_trainings) == 2 and "training a new one" in caplog.text
    assert load_segmenter(path).concepts == again.concepts  # the damaged file was rewritten


# ============================================================================ IoU
def test_segmenter_iou_counts_sets_exactly():
    g = torch.Generator().manual_seed(3)
    n, c, r = 4, 3, 5
    labels = torch.randint(0, c - 1, (n, r, r), generator=g)  # concept 2 never appears in the truth
    predicted = torch.randint(0, c, (n, r, r), generator=g)
    predicted[predicted == 1] = 0  # nor concept 1 in the predictions, half the time
    predicted[0, 0, 0] = 1

    class Fixed:
        concepts = ["a", "b", "c"]
        resolution = r
        source = "fixed"

        def __call__(self, images):
            idx = images[:, 0, 0, 0].long()
            return F.one_hot(predicted[idx], c).permute(0, 3, 1, 2).bool()

    images = torch.arange(n).float()[:, None, None, None].expand(n, 3, r, r)
    expected = {}
    for k, name in enumerate(Fixed.concepts):
        pred = {(i, y, x) for i in range(n) for y in range(r) for x in range(r) if predicted[i, y, x] == k}
        true = {(i, y, x) for i in range(n) for y in range(r) for x in range(r) if labels[i, y, x] == k}
        expected[name] = len(pred & true) / len(pred | true) if pred | true else math.nan
    for batch in (1, 3, 256):
        got = segmenter_iou(Fixed(), images, labels, batch_size=batch)
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k] == pytest.approx(expected[k]), (k, batch)
    onehot = F.one_hot(labels, c).permute(0, 3, 1, 2).bool()
    assert segmenter_iou(Fixed(), images, onehot) == pytest.approx(expected)
    predicted[predicted == 2] = 0  # concept "c" now absent from both: no IoU
    assert math.isnan(segmenter_iou(Fixed(), images, labels)["c"])
    with pytest.raises(ValueError, match=r"\[N, 3, R, R\]"):
        segmenter_iou(Fixed(), images, onehot[:, :2])


# ============================================================================ user files
class TinyNet(nn.Module):
    """A TorchScript-able segmenter: a 3x3 conv to ``classes`` channels."""

    def __init__(self, classes: int = 3, concepts: list[str] | None = None, resolution: int = 0) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        if concepts is not None:
            self.concepts = concepts
            self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".json", ".pt", ".ts"])
def test_save_load_round_trip(trained, scenes, tmp_path, suffix):
    images, _ = scenes
    target = tmp_path / f"seg{'.safetensors' if suffix == '.json' else suffix}"
    save_segmenter(trained, target)
    loaded = load_segmenter(target.with_suffix(suffix), resolution=RES)
    assert isinstance(loaded, Segmenter)
    assert loaded.concepts == trained.concepts and loaded.resolution == RES and loaded.source == trained.source
    assert torch.allclose(loaded.logits(images), trained.logits(images), atol=1e-5)
    assert torch.equal(loaded(images), trained(images))
    assert loaded.training["iou"] == trained.iou
    if suffix in (".safetensors", ".json"):
        assert loaded.arch == trained.arch


def test_torchscript_attributes_and_normalisation(tmp_path):
    net = TinyNet(3, ["sky", "tree", "road"], 8)
    path = tmp_path / "attrs.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = load_segmenter(path)
    assert loaded.concepts == ["sky", "tree", "road"] and loaded.resolution == 8
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(loaded.logits(images), net(images), atol=1e-6)
    # A side JSON overrides the attributes and sets the normalisation and output kind.
    path.with_suffix(".json").write_text(json.dumps({"concepts": ["a", "b", "c"], "resolution": 8,
                                                     "normalisation": "imagenet", "output": "multilabel"}))
    loaded = load_segmenter(path)
    assert loaded.concepts == ["a", "b", "c"]
    expected = net(normalise(images, "imagenet"))
    assert torch.allclose(loaded.logits(images), expected, atol=1e-5)
    assert torch.equal(loaded(images), expected > 0)


def test_normalisation_specs():
    images = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert torch.equal(normalise(images, check_normalisation("[-1, 1]")), images)
    assert torch.allclose(normalise(images, "[0,1]").flatten(), torch.tensor([0.0, 0.5, 1.0]))
    spec = check_normalisation({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    assert torch.allclose(normalise(images, spec), images)
    for bad in ("0-255", {"mean": [0.5], "std": [0.5]}, {"mean": [0, 0, 0], "std": [1, 0, 1]}, 3):
        with pytest.raises(ValueError, match="unknown normalisation"):
            check_normalisation(bad)


def _smp_spec(trained) -> dict:
    return {**trained.arch, "concepts": trained.concepts, "resolution": RES}


def test_load_segmenter_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmenter(tmp_path / "missing.pt")
    (tmp_path / "odd.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown segmenter format '.onnx'"):
        load_segmenter(tmp_path / "odd.onnx")
    (tmp_path / "broken.pt").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_segmenter(tmp_path / "broken.pt")

    # safetensors without, or with a bad, JSON beside it
    weights = tmp_path / "w.safetensors"
    save_segmenter(trained, weights)
    side = weights.with_suffix(".json")
    good = json.loads(side.read_text())
    side.unlink()
    with pytest.raises(FileNotFoundError, match=r"w\.json not found"):
        load_segmenter(weights)
    side.write_text('{"arch": "Unet", "concepts": [')
    with pytest.raises(ValueError, match=r"w\.json: not valid JSON"):
        load_segmenter(weights)
    cases = [
        ({**good, "classes": 5}, r'"classes" is 5 but 6 concepts'),
        ({**good, "classes": 5, "concepts": good["concepts"][:5]}, "do not fit the architecture"),
        ({**good, "arch": "Unet3000"}, "unknown smp architecture 'Unet3000'"),
        ({**good, "resolution": "32"}, '"resolution" must be'),
        ({**good, "resolution": 0}, '"resolution" must be'),
        ({**good, "colour": "blue"}, r"unknown key\(s\) \['colour'\]"),
        ({k: v for k, v in good.items() if k != "arch"}, r"missing key\(s\) \['arch'\]"),
        ({**good, "output": "softmax"}, '"output" must be one of'),
    ]
    for spec, message in cases:
        side.write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=message):
            load_segmenter(weights)
    side.write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"segments 16x16 images but 32x32.*resize=True"):
        load_segmenter(weights, resolution=32)
    assert load_segmenter(weights, resolution=32, resize=True).resize

    # TorchScript: no description, wrong concept count, wrong resolution
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(TinyNet(3)), str(path))
    with pytest.raises(ValueError, match=r"does not say its concepts and resolution.*plain\.json"):
        load_segmenter(path)
    path.with_suffix(".json").write_text(json.dumps({"concepts": ["a", "b"], "resolution": 8}))
    with pytest.raises(ValueError, match="outputs 3 channels but .*plain.json names 2 concepts"):
        load_segmenter(path)
    down = tmp_path / "down.ts"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1))), str(down))
    down.with_suffix(".json").write_text(json.dumps({"concepts": ["a", "b"], "resolution": 8}))
    with pytest.raises(ValueError, match="resolution mismatch: .*says 8 but the network returns 4x4"):
        load_segmenter(down)


# ============================================================================ class evidence
class RedDetector(nn.Module):
    """Class 1 ("red") rises with the amount of red; class 0 falls with it. Features are at half
    resolution, as a real network's would be."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 2, stride=2)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[:, 0] = 0.25  # every channel: mean red over the 2x2 patch
            self.features.weight[:, 1:] = -0.25
            self.features.bias.fill_(-0.2)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.fc.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))  # [B, 4, H/2, W/2]

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class QuadrantReader(nn.Module):
    """Reads only the top-left quadrant: its features vanish elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
        quadrant = torch.zeros(1, 1, 16, 16)
        quadrant[..., :8, :8] = 1
        self.register_buffer("quadrant", quadrant)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)) * self.quadrant

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _red_squares(n: int, size: int = 16, side: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.full((n, 3, size, size), -0.8)
    truth = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        images[i, 0, y : y + side, x : x + side] = 0.9
        truth[i, y : y + side, x : x + side] = True
    return images, truth


def test_class_evidence_lies_on_the_planted_object():
    images, truth = _red_squares(6)
    evidence = ClassEvidence(RedDetector(), ["plain", "red"], quantile=0.9, resolution=16)
    assert isinstance(evidence, Segmenter)
    assert evidence.concepts == ["evidence: plain", "evidence: red"]
    masks = evidence(images)
    assert masks.dtype == torch.bool and masks.shape == (6, 2, 16, 16)
    red = masks[:, 1]
    near = F.max_pool2d(truth[:, None].float(), 3, stride=1, padding=1)[:, 0].bool()  # the square + 1 px
    assert red.sum((1, 2)).min() >= 10  # about the top 10 % of 256 pixels
    assert not (red & ~near).any()  # no evidence off the square
    assert ((red & truth).sum((1, 2)) >= 0.6 * red.sum((1, 2))).all()
    assert not masks[:, 0].any()  # the "plain" class has only negative evidence: no mask at all


def test_grad_cam_of_a_linear_head_is_the_class_activation_map():
    net = RedDetector()
    images, _ = _red_squares(3, size=8, side=3)
    cam = grad_cam(net, images, classes=[1])  # [3, 1, 8, 8]
    feats = net.forward_features(images)  # [3, 4, 4, 4]
    # Global average pooling + linear: d logit / d A_k[i, j] = w_k / (h w), so alpha_k = w_k / 16.
    expected = F.relu(torch.einsum("k,bkhw->bhw", net.fc.weight[1] / 16, feats))[:, None]
    expected = F.interpolate(expected, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(cam, expected, atol=1e-6)
    # Log-probability target: d log p_1 = (1 - p_1)(d z_1 - d z_0) for two classes.
    p1 = net(images).softmax(-1)[:, 1]
    weights = (net.fc.weight[1] - net.fc.weight[0]) / 16
    expected = F.relu((1 - p1)[:, None, None] * torch.einsum("k,bkhw->bhw", weights, feats))[:, None]
    expected = F.interpolate(expected, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(grad_cam(net, images, target="log_prob", classes=[1]), expected, atol=1e-6)


def test_class_evidence_stays_in_the_quadrant_read():
    net = QuadrantReader().train()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    masks = ClassEvidence(net, ["a", "b"], quantile=0.8, resolution=16)(images)
    assert masks.any()
    assert not masks[..., 8:, :].any() and not masks[..., :, 8:].any()
    assert net.training  # its mode is restored


def test_evidence_masks_threshold_per_image_and_class():
    cam = torch.zeros(2, 2, 4, 4)
    cam[0, 0] = torch.arange(16.0).view(4, 4)
    cam[1, 0, 0, 0] = 1.0
    masks = evidence_masks(cam, 0.75)
    assert masks[0, 0].sum() == 4 and masks[0, 0].flatten()[12:].all()  # the top quarter
    assert masks[1, 0].sum() == 1 and masks[1, 0, 0, 0]  # ties at zero are never evidence
    assert not masks[:, 1].any()


def test_class_evidence_on_a_timm_classifier():
    from stylex.classifier.model import Classifier

    torch.manual_seed(0)
    classifier = Classifier("resnet10t", num_classes=2, input_size=32, temperature=0.5).freeze()
    evidence = ClassEvidence(classifier, ["healthy", "DR signs"])
    assert evidence.resolution == 32 and "resnet10t" in evidence.source
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    masks = evidence(images)  # the first call also checks the feature/head split against classifier(x)
    assert masks.shape == (3, 2, 32, 32) and masks.dtype == torch.bool
    cam = evidence.maps(images)
    assert (cam >= 0).all() and cam.shape == (3, 2, 32, 32)
    with pytest.raises(ValueError, match="3 class names given for a classifier of 2 classes"):
        ClassEvidence(classifier, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"quantile must lie in \(0, 1\)"):
        ClassEvidence(classifier, ["a", "b"], quantile=1.0)
    with pytest.raises(TypeError, match="forward_features"):
        ClassEvidence(nn.Linear(3, 2), ["a", "b"], resolution=8)


def test_no_pretrained_weights_are_requested(monkeypatch):
    _refuse_network(monkeypatch)
    net = seg.build_smp_network({**SegmenterTrainConfig().arch(6), "arch_kwargs": {"encoder_weights": "imagenet"}})
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 6, 32, 32)
