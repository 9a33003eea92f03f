"""Generator quality: FID / KID with cached real statistics, conditioning and causal-factor
fidelity, the factor-probe cache and the training callback."""

from __future__ import annotations

import csv
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import tiny_cfg
from stylex.classifier import Classifier
from stylex.data.synthetic import FACTOR_NAMES, generate_split, render_batch, sample_factors
from stylex.metrics import probe as probe_mod
from stylex.metrics.fidelity import conditioning_fidelity, factor_fidelity, factor_from_readings, key_name
from stylex.metrics.realism import RealismMeter, feature_extractor, kid_subset_size, real_key
from stylex.training.quality import GeneratorQuality

RES = 16


@pytest.fixture(scope="module")
def scenes() -> torch.Tensor:  # [48, 3, 16, 16] synthetic fundus scenes in [-1, 1]
    data = generate_split(48, 0, "val", RES)
    return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1


def tiny_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier("resnet10t", 2).freeze()


# ============================================================================ FID and KID
def test_fid_and_kid_are_zero_against_the_same_set_and_positive_against_a_shifted_one(scenes):
    features = feature_extractor(tiny_classifier())
    assert features.name == "classifier:resnet10t" and features.num_features == 512
    meter = RealismMeter(features)
    meter.set_real(scenes)
    same = meter.measure(scenes)
    brighter = meter.measure((scenes + 0.5).clamp(-1, 1))
    assert same["feature"] == brighter["feature"] == "classifier:resnet10t"
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3
    assert brighter["fid"] > 100 * max(abs(same["fid"]), 1e-6) and brighter["fid"] > 0.1
    assert brighter["kid"] > 20 * max(abs(same["kid"]), 1e-5) and brighter["kid"] > 1e-3
    # KID's subsets: half the smaller side, and the same draw every time (a seeded generator)
    assert same["kid_subset_size"] == kid_subset_size(48, 48) == 24
    assert meter.measure((scenes + 0.5).clamp(-1, 1)) == brighter
    with pytest.raises(ValueError, match="at least 2 images"):
        kid_subset_size(1, 10)


def test_real_statistics_are_cached_and_invalidated(scenes, tmp_path):
    dataset = {"datamodule": "SyntheticDataModule", "seed": 0, "resolution": RES}
    calls = []

    def images():  # the real images, only asked for on a cache miss
        calls.append(1)
        return scenes

    first = RealismMeter(feature_extractor(tiny_classifier()))
    assert first.load_or_set_real(images, dataset, 48, tmp_path) is False
    assert len(calls) == 1 and first.features.images_read == 48
    files = sorted(tmp_path.glob("real_*.pt"))
    assert len(files) == 1

    # A new meter (a resumed run, a second callback): restored without reading a real image.
    again = RealismMeter(feature_extractor(tiny_classifier()))
    assert again.load_or_set_real(images, dataset, 48, tmp_path) is True
    assert len(calls) == 1 and again.features.images_read == 0 and again.loaded_from == files[0]
    fakes = (scenes[:24] * 0.8).clamp(-1, 1)
    assert again.measure(fakes) == first.measure(fakes)

    # Another dataset config, another classifier or another count: another key, computed anew.
    for changed_dataset, classifier, count in (({**dataset, "seed": 1}, tiny_classifier(), 48),
                                               (dataset, tiny_classifier(seed=1), 48),
                                               (dataset, tiny_classifier(), 40)):
        meter = RealismMeter(feature_extractor(classifier))
        subset = scenes[:count]
        assert meter.load_or_set_real(lambda: subset, changed_dataset, count, tmp_path) is False
        assert meter.features.images_read == count
    assert len(list(tmp_path.glob("real_*.pt"))) == 4
    base = feature_extractor(tiny_classifier())
    assert real_key(dataset, base, 48) == real_key(dict(dataset), feature_extractor(tiny_classifier()), 48)
    assert real_key(dataset, base, 48) != real_key(dataset, feature_extractor(tiny_classifier(seed=1)), 48)


def test_inception_features_are_refused_without_their_weights_file(tmp_path):
    with pytest.raises(ValueError, match="weights-inception-2015-12-05-6726825d.pth"):
        GeneratorQuality(inception_weights=str(tmp_path / "missing.pth"))
    GeneratorQuality(inception_weights=str(tmp_path / "missing.pth"), enabled=False)  # off: not checked
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
        weights.write_bytes(b"x")
        with pytest.raises(ValueError, match="pip install torch-fidelity"):
            GeneratorQuality(inception_weights=str(weights))


# ============================================================================ planted generator
class PlantedScenes(nn.Module):
    """Renders synthetic scenes: class 0 without lesions; class 1 with 2 exudates and 1
    haemorrhage, except where ``z[:, 0] <= 0`` (it then "forgets" the class and draws none).
    Pixel (0, 0), black background otherwise, holds the drawn counts: red = exudates / 4, green =
    haemorrhages / 4 (in [-1, 1] units), so the fakes below can read them exactly."""

    z_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # a device to be found on
        self.drawn: list[tuple[int, int, int]] = []  # (class asked for, exudates, haemorrhages) per sample

    def forward(self, z, c, noise_mode="random"):
        rng = np.random.default_rng(0)
        factors = np.array([[f[n] for n in FACTOR_NAMES] for f in
                            (sample_factors(rng, lesion_prob=0.0) for _ in range(z.shape[0]))])
        ask = c.argmax(dim=1)
        draw = (ask == 1) & (z[:, 0] > 0)
        factors[:, FACTOR_NAMES.index("exudates")] = 2 * draw.numpy()
        factors[:, FACTOR_NAMES.index("haemorrhages")] = 1 * draw.numpy()
        images = torch.from_numpy(render_batch(factors, RES)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
        mark(images, 2 * draw.float(), 1 * draw.float())
        self.drawn += [(int(a), 2 * int(d), int(d)) for a, d in zip(ask, draw)]
        return images


def mark(images: torch.Tensor, exudates: torch.Tensor, haemorrhages: torch.Tensor) -> None:
    images[:, 0, 0, 0] = exudates / 4
    images[:, 1, 0, 0] = haemorrhages / 4


class MarkReader(nn.Module):
    """A fake classifier: class 1 exactly when pixel (0, 0) says lesions were drawn."""

    def forward(self, x):
        lesions = (x[:, 0, 0, 0] > 0.1) | (x[:, 1, 0, 0] > 0.1)
        return torch.stack([(~lesions).float(), lesions.float()], dim=1) * 10


class MarkProbe(nn.Module):
    """A fake factor probe reading the counts from pixel (0, 0)."""

    factor_names = ["exudates", "haemorrhages"]

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def read(self, images):
        return images[:, :2, 0, 0] * 4


def test_conditioning_fidelity_of_a_planted_generator():
    g = PlantedScenes()
    cond = conditioning_fidelity(g, MarkReader(), 2, num=40, seed=3, batch_size=16)
    asked = torch.tensor([a for a, _, _ in g.drawn])
    lesions = torch.tensor([e > 0 for _, e, _ in g.drawn])
    assert asked.tolist() == [0, 1] * 20  # balanced
    share1 = float(lesions[asked == 1].double().mean())
    assert 0 < share1 < 1  # the planted generator forgets some of class 1
    assert cond.counts == [20, 20]
    assert cond.per_class == [1.0, pytest.approx(share1)]
    assert cond.overall == pytest.approx((1.0 + share1) / 2)


def test_factor_fidelity_of_a_planted_generator():
    g = PlantedScenes()
    # Real images: 3 healthy (no lesions), 5 "DR signs" with known counts, marked like the fakes.
    real = torch.zeros(8, 3, RES, RES)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    exu = torch.tensor([0, 0, 0, 4, 3, 2, 1, 0.0])
    hae = torch.tensor([0, 0, 0, 1, 1, 2, 2, 4.0])
    mark(real, exu, hae)
    names = ["healthy", "DR signs"]
    ff = factor_fidelity(g, MarkProbe(), real, labels, names, num=30, seed=1, batch_size=7)
    asked = torch.tensor([a for a, _, _ in g.drawn])
    gen_e = torch.tensor([float(e) for _, e, _ in g.drawn])
    gen_h = torch.tensor([float(h) for _, _, h in g.drawn])
    # the samples follow the class mix of the real labels (3 : 5), cycled
    assert asked.tolist() == labels[torch.arange(30) % 8].tolist()
    dr = ff.classes["DR signs"]
    assert dr["exudates"]["generated"] == pytest.approx(float(gen_e[asked == 1].mean()))
    assert dr["exudates"]["real"] == pytest.approx(2.0)
    assert dr["exudates"]["ratio"] == pytest.approx(float(gen_e[asked == 1].mean()) / 2.0)
    assert dr["haemorrhages"]["ratio"] == pytest.approx(float(gen_h[asked == 1].mean()) / 2.0)
    healthy = ff.classes["healthy"]
    assert healthy["exudates"] == {"generated": 0.0, "real": 0.0, "ratio": None, "difference": 0.0}
    assert ff.counts == {"healthy": {"generated": 12, "real": 3}, "DR signs": {"generated": 18, "real": 5}}
    flat = ff.flat()
    assert flat["factor_ratio/dr_signs/exudates"] == pytest.approx(dr["exudates"]["ratio"])
    assert "factor_ratio/healthy/exudates" not in flat and flat["factor_diff/healthy/haemorrhages"] == 0.0
    assert key_name("DR signs") == "dr_signs"
    # class contrast: (generated DR - generated healthy) / (real DR - real healthy), healthy = 0 here
    for fname, gen in (("exudates", gen_e), ("haemorrhages", gen_h)):
        expected = float(gen[asked == 1].mean() - gen[asked == 0].mean()) / 2.0
        assert ff.contrast["DR signs"][fname] == pytest.approx(expected)
        assert flat[f"factor_contrast/dr_signs/{fname}"] == pytest.approx(expected)
    assert "healthy" not in ff.contrast  # the reference class has no contrast with itself
    assert ff.to_dict()["contrast"] == ff.contrast


def test_the_class_contrast_is_near_zero_for_lesions_drawn_into_every_class():
    # The generator draws 2 exudates whatever the class; real DR images have 2, healthy none:
    # the DR ratio is a perfect 1.0, the contrast 0.
    gen = torch.tensor([[2.0, 0.0]] * 6)
    gen_classes = torch.tensor([0, 1, 0, 1, 0, 1])
    real = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.1], [2.0, 0.0]])
    real_labels = torch.tensor([0, 0, 1, 1])
    ff = factor_from_readings(gen, gen_classes, real, real_labels, ["exudates", "haemorrhages"], ["healthy", "DR"])
    assert ff.classes["DR"]["exudates"]["ratio"] == pytest.approx(1.0)
    assert ff.contrast["DR"]["exudates"] == pytest.approx(0.0)
    assert ff.contrast["DR"]["haemorrhages"] is None  # a real gap of 0.05 < min_real: undefined
    assert "factor_contrast/dr/haemorrhages" not in ff.flat()


# ============================================================================ the probe cache
def test_trained_probes_are_cached_per_resolution_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEX_CACHE_DIR", str(tmp_path))
    trained = []
    real_train = probe_mod.train_factor_probe

    def counting(*args, **kwargs):
        trained.append((args, kwargs))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "train_factor_probe", counting)
    settings = {"num_train": 32, "num_val": 16, "epochs": 1, "factor_names": ["exudates", "brightness"]}
    first = probe_mod.cached_factor_probe(8, **settings)
    again = probe_mod.cached_factor_probe(8, **settings)
    assert len(trained) == 1 and probe_mod.cache_dir() == tmp_path / "probes"
    assert again.r2 == first.r2 and again.factor_names == ["exudates", "brightness"]
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(again.read(x), first.read(x))
    probe_mod.cached_factor_probe(16, **settings)  # another resolution
    probe_mod.cached_factor_probe(8, **{**settings, "epochs": 2})  # other settings
    assert len(trained) == 3 and len(list((tmp_path / "probes").glob("probe_*.pt"))) == 3
    # a damaged file is replaced by a freshly trained probe
    for path in (tmp_path / "probes").glob("probe_r16_*.pt"):
        path.write_bytes(b"damaged")
    probe_mod.cached_factor_probe(16, **settings)
    assert len(trained) == 4


# ============================================================================ the callback
@pytest.mark.parametrize("feature_net", [None, "resnet18"])
def test_callback_logs_plots_and_summarises_a_short_run(tmp_path, monkeypatch, feature_net):
    from stylex.classifier import build_classifier
    from stylex.training import quality
    from stylex.training.run import train

    monkeypatch.setenv("STYLEX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(quality, "PROBE_SETTINGS", {"num_train": 64, "num_val": 32, "epochs": 1})
    run = tmp_path / "runs" / "synthetic" / "run"
    extra, feature = [], "classifier:resnet10t"
    if feature_net:  # FID and KID are then read in the second network's features, and say so
        build_classifier({"arch": feature_net}, 3).save(tmp_path / "features.safetensors")
        extra, feature = [f"classifier.feature_checkpoint={tmp_path / 'features.safetensors'}"], f"feature-net:{feature_net}"
    train(tiny_cfg(run, "trainer.max_steps=4", "classifier.train.max_epochs=1", "trainer.val_check_interval=100",
                   "trainer.enable_progress_bar=false", "callbacks.quality.every_n_steps=2",
                   "callbacks.quality.num_fake=16", "callbacks.quality.num_real=16", *extra))
    rows = []
    for f in (run / "logs").rglob("metrics.csv"):
        with open(f) as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("val/fid") not in (None, "")]
    assert len(rows) == 2  # steps 2 and 4 (the end of training is step 4: measured once)
    for key in ("val/fid", "val/kid", "val/kid_std", "val/cond_fidelity", "val/factor_diff/dr_signs/exudates"):
        assert all(r.get(key) not in (None, "") for r in rows), key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val/fid"] == pytest.approx(float(rows[-1]["val/fid"]))
    assert summary["val/kid"] == pytest.approx(float(rows[-1]["val/kid"]))
    assert 0 <= summary["val/cond_fidelity"] <= 1
    q = summary["quality"]
    assert q["feature"] == feature and q["g_steps"] == 4
    assert q["num_fake"] == q["num_real"] == 16 and q["kid_subset_size"] == 8
    assert set(q["factors"]["classes"]) == {"healthy", "DR signs"}
    with Image.open(run / "quality.png") as img:
        assert img.format == "PNG" and img.height > 3 * 300  # FID, KID, conditioning and factor panels
    history = json.loads((run / "metrics" / "quality.json").read_text())
    assert [h["g_steps"] for h in history["history"]] == [2, 4] and history["feature"] == feature
    assert len(list((run / "metrics").glob("real_*.pt"))) == 1
    assert len(list((tmp_path / "cache" / "probes").glob("probe_r16_*.pt"))) == 1


def test_a_failed_measurement_warns_and_training_goes_on(tmp_path, caplog):
    cb = GeneratorQuality(every_n_steps=1, num_fake=4, num_real=4)
    module = SimpleNamespace(count=lambda name: 1, device=torch.device("cpu"), G_ema=nn.Linear(1, 1))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataset=None, train_dataset=None), loggers=[],
                              default_root_dir=str(tmp_path), global_step=1)
    with caplog.at_level(logging.WARNING):
        cb.on_train_batch_end(trainer, module, None, None, 0)
    assert "generator quality at step 1 failed" in caplog.text and "training goes on" in caplog.text
    assert cb.last == {} and not (tmp_path / "quality.png").exists()
    assert module.G_ema.training, "the generator's mode must be restored"


# ---- the class swapped on encoded real images ------------------------------------------------------
class _RedGenerator(nn.Module):
    """Renders a grey image whose red channel is ``gain_c * (2 c_1 - 1) + gain_w * w`` (plus the
    noise map's mean when given): class 1 = red."""

    def __init__(self, gain_c: float, gain_w: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.gain_c, self.gain_w = gain_c, gain_w

    def generate(self, w, c, noise_mode="const", noise=None):
        red = self.gain_c * (2 * c[:, 1] - 1) + self.gain_w * w[:, 0]
        if noise is not None:
            red = red + noise["m"].mean(dim=(1, 2, 3))
        img = torch.zeros(w.shape[0], 3, 4, 4)
        img[:, 0] = red.clamp(-1, 1)[:, None, None]
        return img * self.scale


class _MeanRedEncoder(nn.Module):
    def __init__(self, maps: bool = False) -> None:
        super().__init__()
        self.noise_encoder = nn.Identity() if maps else None

    def forward(self, x):
        return x[:, 0].mean(dim=(1, 2))[:, None]

    def noise_maps(self, x):
        return {"m": x[:, :1] * 0 + 0.9} if self.noise_encoder is not None else None  # pushes every render red


def _red_classifier(x):
    r = x[:, 0].mean(dim=(1, 2))
    return torch.stack([-r, r], dim=1)


def test_swap_fidelity_counts_renders_that_follow_the_swapped_class():
    from stylex.metrics.fidelity import swap_fidelity

    images = torch.zeros(8, 3, 4, 4)
    images[:5, 0] = 0.6  # five red (class 1), three grey-negative (class 0)
    images[5:, 0] = -0.6
    probe = SimpleNamespace(factor_names=["exudates", "haemorrhages"], read=lambda x: torch.stack(
        [x[:, 0].mean(dim=(1, 2)), x[:, 1].mean(dim=(1, 2))], dim=1))
    probe.parameters = lambda: iter([torch.zeros(1)])
    names = ["healthy", "DR signs"]
    obeys = swap_fidelity(_RedGenerator(0.8, 0.1), _MeanRedEncoder(), _red_classifier, images, names,
                          probe=probe, batch_size=3)
    assert obeys.shares == {"healthy": {"DR signs": 1.0}, "DR signs": {"healthy": 1.0}} and obeys.overall == 1.0
    assert obeys.counts == {"healthy": 3, "DR signs": 5}
    # independently: class 1 rendered as class 0 reads 0.1 * 0.6 - 0.8 = -0.74 red, as itself 0.86
    dr = obeys.factors["DR signs"]["exudates"]
    assert dr["real"] == pytest.approx(0.6) and dr["own"] == pytest.approx(0.86) and dr["swapped"] == pytest.approx(-0.74)
    ignores = swap_fidelity(_RedGenerator(0.0, 1.0), _MeanRedEncoder(), _red_classifier, images, names)
    assert ignores.overall == 0.0 and ignores.factors is None
    # with the encoder's noise maps (every map pushes red by 0.9) class 0 can no longer be reached
    maps = swap_fidelity(_RedGenerator(0.8, 0.1), _MeanRedEncoder(maps=True), _red_classifier, images, names)
    assert maps.shares["DR signs"]["healthy"] == 0.0 and maps.shares["healthy"]["DR signs"] == 1.0
    with pytest.raises(ValueError, match="two classes"):
        swap_fidelity(_RedGenerator(0.8, 0.1), _MeanRedEncoder(), _red_classifier, images, ["one"])
