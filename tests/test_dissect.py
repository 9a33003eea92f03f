"""Unit dissection and attribute localisation: streaming statistics against direct computations,
a planted generator whose answer is known, and a tiny real generator against brute force."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dissect_fixtures import RES, UNITS, PlantedGenerator, SquareSegmenter, maps_generator, own, random_maps
from stylex.dissect.base import modulating_styles, unit_counts, unit_layers
from stylex.dissect.dissection import Dissection, dissect, noise_latents
from stylex.dissect.localise import localise_attributes
from stylex.dissect.stats import IoUAccumulator, RunningQuantile, overlap_counts, upsample_maps
from stylex.explain.result import Attribute
from stylex.networks import Generator
from stylex.networks.encoder import Encoder
from stylex.stylespace import StyleSpace

VISIBLE = 0.5 * math.atanh(0.5)  # the planted square is red > 0.2 exactly when its style exceeds this


# ============================================================================ streaming statistics
def _stream_data(seed: int = 0) -> torch.Tensor:  # [N, U, P]: units of different shapes and drifting scales
    g = torch.Generator().manual_seed(seed)
    n, p = 60, 50
    x = torch.randn(n, 6, p, generator=g)
    x[:, 1] = F.leaky_relu(x[:, 1] * 3.0 + 1.0, 0.2)  # lrelu-like, skewed
    x[:, 2] = torch.exp(1.5 * x[:, 2])  # heavy upper tail
    x[:, 3] = 3.0  # a dead unit (constant, away from 0)
    x[:, 4] = F.relu(x[:, 4]) * (x[:, 4] > 1.5)  # mostly zeros: the 99th percentile sits in the tail
    x[:, 5] = x[:, 5] * torch.linspace(0.01, 20.0, n)[:, None]  # the range grows batch after batch
    return x


def _add_in_batches(rq: RunningQuantile, x: torch.Tensor, sizes: list[int]) -> None:
    start = 0
    for s in sizes:
        rq.add(x[start : start + s])
        start += s
    if start < x.shape[0]:
        rq.add(x[start:])


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.999])
def test_running_quantile_matches_torch_quantile(p):
    x = _stream_data()
    rq = RunningQuantile(6, bins=1024)
    _add_in_batches(rq, x, [1, 3, 7, 10, 19])
    exact = torch.quantile(x.double().transpose(0, 1).reshape(6, -1), p, dim=1)
    got = rq.quantile(p)
    err = (got - exact).abs()
    assert rq.count == x.shape[0] * x.shape[2]
    assert torch.all(err <= rq.bin_width * 1.01 + 1e-9), (err, rq.bin_width)
    span = x.amax(dim=(0, 2)).double() - x.amin(dim=(0, 2)).double()
    assert torch.all(err <= 2.0 * span / 1024 + 1e-6)  # small against each unit's spread
    assert got[3] == pytest.approx(3.0, abs=1e-6)  # the dead unit: its constant


def test_top_quantile_is_upper_share():
    x = _stream_data()
    rq = RunningQuantile(6)
    rq.add(x)
    t = rq.top_quantile(0.01)
    share = (x > t.float()[None, :, None]).double().mean(dim=(0, 2))
    live = [0, 1, 2, 5]
    assert torch.allclose(share[live], torch.full((4,), 0.01, dtype=torch.float64), atol=0.002)
    assert share[3] == 0.0  # a constant is never above its own threshold


def test_running_quantile_independent_of_batching_and_mergeable():
    x = _stream_data(seed=1)
    a, b, merged_a, merged_b = (RunningQuantile(6, bins=2048) for _ in range(4))
    _add_in_batches(a, x, [60])
    _add_in_batches(b, x, [2, 2, 5, 11, 13])
    _add_in_batches(merged_a, x[:25], [4, 21])
    _add_in_batches(merged_b, x[25:], [35])
    merged_a.merge(merged_b)
    ta, tb, tm = a.top_quantile(0.01), b.top_quantile(0.01), merged_a.top_quantile(0.01)
    width = torch.maximum(a.bin_width, b.bin_width)
    assert torch.all((ta - tb).abs() <= 2 * width + 1e-9)
    assert torch.all((ta - tm).abs() <= 3 * torch.maximum(width, merged_a.bin_width) + 1e-9)
    assert merged_a.count == a.count


def test_running_quantile_errors():
    rq = RunningQuantile(3)
    with pytest.raises(ValueError, match="no values"):
        rq.quantile(0.5)
    with pytest.raises(ValueError, match="units must be dim 1"):
        rq.add(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="non-finite"):
        rq.add(torch.tensor([[0.0, math.nan, 1.0]]))


def _random_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(5, 4, 4, 4, generator=g)  # [B, U, 4, 4], upsampled to 8
    masks = torch.rand(5, 3, 8, 8, generator=g) > 0.6  # [B, C, 8, 8]
    thresholds = torch.tensor([0.0, 0.5, 1.0, -0.5])
    return maps, masks, thresholds


def test_iou_and_conditional_mean_against_python_sets():
    maps, masks, thresholds = _random_case()
    acc = IoUAccumulator(thresholds, 3)
    acc.add(maps, masks)
    up = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    b, u, r, _ = up.shape
    pixels = [(i, y, x) for i in range(b) for y in range(r) for x in range(r)]
    for k in range(u):
        on = {px for px in pixels if float(up[px[0], k, px[1], px[2]]) > float(thresholds[k])}
        for c in range(3):
            concept = {px for px in pixels if bool(masks[px[0], c, px[1], px[2]])}
            expected = len(on & concept) / len(on | concept)
            assert float(acc.iou()[k, c]) == pytest.approx(expected, abs=1e-12)
            mean = sum(float(up[px[0], k, px[1], px[2]]) for px in concept) / len(concept)
            assert float(acc.conditional_mean()[k, c]) == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert float(acc.unit_area[k]) == len(on)


def test_iou_streaming_equals_in_memory():
    maps, masks, thresholds = _random_case(seed=3)
    whole = IoUAccumulator(thresholds, 3)
    whole.add(maps, masks)
    pieces = IoUAccumulator(thresholds, 3, max_values=70)  # also forces unit chunks
    for sl in (slice(0, 1), slice(1, 3), slice(3, 5)):
        pieces.add(maps[sl], masks[sl])
    assert torch.equal(whole.iou(), pieces.iou())
    assert torch.allclose(whole.conditional_mean(), pieces.conditional_mean(), rtol=1e-5, atol=1e-6)
    inter, area, carea = overlap_counts(upsample_maps(maps, 8) > thresholds[None, :, None, None], masks)
    assert torch.equal(inter, whole.intersection) and torch.equal(area, whole.unit_area)
    assert torch.equal(carea, whole.concept_area)


def test_iou_accumulator_rejects_mismatched_batches():
    maps, masks, thresholds = _random_case()
    acc = IoUAccumulator(thresholds, 3)
    with pytest.raises(ValueError, match="batches must match"):
        acc.add(maps[:2], masks[:3])


# ============================================================================ planted generator
NUM_PLANTED = 192


@pytest.fixture(scope="module")
def planted():
    g = PlantedGenerator()
    space = StyleSpace(g)
    w, c = noise_latents(g, NUM_PLANTED, seed=0)
    # The square covers 36/256 of an image in which it is visible; a top quantile equal to the
    # square's share of all pixels makes "unit 0 above its threshold" exactly "square visible".
    # (At q = 0.01 the IoU is bounded by 0.01 / that share: the unit can only cover 1% of pixels.)
    share = 36 / RES**2 * float((w[:, 0] > VISIBLE).double().mean())
    d = dissect(space, SquareSegmenter(), num_images=NUM_PLANTED, quantile=share, batch_size=50, progress=False)
    return types.SimpleNamespace(space=space, w=w, c=c, share=share, d=d)


def test_planted_unit_is_the_square(planted):
    d = planted.d
    sq = d.concept_index("square")
    unit = d.unit("b16.conv1", 0)
    assert unit.label == "square" and unit.iou > 0.9 and unit.interpretable
    for k in range(1, UNITS):
        decoy = d.unit("b16.conv1", k)
        assert decoy.label != "square"
        assert float(d.layers["b16.conv1"].iou[k, sq]) < 0.2
    assert d.counts()["b16.conv1"]["square"] == 1
    assert [u.channel for u in d.top_units("square", 2)][0] == 0
    assert unit.styles == [("b16.torgb", 0)]
    assert d.layers["b16.conv1"].modulated_by == modulating_styles(planted.space, "b16.conv1")


def test_planted_threshold_and_conditional_mean(planted):
    d, space = planted.d, planted.space
    s0 = planted.w[:, 0]
    # threshold: against torch.quantile over every value of the unit maps
    with torch.no_grad(), space.trace(retain=["b16.conv1"]) as seen:
        space.render(space.flat_styles(planted.w, planted.c))
    maps = seen["b16.conv1"]
    exact = torch.quantile(maps.transpose(0, 1).reshape(UNITS, -1).double(), 1 - planted.share, dim=1)
    span = maps.amax(dim=(0, 2, 3)).double() - maps.amin(dim=(0, 2, 3)).double()
    assert torch.all((d.layers["b16.conv1"].thresholds - exact).abs() <= 4 * span / 2048)
    # k: unit 0 is relu(s0) on the square, and the square is segmented where s0 > VISIBLE
    expected = float(F.relu(s0[s0 > VISIBLE]).mean())
    assert float(d.conditional_mean("b16.conv1", "square")[0]) == pytest.approx(expected, rel=1e-5)
    assert d.concept_area[1] == pytest.approx(36 / RES**2 * float((s0 > VISIBLE).double().mean()), rel=1e-6)


def test_planted_dissection_independent_of_batching(planted):
    d = dissect(planted.space, SquareSegmenter(), layers="b16.conv1", num_images=NUM_PLANTED,
                quantile=planted.share, batch_size=NUM_PLANTED, progress=False)
    a, b = d.layers["b16.conv1"], planted.d.layers["b16.conv1"]
    assert torch.allclose(a.thresholds, b.thresholds, atol=4 * 2.5 / 2048)
    assert torch.equal(a.labels, b.labels)
    assert float(a.iou[0, 1]) == pytest.approx(float(b.iou[0, 1]), abs=0.02)


def test_planted_default_quantile_still_labels_the_square(planted):
    d = dissect(planted.space, SquareSegmenter(), num_images=NUM_PLANTED, progress=False)
    unit = d.unit("b16.conv1", 0)
    assert unit.label == "square" and unit.interpretable
    assert unit.iou <= 0.01 / planted.share * 1.2  # the bound of a 1% threshold
    assert not any(d.unit("b16.conv1", k).interpretable for k in range(1, UNITS))
    assert d.counts() == {"b16.conv1": {"rest": 0, "square": 1}}


def test_dissection_json_round_trip(planted):
    d = planted.d
    data = json.loads(json.dumps(d.to_json()))
    assert data["counts"]["b16.conv1"]["square"] == 1
    assert data["source"] == SquareSegmenter.source
    back = Dissection.from_json(data)
    for name, ld in d.layers.items():
        assert torch.allclose(back.layers[name].iou, ld.iou)
        assert torch.allclose(back.layers[name].thresholds, ld.thresholds)
        assert torch.allclose(back.layers[name].conditional_mean, ld.conditional_mean, equal_nan=True)
    assert back.counts() == d.counts()
    assert "square 1" in d.summary()


def test_localise_planted_coordinate(planted):
    space = planted.space
    flat = space.flat_styles(planted.w[:64], planted.c[:64])
    square, decoy, torgb = localise_attributes(
        space, SquareSegmenter(), flat,
        [("b16.conv1", 0, 2.0), ("b16.conv1", 3, 2.0), ("b16.torgb", 0, 1.0)],
        dissection=planted.d, batch_size=24, progress=False,
    )
    assert square.effect_concept == "square" and float(square.effect_iou[1]) > 0.9
    assert square.acts_on.startswith("acts on: square (IoU ")
    assert square.num_affected > 32 and square.unit is None  # the first layer modulates the constant
    assert square.effect.shape == (64, RES, RES) and square.masks.shape == (64, 2, RES, RES)
    assert decoy.effect_concept != "square" and float(decoy.effect_iou[1]) < 0.3
    # the torgb style scales unit b16.conv1:0, the square; the planted torgb ignores its style
    assert torgb.unit == ("b16.conv1", 0) and torgb.unit_threshold_source == "dissection"
    assert torgb.unit_concept == "square" and float(torgb.unit_iou[1]) > 0.9
    assert torgb.num_affected == 0 and torgb.effect_concept is None
    json.dumps([x.to_dict() for x in (square, decoy, torgb)])


def test_localise_attfind_attributes_without_dissection(planted):
    space = planted.space
    flat = space.flat_styles(planted.w[:48], planted.c[:48])
    stats = space.statistics(flat)
    attr = Attribute(coordinate=space.index("b16.torgb", 0), layer="b16.torgb", channel=0, direction=1,
                     effect=0.0, probability_change=0.0, share_affected=0.0, flip_share=0.0)
    grow = Attribute(coordinate=space.index("b16.conv1", 0), layer="b16.conv1", channel=0, direction=1,
                     effect=0.0, probability_change=0.0, share_affected=0.0, flip_share=0.0)
    loc, grown = localise_attributes(space, SquareSegmenter(), flat, [attr, grow],
                                     extremes=(stats["min"], stats["max"]), keep_maps=False, progress=False)
    assert loc.unit_threshold_source == "quantile of these images"
    assert loc.unit_concept == "square" and loc.effect is None
    assert torch.allclose(grown.delta, stats["max"][grown.coordinate] - flat[:, grown.coordinate])
    assert grown.effect_concept == "square" and float(grown.effect_iou[1]) > 0.9
    with pytest.raises(ValueError, match="extremes"):
        localise_attributes(space, SquareSegmenter(), flat, [attr], progress=False)


# ============================================================================ a tiny real generator
class ColourSegmenter:
    """Stand-in concepts at 16x16: darker than the image's mean, red-dominant, green-dominant."""

    concepts = ["dark", "red", "green"]
    resolution = 16
    source = "colour thresholds (test stand-in)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        lum = images.mean(dim=1)
        r, g, b = images.unbind(dim=1)
        return torch.stack([lum < lum.mean(dim=(1, 2), keepdim=True), (r > g) & (r > b), (g > r) & (g > b)], dim=1)


class MeanColourClassifier(nn.Module):
    num_classes = 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = images.mean(dim=(2, 3))
        return torch.softmax(torch.stack([m[:, 0] - m[:, 1], m[:, 1] - m[:, 0]], dim=1) * 4.0, dim=1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    g = Generator(z_dim=32, w_dim=32, c_dim=2, resolution=16, channel_base=256, channel_max=32, mapping_layers=2)
    return StyleSpace(g.eval())


def _brute_force_iou(space, w, c, d, batch_size, noise=None):
    """IoU per unit and concept, unit by unit, over every image held at once. ``noise``: one entry
    per image, its own noise maps (batch 1) or None; the images are then rendered one by one."""
    layers = list(d.layers)
    maps = {name: [] for name in layers}
    masks = []
    step = batch_size if noise is None else 1
    with torch.no_grad(), space.trace(retain=layers) as seen:
        for start in range(0, w.shape[0], step):
            img = space.render(space.flat_styles(w[start : start + step], c[start : start + step]),
                               noise=None if noise is None else noise[start])
            masks.append(ColourSegmenter()(img))
            for name in layers:
                maps[name].append(seen[name])
    masks = torch.cat(masks)
    out = {}
    for name in layers:
        m = torch.cat(maps[name])
        up = F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False)
        iou = torch.zeros(m.shape[1], 3, dtype=torch.float64)
        for u in range(m.shape[1]):
            on = up[:, u] > float(d.layers[name].thresholds[u])
            for k in range(3):
                inter = int((on & masks[:, k]).sum())
                union = int((on | masks[:, k]).sum())
                iou[u, k] = inter / union if union else 0.0
        out[name] = (iou, m)
    return out


def test_tiny_generator_against_brute_force(tiny):
    d = dissect(tiny, ColourSegmenter(), num_images=10, batch_size=4, progress=False)
    assert {name: ld.units for name, ld in d.layers.items()} == unit_counts(tiny)
    assert list(d.layers) == unit_layers(tiny)
    w, c = noise_latents(tiny.generator, 10, seed=0)
    assert torch.equal(c.argmax(dim=1), torch.arange(10) % 2)  # one-hot classes in turn
    for name, (iou, m) in _brute_force_iou(tiny, w, c, d, batch_size=4).items():
        assert torch.allclose(d.layers[name].iou, iou, atol=1e-12), name
        assert float(iou.max()) > 0.0, name  # the comparison is not between zeros
        assert d.layers[name].iou.shape == (unit_counts(tiny)[name], 3)
        exact = torch.quantile(m.transpose(0, 1).reshape(m.shape[1], -1).double(), 0.99, dim=1)
        span = m.amax(dim=(0, 2, 3)).double() - m.amin(dim=(0, 2, 3)).double()
        # one bin of a range that doubled from the first batch's: at most a few spans / bins
        assert torch.all((d.layers[name].thresholds - exact).abs() <= 4 * span / 2048), name


def test_tiny_generator_encoder_path(tiny):
    g = tiny.generator
    torch.manual_seed(1)
    encoder = Encoder(resolution=16, w_dim=32, channel_base=256, channel_max=32).eval()
    classifier = MeanColourClassifier()
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    d = dissect(tiny, ColourSegmenter(), layers=["b8.conv1", "b16.conv1"], num_images=0, encoder_images=images,
                encoder=encoder, classifier=classifier, batch_size=4, progress=False)
    assert d.num_images == 0 and d.num_encoded == 6 and "encoder" in d.conditioning
    with torch.no_grad():
        w, c = encoder(images), classifier(images)
    for name, (iou, _) in _brute_force_iou(tiny, w, c, d, batch_size=4).items():
        assert torch.allclose(d.layers[name].iou, iou, atol=1e-12), name
    with pytest.raises(ValueError, match="encoder= and classifier="):
        dissect(tiny, ColourSegmenter(), num_images=1, encoder_images=images, progress=False)
    assert g.c_dim == 2


def test_noise_and_w_plus_encoder_latents_are_dissected_together(tiny):
    """An encoder into w+ next to noise-path images: a mapped w enters as the same w at every layer."""
    torch.manual_seed(2)
    encoder = Encoder(resolution=16, w_dim=32, channel_base=256, channel_max=32, latent="w+",
                      num_ws=tiny.generator.num_ws).eval()
    classifier = MeanColourClassifier()
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    d = dissect(tiny, ColourSegmenter(), layers=["b16.conv1"], num_images=3, encoder_images=images,
                encoder=encoder, classifier=classifier, batch_size=4, seed=7, progress=False)
    assert d.num_images == 3 and d.num_encoded == 5
    wn, cn = noise_latents(tiny.generator, 3, seed=7)
    with torch.no_grad():
        we, ce = encoder(images), classifier(images)
    w = torch.cat([wn[:, None].repeat(1, tiny.generator.num_ws, 1), we])
    for name, (iou, _) in _brute_force_iou(tiny, w, torch.cat([cn, ce]), d, batch_size=4).items():
        assert torch.allclose(d.layers[name].iou, iou, atol=1e-12), name


# ============================================================================ noise maps
MAPS_G = dict(z_dim=32, w_dim=32, c_dim=2, resolution=16, channel_base=256, channel_max=32, mapping_layers=2)


def test_dissection_renders_every_image_with_its_own_noise_maps():
    """Noise-path images with the given maps, encoded images with the encoder's maps of them:
    the statistics are those of renders of one image at a time with that image's maps."""
    g = maps_generator(**MAPS_G)
    space = StyleSpace(g)
    torch.manual_seed(3)
    encoder = Encoder(resolution=16, w_dim=32, channel_base=256, channel_max=32, noise_maps=True,
                      noise_layers=[list(x) for x in g.noise_layers]).eval()
    classifier = MeanColourClassifier()
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    layouts = random_maps(g, 5, seed=4)
    common = dict(layers=["b8.conv1", "b16.conv1"], num_images=5, encoder_images=images, encoder=encoder,
                  classifier=classifier, batch_size=4, seed=2, progress=False)
    d = dissect(space, ColourSegmenter(), noise=layouts, **common)
    mixed = dissect(space, ColourSegmenter(), **common)  # samples without maps next to encoded ones with theirs
    wn, cn = noise_latents(g, 5, seed=2)
    with torch.no_grad():
        w, c = torch.cat([wn, encoder(images)]), torch.cat([cn, classifier(images)])
        encoded = encoder.noise_maps(images)
    per_image = [own(layouts, i) for i in range(5)] + [own(encoded, i) for i in range(6)]
    for got, noise in ((d, per_image), (mixed, [None] * 5 + per_image[5:])):
        for name, (iou, m) in _brute_force_iou(space, w, c, got, 4, noise=noise).items():
            assert torch.allclose(got.layers[name].iou, iou, atol=1e-12), name
            exact = torch.quantile(m.transpose(0, 1).reshape(m.shape[1], -1).double(), 0.99, dim=1)
            span = m.amax(dim=(0, 2, 3)).double() - m.amin(dim=(0, 2, 3)).double()
            assert torch.all((got.layers[name].thresholds - exact).abs() <= 4 * span / 2048), name
    # Constant noise gives other statistics: the maps are not ignored.
    const = _brute_force_iou(space, w, c, d, 4)
    assert any(not torch.allclose(d.layers[name].iou, iou, atol=1e-6) for name, (iou, _) in const.items())
    with pytest.raises(ValueError, match="batch 1 or 5"):
        dissect(space, ColourSegmenter(), noise=random_maps(g, 3, seed=4), **common)


def test_localised_edits_keep_each_images_noise_maps():
    g = maps_generator(**MAPS_G)
    space = StyleSpace(g)
    flat = space.flat_styles(*noise_latents(g, 5, seed=1))
    maps = random_maps(g, 5, seed=5)
    loc, = localise_attributes(space, ColourSegmenter(), flat, [("b16.conv0", 3, 2.0)], batch_size=2,
                               progress=False, noise=maps)
    with torch.no_grad():
        for i in range(5):
            before = space.render(flat[i : i + 1], noise=own(maps, i))
            after = space.render(space.edit(flat[i : i + 1], [("b16.conv0", 3)], 2.0, mode="add"), noise=own(maps, i))
            assert torch.allclose(loc.before[i], before[0], atol=1e-5)
            assert torch.allclose(loc.after[i], after[0], atol=1e-5)
            assert torch.allclose(loc.effect[i], (after - before).abs().mean(dim=1)[0], atol=1e-5)
        assert (loc.before - space.render(flat)).abs().max() > 1e-2  # constant noise draws other images


# ============================================================================ bad inputs
def test_bad_inputs(tiny):
    seg = ColourSegmenter()
    with pytest.raises(ValueError, match=r"unknown unit layer\(s\) \['b16.torgb'\]; the valid layers are b4.conv1, "):
        dissect(tiny, seg, layers=["b16.torgb"], num_images=2, progress=False)
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        dissect(tiny, seg, num_images=0, progress=False)
    wrong = ColourSegmenter()
    wrong.resolution = 32
    with pytest.raises(ValueError, match="reads 32x32 images but the generator draws 16x16"):
        dissect(tiny, wrong, num_images=2, progress=False)

    class ShortSegmenter(ColourSegmenter):
        def __call__(self, images):
            return super().__call__(images)[:1]

    with pytest.raises(ValueError, match=r"returned masks of shape \(1, 3, 16, 16\) for 2 images"):
        dissect(tiny, ShortSegmenter(), num_images=2, progress=False)
    with pytest.raises(ValueError, match="quantile must be in"):
        dissect(tiny, seg, num_images=2, quantile=0.0, progress=False)
    with pytest.raises(ValueError, match="classes must be"):
        dissect(tiny, seg, num_images=2, classes=[5], progress=False)
    flat = tiny.flat_styles(*noise_latents(tiny.generator, 2))
    with pytest.raises(ValueError, match=r"one per image \(2\)"):
        localise_attributes(tiny, seg, flat, [("b8.conv0", 0, torch.ones(3))], progress=False)
