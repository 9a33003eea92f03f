"""StylEx training: losses, the LightningModule, a short real run, resume, export, precision."""

from __future__ import annotations

import copy
import json
import csv
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
import pytorch_lightning as pl
import torch

from helpers import tiny_cfg
from stylex.export import load_export
from stylex.training import losses
from stylex.training.callbacks import encoder_check_images
from stylex.training.run import ConfigError, build_datamodule, build_module, train


# ------------------------------------------------------------------------------------------ losses
def test_logistic_losses_match_their_definition():
    real, fake = torch.randn(6, 1), torch.randn(5, 1)
    sig = torch.sigmoid
    expected_d = -torch.log(sig(real)).mean() - torch.log(1 - sig(fake)).mean()
    assert torch.allclose(losses.d_logistic_loss(real, fake), expected_d, atol=1e-6)
    assert torch.allclose(losses.g_nonsaturating_loss(fake), -torch.log(sig(fake)).mean(), atol=1e-6)


def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight_norm():
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * a).sum(dim=[1, 2, 3])[:, None]
    assert torch.allclose(losses.r1_penalty(x, logits), a.square().sum(), rtol=1e-5)


def test_path_length_of_a_linear_generator():
    # img = reshape(A w); for isotropic image noise y of variance 1/(HW), E|A^T y|^2 = |A|_F^2 / (HW).
    torch.manual_seed(0)
    hw = 8 * 8
    a = torch.randn(3 * hw, 16)
    w = torch.randn(4096, 16, requires_grad=True)
    img = (w @ a.T).view(-1, 3, 8, 8)
    pl_mean = torch.zeros(())
    losses.path_length_penalty(img, w, pl_mean, decay=1.0)
    expected = math.sqrt(a.square().sum() / hw)
    assert abs(float(pl_mean) - expected) / expected < 0.05


def test_classifier_kl_matches_definition_and_vanishes_at_equality():
    p = torch.softmax(torch.randn(4, 3), 1)
    logits = torch.randn(4, 3)
    q = torch.softmax(logits, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(losses.classifier_kl(p, logits), expected, atol=1e-6)
    assert float(losses.classifier_kl(p, p.log())) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ module
def _module_and_data(tmp_path, *overrides):
    cfg = tiny_cfg(tmp_path / "run", *overrides)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    from stylex.classifier import build_classifier
    from omegaconf import OmegaConf

    clf = build_classifier(OmegaConf.to_container(cfg.classifier, resolve=True), dm.num_classes).freeze()
    return cfg, dm, clf


def _fit_steps(module, dm, steps, tmp_path, **kw):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path), **kw,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.parametrize("latent", ["w", "w+"])
def test_the_encoder_latent_follows_the_model_preset_and_its_adam_keeps_momentum(tmp_path, latent):
    cfg, dm, clf = _module_and_data(tmp_path, f"model.encoder_latent={latent}")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    x = next(iter(dm.train_dataloader()))["image"][:2]
    w = module.E(x)
    if latent == "w+":
        assert w.shape == (2, module.G.num_ws, cfg.model.w_dim)
        assert module.hparams.encoder["num_ws"] == module.G.num_ws  # the export rebuilds the same encoder
    else:
        assert w.shape == (2, cfg.model.w_dim) and "num_ws" not in module.hparams.encoder
    opt_g, opt_d, opt_e = module.configure_optimizers()
    assert opt_e.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt_g.param_groups[0]["betas"] == opt_d.param_groups[0]["betas"] == (0.0, 0.99)
    with pytest.raises(ValueError, match=r"unknown optimiser option\(s\) \['beta'\]"):
        type(module)(generator=dict(module.hparams.generator), discriminator=dict(module.hparams.discriminator),
                     encoder=dict(module.hparams.encoder), classifier=clf, optim={"beta": 0.5})


def test_classifier_stays_frozen_while_its_gradient_trains_the_generator(tmp_path):
    # Only the noise-path classifier KL is switched on: the generator can only change through
    # gradients that pass through the frozen classifier.
    zero = [f"loss.{k}=0" for k in ("adv", "rec_l1", "perceptual", "latent_l1", "kl_rec")]
    cfg, dm, clf = _module_and_data(tmp_path, *zero, "loss.r1_gamma=0")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    clf_before = {k: v.clone() for k, v in clf.state_dict().items()}
    g_before = [p.detach().clone() for p in module.G.synthesis.parameters()]
    _fit_steps(module, dm, 2, tmp_path)
    for k, v in clf.state_dict().items():
        assert torch.equal(v, clf_before[k]), f"classifier tensor {k} changed during StylEx training"
    assert all(not p.requires_grad for p in clf.parameters())
    assert not clf.training
    changed = sum(not torch.equal(a, b) for a, b in zip(g_before, module.G.synthesis.parameters()))
    assert changed > 0, "no generator parameter moved: the classifier KL did not reach the generator"


def _encoder_gradient_of_one_step(tmp_path, *overrides) -> list[torch.Tensor]:
    """E's gradient in the first training step, from identical weights, data and noise."""
    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path, "loss.r1_gamma=0", *overrides)
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    captured = {}
    original = module._step

    def spy(opt, counted):
        if opt.optimizer is module.optimizers()[2].optimizer and "E" not in captured:
            captured["E"] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.E.parameters()]
        return original(opt, counted)

    module._step = spy
    torch.manual_seed(0)
    _fit_steps(module, dm, 1, tmp_path)
    return captured["E"]


@pytest.mark.parametrize("maps", [False, True], ids=["latent", "latent+noise_maps"])
def test_encoder_learns_from_the_reconstruction_terms_only(tmp_path, maps):
    """With encoder_losses=reconstruction, adding the KL and adversarial terms leaves E's gradient
    unchanged (the generator still gets them); with "all" they reach E. With noise maps the same
    holds for the map encoder's weights, which are part of E."""
    extra = ["model.encoder_noise=true", "model.noise_init=1"] if maps else []
    no_gen_terms = ["loss.kl_rec=0", "loss.adv=0", "loss.kl_gen=0"]
    base = _encoder_gradient_of_one_step(tmp_path / "a", *extra, *no_gen_terms, "loss.encoder_losses=all")
    split = _encoder_gradient_of_one_step(tmp_path / "b", *extra, "loss.kl_rec=5", "loss.adv=2", "loss.kl_swap=3")
    mixed = _encoder_gradient_of_one_step(tmp_path / "c", *extra, "loss.kl_rec=5", "loss.adv=2",
                                          "loss.encoder_losses=all")
    assert any(g.abs().sum() > 0 for g in base)
    for a, b in zip(base, split):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert max((a - c).abs().max().item() for a, c in zip(base, mixed)) > 1e-4, "KL/adversarial did not reach E"


def test_class_swap_term_is_the_kl_of_the_images_own_styles_and_maps_under_another_class(tmp_path):
    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path, "model.encoder_noise=true", "model.noise_init=1", "loss.kl_swap=2")
    head = [m for m in clf.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.data.mul_(100.0)  # a confident classifier: the swapped class is far from the render's
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    x = next(iter(dm.train_dataloader()))["image"]
    inputs = module.loss.prepare(x)
    renders = module.loss.render(inputs, (True, False))
    _, _, logs = module.loss.generator(inputs, (True, False), renders)
    # independent definition: KL(p' || q), p' = the other images' class vectors, q = C(G(E(x), p', maps of x))
    with torch.no_grad():
        p = inputs.c_noise
        q = clf(module.G.generate(module.E(x), p, noise=module.E.noise_maps(x))).softmax(dim=1)
        kl = (p * (p.clamp_min(1e-12).log() - q.log())).sum(dim=1).mean()
    assert kl > 1e-3
    torch.testing.assert_close(logs["train/kl_swap"], kl, rtol=1e-4, atol=1e-6)
    # off by default: no swapped render, no term
    cfg0, _, _ = _module_and_data(tmp_path / "off", "model.encoder_noise=true", "model.noise_init=1")
    off = build_module(cfg0, dm.num_classes, dm.class_names, clf)
    assert off.loss.render(off.loss.prepare(x), (True, False)).x_swap is None


def test_class_sparsity_is_the_group_lasso_of_the_class_weights_centred_over_the_classes(tmp_path):
    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path, "loss.class_sparsity=0.5", "model.class_gain=3")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    G, w_dim = module.G, module.G.w_dim
    x = next(iter(dm.train_dataloader()))["image"]
    inputs = module.loss.prepare(x)
    _, _, logs = module.loss.generator(inputs, (False, True), module.loss.render(inputs, (False, True)))
    # independent definition: per style coordinate, the L2 norm of its class weights (gain
    # included) minus their mean over the classes
    norms = []
    for _, layer in G.synthesis.named_layers():
        cols = 3.0 * layer.affine.weight[:, w_dim:].detach() * layer.affine.weight_gain
        norms.append((cols - cols.mean(dim=1, keepdim=True)).norm(dim=1))
    norms = torch.cat(norms)
    torch.testing.assert_close(logs["train/class_sparsity"], norms.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["train/class_top10"], norms.topk(10).values.sum() / norms.sum(),
                               rtol=1e-5, atol=1e-6)
    # only the weights that read the class receive the penalty's gradient
    G.zero_grad()
    losses.class_group_norm(list(G.class_weights().values())).sum().backward()
    for _, layer in G.synthesis.named_layers():
        assert layer.affine.weight.grad[:, :w_dim].abs().max() == 0
        assert layer.affine.weight.grad[:, w_dim:].abs().max() > 0
    # a shift shared by every class column moves every class vector's styles alike (probabilities
    # sum to 1): it changes no class switch, and the penalty does not charge it
    w, c0, c1 = torch.randn(4, w_dim), inputs.c_real[:4], inputs.c_noise[:4]
    switch = {k: G.styles(G.condition(w, c1))[k] - v for k, v in G.styles(G.condition(w, c0)).items()}
    before = losses.class_group_norm(list(G.class_weights().values()))
    with torch.no_grad():
        for _, layer in G.synthesis.named_layers():
            layer.affine.weight[:, w_dim:] += torch.randn(layer.affine.weight.shape[0], 1)
    moved = {k: G.styles(G.condition(w, c1))[k] - v for k, v in G.styles(G.condition(w, c0)).items()}
    for k in switch:
        torch.testing.assert_close(moved[k], switch[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses.class_group_norm(list(G.class_weights().values())), before,
                               rtol=1e-4, atol=1e-6)
    # off by default: no term, no log
    cfg0, _, _ = _module_and_data(tmp_path / "off")
    off = build_module(cfg0, dm.num_classes, dm.class_names, clf)
    assert "train/class_sparsity" not in off.loss.generator(inputs, (False, True))[2]


def test_encoder_fit_objective_adds_the_weighted_classifier_kl_of_the_reconstruction(tmp_path):
    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path)
    head = [m for m in clf.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.data.mul_(100.0)  # a confident classifier, so the KL is far from zero
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    x = next(iter(dm.train_dataloader()))["image"]
    base, l1 = module.encoder_reconstruction_loss(x)
    with_kl, l1_again = module.encoder_reconstruction_loss(x, kl_weight=0.3)
    # independent definition: KL(p || q) = sum p (log p - log q), p = C(x), q = C(G_ema(E(x), p))
    with torch.no_grad():
        p = clf(x).softmax(dim=1)
        q = clf(module.G_ema.generate(module.E(x), p, noise_mode="const")).softmax(dim=1)
        kl = (p * (p.log() - q.log())).sum(dim=1).mean()
    assert kl > 1e-3
    torch.testing.assert_close(l1_again, l1)
    torch.testing.assert_close(with_kl - base, 0.3 * kl, rtol=1e-4, atol=1e-6)


def test_laplacian_pyramid_levels_collapse_back_to_the_image_and_use_2x2_means():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    levels = losses.laplacian_pyramid(x, levels=3)
    assert [tuple(v.shape[-2:]) for v in levels] == [(16, 16), (8, 8), (4, 4)]
    # independent 2x2 box averages, then collapse the pyramid coarse to fine
    lows = [x]
    for _ in range(3):
        g = lows[-1]
        lows.append(g.reshape(*g.shape[:2], g.shape[2] // 2, 2, g.shape[3] // 2, 2).mean(dim=(3, 5)))
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    img = lows[3]
    for level in reversed(levels):
        img = level + up(img)
    torch.testing.assert_close(img, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(levels[1], lows[1] - up(lows[2]), rtol=0, atol=1e-6)
    assert len(losses.laplacian_pyramid(torch.zeros(1, 3, 6, 6), levels=3)) == 1  # 3x3 cannot be halved


def test_laplacian_l1_ignores_a_global_shift_and_weighs_a_missing_spot():
    """Two reconstruction errors of equal pixel L1: a uniform brightness shift, and a missing
    3x3 spot. The band-pass loss is blind to the first and counts the second, which is what
    makes it pull a generator toward small structures."""
    x = torch.zeros(1, 3, 32, 32)
    x[..., 10:13, 20:23] = 1.0  # a bright spot of 9 pixels
    spotless = torch.zeros_like(x)
    shifted = x + 9.0 / (32 * 32)  # the same pixel L1 as the missing spot
    assert float(losses.l1(spotless, x)) == pytest.approx(float(losses.l1(shifted, x)), rel=1e-5)
    assert float(losses.laplacian_l1(shifted, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.laplacian_l1(spotless, x)) > 3 * float(losses.l1(spotless, x))
    assert float(losses.laplacian_l1(x, x)) == 0.0


def test_encoder_fit_objective_adds_the_weighted_laplacian_term(tmp_path):
    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path)
    x = next(iter(dm.train_dataloader()))["image"]
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    base, _ = module.encoder_reconstruction_loss(x)
    module.loss.cfg.rec_lap = 2.5
    with_lap, _ = module.encoder_reconstruction_loss(x)
    with torch.no_grad():
        p = clf(x).softmax(dim=1)
        x_rec = module.G_ema.generate(module.E(x), p, noise_mode="const")
    torch.testing.assert_close(with_lap - base, 2.5 * losses.laplacian_l1(x_rec, x), rtol=1e-4, atol=1e-6)


def test_generator_phase_adds_the_weighted_laplacian_term_and_logs_it_only_when_on(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path)
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    x = next(iter(dm.train_dataloader()))["image"]
    inputs = module.loss.prepare(x)

    def phase(weight: float):
        module.loss.cfg.rec_lap = weight
        torch.manual_seed(1)  # the same noise inputs of G in both passes
        loss, _, logs = module.loss.generator(inputs, (True, False))
        return loss.detach(), logs

    base, logs_off = phase(0.0)
    with_lap, logs_on = phase(3.0)
    torch.manual_seed(1)
    with torch.no_grad():
        x_rec = module.G.generate(module.E(x), inputs.c_real)
    expected = losses.laplacian_l1(x_rec, x)
    assert float(expected) > 1e-3
    torch.testing.assert_close(with_lap - base, 3.0 * expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logs_on["train/rec_lap"], expected, rtol=1e-4, atol=1e-6)
    assert "train/rec_lap" not in logs_off


def test_validation_reports_the_ema_and_the_live_generator_pairing(tmp_path):
    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path)
    module = build_module(cfg, dm.num_classes, dm.class_names, clf).eval()
    with torch.no_grad():  # a live generator that has moved away from its EMA copy
        for p in module.G.synthesis.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = next(iter(dm.val_dataloader()))["image"]
    figures = module.reconstruction_figures(x)
    with torch.no_grad():
        p = clf(x).softmax(dim=1)
        for suffix, g in (("", module.G_ema), ("_live", module.G)):
            x_rec = g.generate(module.E(x), p, noise_mode="const")
            logits = clf(x_rec)
            torch.testing.assert_close(figures[f"val/recon_l1{suffix}"], (x_rec - x).abs().mean())
            torch.testing.assert_close(figures[f"val/agreement{suffix}"],
                                       (logits.argmax(1) == p.argmax(1)).float().mean())
            q = logits.softmax(dim=1)
            torch.testing.assert_close(figures[f"val/kl_rec{suffix}"], (p * (p.log() - q.log())).sum(1).mean(),
                                       rtol=1e-4, atol=1e-6)
    assert abs(float(figures["val/recon_l1"] - figures["val/recon_l1_live"])) > 1e-3


def test_max_steps_counts_training_steps_not_optimiser_steps(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path)
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    trainer = _fit_steps(module, dm, 3, tmp_path)
    assert int(module.g_steps) == 3 and int(module.d_steps) == 3
    assert trainer.global_step == 3
    # the host copies the training loop reads agree with the saved buffers, and follow a load
    assert module.count("g_steps") == module.count("d_steps") == 3
    assert module.count("images_seen") == int(module.images_seen) == 3 * dm.batch_size
    state = module.state_dict()
    state["g_steps"], state["images_seen"] = torch.tensor(41), torch.tensor(1000)
    module.load_state_dict(state)
    assert module.count("g_steps") == 41 and module.count("images_seen") == 1000 and module.count("d_steps") == 3


def test_non_finite_gradient_stops_with_a_clear_message(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path, "loss.rec_l1=nan")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    with pytest.raises(FloatingPointError, match="non-finite gradient in the generator/encoder update"):
        _fit_steps(module, dm, 2, tmp_path)


def test_bf16_mixed_step_keeps_r1_in_float32(tmp_path, monkeypatch):
    cfg, dm, clf = _module_and_data(tmp_path, "loss.r1_interval=1")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    seen = []
    original = losses.r1_penalty

    def spy(x, logits):
        seen.append((x.dtype, logits.dtype, torch.is_autocast_cpu_enabled()))
        return original(x, logits)

    monkeypatch.setattr(losses, "r1_penalty", spy)
    d_outputs = []
    module.D.register_forward_hook(lambda m, i, o: d_outputs.append(o.dtype))
    _fit_steps(module, dm, 2, tmp_path, precision="bf16-mixed")
    assert seen and all(d == (torch.float32, torch.float32, False) for d in seen)
    assert torch.bfloat16 in d_outputs, "the ordinary discriminator passes did not run in bf16"
    assert all(torch.isfinite(p).all() for p in module.G.parameters())


# ------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "synthetic" / "tiny"
    cfg = tiny_cfg(run_dir, "trainer.max_steps=80", "callbacks.samples.every_n_steps=40",
                   "trainer.log_every_n_steps=1", "callbacks.explain.enabled=true",
                   "callbacks.explain.num_images=8", "callbacks.explain.top_k=2",
                   "callbacks.encoder_fit.steps=40")
    return train(cfg)


def _metric_series(run_dir: Path, key: str) -> list[float]:
    files = list((run_dir / "logs").rglob("metrics.csv"))
    assert files, f"no metrics.csv under {run_dir / 'logs'}"
    out = []
    for f in files:
        with open(f) as fh:
            for row in csv.DictReader(fh):
                if row.get(key) not in (None, ""):
                    out.append(float(row[key]))
    return out


def test_short_run_reduces_reconstruction_and_classifier_kl(tiny_run):
    for key in ("train/rec_l1", "train/kl_rec"):
        series = _metric_series(tiny_run, key)
        assert len(series) == 80, key
        first, last = series[:10], series[-10:]
        assert sum(last) / len(last) < 0.8 * sum(first) / len(first), f"{key} did not go down: {series}"


def test_encoder_fit_after_training_lowers_the_ema_reconstruction_error(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    fit = summary["encoder_fit"]
    assert fit["steps"] == 40 and fit["kl_weight"] == 0.1
    assert {"val/recon_l1", "val/agreement", "val/recon_l1_live", "val/agreement_live"} <= set(summary)
    assert fit["recon_l1_after"] < fit["recon_l1_before"], fit
    # the export holds the fitted encoder: on the same check images, its reconstruction error and
    # class agreement are the "after" figures
    exp = load_export(tiny_run)
    cfg = OmegaConf.load(tiny_run / "config.yaml")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    x = encoder_check_images(dm.val_dataloader().dataset, fit["check_images"])
    assert x.shape[0] == fit["check_images"] == min(128, len(dm.val_dataset))
    with torch.no_grad():
        c = exp.classifier(x).softmax(dim=1)
        x_rec = exp.generator.generate(exp.encoder(x), c, noise_mode="const")
        err = (x_rec - x).abs().mean().item()
        agree = (exp.classifier(x_rec).argmax(dim=1) == c.argmax(dim=1)).float().mean().item()
    assert err == pytest.approx(fit["recon_l1_after"], rel=1e-4)
    assert fit["mean_image_l1"] == pytest.approx((x - x.mean(dim=0)).abs().mean().item(), rel=1e-5)
    assert agree == pytest.approx(fit["agreement_after"], abs=1e-6)
    # the loggers received the same figures
    assert _metric_series(tiny_run, "encoder_fit/recon_l1_after") == [pytest.approx(fit["recon_l1_after"])]
    assert _metric_series(tiny_run, "encoder_fit/agreement_before") == [pytest.approx(fit["agreement_before"])]


def test_run_folder_holds_everything_later_commands_need(tiny_run):
    for rel in ("config.yaml", "classifier/classifier.safetensors", "checkpoints/last.ckpt",
                "export/model.safetensors", "export/stylex.json", "summary.json",
                "explain/report.html", "explain/explanation.json"):
        assert (tiny_run / rel).is_file(), rel
    assert sorted(p.name for p in (tiny_run / "samples").glob("*.png"))[-1] == "step_000080.png"


def test_export_reproduces_the_trained_ema_generator(tiny_run):
    from stylex.export import load_export

    exp = load_export(tiny_run)
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for prefix, net in (("G_ema.", exp.generator), ("E.", exp.encoder), ("C.classifier.", exp.classifier)):
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        for k, v in net.state_dict().items():
            assert torch.equal(v, state[k]), prefix + k
    z = torch.randn(2, exp.generator.z_dim)
    c = torch.softmax(torch.randn(2, len(exp.class_names)), 1)
    x = exp.generator(z, c, noise_mode="const")
    assert x.shape == (2, 3, exp.resolution, exp.resolution)
    logits = exp.classifier(exp.generator.generate(exp.encoder(x), c, noise_mode="const"))
    assert logits.shape == (2, len(exp.class_names))


def test_resume_restores_weights_optimisers_and_counters(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "synthetic" / "copy"
    shutil.copytree(tiny_run, run)
    # A run saved before an option existed still resumes: the option takes its default.
    saved_cfg = OmegaConf.load(run / "config.yaml")
    del saved_cfg.callbacks["explain"]
    OmegaConf.save(saved_cfg, run / "config.yaml")
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    captured = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            captured["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            captured["optim"] = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]

    from stylex.training import run as run_mod

    original = run_mod.build_callbacks
    run_mod.build_callbacks = lambda *a, **k: original(*a, **k) + [Capture()]
    try:
        cfg = tiny_cfg(tmp_path, f"resume={run}", "trainer.max_steps=83")
        out = train(cfg, overrides=["trainer.max_steps=83"])
    finally:
        run_mod.build_callbacks = original
    assert out == run
    assert len(captured["optim"]) == len(saved["optimizer_states"]) == 3
    for k, v in saved["state_dict"].items():
        assert torch.equal(captured["state"][k], v), f"{k} not restored"
    for got, want in zip(captured["optim"], saved["optimizer_states"]):
        for sid, st in want["state"].items():
            assert torch.equal(got["state"][sid]["exp_avg"], st["exp_avg"])
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(final["state_dict"]["g_steps"]) == 83 and final["global_step"] == 83


def test_resume_refuses_to_switch_config_groups(tiny_run):
    cfg = tiny_cfg(tiny_run.parent / "other", f"resume={tiny_run}")
    with pytest.raises(ConfigError, match="keeps its config groups"):
        train(cfg, overrides=["dataset=retina"])
    with pytest.raises(ConfigError, match="keeps its model, data and classifier"):
        train(cfg, overrides=["model.batch_size=32"])


@pytest.mark.parametrize("override,message", [
    ("loss.batch_mode=sometimes", "loss.batch_mode must be"),
    ("loss.encoder_losses=some", "loss.encoder_losses must be 'reconstruction' or 'all'"),
    ("loss.perceptual_backend=vgg", "loss.perceptual_backend='vgg' is not one of"),
    ("model.batch_size=6", "must be a multiple of 4"),
    ("trainer.precision=16-mixed", "use trainer.precision=bf16-mixed"),
    ("+trainer.max_step=3", "trainer.max_step is not a pytorch_lightning.Trainer argument"),
    ("classifier.arch=resnt18", "classifier: "),
    ("callbacks.encoder_fit.kl_weight=-1", "callbacks.encoder_fit needs steps >= 0, kl_weight >= 0"),
])
def test_bad_options_are_refused_before_any_training(tmp_path, override, message):
    run_dir = tmp_path / "synthetic" / "bad"
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(tiny_cfg(run_dir, override))
    assert not (run_dir / "classifier").exists(), "work was done before the option was checked"


def test_resume_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path / "x", f"resume={tmp_path}")
    with pytest.raises(ConfigError, match="last.ckpt does not exist"):
        train(cfg)


# ------------------------------------------------------------------------------------------ checkpoints
def test_atomic_checkpoint_write_keeps_the_previous_file_when_interrupted(tmp_path):
    from stylex.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "x": Boom()}, path)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"


def test_tensorboard_logger_receives_scalars_and_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "synthetic" / "tb"
    train(tiny_cfg(run_dir, "logger=tensorboard", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
                   "classifier.train.max_epochs=1"))
    events = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    tags = {"scalars": set(), "images": set()}
    for e in events:
        acc = EventAccumulator(str(e), size_guidance={"images": 0}).Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert {"train/rec_l1", "train/kl_rec", "train/loss_d"} <= tags["scalars"]
    assert "samples" in tags["images"]


def test_damaged_export_gives_a_clear_error(tiny_run, tmp_path):
    import shutil

    from stylex.export import load_export

    exp = tmp_path / "export"
    shutil.copytree(tiny_run / "export", exp)
    data = (exp / "model.safetensors").read_bytes()
    (exp / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        load_export(exp)
    (exp / "stylex.json").write_text('{"format": "stylex-export", "version": 1}')
    with pytest.raises(ValueError, match="lacks"):
        load_export(exp)


def test_resume_last_picks_the_run_whose_checkpoint_is_newest(tmp_path):
    import os

    from stylex.training.run import find_latest_run

    old, new, no_ckpt = (tmp_path / "synthetic" / n for n in ("b-old", "a-new", "c-none"))
    for run, stamp in ((old, 1_000), (new, 2_000)):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        os.utime(run / "checkpoints" / "last.ckpt", (stamp, stamp))
    no_ckpt.mkdir(parents=True)
    assert find_latest_run(tmp_path) == new
    with pytest.raises(ConfigError, match="no run with checkpoints/last.ckpt"):
        find_latest_run(tmp_path / "empty")


def test_loss_config_names_unknown_options_and_checks_values():
    from stylex.training.loss import LossConfig

    with pytest.raises(ValueError, match=r"unknown loss option\(s\) \['advv'\]"):
        LossConfig.coerce({"advv": 1.0})
    with pytest.raises(ValueError, match="loss.adv must be a number"):
        LossConfig.coerce({"adv": "strong"})
    with pytest.raises(ValueError, match="loss.d_features must be true or false"):
        LossConfig.coerce({"d_features": "yes"})
    with pytest.raises(ValueError, match=r"loss.style_mixing must be in \[0, 1\]"):
        LossConfig.coerce({"style_mixing": 1.5})
    with pytest.raises(ValueError, match="loss.rec_noise must be 'random', 'const' or 'none'"):
        LossConfig.coerce({"rec_noise": "fixed"})
    cfg = LossConfig.coerce({"adv": 2.0})
    assert cfg.adv == 2.0 and cfg.kl_gen == LossConfig().kl_gen
    assert LossConfig.coerce(cfg) is cfg  # a checked config is not checked again


@pytest.mark.parametrize("d_features", [False, True])
def test_discriminator_phase_is_the_logistic_loss_plus_the_scaled_r1_penalty(tmp_path, d_features):
    """D main + D reg against their definitions: softplus(-D(x)) + softplus(D(G(z))) + gamma/2 ·
    interval · E|∇_x D(x)|², with the same latents; with feature heads D(x) also reads C's maps
    of x, and the R1 gradient runs through the frozen classifier."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path, "loss.r1_gamma=0.3", "loss.r1_interval=4",
                                    f"loss.d_features={str(d_features).lower()}")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    assert (module.D.feature_heads is not None) == d_features
    if d_features:  # one head per feature map of the classifier, sized from it
        assert module.D.feature_heads.channels == [f.shape[1] for f in module.C(torch.zeros(1, 3, 16, 16))[1]]

    def D(img, c):  # D as defined: with heads it also reads C's feature maps of the same image
        return module.D(img, c, features=module.C(img)[1]) if d_features else module.D(img, c)

    x = next(iter(dm.train_dataloader()))["image"]
    inputs = module.loss.prepare(x)
    torch.manual_seed(4)
    loss, logs = module.loss.discriminator(inputs, (False, True), r1=True)
    torch.manual_seed(4)
    with torch.no_grad():
        fake = module.G(torch.randn(x.shape[0], module.G.z_dim), inputs.c_noise)
    real = x.detach().clone().requires_grad_(True)
    real_logits = D(real, inputs.c_real)
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    logistic = F.softplus(-real_logits).mean() + F.softplus(D(fake, inputs.c_noise)).mean()
    expected = logistic + 0.3 / 2 * 4 * grad.square().sum(dim=[1, 2, 3]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_d"], logistic.detach(), rtol=1e-5, atol=1e-6)
    no_r1, _ = module.loss.discriminator(inputs, (False, True), r1=False)
    assert float(loss.detach()) > float(no_r1.detach())
    if d_features:
        # the R1 term alone trains the heads through the classifier's second derivatives
        module.D.zero_grad()
        (loss - no_r1).backward()
        heads = list(module.D.feature_heads.heads.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)


def test_the_generator_learns_from_the_feature_heads_through_the_frozen_classifier(tmp_path):
    # Only the adversarial terms are on, and D's own image head outputs zero: the generator's
    # gradient can only come from the feature heads, through the classifier's features.
    zero = [f"loss.{k}=0" for k in ("rec_l1", "perceptual", "latent_l1", "kl_rec", "kl_gen")]
    cfg, dm, clf = _module_and_data(tmp_path, *zero, "loss.r1_gamma=0", "loss.d_features=true")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    with torch.no_grad():
        module.D.out.weight.zero_()
        module.D.out.bias.zero_()
    x = next(iter(dm.train_dataloader()))["image"]
    inputs = module.loss.prepare(x)
    loss, _, _ = module.loss.generator(inputs, (False, True))
    loss.backward()
    grads = [p.grad for p in module.G.synthesis.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in clf.parameters())


def test_a_feature_network_judges_realism_and_the_explained_classifier_keeps_the_kl(tmp_path):
    """With classifier.feature_checkpoint the perceptual maps, D's feature heads and the quality
    features come from the second network; the logits (KL, conditioning) stay the explained one's."""
    from stylex.classifier import build_classifier
    from stylex.metrics.realism import feature_extractor
    from stylex.training.perceptual import ClassifierFeatures

    cfg, dm, clf = _module_and_data(tmp_path)
    torch.manual_seed(3)
    other = build_classifier({"arch": "resnet18"}, 5)  # another architecture and class count
    path = tmp_path / "features.safetensors"
    other.save(path)
    over = [f"classifier.feature_checkpoint={path}", "loss.perceptual_backend=classifier", "loss.d_features=true"]
    module = build_module(tiny_cfg(tmp_path / "run", *over), dm.num_classes, dm.class_names, clf)
    net = module.feature_classifier
    assert net is not clf and not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in other.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), f"feature network tensor {k} was not loaded"

    x = next(iter(dm.train_dataloader()))["image"][:4]
    logits, feats = module.loss._classify(x, features=True)
    torch.testing.assert_close(logits, clf(x))
    expected = ClassifierFeatures(other.eval())(x)[1]
    own = module.C(x)[1]
    assert [f.shape for f in feats] == [f.shape for f in expected]
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(feats[-1], own[-1])  # not the explained classifier's maps
    assert module.D.feature_heads.channels == [f.shape[1] for f in expected]
    quality = feature_extractor(net, None, 16, "feature-net")
    assert quality.name == "feature-net:resnet18" and quality.num_features == 512
    # Without the option the module holds the explained classifier once, and checkpoints no copy.
    plain = build_module(cfg, dm.num_classes, dm.class_names, clf)
    assert plain.feature_classifier is clf and plain.F is plain.C
    assert module.own_feature_classifier is net and plain.own_feature_classifier is None
    assert not any(k.startswith("feature_net.") for k in plain.state_dict())
    assert any(k.startswith("feature_net.") for k in module.state_dict())


def test_the_export_carries_the_realism_network_and_the_explanation_reads_it_from_there(tmp_path):
    """A run with classifier.feature_checkpoint exports that network too, so the explanation's KID
    reads the features training used even when the file it came from is gone; a run without one
    exports no copy of anything."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from stylex.classifier import build_classifier
    from stylex.explain.inputs import realism_network
    from stylex.export import load_export
    from stylex.training.callbacks import Exporter

    cfg, dm, clf = _module_and_data(tmp_path)
    torch.manual_seed(5)
    other = build_classifier({"arch": "resnet18"}, 3)
    path = tmp_path / "features.safetensors"
    other.save(path)
    module = build_module(tiny_cfg(tmp_path / "run", f"classifier.feature_checkpoint={path}"),
                          dm.num_classes, dm.class_names, clf)
    plain = build_module(cfg, dm.num_classes, dm.class_names, clf)
    for name, m in (("with", module), ("plain", plain)):
        Exporter(out_dir=str(tmp_path / name)).export(SimpleNamespace(default_root_dir=str(tmp_path)), m)
    path.unlink()  # the file the run named is gone; the export still has the network

    exp = load_export(tmp_path / "with")
    net = exp.feature_classifier
    assert net is not None and not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.config["arch"] == "resnet18" and net.num_classes == 3
    for k, v in other.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), f"exported feature network tensor {k} differs"
    for k, v in clf.state_dict().items():  # the explained classifier is still the explained one
        assert torch.equal(exp.classifier.state_dict()[k], v)
    notes: list[str] = []
    config = {"classifier": {"feature_checkpoint": str(path)}}
    assert realism_network(config, notes.append, exp) is net and notes == []
    assert realism_network(config, notes.append) is None and len(notes) == 1  # without the export: the note

    bare = load_export(tmp_path / "plain")
    assert bare.feature_classifier is None and "feature_classifier" not in bare.meta
    assert not any(k.startswith("feature_classifier.") for k in load_file(str(tmp_path / "plain" / "model.safetensors")))


# ------------------------------------------------------------------------------------------ ADA
ADA_KIMG = 0.5  # p moves by 8 · 4 / 500 = 0.064 per update: visible within 40 steps


@pytest.fixture(scope="module")
def ada_run(tmp_path_factory):
    """40 steps on 16 training images (D soon tells them from the fakes), with spies on what the
    augmentation pipe, D and the classifier receive in the last 8 steps."""
    run_dir = tmp_path_factory.mktemp("ada") / "synthetic" / "ada"
    seen = {"pipe": [], "D": [], "classifier": [], "p": []}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, module):
            def recording() -> bool:
                return trainer.global_step >= 32 and trainer.training

            def on_pipe(m, args, out):
                if recording():
                    seen["pipe"].append((args[0].detach().clone(), out.detach().clone()))
                    seen["p"].append(m.p_value)

            def on_d(m, args):
                if recording():
                    seen["D"].append(args[0].detach().clone())

            def on_classifier(m, args):
                if recording():
                    seen["classifier"].append(args[0].detach().clone())

            module.augment.register_forward_hook(on_pipe)
            module.D.register_forward_pre_hook(on_d)
            module.C.classifier.register_forward_pre_hook(on_classifier)

    from stylex.training import run as run_mod

    original = run_mod.build_callbacks
    run_mod.build_callbacks = lambda *a, **k: original(*a, **k) + [Spy()]
    try:
        train(tiny_cfg(run_dir, "dataset.num_train=16", "loss.augment=ada", f"loss.ada_kimg={ADA_KIMG}",
                       "trainer.max_steps=40", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1.0",
                       "trainer.check_val_every_n_epoch=10", "classifier.train.max_epochs=1",
                       "classifier.train.batch_size=8"))
    finally:
        run_mod.build_callbacks = original
    return run_dir, seen


def _step_rows(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for f in (run_dir / "logs").rglob("metrics.csv"):
        with open(f) as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("train/ada_p") not in (None, "")]
    return sorted(rows, key=lambda r: int(r["step"]))


def test_ada_raises_p_when_d_overfits_a_tiny_dataset(ada_run):
    run_dir, _ = ada_run
    rows = _step_rows(run_dir)
    assert len(rows) == 40
    p = [float(r["train/ada_p"]) for r in rows]
    assert p[-1] > 0 and max(p) >= 2 * 8 * 4 / (ADA_KIMG * 1000) - 1e-6, p
    # every 4th discriminator step an update, by exactly the formula's step toward the target
    updates = [i for i, r in enumerate(rows) if r.get("train/rt") not in (None, "")]
    assert updates == list(range(3, 40, 4))
    before = 0.0
    for i, r in enumerate(rows):
        if i in updates:
            rt = float(r["train/rt"])
            step = math.copysign(8 * 4 / (ADA_KIMG * 1000), rt - 0.6) if rt != 0.6 else 0.0
            assert p[i] == pytest.approx(min(1.0, max(0.0, before + step)), abs=1e-6), (i, rt, p)
        else:
            assert p[i] == before, "p moved between updates"
        before = p[i]
    # p is saved with the weights, so a resumed run goes on from it
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert float(ckpt["state_dict"]["augment.p"]) == pytest.approx(p[-1])


def test_d_sees_augmented_images_and_the_classifier_never_does(ada_run):
    _, seen = ada_run
    assert seen["pipe"] and min(seen["p"]) > 0
    changed = [(i, o) for i, o in seen["pipe"] if not torch.equal(i, o)]
    assert len(changed) > len(seen["pipe"]) // 2, "at p > 0 the pipe left almost every batch untouched"
    # every image D saw came out of the pipe (reals, fakes of both paths, the R1 pass)
    for d_in in seen["D"]:
        assert any(torch.equal(d_in, o) for _, o in seen["pipe"]), "D saw an image that skipped the pipe"
    # the classifier saw the un-augmented reals, and never an augmented image
    assert any(torch.equal(c, i) for c in seen["classifier"] for i, _ in changed)
    for c in seen["classifier"]:
        assert not any(c.shape == o.shape and torch.equal(c, o) for _, o in changed)


def test_r1_is_taken_at_the_unaugmented_reals_through_the_pipe(tmp_path):
    """D phase with a pipe at p = 1: logistic loss on augmented reals and fakes, and R1 of the
    gradient with respect to the un-augmented reals (the chain rule through the pipe)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg, dm, clf = _module_and_data(tmp_path, "loss.augment=fixed", "loss.augment_p=1.0",
                                    "loss.r1_gamma=0.3", "loss.r1_interval=4")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    assert module.ada is None and module.augment.p_value == 1.0 and module.loss.augment is module.augment
    x = next(iter(dm.train_dataloader()))["image"]
    inputs = module.loss.prepare(x)
    torch.manual_seed(4)
    loss, logs = module.loss.discriminator(inputs, (False, True), r1=True)
    torch.manual_seed(4)
    with torch.no_grad():
        fake = module.G(torch.randn(x.shape[0], module.G.z_dim), inputs.c_noise)
    fake_logits = module.D(module.augment(fake), inputs.c_noise)
    real = x.detach().clone().requires_grad_(True)
    augmented = module.augment(real)
    real_logits = module.D(augmented, inputs.c_real)
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    expected = (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
                + 0.3 / 2 * 4 * grad.square().sum(dim=[1, 2, 3]).mean())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.loss.last_real_logits, real_logits.detach())
    assert not torch.equal(augmented, real)


def test_generator_adversarial_terms_see_augmented_renders_and_the_kl_terms_clean_ones(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path, "loss.augment=fixed", "loss.augment_p=1.0")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    calls = {"pipe": [], "D": [], "C": []}
    module.augment.register_forward_hook(lambda m, a, o: calls["pipe"].append((a[0].detach(), o.detach())))
    module.D.register_forward_pre_hook(lambda m, a: calls["D"].append(a[0].detach()))
    module.C.classifier.register_forward_pre_hook(lambda m, a: calls["C"].append(a[0].detach()))
    inputs = module.loss.prepare(next(iter(dm.train_dataloader()))["image"])
    calls["C"].clear()
    module.loss.generator(inputs, (True, True))
    assert len(calls["pipe"]) == len(calls["D"]) == 2  # the encoder and the noise path's adversarial terms
    for (renders, augmented), d_in in zip(calls["pipe"], calls["D"]):
        assert torch.equal(d_in, augmented) and not torch.equal(renders, augmented)
        assert any(torch.equal(c, renders) for c in calls["C"]), "the classifier did not see the clean render"
        assert not any(torch.equal(c, augmented) for c in calls["C"])


def test_augment_none_builds_no_pipe_and_p_zero_changes_nothing(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path, "loss.augment=none")
    plain = build_module(cfg, dm.num_classes, dm.class_names, clf)
    assert plain.augment is None and plain.ada is None and "augment.p" not in plain.state_dict()
    cfg_ada, _, _ = _module_and_data(tmp_path / "b", "loss.augment=ada")
    ada = build_module(cfg_ada, dm.num_classes, dm.class_names, clf)
    assert ada.loss_cfg.augment == "ada" and ada.augment.p_value == 0.0  # ada starts from p = 0
    ada.load_state_dict(plain.state_dict())  # a checkpoint without p loads; p keeps its configured start
    assert ada.augment.p_value == 0.0
    x = next(iter(dm.train_dataloader()))["image"]
    out = []
    for module in (plain, ada):
        torch.manual_seed(1)
        inputs = module.loss.prepare(x)
        loss_d, _ = module.loss.discriminator(inputs, (True, True), r1=True)
        loss_g, _, _ = module.loss.generator(inputs, (True, True))
        out.append((loss_d.detach(), loss_g.detach(), torch.rand(1)))
    for a, b in zip(*out):
        assert torch.equal(a, b)  # same losses, same random-number stream afterwards
    # and the other way: a checkpoint with p loads into a module without a pipe
    ada.augment.set_p(0.3)
    plain.load_state_dict(ada.state_dict())


def test_augment_fixed_keeps_p_through_training(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path, "loss.augment=fixed", "loss.augment_p=0.2", "loss.ada_interval=1")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    _fit_steps(module, dm, 3, tmp_path)
    assert module.ada is None and module.augment.p_value == pytest.approx(0.2)
    assert float(module.state_dict()["augment.p"]) == pytest.approx(0.2)


@pytest.mark.parametrize("override,message", [
    ("loss.augment=sometimes", "loss.augment must be 'auto', 'ada', 'fixed' or 'none', got 'sometimes'"),
    ("loss.augment_p=1.5", "loss.augment_p must be in [0, 1]"),
    ("loss.ada_interval=0", "loss.ada_interval must be >= 1"),
])
def test_bad_augment_options_are_refused_before_any_training(tmp_path, override, message):
    run_dir = tmp_path / "synthetic" / "bad"
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(tiny_cfg(run_dir, override))
    assert not (run_dir / "classifier").exists()


def test_augment_auto_is_ada_on_real_data_and_off_on_generated_data(tmp_path):
    from helpers import compose_cfg
    from stylex.training.run import check

    synthetic = tiny_cfg(tmp_path / "s")
    loss, _, _ = check(synthetic)
    assert loss.augment == "none" and synthetic.loss.augment == "none"  # the saved config records it
    folder = compose_cfg(["dataset=folder", f"dataset.root={tmp_path}", "logger=csv"])
    loss, _, _ = check(folder)
    assert loss.augment == "ada"
    explicit = tiny_cfg(tmp_path / "e", "loss.augment=ada")
    assert check(explicit)[0].augment == "ada"


def test_a_step_renders_each_path_once_and_d_reads_the_same_images_the_generator_is_trained_on(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path, "loss.augment=none", "loss.r1_interval=1")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    calls = {"synthesis": 0, "E": 0, "D": []}

    synthesize = module.G.synthesis.synthesize

    def counted_synthesize(*a, **kw):
        calls["synthesis"] += 1
        return synthesize(*a, **kw)

    module.G.synthesis.synthesize = counted_synthesize
    module.E.register_forward_pre_hook(lambda m, a: calls.update(E=calls["E"] + 1))
    # (images, whether D was being trained) for every D pass of the step
    module.D.register_forward_pre_hook(
        lambda m, a: calls["D"].append((a[0].detach().clone(), next(m.parameters()).requires_grad)))
    _fit_steps(module, dm, 1, tmp_path)
    # one synthesis pass per path; E on the batch and on the reconstruction (latent L1)
    assert calls["synthesis"] == 2 and calls["E"] == 2
    d_phase = [img for img, training_d in calls["D"] if training_d]
    g_phase = [img for img, training_d in calls["D"] if not training_d]
    assert len(d_phase) == 3 and len(g_phase) == 2  # encoder fakes, noise fakes, reals (R1); then both fakes
    torch.testing.assert_close(d_phase[0], g_phase[0])  # x̂: the same render in both phases
    torch.testing.assert_close(d_phase[1], g_phase[1])  # x̃: the same z and the same render


@pytest.mark.parametrize("rec_noise", ["random", "const", "none"])
def test_the_encoder_path_renders_with_the_noise_of_loss_rec_noise(tmp_path, rec_noise):
    cfg, dm, clf = _module_and_data(tmp_path, f"loss.rec_noise={rec_noise}", "model.noise_init=0.5")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    inputs = module.loss.prepare(next(iter(dm.train_dataloader()))["image"][:4])
    with torch.no_grad():
        first, second = (module.loss.render(inputs, (True, False)).x_rec for _ in range(2))
        expected = module.G.generate(module.E(inputs.x), inputs.c_real, noise_mode=rec_noise)
    # fresh noise per render under random; the fixed maps (or none) otherwise, as explanations render
    assert torch.equal(first, second) == (rec_noise != "random")
    if rec_noise != "random":
        torch.testing.assert_close(first, expected)


@pytest.mark.parametrize("style_mixing", [0.0, 1.0])
def test_noise_path_styles_come_from_two_latents_under_style_mixing(tmp_path, style_mixing):
    cfg, dm, clf = _module_and_data(tmp_path, f"loss.style_mixing={style_mixing}", "loss.augment=none")
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    seen = []
    styles = module.G.styles
    module.G.styles = lambda wc: (seen.append(wc.detach().clone()), styles(wc))[1]
    c = torch.softmax(torch.randn(6, dm.num_classes), 1)
    module.loss._noise_images(c)
    (wc,) = seen
    if style_mixing == 0:
        assert wc.ndim == 2  # one latent for every layer
        return
    w = wc[..., : module.G.w_dim]
    assert w.shape[1] == module.G.num_ws
    first, last = w[:, :1], w[:, -1:]
    assert bool((first != last).any(-1).all())  # two different latents in every image
    is_first, is_last = (w == first).all(-1), (w == last).all(-1)
    assert bool((is_first ^ is_last).all()) and bool(is_first[:, 0].all())
    assert bool((is_last.long().diff(dim=1) >= 0).all())  # one switch, from the first to the second
    torch.testing.assert_close(wc[..., module.G.w_dim:], c[:, None].expand(-1, module.G.num_ws, -1))


def test_a_run_with_encoder_noise_maps_trains_them_exports_them_and_renders_with_them(tmp_path):
    """model.encoder_noise=true: E's map encoder learns in the training step, the reconstruction
    and the export use its maps, and the noise path draws with maps of real images."""
    from types import SimpleNamespace

    from stylex.export import load_export
    from stylex.training.callbacks import Exporter

    cfg, dm, clf = _module_and_data(tmp_path, "model.encoder_noise=true", "model.noise_init=1")
    torch.manual_seed(0)
    module = build_module(cfg, dm.num_classes, dm.class_names, clf)
    assert module.E.noise_encoder is not None
    assert [tuple(p) for p in module.hparams.encoder["noise_layers"]] == module.G.noise_layers
    before = [p.detach().clone() for p in module.E.noise_encoder.parameters()]
    _fit_steps(module, dm, 2, tmp_path)
    assert all(not torch.equal(a, b) for a, b in zip(before, module.E.noise_encoder.parameters()))

    x = next(iter(dm.val_dataloader()))["image"][:4]
    module.eval()
    with torch.no_grad():
        rec, c = module.reconstruct(x)
        maps = module.E.noise_maps(x)
        torch.testing.assert_close(rec, module.G_ema.generate(module.E(x), c, noise_mode="const", noise=maps))
        # the maps matter: the same latents under the constant noise draw something else
        assert not torch.allclose(rec, module.G_ema.generate(module.E(x), c, noise_mode="const"), atol=1e-4)
        z = torch.randn(4, module.G_ema.z_dim)
        torch.testing.assert_close(module.sample(z, c, layout=x), module.G_ema(z, c, noise_mode="const", noise=maps))
        # the quality measurements draw their samples the same way, with layouts in a fixed order
        from stylex.training.quality import LayoutSampler

        sampler = LayoutSampler(module.G_ema, module.E, x, seed=3)
        first, second = sampler(z[:3], c[:3], "const"), sampler(z[:3], c[:3], "const")
        order = sampler.order[torch.arange(6) % 4]
        for got, rows in ((first, order[:3]), (second, order[3:])):
            expected = module.G_ema(z[:3], c[:3], noise_mode="const", noise=module.E.noise_maps(x[rows]))
            torch.testing.assert_close(got, expected)

    Exporter(out_dir=str(tmp_path / "export")).export(SimpleNamespace(default_root_dir=str(tmp_path)), module)
    exp = load_export(tmp_path / "export")
    with torch.no_grad():
        exported = exp.generator.generate(exp.encoder(x), c, noise_mode="const", noise=exp.encoder.noise_maps(x))
    torch.testing.assert_close(exported, rec)


def test_encoder_noise_maps_need_a_nonzero_noise_start(tmp_path):
    cfg, dm, clf = _module_and_data(tmp_path)
    cfg.model.encoder_noise = True  # past the config check, straight to the module
    with pytest.raises(ValueError, match="model.noise_init"):
        build_module(cfg, dm.num_classes, dm.class_names, clf)
