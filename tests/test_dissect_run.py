"""The dissection of a whole run: ``stylex-explain --dissect`` on a small random export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from stylex.classifier import Classifier
from stylex.cli import explain_main
from stylex.dissect.base import unit_layers
from stylex.export import save_export
from stylex.networks import Encoder, Generator
from stylex.stylespace import StyleSpace

G_KW = dict(z_dim=8, w_dim=8, c_dim=2, resolution=16, channel_base=128, channel_max=16, mapping_layers=1)
E_KW = dict(w_dim=8, resolution=16, channel_base=128, channel_max=16)
FAST = ["--num-images", "16", "--intervention-images", "8", "--encoded-images", "0", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding an export of small random networks and nothing else: no data set in
    its config, so the concepts are the classifier's class evidence."""
    torch.manual_seed(0)
    g = Generator(**G_KW).eval().requires_grad_(False)
    e = Encoder(**E_KW).eval()
    c = Classifier("resnet10t", 2).freeze()
    folder = tmp_path_factory.mktemp("dissect") / "runs" / "folder" / "2024-01-01_00-00-00"
    save_export(folder / "export", g, G_KW, e, E_KW, c, ["healthy", "sick"], extra={"config": {}})
    return SimpleNamespace(folder=folder, layers=unit_layers(StyleSpace(g)))


def test_dissect_writes_its_report_and_marks_where_attributes_act(run, capsys):
    # An explanation first: its attributes are localised by the dissection.
    assert explain_main(["--run", str(run.folder), "--top-k", "2", "--num-images", "8", "--flip-k", "0",
                         "--prescreen", "none", "--source", "generated", "--quiet"]) == 0
    capsys.readouterr()
    assert explain_main(["--dissect", "--run", str(run.folder), *FAST]) == 0
    page = run.folder / "dissect" / "report.html"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(page)
    data = json.loads((run.folder / "dissect" / "dissection.json").read_text())
    d = data["dissection"]
    assert data["concept_source"].startswith("Grad-CAM") and d["concepts"] == ["evidence: healthy", "evidence: sick"]
    assert list(d["layers"]) == run.layers and d["num_images"] == 16
    for name, layer in d["layers"].items():  # the bar chart's counts are the interpretable units' labels
        expected = {}
        for label, ok in zip(layer["labels"], layer["interpretable"]):
            if ok:
                expected[label] = expected.get(label, 0) + 1
        assert {k: v for k, v in d["counts"][name].items() if v} == expected
    assert set(data["interventions"]) == set(d["concepts"])
    for iv in data["interventions"].values():
        ins = iv["insertion"]
        assert iv["layer"] in run.layers and ins["successes"] <= ins["trials"]
        assert ins["success_rate"] is None if ins["trials"] == 0 else ins["success_rate"] == ins["successes"] / ins["trials"]
        probs = [v["base"] for v in iv["classifier"]["ablation"]["classes"].values()]
        assert abs(sum(probs) - 1.0) < 1e-4
    # Every ranked attribute of the explanation now says where it acts, in the JSON and the page.
    explanation = json.loads((run.folder / "explain" / "explanation.json").read_text())
    ranked = [a for cls in explanation["classes"].values() for a in cls["attributes"]]
    assert ranked and all("acts_on" in a for a in ranked)
    assert len(data["attributes"]["attributes"]) == len(ranked)
    html = page.read_text()
    assert "src='montages/" not in html and html.count("data:image/png;base64,") >= 2
    assert "acts on" in (run.folder / "explain" / "report.html").read_text()


@pytest.mark.parametrize("case", ["layer", "num_images", "quantile", "segmenter"])
def test_dissect_bad_input_is_one_line_exit_2_and_writes_nothing(case, run, tmp_path, capsys):
    out = tmp_path / "out"
    argv, message = {
        "layer": (["--layers", "b16.nope"], "the valid layers are"),
        "num_images": (["--num-images", "0"], "--num-images must be >= 1"),
        "quantile": (["--quantile", "1.5"], "--quantile must lie in (0, 1)"),
        "segmenter": (["--segmenter", str(tmp_path / "missing.pt")], "no such file"),
    }[case]
    assert explain_main(["--dissect", "--run", str(run.folder), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not out.exists()
    if case == "layer":
        assert all(layer in lines[0] for layer in run.layers)


def test_dissect_callback_dissects_after_fit_and_keeps_the_run_on_failure(tmp_path):
    from stylex.dissect.callback import DissectCallback

    torch.manual_seed(0)
    g = Generator(**G_KW).eval().requires_grad_(False)
    e = Encoder(**E_KW)
    e.train()
    c = Classifier("resnet10t", 2).freeze()
    module = SimpleNamespace(G_ema=g, E=e, classifier=c, class_names=["a", "b"], device=torch.device("cpu"))
    val = [{"image": torch.rand(3, 16, 16) * 2 - 1, "label": torch.tensor(i % 2)} for i in range(12)]
    dm = SimpleNamespace(val_dataset=val, hparams={})
    trainer = SimpleNamespace(datamodule=dm, default_root_dir=str(tmp_path), global_step=5, loggers=[])
    off = DissectCallback()  # the default: off
    off.on_train_end(trainer, module)
    assert not (tmp_path / "dissect").exists()
    cb = DissectCallback(enabled=True, num_images=8, encoded_images=6, intervention_images=4, threads=1,
                         layers=["b8.conv1", "b16.conv1"])
    threads = torch.get_num_threads()
    cb.on_train_end(trainer, module)
    assert torch.get_num_threads() == threads and e.training, "thread count and modes must be restored"
    data = json.loads((tmp_path / "dissect" / "dissection.json").read_text())
    d = data["dissection"]
    assert list(d["layers"]) == ["b8.conv1", "b16.conv1"] and d["num_images"] == 8 and d["num_encoded"] == 6
    # The validation images also score the artifact units: FID with the top units ablated and without.
    art = data["artifacts"]
    assert art["layer"] == "b16.conv1" and {"plain", "top", "random"} <= set(art["realism"])
    assert cb.last_report == tmp_path / "dissect" / "report.html" and cb.last_report.is_file()
    # A failing dissection is logged; the finished run and its earlier report stay as they were.
    bad = DissectCallback(enabled=True, num_images=8, layers=["nope"])
    assert bad.dissect(trainer, module) is None
    assert (tmp_path / "dissect" / "report.html").is_file() and not list(tmp_path.glob(".dissect-*"))


def test_dissection_joins_the_training_runs_wandb_group(tmp_path, monkeypatch, capsys):
    import wandb

    from stylex.utils.loggers import wandb_identity

    torch.manual_seed(0)
    g = Generator(**G_KW).eval().requires_grad_(False)
    folder = tmp_path / "runs" / "folder" / "2024-03-03_00-00-00"
    logger = {"wandb": {"_target_": "pytorch_lightning.loggers.WandbLogger", "project": "stylex", "offline": True}}
    save_export(folder / "export", g, G_KW, Encoder(**E_KW).eval(), E_KW, Classifier("resnet10t", 2).freeze(),
                ["healthy", "sick"], extra={"config": {"logger": logger}})
    calls = []

    class Run:
        def log(self, payload):
            calls.append(("log", payload))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(("init", kw)) or Run())
    assert explain_main(["--dissect", "--run", str(folder), "--layers", "b16.conv1", *FAST]) == 0
    (_, init), (_, payload) = calls
    assert init["job_type"] == "dissect" and init["group"] == wandb_identity("dataset", folder)["group"]
    assert {"dissect/units", "dissect/units_per_layer"} <= set(payload)
    assert any(k.startswith("dissect/ablation/") for k in payload)


def test_a_report_folder_is_published_whole_or_not_at_all(tmp_path):
    from stylex.utils.io import atomic_folder

    out = tmp_path / "dissect"
    out.mkdir()
    (out / "old.txt").write_text("earlier report")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dissect"] and (out / "old.txt").is_file()
    with atomic_folder(out) as tmp:
        (tmp / "report.html").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dissect"]


class BrightSegmenter:
    """Stand-in concepts at 16x16: pixels darker / brighter than the image's mean."""

    concepts = ["dark", "bright"]
    resolution = 16
    source = "brightness threshold (test stand-in)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        lum = images.mean(dim=1)
        bright = lum > lum.mean(dim=(1, 2), keepdim=True)
        return torch.stack([~bright, bright], dim=1)


def test_dissection_of_an_encoder_noise_export_renders_with_the_encoders_maps(tmp_path, capsys):
    """Encoded images take the encoder's maps of them, samples those of real image i % M (the
    training's noise path); without real images the samples get constant noise, and a note says so."""
    from dissect_fixtures import maps_generator

    from stylex.dissect.dissection import noise_latents
    from stylex.dissect.pipeline import DissectSettings, dissect_export
    from stylex.export import load_export

    g = maps_generator(**G_KW)
    e_kw = {**E_KW, "noise_maps": True, "noise_layers": [list(x) for x in g.noise_layers]}
    torch.manual_seed(1)
    folder = tmp_path / "runs" / "folder" / "2024-01-01_00-00-00"
    save_export(folder / "export", g, G_KW, Encoder(**e_kw).eval(), e_kw, Classifier("resnet10t", 2).freeze(),
                ["healthy", "sick"], extra={"config": {}})
    exp = load_export(folder / "export")
    assert exp.encoder.noise_encoder is not None
    space = StyleSpace(exp.generator)
    real = torch.rand(5, 3, 16, 16) * 2 - 1
    s = DissectSettings(num_images=6, encoded_images=3, intervention_images=7, alpha_steps=0, causal_units=2,
                        artifact_count=2, batch_size=4)
    notes: list[str] = []
    data = dissect_export(exp, tmp_path / "with", BrightSegmenter(), s, real_images=real, say=notes.append)

    def probs(x):
        return exp.classifier(x).float().softmax(dim=1)

    with torch.no_grad():
        maps = exp.encoder.noise_maps(real)
        layout = [{k: m[i % 5 : i % 5 + 1] for k, m in maps.items()} for i in range(7)]
        # The dissected images, one at a time: samples with layouts, encoded images with their own maps.
        wn, cn = noise_latents(exp.generator, 6, seed=0)
        x = real[:3]
        flat = torch.cat([space.flat_styles(wn, cn), space.flat_styles(exp.encoder(x), probs(x))])
        rows = [layout[i] for i in range(6)] + [{k: m[j : j + 1] for k, m in maps.items()} for j in range(3)]
        area = torch.stack([BrightSegmenter()(space.render(flat[i : i + 1], noise=rows[i]))[0].double().mean(dim=(1, 2))
                            for i in range(9)]).mean(dim=0)
        const_area = BrightSegmenter()(space.render(flat)).double().mean(dim=(0, 2, 3))
        # The intervention samples' classifier probabilities.
        ws, cs = noise_latents(exp.generator, 7, seed=1)
        samples = space.flat_styles(ws, cs)
        base = torch.cat([probs(space.render(samples[i : i + 1], noise=layout[i])) for i in range(7)]).mean(dim=0)
        const_base = probs(space.render(samples)).mean(dim=0)
    assert data["dissection"]["concept_area"] == pytest.approx(area.tolist(), abs=1e-9)
    assert (area - const_area).abs().max() > 1e-3
    assert "encoder" in data["noise_maps"] and not any("constant noise" in n for n in notes)
    for iv in data["interventions"].values():
        got = [v["base"] for v in iv["classifier"]["ablation"]["classes"].values()]
        assert got == pytest.approx(base.tolist(), abs=1e-6)
    assert (base - const_base).abs().max() > 1e-6

    # No real images: the samples have no layouts; they are rendered with constant noise and a note says so.
    notes.clear()
    alone = dissect_export(exp, tmp_path / "without", BrightSegmenter(), s, artifacts=False, say=notes.append)
    assert any("constant noise" in n for n in notes) and alone["noise_maps"].startswith("none")
    for iv in alone["interventions"].values():
        got = [v["base"] for v in iv["classifier"]["ablation"]["classes"].values()]
        assert got == pytest.approx(const_base.tolist(), abs=1e-6)
    # The command line says it too (the export's config names no data set, so there are no real images).
    assert explain_main(["--dissect", "--run", str(folder), "--num-images", "4", "--intervention-images", "4",
                         "--encoded-images", "0", "--no-artifacts"]) == 0
    assert "constant noise, without layouts" in capsys.readouterr().err
