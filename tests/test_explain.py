"""Explanations: AttFind, its metrics, the visual report, the callback and ``explain.py``."""

from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning import loggers as pl_loggers
from torch import nn

from helpers import REPO, tiny_cfg
from stylex.classifier import Classifier
from stylex.explain import cli
from stylex.explain.attfind import AttFind, AttFindConfig
from stylex.explain.callback import ExplainCallback
from stylex.explain.cli import main
from stylex.explain.drawing import line_plot, pair_panel, toggle_frames
from stylex.explain.factors import (
    GroundTruth,
    class_shift_concentration,
    coordinate_factor_effects,
    factor_changes,
    ground_truth,
    main_factor,
    recovery_purity,
    single_coordinate_bound,
)
from stylex.explain.loggers import log_report, log_to_wandb
from stylex.explain.measures import apply_edits, measure_change, shift_targets
from stylex.explain.metrics import agreement, photometric_sensitivity, sufficiency
from stylex.explain.pipeline import explain_run
from stylex.explain.request import ExplainRequest
from stylex.explain.report import Report, write_report
from stylex.explain.result import greedy_class_ranking
from stylex.export import save_export
from stylex.metrics.probe import FactorProbe, train_factor_probe
from stylex.networks import Encoder, Generator, NoiseInjection
from stylex.stylespace import StyleSpace

G_KW = dict(z_dim=8, w_dim=8, c_dim=2, resolution=16, channel_base=128, channel_max=16, mapping_layers=1)
E_KW = dict(w_dim=8, resolution=16, channel_base=128, channel_max=16)
PLANTED = ("b8.torgb", 5)  # the style coordinate that alone drives the planted classifier


# ============================================================================ a planted model
class RedReader(nn.Module):
    """Logits ``[0, beta * (mean red - tau)]``: class 1 = "redder than tau"."""

    def __init__(self, tau: float = 0.0, beta: float = 1.0) -> None:
        super().__init__()
        self.tau, self.beta = tau, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(r), self.beta * (r - self.tau)], dim=1)


def planted_generator() -> Generator:
    """A generator whose red channel is driven by one style coordinate, ``PLANTED``.

    Every toRGB layer is damped (the other coordinates keep small but non-zero effects); toRGB
    channel 5 of b8 writes red only, and the feature map it reads is a constant (its conv
    weights are zeroed and its bias set), so the image's red mean is linear in that one style.
    """
    torch.manual_seed(0)
    g = Generator(**G_KW).eval().requires_grad_(False)
    layer, ch = PLANTED
    blocks = g.synthesis.blocks
    with torch.no_grad():
        for name, module in g.synthesis.named_layers():
            if name.endswith("torgb"):
                module.conv.weight.mul_(0.3)
        rgb = blocks["b8"].torgb
        rgb.conv.weight[:, ch] = torch.tensor([4.0, 0.0, 0.0]).view(3, 1, 1)
        rgb.affine.weight[ch] *= 3  # a wide spread of that style over images
        conv1 = blocks["b8"].conv1
        conv1.conv.weight[ch] = 0
        conv1.bias[ch] = 1.0
    return g


@pytest.fixture(scope="module")
def planted():
    g = planted_generator()
    space = StyleSpace(g)
    flat = AttFind(g, RedReader()).sample(24, seed=1)
    with torch.no_grad():
        red = space.render(flat)[:, 0].mean(dim=(1, 2))
    clf = RedReader(float(red.median()), 4.0 / float(red.std()))  # both classes, soft probabilities
    return SimpleNamespace(G=g, C=clf, space=space, flat=flat, i=space.index(*PLANTED))


@pytest.fixture(scope="module")
def planted_result(planted):
    return AttFind(planted.G, planted.C).run(planted.flat, top_k=3)


def test_planted_coordinate_is_ranked_first_for_each_class_and_each_image(planted, planted_result):
    for prescreen in (None, 6):
        r = planted_result if prescreen is None else AttFind(
            planted.G, planted.C, AttFindConfig(prescreen=prescreen)).run(planted.flat, top_k=3)
        # Redder = class 1: raising the planted style helps class 1, lowering it helps class 0.
        first = {c: (r.rankings[c][0].coordinate, r.rankings[c][0].direction_name) for c in (0, 1)}
        assert first == {0: (planted.i, "decrease"), 1: (planted.i, "increase")}, prescreen
        assert r.rankings[1][0].probability_change > 5 * abs(r.rankings[1][1].probability_change)
        assert len(r.rankings[0]) == len(r.rankings[1]) == 3
        for n in range(r.num_images):
            (i, d, _), *_ = r.image_topk(n, 3)
            assert i == planted.i, f"image {n}: coordinate {i} ranked first"
            # away from the predicted class: an image predicted red is made less red
            assert d == (0 if int(r.predicted[n]) == 1 else 1)
    # Each class pool holds the images not predicted as that class.
    pred = planted_result.predicted
    assert set(planted_result.pools[1].tolist()) == set(torch.nonzero(pred != 1).flatten().tolist())


def test_prescreening_agrees_with_the_exhaustive_search_on_the_planted_model(planted, planted_result):
    screened = AttFind(planted.G, planted.C, AttFindConfig(prescreen=6)).run(planted.flat, top_k=3)
    assert screened.mode == "prescreen"
    # Far fewer edits rendered, and those rendered are exactly the exhaustive values.
    assert screened.evaluated.sum() < 0.2 * planted_result.evaluated.sum()
    m = screened.evaluated
    torch.testing.assert_close(screened.logp[m], planted_result.logp[m], atol=1e-5, rtol=0)
    a = agreement(screened, planted_result, k=1)
    assert a["class_top1"] == 1.0 and a["image_top1"] == 1.0


def test_conv_layers_leave_the_to_rgb_styles_out_of_the_search_and_the_baselines(planted, planted_result):
    from stylex.explain.metrics import random_rankings, variance_rankings
    from stylex.explain.result import searched_coordinates

    torgb = torch.zeros(planted.space.dim, dtype=torch.bool)
    for name in planted.space.layer_names:
        if name.endswith(".torgb"):
            torgb[planted.space.layer_slice(name)] = True
    assert torgb[planted.i] and 0 < int(torgb.sum()) < planted.space.dim
    assert torch.equal(searched_coordinates(planted.space, "conv"), ~torgb)
    assert bool(searched_coordinates(planted.space, "all").all())
    k = 3
    conv = AttFind(planted.G, planted.C, AttFindConfig(layers="conv")).run(planted.flat, top_k=k)
    # No to-RGB pair is rendered; every convolution pair is, with the values of the full search.
    assert not conv.evaluated[:, torgb].any() and bool(conv.evaluated[:, ~torgb].all())
    m = conv.evaluated
    torch.testing.assert_close(conv.logp[m], planted_result.logp[m], atol=1e-5, rtol=0)
    # The planted (to-RGB) coordinate that tops the full search is gone; each class ranking is the
    # greedy ranking of the full search's effects with the to-RGB coordinates taken out.
    eff = planted_result.effects().clone()
    eff[:, torgb] = math.nan
    for c in (0, 1):
        ranked = [(a.coordinate, a.direction) for a in conv.rankings[c]]
        assert len(ranked) == k and not any(torgb[i] for i, _ in ranked)
        pool = conv.pools[c]
        need = (0.5 - conv.probs[pool, c]).clamp_min(0.0)
        assert ranked == greedy_class_ranking(eff[pool][..., c], need, k)
    for n in range(conv.num_images):
        assert all(not torgb[i] for i, _, _ in conv.image_topk(n, k))
    # Pre-screening never proposes a to-RGB pair either.
    screened = AttFind(planted.G, planted.C, AttFindConfig(layers="conv", prescreen=4)).run(planted.flat, top_k=k)
    assert screened.evaluated.any() and not screened.evaluated[:, torgb].any()
    # The flip-rate baselines draw from the same coordinates.
    for coords, _ in (random_rankings(conv.flat, conv.targets, 10, 0, conv.searched),
                      variance_rankings(conv.flat, conv.targets, 10, None, conv.searched)):
        assert not torgb[coords].any()
    assert torgb[variance_rankings(conv.flat, conv.targets, 10)[0]].any()  # the planted spread, unrestricted
    with pytest.raises(ValueError, match="layers must be one of"):
        AttFindConfig(layers="rgb")


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.LeakyReLU(0.2), nn.Flatten(), nn.LazyLinear(3)).eval()


def test_prefix_reuse_and_batching_give_the_naive_effects():
    torch.manual_seed(1)
    g = Generator(**{**G_KW, "c_dim": 3}).eval().requires_grad_(False)
    for m in g.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.3)  # constant noise must be reproduced by resumed renders
    clf = _tiny_classifier()
    clf(torch.zeros(1, 3, 16, 16))  # materialise the lazy layer
    space = StyleSpace(g)
    finder = AttFind(g, clf)
    flat = finder.sample(6, seed=2)
    stats = space.statistics(flat)
    images = flat[:2]
    targets = shift_targets(images, stats["min"], stats["max"], 0.7)

    # Naive: one coordinate at a time, full renders, through StyleSpace.edit.
    naive = torch.empty(2, space.dim, 2, 3)
    with torch.no_grad():
        base = clf(space.render(images)).log_softmax(-1)
        for n in range(2):
            for i in range(space.dim):
                for d in range(2):
                    edited = space.edit(images[n : n + 1], [i], [float(targets[n, i, d])])
                    naive[n, i, d] = clf(space.render(edited)).log_softmax(-1)[0]

    # Batches of 7 mix both images' edits, merge small layers and split large ones.
    for cfg in (AttFindConfig(shift_size=0.7, batch_size=7),
                AttFindConfig(shift_size=0.7, batch_size=64, reuse_prefix=False)):
        r = AttFind(g, clf, cfg).run(images, top_k=2, reference=flat, images_per_step=2)
        torch.testing.assert_close(r.logp_base, base, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.logp, naive, atol=1e-5, rtol=0)

    # The same search through Lightning's predict loop (the multi-device path) agrees too,
    # pre-screening phase included.
    cfg = AttFindConfig(shift_size=0.7, prescreen=5)
    plain = AttFind(g, clf, cfg).run(images, top_k=2, reference=flat)
    via_trainer = AttFind(g, clf, cfg).run(images, top_k=2, reference=flat,
                                           trainer_kwargs={"accelerator": "cpu", "devices": 1})
    assert torch.equal(plain.evaluated, via_trainer.evaluated)
    torch.testing.assert_close(via_trainer.logp, plain.logp, atol=1e-6, rtol=0, equal_nan=True)


def test_probability_jacobian_matches_autograd(planted):
    finder = AttFind(planted.G, planted.C)
    x = planted.flat[:2]
    _, jac = finder.evaluator.probability_jacobian(x)
    for n in range(2):
        def probs(s):
            return planted.C(planted.space.render(s[None])).softmax(-1)[0]

        expected = torch.autograd.functional.jacobian(probs, x[n])  # [K, S]
        torch.testing.assert_close(jac[n], expected, atol=1e-6, rtol=1e-4)


def _maps_generator():
    """A generator whose noise inputs matter (strength 0.5), a classifier of 3 classes, 4 images'
    styles and their own noise maps."""
    torch.manual_seed(5)
    g = Generator(**{**G_KW, "c_dim": 3}).eval().requires_grad_(False)
    for m in g.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.5)
    clf = _tiny_classifier()
    clf(torch.zeros(1, 3, 16, 16))
    flat = AttFind(g, clf).sample(4, seed=4)
    gen = torch.Generator().manual_seed(6)
    maps = {name: torch.randn(4, 1, r, r, generator=gen) for name, r in g.noise_layers}
    return g, clf, flat, maps


def test_each_image_keeps_its_own_noise_maps_in_every_edit_and_gradient():
    g, clf, flat, maps = _maps_generator()
    space = StyleSpace(g)
    stats = space.statistics(flat)
    targets = shift_targets(flat, stats["min"], stats["max"], 1.0)

    def own(n):
        return {name: m[n : n + 1] for name, m in maps.items()}

    # Naive: image by image, full renders with that image's maps.
    naive = torch.empty(4, space.dim, 2, 3)
    with torch.no_grad():
        base = torch.cat([clf(space.render(flat[n : n + 1], noise=own(n))).log_softmax(-1) for n in range(4)])
        for n in range(4):
            rows = []
            for i in range(space.dim):
                for d in range(2):
                    rows.append(space.edit(flat[n : n + 1], [i], [float(targets[n, i, d])]))
            naive[n] = clf(space.render(torch.cat(rows), noise=own(n))).log_softmax(-1).view(space.dim, 2, 3)
        const = clf(space.render(flat)).log_softmax(-1)
    assert (base - const).abs().max() > 1e-3  # the maps change what the classifier sees

    # Batches mixing the edits of different images, with and without prefix reuse.
    for cfg in (AttFindConfig(batch_size=7), AttFindConfig(batch_size=64, reuse_prefix=False)):
        r = AttFind(g, clf, cfg).run(flat, top_k=2, noise=maps, images_per_step=3)
        torch.testing.assert_close(r.logp_base, base, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.logp, naive, atol=1e-5, rtol=0)
        assert r.noise is not None and torch.equal(r.noise["b4.conv1"], maps["b4.conv1"])

    # Pre-screening's gradients use the maps too: each image's Jacobian is its own.
    _, jac = AttFind(g, clf, AttFindConfig(batch_size=16)).evaluator.probability_jacobian(flat, maps)
    for n in (0, 3):
        expected = torch.autograd.functional.jacobian(
            lambda s: clf(space.render(s[None], noise=own(n))).softmax(-1)[0], flat[n])
        torch.testing.assert_close(jac[n], expected, atol=1e-6, rtol=1e-4)

    with pytest.raises(ValueError, match="batch 1 or 4"):
        AttFind(g, clf).run(flat, top_k=2, noise={name: m[:2] for name, m in maps.items()})


def test_flip_rates_and_report_renders_use_each_images_noise_maps(tmp_path):
    g, clf, flat, maps = _maps_generator()
    space = StyleSpace(g)
    finder = AttFind(g, clf)
    r = finder.run(flat, top_k=2, noise=maps)
    suff = sufficiency(r, finder.evaluator, ks=[1, 2], realism=False)
    # Independently: each stable image with its top-k image attributes applied, rendered alone.
    keep = torch.nonzero(r.stable).flatten().tolist()
    for j, k in enumerate([1, 2]):
        flips = []
        with torch.no_grad():
            for n in keep:
                tops = r.image_topk(n, k)
                edited = apply_edits(r.flat[n : n + 1], r.targets[n : n + 1], torch.tensor([[i for i, _, _ in tops]]),
                                     torch.tensor([[d for _, d, _ in tops]]))
                one = {name: m[n : n + 1] for name, m in maps.items()}
                flips.append(int(clf(space.render(edited, noise=one)).argmax()) != int(r.predicted[n]))
        assert suff.curves["attfind"][j] == pytest.approx(sum(flips) / len(flips))
    # The report's before/after renders are the images' own.
    from stylex.explain.report import render_attribute

    a = r.rankings[0][0]
    idx = torch.tensor([2, 0])
    before, after, _, _ = render_attribute(r, finder.evaluator, a, idx, 0)
    with torch.no_grad():
        expected = space.render(r.flat[idx], noise={name: m[idx] for name, m in maps.items()})
    torch.testing.assert_close(before, expected, atol=1e-5, rtol=0)


def test_noise_rows_keeps_shared_maps_and_noise_cat_joins_batches():
    from stylex.stylespace import noise_cat, noise_rows

    maps = {"a": torch.arange(3.0).view(3, 1, 1, 1), "shared": torch.full((1, 1, 2, 2), 7.0)}
    picked = noise_rows(maps, torch.tensor([2, 2, 0]))
    assert picked["a"].flatten().tolist() == [2.0, 2.0, 0.0] and picked["shared"].shape[0] == 1
    assert noise_rows(maps, slice(1, 3))["a"].flatten().tolist() == [1.0, 2.0]
    assert noise_rows(None, torch.tensor([0])) is None
    joined = noise_cat([{"a": maps["a"][:1]}, {"a": maps["a"][1:]}])
    assert torch.equal(joined["a"], maps["a"]) and noise_cat([None, None]) is None
    with pytest.raises(ValueError, match="with and without"):
        noise_cat([{"a": maps["a"]}, None])


def test_greedy_ranking_moves_on_to_images_not_yet_explained():
    # Pair (0, up) helps images 0-1 a lot; (1, up) helps everyone a little; (2, up) helps 2-3.
    eff = torch.zeros(4, 3, 2)
    eff[:2, 0, 1] = 1.0
    eff[:, 1, 1] = 0.45
    eff[2:, 2, 1] = 0.8
    need = torch.full((4,), 0.9)
    # Step 1 takes coordinate 0 (mean 0.5) and explains images 0-1; step 2 serves images 2-3
    # with coordinate 2 although coordinate 1 has the larger mean over all images.
    assert greedy_class_ranking(eff, need, 3) == [(0, 1), (2, 1), (1, 1)]
    # Without the cap (nothing is ever explained) the plain mean order comes out.
    assert greedy_class_ranking(eff, torch.full((4,), math.inf), 3) == [(0, 1), (1, 1), (2, 1)]
    # Pairs not rendered on every image never compete.
    eff[3, 0, 1] = float("nan")
    assert greedy_class_ranking(eff, need, 1) == [(1, 1)]


def test_unstable_images_are_left_out(planted):
    finder = AttFind(planted.G, planted.C, AttFindConfig(unstable_threshold=0.3, unstable_count=2))
    n, s = 4, planted.space.dim
    flat = planted.flat[:n]
    logp_base = torch.tensor([[0.8, 0.2]] * n).log()
    logp = logp_base[:, None, None, :].repeat(1, s, 2, 1)
    logp[0, :3, 1] = torch.tensor([0.2, 0.8]).log()  # image 0: three coordinates flip it
    logp[1, 0, 1] = torch.tensor([0.2, 0.8]).log()  # image 1: two (allowed)
    logp[1, 1, 1] = torch.tensor([0.45, 0.55]).log()
    logp[2, 7, 0] = torch.tensor([0.6, 0.4]).log()  # below the threshold
    targets = torch.zeros(n, s, 2)
    r = finder.rank(flat, targets, logp_base, logp, top_k=1)
    assert r.sensitive.tolist() == [3, 2, 0, 0]
    assert r.stable.tolist() == [False, True, True, True]
    assert 0 not in r.pools[1].tolist()
    # Over the stable images coordinate 0 raises class 1 by 0.6 on image 1 only: mean 0.2;
    # coordinate 1 by 0.35 (mean 0.117), coordinate 7 by 0.2 (mean 0.067).
    a = r.rankings[1][0]
    assert (a.coordinate, a.direction) == (0, 1)
    assert a.probability_change == pytest.approx(0.6 / 3, abs=1e-6)
    assert a.share_affected == pytest.approx(1 / 3)


def test_logit_measure_is_the_one_vs_rest_log_odds():
    p_base = torch.tensor([[0.7, 0.2, 0.1]])
    p_edit = torch.tensor([[[0.3, 0.3, 0.4]]])
    got = measure_change(p_edit.log(), p_base.log(), "logit")[0, 0]
    expected = torch.log(p_edit[0, 0] / (1 - p_edit[0, 0])) - torch.log(p_base[0] / (1 - p_base[0]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(measure_change(p_edit.log(), p_base.log(), "prob")[0, 0], p_edit[0, 0] - p_base[0])
    # Saturated probabilities stay finite.
    sat = torch.tensor([[0.0, -80.0]])
    assert torch.isfinite(measure_change(sat[:, None], torch.tensor([[-80.0, 0.0]]), "logit")).all()


# ============================================================================ metrics
def test_flip_rate_matches_direct_edits(planted, planted_result):
    r, space = planted_result, planted.space
    suff = sufficiency(r, AttFind(planted.G, planted.C).evaluator, ks=[1, 2, 3])
    # Independently: move the planted coordinate away from each image's class and classify.
    flips = []
    with torch.no_grad():
        for n in torch.nonzero(r.stable).flatten().tolist():
            d = 0 if int(r.predicted[n]) == 1 else 1
            edited = space.edit(r.flat[n : n + 1], [planted.i], [float(r.targets[n, planted.i, d])])
            flips.append(int(planted.C(space.render(edited)).argmax()) != int(r.predicted[n]))
    assert suff.curves["attfind"][0] == pytest.approx(sum(flips) / len(flips))
    assert suff.curves["attfind"][0] > 0.5
    # Coordinates picked without the classifier almost never hit the planted one.
    assert suff.curves["random"][0] < suff.curves["attfind"][0]


class PooledRedReader(nn.Module):
    """RedReader behind the interface of a timm :class:`Classifier` (``preprocess`` and a ``model``
    with ``forward_features`` / ``forward_head``), whose pooled features are the channel means of
    the clamped image: the feature space the realism figures measure in."""

    arch = "channel-means"

    def __init__(self, reader: RedReader) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.num_features = 3
        self.model.forward_features = lambda x: x
        self.model.forward_head = lambda x, pre_logits=False: (
            x.clamp(-1, 1).mean(dim=(2, 3)) if pre_logits else reader(x))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(self.preprocess(x)))


def test_kid_and_agreement_beside_the_flip_rate_on_a_planted_case(planted, tmp_path):
    # Real images: renders of other styles of the same generator (on its manifold). The planted
    # edits move the red style to its extremes, off the distribution of ordinary renders.
    clf = PooledRedReader(planted.C)
    finder = AttFind(planted.G, clf)
    result = finder.run(planted.flat, top_k=2)
    with torch.no_grad():
        real = planted.space.render(finder.sample(48, seed=7))
        inputs = planted.space.render(result.flat)
    inputs[::3] = -inputs[::3]  # a third of the "real inputs" differ from what their styles render
    suff = sufficiency(result, finder.evaluator, ks=[1, 2], inputs=inputs, real_images=real)
    keep = torch.nonzero(result.stable).flatten()
    r = suff.realism
    assert r["feature"] == "classifier:channel-means" and r["k"] == 2
    assert r["num_real"] == 48 and r["num_images"] == keep.numel() == suff.num_images
    assert r["kid_edited"] > r["kid_unedited"] + 0.1  # about 0 unedited: the renders' own distribution
    with torch.no_grad():
        expected = (clf(inputs[keep]).argmax(1) == result.predicted[keep]).double().mean()
    assert suff.agreement == pytest.approx(float(expected)) and 0 < suff.agreement < 1
    rep = write_report(tmp_path, result, finder.evaluator, ["pale", "red"], examples=1, sufficiency=suff)
    data = json.loads(rep.json.read_text())["flip_rate"]
    assert data["realism"] == r and data["agreement"] == suff.agreement and data["notes"] == []
    html = rep.html.read_text()
    assert "leaving the data manifold" in html and "classifier:channel-means" in html
    # Generated sources: no real inputs, which the figures say instead of inventing an agreement;
    # a classifier without timm features is measured in its class probabilities.
    alone = sufficiency(result, AttFind(planted.G, planted.C).evaluator, ks=[1])
    assert alone.realism is None and alone.agreement is None
    assert any("no real inputs" in n for n in alone.notes) and any("KID not measured" in n for n in alone.notes)
    probs = sufficiency(result, AttFind(planted.G, planted.C).evaluator, ks=[1], real_images=real)
    assert probs.realism["feature"] == "classifier-probs:RedReader" and probs.agreement is None
    # A realism network of its own (classifier.feature_checkpoint) reads the KID: one blind to
    # everything (constant features) sees no difference between edited and unedited renders.
    blind = PooledRedReader(planted.C)
    blind.model.forward_head = lambda x, pre_logits=False: x.mean(dim=(2, 3)) * 0 if pre_logits else planted.C(x)
    judged = sufficiency(result, finder.evaluator, ks=[1, 2], inputs=inputs, real_images=real,
                         feature_classifier=blind).realism
    assert judged["feature"] == "feature-net:channel-means"
    assert judged["kid_edited"] == pytest.approx(0.0, abs=1e-6) and judged["kid_unedited"] == pytest.approx(0.0, abs=1e-6)


def test_apply_edits_changes_exactly_the_listed_coordinates():
    flat = torch.randn(3, 10)
    targets = torch.randn(3, 10, 2)
    coords = torch.tensor([[2, 5], [0, -1], [-1, -1]])
    dirs = torch.tensor([[1, 0], [0, 1], [0, 0]])
    out = apply_edits(flat, targets, coords, dirs)
    expected = flat.clone()
    expected[0, 2], expected[0, 5], expected[1, 0] = targets[0, 2, 1], targets[0, 5, 0], targets[1, 0, 0]
    assert torch.equal(out, expected)


def test_recovery_and_purity():
    causal = ["exudates", "haemorrhages"]
    assert recovery_purity(["exudates", "hue", "exudates", None], causal) == (0.5, 0.5)
    assert recovery_purity(["haemorrhages", "exudates"], causal) == (1.0, 1.0)
    assert recovery_purity(["hue"], causal) == (0.0, 0.0)


def test_ground_truth_scores_at_another_threshold_reread_the_main_factors():
    causal = ["exudates", "haemorrhages"]
    changes = {0: [{"haemorrhages": 0.2, "hue": 0.1}, {"hue": 0.3, "exudates": 0.05}],
               1: [{"exudates": 0.12, "hue": 0.04}]}
    per_class = {c: {"changes": ch} for c, ch in changes.items()}
    gt = GroundTruth(per_class=per_class, recovery=0.0, purity=0.0, probe_r2={}, readable=["exudates", "hue",
                     "haemorrhages"], causal=causal)
    # >= 0.25: only "hue" (0.3) counts; >= 0.1: haemorrhages, hue and exudates
    assert gt.scores_at(0.25) == recovery_purity([None, "hue", None], causal) == (0.0, 0.0)
    assert gt.scores_at(0.1) == (1.0, pytest.approx(2 / 3))
    gt.readable = ["hue"]  # a factor the probe cannot read is never a main factor
    assert gt.scores_at(0.01) == (0.0, 0.0)


class ChannelProbe(FactorProbe):
    """A probe without training: "exudates" = mean red, "hue" = mean green."""

    def __init__(self) -> None:
        super().__init__(["exudates", "hue"], width=1)
        self.r2 = {"exudates": 1.0, "hue": 1.0}
        self.std.fill_(0.05)

    def read(self, images):
        return images[:, :2].mean(dim=(2, 3))


def test_ground_truth_attributes_the_planted_coordinate_to_its_factor(planted, planted_result):
    gt = ground_truth(planted_result, AttFind(planted.G, planted.C).evaluator, ChannelProbe())
    for c in (0, 1):
        assert gt.per_class[c]["factors"][0] == "exudates"  # the planted coordinate paints red
        assert gt.per_class[c]["changes"][0]["exudates"] > 10 * gt.per_class[c]["changes"][1]["exudates"]
    assert gt.recovery == 0.5  # "haemorrhages" is never found
    factors = [f for c in (0, 1) for f in gt.per_class[c]["factors"]]
    assert gt.purity == pytest.approx(sum(f == "exudates" for f in factors) / len(factors))


def test_class_shift_concentration_finds_the_one_coordinate_that_carries_the_class():
    g = planted_generator()
    space = StyleSpace(g)
    planted_index = space.index(*PLANTED)
    layer, ch = PLANTED
    with torch.no_grad():  # the class reaches the planted coordinate only
        for _, module in g.synthesis.named_layers():
            module.affine.weight[:, g.w_dim:] = 0
        g.synthesis.blocks[layer.split(".")[0]].torgb.affine.weight[ch, g.w_dim + 1] = 20.0
    probe = ChannelProbe()
    out = class_shift_concentration(g, probe, counts=(1, 5), num=16, seed=3)
    row = out["classes"][1]
    assert row["top_coordinates"][0] == planted_index
    # Independently: the same samples rendered under each one-hot class, read by the probe.
    z = torch.randn(16, g.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        w = g.mapping(z, truncation_psi=1.0, update_w_avg=False)
        eye = torch.eye(2)
        reds = [g.generate(w, eye[k].expand(16, 2), noise_mode="const").clamp(-1, 1)[:, 0].mean(dim=(1, 2))
                for k in (0, 1)]
    expected = float((reds[1] - reds[0]).mean()) / 0.05
    assert abs(expected) > 1.0
    for m in (1, 5, space.dim):
        assert row["changes"][m]["exudates"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert set(row["changes"]) == {1, 5, space.dim}
    with pytest.raises(ValueError, match="at least two classes"):
        class_shift_concentration(Generator(**{**G_KW, "c_dim": 0}), probe)


def test_every_coordinate_alone_gives_the_bound_on_recovery_and_finds_the_planted_one(planted, planted_result):
    g, probe = planted.G, ChannelProbe()
    space = StyleSpace(g)
    planted_index = space.index(*PLANTED)
    flat, targets = planted_result.flat[:6], planted_result.targets[:6]
    coords = torch.tensor([0, 7, planted_index, space.dim - 1])
    effects = coordinate_factor_effects(g, probe, flat, targets, coords, batch_size=5)
    assert effects.shape == (4, 2, 2)
    # Independently: each edit applied and rendered in full, read by the probe.
    with torch.no_grad():
        before = probe.read(space.render(flat).clamp(-1, 1))
        for i, c in enumerate(coords.tolist()):
            for d in (0, 1):
                edited = apply_edits(flat, targets, torch.full((6, 1), c), torch.full((6, 1), d))
                after = probe.read(space.render(edited).clamp(-1, 1))
                torch.testing.assert_close(effects[i, d], ((after - before) / probe.std).mean(0), atol=1e-4, rtol=1e-4)
    bound = single_coordinate_bound({1: effects}, probe.factor_names, ["exudates", "hue"],
                                    ["exudates", "haemorrhages"], min_effect=0.25, coords=coords)
    assert bound["recovery_bound"] == 0.5  # the probe has no "haemorrhages"
    best = bound["classes"][1]["exudates"]
    assert best["coordinate"] == planted_index and best["main_factor"] == "exudates"
    assert best["change"] == pytest.approx(float(effects[2, best["direction"], 0].abs()))
    assert best["coordinates_with_it_as_main_factor"] >= 1
    strict = single_coordinate_bound({1: effects}, probe.factor_names, ["exudates", "hue"], ["exudates"],
                                     min_effect=best["change"] + 1.0, coords=coords)
    assert strict["recovery_bound"] == 0.0  # no edit moves it that far


class _HalvesReader(nn.Module):
    """Class 1 when the top half is brighter than the bottom half: blind to global shifts."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2] // 2
        d = x[..., :h, :].mean(dim=(1, 2, 3)) - x[..., h:, :].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(d), 50 * d], dim=1) + self.dummy


def test_photometric_sensitivity_counts_the_prediction_changes_of_global_image_changes():
    torch.manual_seed(0)
    x = torch.rand(200, 3, 8, 8) * 1.2 - 0.6  # within [-0.6, 0.6], so a 0.2 shift is never clipped
    mean_reader = RedReader(tau=0.0, beta=50.0)  # class 1 when the red mean is above 0
    flips = photometric_sensitivity(mean_reader, x)
    red = x[:, 0].mean(dim=(1, 2))
    assert flips["darker by 0.2"] == pytest.approx(float(((red > 0) & (red - 0.2 <= 0)).float().mean()))
    assert flips["brighter by 0.2"] == pytest.approx(float(((red <= 0) & (red + 0.2 > 0)).float().mean()))
    assert flips["contrast x 0.7"] == 0.0  # the sign of the red mean survives scaling
    assert flips["darker by 0.2"] > 0.05
    planted = x.clone()  # a local structure decides the class: global changes move nothing
    planted[:, :, :4] += torch.where(torch.rand(200) < 0.5, 0.3, -0.3)[:, None, None, None]
    planted = planted.clamp(-0.7, 0.7)
    local = photometric_sensitivity(_HalvesReader(), planted)
    for name in ("darker by 0.2", "brighter by 0.2", "contrast x 0.7", "yellow tint 0.2"):
        assert local[name] == 0.0, (name, local)


def test_factor_probe_names_the_factor_an_edit_changes():
    from stylex.data.synthetic import render_scene, sample_factors

    probe = train_factor_probe(16, num_train=640, num_val=128, epochs=5, factor_names=["brightness", "disc_x"])
    assert probe.r2["disc_x"] > 0.6 and probe.r2["brightness"] > 0.4, probe.r2
    rng = np.random.default_rng(0)

    def image(f):
        return torch.from_numpy(render_scene(f, 16)[0]).permute(2, 0, 1).float() / 127.5 - 1

    scenes = [sample_factors(rng) for _ in range(12)]
    for s in scenes:
        s.update(brightness=0.85, disc_x=-0.45)
    before = torch.stack([image(s) for s in scenes])
    moved = torch.stack([image({**s, "disc_x": 0.45}) for s in scenes])
    brighter = torch.stack([image({**s, "brightness": 1.15}) for s in scenes])
    readable = probe.readable(0.4)
    assert main_factor(factor_changes(probe, before, moved), readable) == "disc_x"
    assert main_factor(factor_changes(probe, before, brighter), readable) == "brightness"
    assert main_factor(factor_changes(probe, before, before), readable) is None


# ============================================================================ report
def _rgb(pil: Image.Image) -> np.ndarray:
    return np.asarray(pil.convert("RGB")).astype(np.int64)


def _tile_of(img: torch.Tensor, scale: int) -> np.ndarray:
    up = ((img.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int64)
    return up.repeat(scale, 0).repeat(scale, 1)


def test_pair_panel_shows_input_reconstruction_edit_and_change_with_labels():
    torch.manual_seed(0)
    orig = torch.rand(2, 3, 8, 8) * 2 - 1
    mod = orig.clone()
    mod[:, :, :4, :4] = -orig[:, :, :4, :4]  # the edit changes the top-left quarter only
    real = torch.rand(2, 3, 8, 8) * 2 - 1
    panel = pair_panel(orig, mod, [0.1, 0.2], [0.9, 0.8], ["title"], tile=64, inputs=real, p_inputs=[0.3, 0.4])
    arr = _rgb(panel)
    band = arr.shape[0] - 64
    # Layout per example: input 64 | 2 | recon 64 | 2 | edited 64 | 2 | change 64 | 14.
    group = 4 * 64 + 3 * 2 + 14
    for j in range(2):
        x0 = j * group
        tiles = [arr[band:, x0 + t * 66: x0 + t * 66 + 64] for t in range(4)]
        for tile, img in zip(tiles[:3], [real[j], orig[j], mod[j]]):
            up = _tile_of(img, 8)
            assert np.array_equal(tile[32:, 32:], up[32:, 32:])  # away from the label: the image itself
            assert not np.array_equal(tile[:12, :30], up[:12, :30])  # the probability label is drawn
        # The change map: black where nothing changed, bright where the edit acted.
        change = tiles[3]
        assert change[40:, 40:].max() == 0
        v = ((mod[j] - orig[j]).abs().mean(0) / 0.5).clamp(0, 1)
        red = (3 * v).clamp(0, 1)[:4, :4]
        expect = ((red * 2 - 1 + 1) * 127.5).round().numpy().astype(np.int64).repeat(8, 0).repeat(8, 1)
        assert np.array_equal(change[24:32, 0:32, 0], expect[24:32, 0:32])
    # Without real inputs (generated images) a group is render | edited | change.
    assert pair_panel(orig, mod, [0.1, 0.2], [0.9, 0.8], ["t"], tile=64).width == 2 * (3 * 64 + 2 * 2 + 14) - 14
    # More examples than fit a row wrap onto the next one: four examples, two rows of two.
    four = pair_panel(orig.repeat(2, 1, 1, 1), mod.repeat(2, 1, 1, 1), [0.1] * 4, [0.9] * 4, ["t"], tile=64,
                      per_row=2)
    two = pair_panel(orig, mod, [0.1, 0.2], [0.9, 0.8], ["t"], tile=64)
    assert four.width == two.width and four.height == two.height + 64 + 8
    frames = toggle_frames(orig, mod, [0.1, 0.2], [0.9, 0.8], ["t"], tile=64)
    assert len(frames) == 2 and frames[0].size == frames[1].size
    assert not np.array_equal(_rgb(frames[0]), _rgb(frames[1]))


def test_line_plot_draws_each_curve_at_its_values():
    img = _rgb(line_plot([1, 2, 3], {"attfind": [1.0, 1.0, 1.0], "random": [0.0, 0.0, 0.0]}))
    red = np.all(img == (214, 39, 40), axis=-1)
    grey = np.all(img == (120, 120, 120), axis=-1)
    red_rows = np.nonzero(red[:, 100:480].any(axis=1))[0]
    grey_rows = np.nonzero(grey[:, 100:480].any(axis=1))[0]
    # y = 1 sits at the top of the axes, y = 0 at the bottom.
    assert red_rows.mean() < 60 and grey_rows.mean() > 340


def test_report_files_and_self_contained_html(planted, planted_result, tmp_path):
    finder = AttFind(planted.G, planted.C)
    suff = sufficiency(planted_result, finder.evaluator, ks=[1, 2])
    rep = write_report(tmp_path, planted_result, finder.evaluator, ["pale", "red"], examples=3,
                       sufficiency=suff, image_panels=[0, 1])
    data = json.loads(rep.json.read_text())
    assert [a["coordinate"] for a in data["classes"]["red"]["attributes"]][:1] == [planted.i]
    for cls in data["classes"].values():
        assert len(cls["attributes"]) == 3
        for a in cls["attributes"]:
            assert (tmp_path / a["panel"]).is_file() and (tmp_path / a["gif"]).is_file()
            with Image.open(tmp_path / a["gif"]) as gif:
                assert gif.n_frames == 2 and gif.info.get("loop") == 0
    assert len(data["images"]) == planted_result.num_images
    assert data["images"][0]["top_attributes"][0]["coordinate"] == planted.i
    assert data["flip_rate"]["attfind"] == suff.curves["attfind"]
    html = rep.html.read_text()
    uris = re.findall(r"src='(data:image/(?:png|gif);base64,[^']+)'", html)
    assert len(uris) == 2 * 6 + 1 + 2  # panels and GIFs, the plot, two image panels
    assert "src='panels/" not in html and "src='gifs/" not in html
    first_panel = (tmp_path / data["classes"]["pale"]["attributes"][0]["panel"]).read_bytes()
    assert base64.b64encode(first_panel).decode() in html


def test_report_shows_real_inputs_run_figures_and_what_columns_mean(planted, planted_result, tmp_path):
    from stylex.explain.pipeline import read_run_figures

    finder = AttFind(planted.G, planted.C)
    torch.manual_seed(1)
    real = torch.rand(planted_result.num_images, 3, planted.G.resolution, planted.G.resolution) * 2 - 1
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({
        "classifier_metrics": {"val_acc": 0.875, "val_balanced_acc": 0.8},
        "encoder_fit": {"recon_l1_before": 0.3, "recon_l1_after": 0.125, "agreement_after": 0.96},
        "val/recon_l1": 0.3, "val/fid": 12.5, "quality": {"feature": "classifier:resnet10t"}}))
    figures = read_run_figures(tmp_path / "run")
    # The encoder fit's final figures win over the last validation's.
    assert figures["recon_l1"] == 0.125 and figures["agreement"] == 0.96 and figures["classifier_val_acc"] == 0.875
    assert read_run_figures(tmp_path / "nowhere") == {}
    with_inputs = write_report(tmp_path / "a", planted_result, finder.evaluator, ["pale", "red"], examples=2,
                               inputs=real, settings={"measure": "prob", "affect_threshold": 0.1},
                               sections={"run": figures})
    without = write_report(tmp_path / "b", planted_result, finder.evaluator, ["pale", "red"], examples=2)
    key = (1, 1)
    n_examples = len(json.loads(with_inputs.json.read_text())["classes"]["red"]["attributes"][0]["examples"])
    with Image.open(with_inputs.panels[key]) as a, Image.open(without.panels[key]) as b:
        # Per example one more tile (the real input, 128 px and a 2 px gap).
        assert a.width - b.width == n_examples * (128 + 2)
    page = with_inputs.html.read_text()
    assert "87.5%" in page and "0.125" in page and "classifier:resnet10t" in page
    for column in ("mean Δp", "mean effect", "affected", "flips"):
        assert f"<b>{column}</b>:" in page
    assert "rises by at least 0.1" in page
    # The first example tile of a panel is the real input, pixel for pixel away from its label.
    data = json.loads(with_inputs.json.read_text())
    first = data["classes"]["red"]["attributes"][0]["examples"][0]
    arr = _rgb(Image.open(with_inputs.panels[key]))
    scale = 128 // planted.G.resolution
    tile = arr[arr.shape[0] - 128:, :128]
    assert np.array_equal(tile[64:, 64:], _tile_of(real[first], scale)[64:, 64:])


# ============================================================================ callback
class WandbLogger(pl_loggers.WandbLogger):  # recognised as W&B by stylex.utils.loggers
    def __init__(self):  # no W&B run: only what the explanation logs is recorded
        self.tables, self.images = [], []

    def log_table(self, key, columns, data):
        self.tables.append((key, columns, data))

    def log_image(self, key, images, caption=None, step=None):
        self.images.append((key, images))


def _random_nets():
    torch.manual_seed(0)
    g = Generator(**G_KW).eval().requires_grad_(False)
    e = Encoder(**E_KW).eval()
    c = Classifier("resnet10t", 2).freeze()
    return g, e, c


def test_callback_explains_after_fit_and_logs(tmp_path):
    g, e, c = _random_nets()
    e.train()
    dataset = [{"image": torch.rand(3, 16, 16) * 2 - 1, "label": torch.tensor(i % 2)} for i in range(20)]
    module = SimpleNamespace(G_ema=g, E=e, classifier=c, class_names=["a", "b"], num_classes=2,
                             device=torch.device("cpu"), g_steps=torch.tensor(7))
    wandb = WandbLogger()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataset=dataset), loggers=[wandb], global_step=7,
                              current_epoch=0)
    cb = ExplainCallback(tmp_path / "explain", top_k=2, num_images=10, prescreen=8, flip_k=2, examples=2,
                         threads=1)
    threads = torch.get_num_threads()
    cb.on_train_end(trainer, module)
    assert torch.get_num_threads() == threads, "the thread count must be restored"
    rep = cb.last_report
    assert rep is not None and rep.html.is_file()
    data = json.loads(rep.json.read_text())
    assert data["search"]["num_images"] == 10 and data["search"]["mode"] == "prescreen"
    assert [len(v["attributes"]) for v in data["classes"].values()] == [2, 2]
    key, columns, rows = wandb.tables[0]
    assert key == "explain/attributes" and len(rows) == 4 and columns[:2] == ["class", "rank"]
    assert [k for k, _ in wandb.images] == ["explain/panels", "explain/flip_rate"]
    assert all(Path(p).is_file() for p in wandb.images[0][1])
    assert e.training, "the encoder's training mode must be restored"
    # every_n_epochs: periodic reports in their own folders
    periodic = ExplainCallback(tmp_path / "p", top_k=1, num_images=4, every_n_epochs=2, prescreen=4, flip_k=0)
    periodic.on_train_epoch_end(trainer, module)  # epoch 1: not due
    assert not (tmp_path / "p").exists()
    trainer.current_epoch = 1
    periodic.on_train_epoch_end(trainer, module)
    assert (tmp_path / "p" / "epoch_0002" / "report.html").is_file()


def test_callback_defaults_are_config_values_and_a_relative_out_dir_lies_in_the_run(tmp_path):
    # The signature is the only source of the defaults: OmegaConf must accept every annotation.
    params = inspect.signature(ExplainCallback).parameters.values()
    fields = [(p.name, p.annotation, dataclasses.field(default=p.default)) for p in params]
    schema = OmegaConf.structured(dataclasses.make_dataclass("ExplainSchema", fields))
    assert OmegaConf.to_container(schema) == {
        "out_dir": "explain", "top_k": 4, "num_images": 64, "every_n_epochs": 0, "shift_size": 1.0,
        "prescreen": 16, "flip_k": 6, "examples": 4, "threads": None, "enabled": True, "refine_steps": 0,
        "layers": "all"}
    g, e, c = _random_nets()
    dataset = [{"image": torch.rand(3, 16, 16) * 2 - 1, "label": torch.tensor(i % 2)} for i in range(8)]
    module = SimpleNamespace(G_ema=g, E=e, classifier=c, class_names=["a", "b"], num_classes=2,
                             device=torch.device("cpu"), g_steps=torch.tensor(1))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataset=dataset), loggers=[], global_step=1,
                              current_epoch=0, default_root_dir=str(tmp_path / "run"))
    cb = ExplainCallback(top_k=1, num_images=4, prescreen=4, flip_k=0, examples=1, threads=1)
    cb.on_train_end(trainer, module)
    assert cb.last_report is not None and cb.last_report.html == tmp_path / "run" / "explain" / "report.html"
    assert cb.last_report.html.is_file()


def _small_report(folder: Path) -> Report:
    """A report of two classes with one attribute each, without a search."""
    panel, plot = folder / "panel.png", folder / "plot.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(panel)
    Image.new("RGB", (8, 8), (0, 0, 200)).save(plot)
    attribute = {"rank": 1, "coordinate": 3, "layer": "b4.conv1", "channel": 3, "direction": "increase",
                 "mean_probability_change": 0.2, "share_affected": 0.5, "flip_share": 0.25}
    classes = {"a": {"attributes": [attribute]}, "b": {"attributes": [{**attribute, "direction": "decrease"}]}}
    return Report(out_dir=folder, json=folder / "explanation.json", html=folder / "report.html",
                  panels={(0, 1): panel, (1, 1): panel}, plot=plot, data={"classes": classes})


def test_training_loggers_and_the_wandb_run_get_the_same_keys(tmp_path, monkeypatch):
    import wandb

    report = _small_report(tmp_path)
    in_training = WandbLogger()
    log_report(in_training, report, step=3)
    training_keys = [k for k, *_ in in_training.tables] + [k for k, _ in in_training.images]

    logged = []

    class FakeRun:
        def log(self, payload):
            logged.append(payload)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun())
    log_to_wandb({"project": "stylex", "offline": True}, tmp_path / "run", report)
    assert len(logged) == 1, "log_to_wandb warned instead of logging"
    assert set(logged[0]) == set(training_keys) == {"explain/attributes", "explain/panels", "explain/flip_rate"}
    assert len(training_keys) == 3
    # The same content under each key.
    assert logged[0]["explain/attributes"].data == in_training.tables[0][2]
    assert len(logged[0]["explain/panels"]) == len(in_training.images[0][1]) == 2


# ============================================================================ explain.py
@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    """A run-like folder with an export of small random networks (no training)."""
    root = tmp_path_factory.mktemp("exported")
    run = root / "runs" / "synthetic" / "2024-01-01_00-00-00"
    g, e, c = _random_nets()
    dataset = {"_target_": "stylex.data.SyntheticDataModule", "name": "synthetic", "resolution": 16,
               "batch_size": 8, "num_train": 16, "num_val": 24, "num_test": 8}
    logger = {"wandb": {"_target_": "pytorch_lightning.loggers.WandbLogger", "project": "stylex", "offline": True}}
    save_export(run / "export", g, G_KW, e, E_KW, c, ["healthy", "DR signs"],
                extra={"config": {"dataset": dataset, "logger": logger}})
    return SimpleNamespace(root=root, run=run, dim=StyleSpace(g).dim)


def test_explain_run_renders_every_image_with_the_encoders_noise_maps(tmp_path):
    from stylex.explain.inputs import validation_images

    torch.manual_seed(0)
    g = Generator(**G_KW).eval().requires_grad_(False)
    for m in g.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.5)
    e_kw = {**E_KW, "noise_maps": True, "noise_layers": [list(x) for x in g.noise_layers]}
    e = Encoder(**e_kw).eval()
    c = Classifier("resnet10t", 2).freeze()
    run = tmp_path / "runs" / "synthetic" / "2024-01-01_00-00-00"
    dataset = {"_target_": "stylex.data.SyntheticDataModule", "name": "synthetic", "resolution": 16,
               "batch_size": 8, "num_train": 16, "num_val": 24, "num_test": 8}
    save_export(run / "export", g, G_KW, e, e_kw, c, ["healthy", "DR signs"], extra={"config": {"dataset": dataset}})
    common = dict(run=run, top_k=2, num_images=6, prescreen="none", flip_k=0, wandb=False, device="cpu")

    _, result = explain_run(ExplainRequest(**common, out=tmp_path / "val"))
    images, _ = validation_images({"dataset": dataset}, 6, 16)
    space = StyleSpace(g)
    with torch.no_grad():
        maps = e.noise_maps(images)
        flat = space.flat_styles(e(images), c(images).softmax(-1))
        expected = c(space.render(flat, noise=maps)).log_softmax(-1)
        unmapped = c(space.render(flat)).log_softmax(-1)
    assert (expected - unmapped).abs().max() > 1e-4
    torch.testing.assert_close(result.logp_base, expected, atol=1e-4, rtol=0)

    # Refinement reconstructs with the maps too: its "before" is the mapped reconstruction's L1.
    report, _ = explain_run(ExplainRequest(**common, out=tmp_path / "refined", refine_steps=2))
    with torch.no_grad():
        l1 = float((space.render(flat, noise=maps) - images).abs().mean())
    assert report.data["refinement"]["recon_l1_before"] == pytest.approx(l1, abs=1e-4)

    # Generated samples take the layouts of real images, as on the training's noise path.
    _, gen = explain_run(ExplainRequest(**common, out=tmp_path / "gen", source="generated"))
    assert gen.noise is not None
    torch.testing.assert_close(gen.noise["b16.conv1"], maps["b16.conv1"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["no_run", "not_export", "training_ckpt", "top_k", "bad_image", "missing_image", "folder_image", "bad_class"],
)
def test_explain_cli_reports_bad_input_without_traceback(case, random_export, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = str(random_export.run)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    fake_png = tmp_path / "photo.png"
    fake_png.write_text("this is text")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    argv, message = {
        "no_run": ([], "no run found under"),
        "not_export": (["--checkpoint", str(junk)], "is not a StylEx export"),
        "training_ckpt": (["--checkpoint", str(ckpt)], "is a training checkpoint, not a StylEx export"),
        "top_k": (["--run", run, "--top-k", str(random_export.dim + 1)],
                  f"larger than the number of style coordinates ({random_export.dim})"),
        "bad_image": (["--run", run, "--image", str(fake_png)], "cannot read it as an image"),
        "missing_image": (["--run", run, "--image", str(tmp_path / "nope.png")], "no such file"),
        "folder_image": (["--run", run, "--image", str(tmp_path)], "is a folder; give image files"),
        "bad_class": (["--run", run, "--classes", "cats"], "unknown class 'cats'"),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err


def test_explain_cli_explains_given_images(random_export, tmp_path, capsys):
    paths = []
    for j, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        p = tmp_path / f"img {j}.png"  # a space in the name, as in real data sets
        Image.new("RGB", (40, 30), colour).save(p)
        paths += ["--image", str(p)]
    out = tmp_path / "report"
    rc = main(["--run", str(random_export.run), *paths, "--top-k", "2", "--num-images", "8", "--out", str(out),
               "--flip-k", "2", "--prescreen", "none", "--classes", "DR signs"])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str((out / "report.html").resolve())
    data = json.loads((out / "explanation.json").read_text())
    assert list(data["classes"]) == ["DR signs"]
    assert [im["source"] for im in data["images"]] == [p for p in paths if p != "--image"]
    for im in data["images"]:
        assert len(im["top_attributes"]) == 2 and (out / im["panel"]).is_file()
    # The run logged to W&B, so the explanation went there too (offline, inside the run folder).
    runs = list((random_export.run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The one real (tiny) training run of this file, placed where explain.py looks by default."""
    from stylex.training.run import train

    root = tmp_path_factory.mktemp("trained")
    run = root / "runs" / "synthetic" / "2024-01-01_00-00-00"
    cfg = tiny_cfg(run, "trainer.max_steps=2", "classifier.train.max_epochs=1", "callbacks.checkpoint.every_n_steps=100",
                   "trainer.val_check_interval=100", "callbacks.quality.factor_fidelity=false")  # no probe to train
    train(cfg)
    return root, run


def test_explain_py_end_to_end_on_the_latest_run(trained_run):
    root, run = trained_run
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "explain.py"), "--top-k", "2", "--num-images", "8",
                           "--flip-k", "3", "--examples", "2"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = Path(proc.stdout.strip().splitlines()[-1])
    assert html == (run / "explain" / "report.html").resolve() and html.is_file()
    data = json.loads((html.parent / "explanation.json").read_text())
    assert list(data["classes"]) == ["healthy", "DR signs"]
    for cls in data["classes"].values():
        assert len(cls["attributes"]) == 2
        for a in cls["attributes"]:
            assert {"coordinate", "layer", "channel", "direction", "mean_probability_change",
                    "share_affected"} <= set(a)
            assert (html.parent / a["panel"]).is_file() and (html.parent / a["gif"]).is_file()
    assert len(data["images"]) == 8 and all(im["source"].startswith("synthetic/val:") for im in data["images"])
    assert (html.parent / "flip_rate.png").is_file() and len(data["flip_rate"]["attfind"]) == 3
    assert html.read_text().count("data:image/gif;base64,") == 4
    assert [im["index"] for im in data["images"] if "panel" in im] == [0, 1, 2, 3]


def test_explain_py_delegates_to_explain_run(random_export, tmp_path, monkeypatch, capsys):
    options = ["--run", str(random_export.run), "--source", "generated", "--num-images", "4", "--top-k", "1",
               "--flip-k", "2", "--examples", "1", "--prescreen", "none", "--no-wandb", "--threads", "1",
               "--layers", "conv"]
    requests = []

    def spy(request, say=None, show=None):
        requests.append(request)
        return explain_run(request, say=say, show=show)

    import stylex.explain.pipeline as pipeline

    monkeypatch.setattr(pipeline, "explain_run", spy)  # the CLI imports it when it runs
    threads = torch.get_num_threads()
    assert main([*options, "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str((tmp_path / "cli" / "report.html").resolve())
    # The same request as plain Python values, and the same report from it.
    request = ExplainRequest(run=random_export.run, source="generated", num_images=4, top_k=1, flip_k=2,
                             examples=1, prescreen="none", wandb=False, threads=1, layers="conv",
                             out=tmp_path / "direct")
    assert requests == [dataclasses.replace(request, out=tmp_path / "cli")]
    report, result = explain_run(request)
    assert torch.get_num_threads() == threads, "the thread count must be restored"
    assert report.html == tmp_path / "direct" / "report.html" and result.num_images == 4
    # --layers conv: no to-RGB style was edited, and the report says which coordinates were searched
    assert result.config.layers == "conv" and not result.evaluated[:, ~result.searched].any()
    assert all(not a.layer.endswith(".torgb") for ranked in result.rankings.values() for a in ranked)
    assert json.loads((tmp_path / "direct" / "explanation.json").read_text())["settings"]["layers"] == "conv"

    def content(folder: Path) -> dict:
        data = json.loads((folder / "explanation.json").read_text())
        for key in ("created", "report_seconds"):
            data.pop(key)
        for key in ("seconds", "seconds_per_image", "timings"):
            data["search"].pop(key)
        data["flip_rate"].pop("seconds")
        return data

    assert content(tmp_path / "cli") == content(tmp_path / "direct")


def test_explain_request_holds_the_command_line_defaults():
    assert cli.request_from_args(cli.build_parser().parse_args([])) == ExplainRequest()


def test_the_explanation_reads_realism_in_the_runs_feature_network(tmp_path):
    from stylex.classifier import build_classifier
    from stylex.explain.inputs import realism_network

    net = build_classifier({"arch": "resnet10t"}, 2)
    path = tmp_path / "features.safetensors"
    net.save(path)
    assert realism_network({}) is None and realism_network({"classifier": {"feature_checkpoint": None}}) is None
    loaded = realism_network({"classifier": {"feature_checkpoint": str(path)}})
    assert not loaded.training and set(loaded.state_dict()) == set(net.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    notes: list[str] = []
    gone = tmp_path / "gone.safetensors"
    assert realism_network({"classifier": {"feature_checkpoint": str(gone)}}, notes.append) is None
    assert len(notes) == 1 and str(gone) in notes[0] and "explained classifier's features" in notes[0]
