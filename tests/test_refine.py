"""Per-image latent refinement: it lowers the reconstruction error and keeps the class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stylex.explain.refine import refine_latents
from stylex.networks import Encoder, Generator

G_KW = dict(z_dim=8, w_dim=8, c_dim=2, resolution=16, channel_base=128, channel_max=16, mapping_layers=1)
E_KW = dict(w_dim=8, resolution=16, channel_base=128, channel_max=16)


class RedReader(nn.Module):
    """Logits ``[0, beta * (mean red - tau)]``: class 1 = "redder than tau"."""

    def __init__(self, tau: float, beta: float) -> None:
        super().__init__()
        self.tau, self.beta = tau, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(r), self.beta * (r - self.tau)], dim=1)


@pytest.fixture(scope="module")
def planted():
    """Images the generator can draw exactly (from known latents), an untrained encoder that
    misses them, and a classifier that splits them in two classes."""
    torch.manual_seed(0)
    g = Generator(**G_KW).eval().requires_grad_(False)
    e = Encoder(**E_KW).eval()
    w_true = g.mapping(torch.randn(12, 8), update_w_avg=False)
    with torch.no_grad():
        c = torch.softmax(torch.randn(12, 2), dim=1)
        x = g.generate(w_true, c, noise_mode="const")
        red = x[:, 0].mean(dim=(1, 2)).sort().values
    # the boundary in the widest gap between the middle images: every image has a clear class
    gaps = red[3:-2] - red[2:-3]
    j = int(gaps.argmax()) + 2
    clf = RedReader(float(red[j] + red[j + 1]) / 2, 8.0 / float(gaps.max()))
    return g, e, clf, x


def test_refinement_lowers_the_reconstruction_error_and_keeps_the_class(planted):
    g, e, clf, x = planted
    g_state = {k: v.clone() for k, v in g.state_dict().items()}
    e_state = {k: v.clone() for k, v in e.state_dict().items()}
    result = refine_latents(g, e, clf, x, steps=150, lr=0.05, kl_weight=1.0, batch_size=5, progress=False)
    assert result.w.shape == (12, 8) and result.c.shape == (12, 2)
    assert result.after["recon_l1"] < 0.5 * result.before["recon_l1"], (result.before, result.after)
    assert result.after["agreement"] >= result.before["agreement"]
    assert result.after["agreement"] == pytest.approx(1.0)
    # the figures are those of the returned latents, measured independently
    with torch.no_grad():
        render = g.generate(result.w, result.c, noise_mode="const")
        assert float((render - x).abs().mean()) == pytest.approx(result.after["recon_l1"], rel=1e-4)
        start = g.generate(e(x), result.c, noise_mode="const")
        assert float((start - x).abs().mean()) == pytest.approx(result.before["recon_l1"], rel=1e-4)
    # nothing but w moved, and the encoder can still be trained afterwards
    assert all(torch.equal(v, g_state[k]) for k, v in g.state_dict().items())
    assert all(torch.equal(v, e_state[k]) for k, v in e.state_dict().items())
    assert all(p.requires_grad for p in e.parameters())


def test_zero_steps_return_the_encoder_latents(planted):
    g, e, clf, x = planted
    result = refine_latents(g, e, clf, x, steps=0, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.w, e(x))
    assert result.before == result.after


def test_bad_refinement_options_are_refused(planted):
    g, e, clf, x = planted
    with pytest.raises(ValueError, match="refinement needs steps >= 0"):
        refine_latents(g, e, clf, x, steps=-1)


def test_explain_run_refines_and_reports_what_refinement_changed(tmp_path):
    """``explain.py --refine-steps``: the report holds the before / after figures and how far the
    rankings moved, and the refined figures are those of a direct refinement of the same images."""
    import json

    from stylex.classifier import Classifier
    from stylex.explain.inputs import validation_images
    from stylex.explain.pipeline import explain_run
    from stylex.explain.request import ExplainRequest
    from stylex.export import save_export

    torch.manual_seed(0)
    g, e = Generator(**G_KW).eval(), Encoder(**E_KW).eval()
    c = Classifier("test_resnet", 2).eval()
    run = tmp_path / "runs" / "synthetic" / "r"
    dataset = {"_target_": "stylex.data.SyntheticDataModule", "name": "synthetic", "resolution": 16,
               "batch_size": 8, "num_train": 16, "num_val": 24, "num_test": 8}
    save_export(run / "export", g, G_KW, e, E_KW, c, ["healthy", "DR signs"], extra={"config": {"dataset": dataset}})
    request = ExplainRequest(run=run, num_images=12, top_k=2, flip_k=2, examples=1, prescreen="8", refine_steps=30,
                             wandb=False)
    report, _ = explain_run(request)
    data = json.loads(report.json.read_text())
    ref = data["refinement"]
    assert ref["steps"] == 30 and ref["images"] == 12
    assert ref["recon_l1_after"] < ref["recon_l1_before"]
    assert 0.0 <= ref["rankings_vs_encoder"]["class_overlap"] <= 1.0
    assert "Latents refined per image" in report.html.read_text()
    images, _ = validation_images({"dataset": dataset}, 12, 16)
    direct = refine_latents(g, e, c, images, steps=30, lr=request.refine_lr, kl_weight=request.refine_kl,
                            progress=False)
    assert ref["recon_l1_after"] == pytest.approx(direct.after["recon_l1"], rel=1e-3)
