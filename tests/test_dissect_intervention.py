"""Interventions on the planted generator: unit 0 of ``b16.conv1`` paints a known square, units
1..5 are decoys. Expected figures are computed from the fixture's construction (the square's
pixels and the latents that draw it), not from the code under test."""

import json
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dissect_fixtures import RES, UNITS, PlantedGenerator, SquareClassifier, SquareSegmenter, square_mask

from stylex.dissect import artifacts, edits
from stylex.dissect import intervention as iv
from stylex.stylespace import StyleSpace

LAYER = "b16.conv1"
SQUARE_PIXELS = float(square_mask().float().mean())  # the square's share of an image
DRAW_THRESHOLD = math.atanh(0.5) / 2  # red = -0.6 + 1.6 tanh(2 s0) > 0.2  <=>  s0 > atanh(0.5) / 2


class SoftSquareSegmenter(SquareSegmenter):
    """The square segmenter with a differentiable probability map (sigmoid of red)."""

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        sq = torch.sigmoid(20.0 * (images[:, 0] - 0.2))
        return torch.stack([1 - sq, sq], dim=1)


def soft_square(images: torch.Tensor) -> torch.Tensor:  # [B, 2] soft shares
    sq = torch.sigmoid(20.0 * (images[:, 0] - 0.2)).mean(dim=(1, 2))
    return torch.stack([1 - sq, sq], dim=1)


@pytest.fixture(scope="module")
def space() -> StyleSpace:
    return StyleSpace(PlantedGenerator())


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, PlantedGenerator.w_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def w() -> torch.Tensor:
    return latents(48, 0)


@pytest.fixture(scope="module")
def flat(space, w) -> torch.Tensor:
    return space.flat_styles(w, None)


def concept_means(space, flat, layer, segmenter, concept) -> torch.Tensor:  # [C] k_{u,c}
    """Mean activation of each unit over the layer cells where the concept is present."""
    with torch.no_grad(), space.trace(retain=[layer]) as seen:
        images = space.render(flat)
    act = seen[layer]
    mask = segmenter(images)[:, segmenter.concepts.index(concept)].float()[:, None]
    m = F.interpolate(mask, size=act.shape[-2:], mode="area") > 0.5
    return (act * m).sum(dim=(0, 2, 3)) / m.sum()


# ============================================================================ causal effects
def test_ablating_the_square_unit_removes_the_square(space, w, flat):
    present = (w[:, 0] > DRAW_THRESHOLD).float()
    expected_base = float(present.mean()) * SQUARE_PIXELS
    assert 0.2 < float(present.mean()) < 0.8

    effect = iv.average_causal_effect(space, flat, LAYER, [0], SquareSegmenter(), "square", progress=False)
    assert effect.base_share[0] == pytest.approx(expected_base, abs=1e-4)
    assert effect.ace[0] == pytest.approx(-expected_base, abs=1e-4)
    assert effect.share[0] == pytest.approx(0.0, abs=1e-6)

    units = iv.unit_effects(space, flat, LAYER, SquareSegmenter(), batch_size=20, progress=False)
    sq = units.concepts.index("square")
    assert units.ace.shape == (UNITS, 2)
    assert units.ace[0, sq] == pytest.approx(-expected_base, abs=1e-4)
    assert units.ace[0, units.concepts.index("rest")] == pytest.approx(expected_base, abs=1e-4)
    assert torch.allclose(units.ace[1:, sq], torch.zeros(UNITS - 1), atol=1e-6)  # decoys draw no square
    assert units.ranking("square")[0] == 0
    json.dumps(units.to_json())
    json.dumps(effect.to_json())


def test_single_unit_ace_matches_style_edits(space, flat):
    """The batched sweep equals one plain render per ablated unit (here ablating unit u equals
    zeroing its style, since the unit is relu(style) * pattern)."""
    units = iv.unit_effects(space, flat, LAYER, SquareSegmenter(), concepts=["square"], batch_size=7, progress=False)
    seg = SquareSegmenter()
    for u in range(UNITS):
        edited = space.edit(flat, [(LAYER, u)], 0.0)
        share = seg(space.render(edited))[:, 1].float().mean()
        assert units.share[u, 0] == pytest.approx(float(share), abs=1e-6)


def test_region_ablation_changes_only_the_region(space, flat):
    region = torch.zeros(RES, RES, dtype=torch.bool)
    region[2:8, 3:9] = True  # overlaps the square's corner
    plain = space.render(flat)
    ablated = edits.render_intervened(space, flat, LAYER, list(range(UNITS)), region=region, batch_size=16)
    assert torch.equal(ablated[..., ~region], plain[..., ~region])
    assert not torch.equal(ablated[..., region], plain[..., region])
    with space.trace(edit=edits.ablation_edit(space, LAYER, [0, 2], region=region)):
        traced = space.render(flat)
    assert torch.equal(traced[..., ~region], plain[..., ~region])

    per_image = torch.zeros(flat.shape[0], RES, RES, dtype=torch.bool)
    per_image[::2, :8, :8] = True  # every other image only
    ablated = edits.render_intervened(space, flat, LAYER, list(range(UNITS)), region=per_image, batch_size=10)
    assert torch.equal(ablated[1::2], plain[1::2])
    assert torch.equal(ablated[::2][..., 8:, :], plain[::2][..., 8:, :])


def test_soft_ablation_with_one_hot_alpha_equals_hard_ablation(space, flat):
    region = torch.zeros(RES, RES, dtype=torch.bool)
    region[4:12, 0:8] = True
    for u in (0, 3):
        alpha = torch.zeros(UNITS)
        alpha[u] = 1.0
        for r in (None, region):
            with space.trace(edit=edits.soft_edit(space, LAYER, alpha, region=r)):
                soft = space.render(flat)
            with space.trace(edit=edits.ablation_edit(space, LAYER, [u], region=r)):
                hard = space.render(flat)
            assert torch.equal(soft, hard)


def test_resized_regions():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :2, :3] = 1.0
    near = edits.fit_mask(mask, (4, 4), "nearest")
    area = edits.fit_mask(mask, (4, 4), "area")
    assert set(near.unique().tolist()) <= {0.0, 1.0}
    assert area[0, 0, 0, 1] == pytest.approx(0.5)  # half of that cell's pixels are inside
    assert area[0, 0, 0, 0] == 1.0 and area[0, 0, 1, 0] == 0.0


# ============================================================================ insertion
def test_inserting_the_square_unit_draws_the_square_at_a_location(space, w, flat):
    seg = SquareSegmenter()
    k = concept_means(space, flat, LAYER, seg, "square")
    assert k[0] > DRAW_THRESHOLD
    absent = w[:, 0] <= 0  # no square drawn in these images
    locations = torch.tensor([[7, 6], [9, 8], [2, 13]])  # (x, y): two inside the square's place, one outside
    result = iv.insert_at_locations(space, flat[absent], LAYER, [0], k[:1], seg, "square", locations, size=1,
                                    batch_size=16, progress=False)
    assert result.trials == int(absent.sum()) * 3
    assert result.success_rate == 1.0
    with_r = iv.insert_at_locations(space, flat[absent], LAYER, [0], k, seg, "square", locations, size=0,
                                    tolerance=1.5, progress=False)
    assert with_r.success_rate == 1.0
    json.dumps(result.to_json())

    # Images that already show the square at the location do not count as trials.
    present = w[:, 0] > DRAW_THRESHOLD
    inside = iv.insert_at_locations(space, flat[present], LAYER, [0], k[:1], seg, "square", locations[:1],
                                    progress=False)
    assert inside.trials == 0 and math.isnan(inside.success_rate)

    # The painted pixels: red inside the region, the rest untouched.
    region = torch.zeros(RES, RES, dtype=torch.bool)
    region[11:14, 1:4] = True
    plain = space.render(flat[absent])
    with space.trace(edit=edits.insertion_edit(space, LAYER, [0], k[:1], region=region)):
        painted = space.render(flat[absent])
    assert bool((painted[:, 0][:, region] > 0.2).all())
    assert torch.equal(painted[..., ~region], plain[..., ~region])


# ============================================================================ unit sets and curves
@pytest.fixture(scope="module")
def alpha_ablation(space, flat) -> iv.UnitSet:
    return iv.optimise_unit_set(space, flat, LAYER, SoftSquareSegmenter(), "square", steps=40, lr=0.1,
                                batch_size=16, progress=False)


def test_alpha_optimisation_finds_the_square_unit(alpha_ablation, space, flat):
    result = alpha_ablation
    assert int(result.alpha.argmax()) == 0 and result.ranking()[0] == 0
    assert result.alpha[0] > 0.9
    assert bool((result.alpha[1:] < 0.2).all())
    assert result.objective[-1] < result.objective[0]
    json.dumps(result.to_json())

    by_callable = iv.optimise_unit_set(space, flat, LAYER, SquareSegmenter(), "square", concept_score=soft_square,
                                       steps=10, lr=0.1, progress=False)
    assert by_callable.ranking()[0] == 0

    k = concept_means(space, flat, LAYER, SquareSegmenter(), "square")
    inserted = iv.optimise_unit_set(space, flat, LAYER, SoftSquareSegmenter(), "square", mode="insertion", values=k,
                                    steps=20, lr=0.1, progress=False)
    assert inserted.ranking()[0] == 0


def test_alpha_optimisation_needs_a_differentiable_score(space, flat):
    with pytest.raises(ValueError, match="probabilities"):
        iv.optimise_unit_set(space, flat, LAYER, SquareSegmenter(), "square", steps=1, progress=False)
    with pytest.raises(ValueError, match="insertion needs values"):
        iv.optimise_unit_set(space, flat, LAYER, SoftSquareSegmenter(), "square", mode="insertion", progress=False)


def test_ablation_curve(space, flat, alpha_ablation):
    ace = iv.unit_effects(space, flat, LAYER, SquareSegmenter(), "square", progress=False)
    curve = iv.ablation_curve(space, flat, LAYER, SquareSegmenter(), "square",
                              {"alpha": alpha_ablation.ranking(), "ace": ace.ranking("square"),
                               "iou": [5, 4, 3, 2, 1, 0], "short": [0]},
                              random_draws=3, seed=0, batch_size=32, progress=False)
    assert curve.sizes == [1, 2, 4, 6]
    assert curve.remaining["alpha"][0] == pytest.approx(0.0, abs=1e-6)
    assert curve.remaining["ace"][0] == pytest.approx(0.0, abs=1e-6)
    assert curve.remaining["iou"][:3] == pytest.approx([1.0, 1.0, 1.0])  # the decoys first: nothing removed
    assert curve.remaining["iou"][3] == pytest.approx(0.0, abs=1e-6)
    assert curve.remaining["random"][0] > curve.remaining["alpha"][0] + 0.1
    assert math.isnan(curve.remaining["short"][1])
    json.dumps(curve.to_json())
    assert iv.curve_sizes(512) == [1, 2, 4, 8, 16, 32, 64]
    assert iv.curve_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


# ============================================================================ the classifier link
def test_ablating_the_square_unit_lowers_p_square(space, flat):
    clf = SquareClassifier()
    effect = iv.classifier_effect(space, flat, LAYER, [0], clf, progress=False)
    assert effect.class_names == ["plain", "square"]
    # Independent: unit 0 is relu(s_0) * square, so zeroing its style ablates it.
    with torch.no_grad():
        before = clf(space.render(flat)).mean(dim=0)
        after = clf(space.render(space.edit(flat, [(LAYER, 0)], 0.0))).mean(dim=0)
    assert effect.delta[1] < -0.1
    assert torch.allclose(effect.delta, after - before, atol=1e-5)
    assert torch.allclose(effect.delta.sum(), torch.zeros(()), atol=1e-5)
    json.dumps(effect.to_json())

    decoy = iv.classifier_effect(space, flat, LAYER, [2, 4], clf, progress=False)
    assert torch.allclose(decoy.delta, torch.zeros(2), atol=1e-6)


# ============================================================================ artifact units
class GreenStatistics(nn.Module):
    """A stand-in classifier whose logits read the green channel (where the decoys paint)."""

    num_classes = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        g, r = images[:, 1], images[:, 0]
        return torch.stack([5 * g.mean(dim=(1, 2)), 20 * g.std(dim=(1, 2)), 5 * r.mean(dim=(1, 2)),
                            torch.zeros_like(r[:, 0, 0])], dim=1)


def test_artifact_unit_ranks_first(space):
    real_w = latents(48, 1)
    real_w[:, 3] = 0.0  # real images: decoy 3 never paints
    fake_w = latents(48, 2)
    fake_w[:, 3] = 3.0 + fake_w[:, 3].abs()  # generated ones: decoy 3 paints strongly everywhere
    real = space.render(space.flat_styles(real_w, None))
    result = artifacts.artifact_units(space, space.flat_styles(fake_w, None), LAYER, real, classifier=GreenStatistics(),
                               count=1, random_draws=3, score_images=32, batch_size=32, progress=False)
    assert result.ranking()[0] == 3 and result.top == [3]
    assert result.score[3] > 0
    fid = {name: result.realism[name]["fid"] for name in ("plain", "top", "random")}
    assert fid["top"] < fid["plain"]
    assert fid["top"] < fid["random"]
    assert result.feature.startswith("classifier-probs")
    json.dumps(result.to_json())


# ============================================================================ errors
def test_clear_errors(space, flat):
    seg = SquareSegmenter()
    with pytest.raises(ValueError, match="out of range"):
        iv.average_causal_effect(space, flat, LAYER, [UNITS], seg, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        edits.ablation_edit(space, LAYER, [-1])
    with pytest.raises(ValueError, match="repeat"):
        edits.ablation_edit(space, LAYER, [1, 1])
    with pytest.raises(ValueError, match="unit layer"):
        edits.ablation_edit(space, "b16.torgb", [0])
    with pytest.raises(ValueError, match="region must have shape"):
        edits.ablation_edit(space, LAYER, [0], region=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="region must have shape"):
        edits.render_intervened(space, flat, LAYER, [0], region=torch.ones(2, 3, RES, RES, dtype=torch.bool))
    with pytest.raises(ValueError, match="one mask per image"):
        edits.render_intervened(space, flat, LAYER, [0], region=torch.ones(3, RES, RES, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown concept 'circle'"):
        iv.average_causal_effect(space, flat, LAYER, [0], seg, "circle", progress=False)
    with pytest.raises(ValueError, match="unknown concept"):
        iv.unit_effects(space, flat, LAYER, seg, ["square", "circle"], progress=False)
    with pytest.raises(ValueError, match="styles must be"):
        iv.unit_effects(space, flat[:, :5], LAYER, seg, progress=False)
    with pytest.raises(ValueError, match="alpha must be"):
        edits.soft_edit(space, LAYER, torch.ones(3))
    with pytest.raises(ValueError, match="resize"):
        edits.ablation_edit(space, LAYER, [0], resize="bicubic")
    with pytest.raises(ValueError, match="locations"):
        iv.insert_at_locations(space, flat, LAYER, [0], 1.0, seg, "square", torch.tensor([[RES, 0]]), progress=False)
    with pytest.raises(ValueError, match="not probabilities"):
        iv.classifier_effect(space, flat, LAYER, [0], lambda x: torch.randn(x.shape[0], 3), progress=False)


# ============================================================================ a real generator
def test_batched_sweep_with_prefix_reuse_matches_plain_renders():
    """On the StyleGAN2 generator (which resumes renders from the unit layer), the batched
    single-unit sweep gives the images of one traced render per unit."""
    from stylex.networks import Generator

    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, c_dim=3, resolution=16, channel_base=128, channel_max=16, mapping_layers=2)
    space = StyleSpace(G.eval())
    g = torch.Generator().manual_seed(3)
    flat = space.flat_styles(torch.randn(5, 16, generator=g), torch.softmax(torch.randn(5, 3, generator=g), dim=1))
    layer = "b8.conv1"
    cache: dict = {}
    with torch.no_grad():
        space.render(flat[:1], cache=cache)
    assert layer in cache  # the sweep takes the resumed path
    width = edits.layer_width(space, layer)
    assert edits.layer_resolution(space, layer, flat) == (8, 8)
    alpha = torch.eye(width)
    region = torch.zeros(1, 1, 16, 16)
    region[..., 4:12, 2:10] = 1.0
    for masks in (None, region.expand(width, 1, 16, 16)):
        _, out = edits.sweep(space, flat, layer, alpha, torch.zeros_like(alpha), masks,
                           lambda img, *_: img, None, "area", 7, False, "")
        for u in (0, width // 2, width - 1):
            r = None if masks is None else region[0, 0]
            with torch.no_grad(), space.trace(edit=edits.ablation_edit(space, layer, [u], region=r, resize="area")):
                want = space.render(flat)
            assert torch.allclose(out[u], want, atol=1e-5)
    effect = iv.classifier_effect(space, flat, layer, [0, 1], lambda x: torch.softmax(x.mean(dim=(2, 3)), dim=1),
                                  progress=False)
    assert effect.delta.shape == (3,)


# ============================================================================ noise maps
def test_every_intervened_copy_keeps_its_images_noise_maps():
    """A generator that draws from noise maps (an encoder_noise run): the batched sweep, with and
    without prefix reuse, gives each intervened image the render of that image alone with its own
    maps; so do the classifier link, the α objective and the artifact scores built on it."""
    from dissect_fixtures import maps_generator, own, random_maps

    g = maps_generator(z_dim=16, w_dim=16, c_dim=3, resolution=16, channel_base=128, channel_max=16,
                       mapping_layers=2)
    space = StyleSpace(g)
    gen = torch.Generator().manual_seed(3)
    flat = space.flat_styles(torch.randn(5, 16, generator=gen), torch.softmax(torch.randn(5, 3, generator=gen), dim=1))
    maps = random_maps(g, 5, seed=7)
    layer = "b8.conv1"
    width = edits.layer_width(space, layer)
    units = (0, width // 2, width - 1)

    def alone(i, edit=None):  # image i rendered by itself with its own maps
        with torch.no_grad(), space.trace(edit=edit):
            return space.render(flat[i : i + 1], noise=own(maps, i))

    alpha = torch.eye(width)
    for batch in (12, 2):  # two interventions side by side per render, and batches of two images
        base, out = edits.sweep(space, flat, layer, alpha, torch.zeros_like(alpha), None, lambda img, *_: img,
                                lambda img, *_: img, "nearest", batch, False, "", noise=maps)
        for i in range(5):
            torch.testing.assert_close(base[i], alone(i)[0], atol=1e-5, rtol=0)
            for u in units:
                torch.testing.assert_close(out[u, i], alone(i, edits.ablation_edit(space, layer, [u]))[0],
                                           atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (base - space.render(flat)).abs().max() > 1e-2  # constant noise draws other images

    def clf(x):
        return torch.softmax(4 * x.mean(dim=(2, 3)), dim=1)

    effect = iv.classifier_effect(space, flat, layer, [0, 1], clf, progress=False, noise=maps)
    ablate = edits.ablation_edit(space, layer, [0, 1])
    expected = torch.stack([clf(alone(i, ablate))[0] - clf(alone(i))[0] for i in range(5)]).mean(dim=0)
    torch.testing.assert_close(effect.delta, expected, atol=1e-6, rtol=0)
    const = iv.classifier_effect(space, flat, layer, [0, 1], clf, progress=False)
    assert (const.delta - effect.delta).abs().max() > 1e-4

    # The α objective's first value: E[s~_c] at α = init over every image, plus λ ||α||².
    def score(img):  # soft shares of "red" and "green"
        return torch.stack([img[:, 0].mean(dim=(1, 2)).sigmoid(), img[:, 1].mean(dim=(1, 2)).sigmoid()], dim=1)

    seg = types.SimpleNamespace(concepts=["red", "green"], resolution=16, source="test")
    found = iv.optimise_unit_set(space, flat, layer, seg, "red", concept_score=score, steps=1, batch_size=5,
                                 lam=0.0, progress=False, noise=maps)
    half = edits.soft_edit(space, layer, torch.full((width,), 0.5))
    want = torch.stack([score(alone(i, half))[0, 0] for i in range(5)]).mean()
    assert found.objective[0] == pytest.approx(float(want), abs=1e-6)

    # Artifact scores: the diagonal Fréchet distance of the unablated renders, each with its maps.
    from stylex.metrics.realism import feature_extractor

    real = torch.rand(4, 3, 16, 16) * 2 - 1
    art = artifacts.artifact_units(space, flat, layer, real, classifier=GreenStatistics(), count=1, random_draws=1,
                                   batch_size=3, progress=False, noise=maps)
    features = feature_extractor(GreenStatistics(), resolution=16)
    with torch.no_grad():
        fake = torch.cat([features(alone(i)) for i in range(5)])
        real_f = features(real)
    d = artifacts.diagonal_frechet(fake, real_f.double().mean(0), real_f.double().std(0, correction=0))
    assert art.base_distance == pytest.approx(float(d), rel=1e-5)
    with pytest.raises(ValueError, match="batch 1 or 5"):
        iv.classifier_effect(space, flat, layer, [0], clf, progress=False, noise=random_maps(g, 2, seed=1))
