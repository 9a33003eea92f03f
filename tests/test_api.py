"""The Python API: ``from stylex import ...``, and the README's example run as written."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

from helpers import REPO

SNIPPET = re.compile(r"<!-- api-snippet -->\s*```python\n(.*?)```\s*<!-- /api-snippet -->", re.S)
# What the README's example reads; the test puts a tiny export and two images there.
RUN = "runs/synthetic/2026-11-25_19-02-11"
IMAGES = ("fundus1.png", "fundus2.png")


def readme_snippet() -> str:
    found = SNIPPET.findall((REPO / "README.md").read_text())
    assert len(found) == 1, "README.md must hold one ```python block between <!-- api-snippet --> markers"
    return found[0]


def test_import_stylex_loads_neither_torch_nor_lightning():
    code = ("import sys, stylex\n"
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'hydra', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves_and_has_its_own_docstring():
    import stylex

    assert set(stylex.__all__) <= set(dir(stylex))
    for name in stylex.__all__:
        obj = getattr(stylex, name)
        doc = obj.__doc__ or ""
        generated = inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")  # a dataclass's signature
        assert doc.strip() and not generated, f"stylex.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        stylex.nope  # noqa: B018


def test_the_names_are_the_objects_of_their_modules():
    import stylex
    from stylex.explain.attfind import AttFind
    from stylex.export import load_export
    from stylex.stylespace import StyleSpace
    from stylex.training.run import train

    assert (stylex.AttFind, stylex.load_export, stylex.StyleSpace, stylex.train) == (
        AttFind, load_export, StyleSpace, train)


def test_compose_config_is_what_the_command_line_runs():
    from stylex import compose_config

    cfg = compose_config(["dataset=retina", "trainer.max_steps=7"])
    assert cfg.dataset.name == "retina" and cfg.trainer.max_steps == 7
    assert cfg.logger and "wandb" in cfg.logger  # the defaults of configs/train.yaml


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """A folder laid out as the README's example expects: an export of small random networks
    under ``RUN`` and two image files, as the working directory."""
    import torch
    from PIL import Image

    from stylex import Classifier, Encoder, Generator, save_export

    g_kw = dict(z_dim=8, w_dim=8, c_dim=2, resolution=16, channel_base=128, channel_max=16, mapping_layers=1)
    e_kw = dict(w_dim=8, resolution=16, channel_base=128, channel_max=16)
    torch.manual_seed(0)
    save_export(tmp_path / RUN / "export", Generator(**g_kw), g_kw, Encoder(**e_kw), e_kw,
                Classifier("resnet10t", 2).freeze(), ["healthy", "DR signs"])
    for j, name in enumerate(IMAGES):
        Image.new("RGB", (40, 30), (200 - 150 * j, 30 + 150 * j, 30)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_example_runs_as_written(tiny_run, capsys):
    code = readme_snippet()
    assert RUN in code and all(name in code for name in IMAGES), "the test must supply what the example reads"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md <api-snippet>", "exec"), namespace)  # noqa: S102

    import torch

    images, styles, space = namespace["images"], namespace["styles"], namespace["space"]
    assert images.shape == (2, 3, 16, 16) and -1 <= images.min() and images.max() <= 1
    assert styles.shape == (2, space.dim)
    assert namespace["reconstructions"].shape == (2, 3, 16, 16)
    i = space.index("b16.conv1", 7)
    changed = (namespace["edited"] != styles).any(dim=0).nonzero().flatten().tolist()
    assert changed == [i], "the example's edit moves exactly one coordinate"
    assert torch.allclose(namespace["probs"].sum(dim=1), torch.ones(2))
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" [")[0] for line in lines] == ["healthy", "DR signs"]
    assert len(namespace["result"].rankings[1]) == 2
