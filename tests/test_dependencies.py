"""What StylEx imports is what it declares.

Every third-party module imported anywhere in ``stylex/`` (function-level imports included) must
belong to a distribution in ``[project] dependencies`` or in a documented extra; an extra's
modules are imported only where they are used, so that StylEx imports without them; the floors
cover the newest APIs the code calls; and a missing optional part is named with its install
command.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from helpers import REPO

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

PACKAGE = REPO / "stylex"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# Import name -> distribution, where they differ or the distribution may not be installed here.
# Anything else is looked up in the installed distributions' metadata.
DISTRIBUTION = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "hydra": "hydra-core",
    "hydra_zen": "hydra-zen",
    "pytorch_lightning": "pytorch-lightning",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "torch_fidelity": "torch-fidelity",
    "tensorboard": "tensorboard",
    "tensorboardX": "tensorboardx",
    "ninja": "ninja",
}

# An API the code calls -> the distribution and the release that introduced it.
FLOORS = {
    "torch.nn.utils.get_total_norm": ("torch", (2, 6)),
    "Image.Resampling": ("pillow", (9, 1)),
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """``"torch>=2.6"`` -> ``("torch", (2, 6))``; the floor is None without ``>=``."""
    name = re.match(r"[A-Za-z0-9._-]+", spec).group()
    floor = re.search(r">=\s*([0-9][0-9.]*)", spec)
    return _normalise(name), tuple(int(p) for p in floor.group(1).split(".") if p) if floor else None


REQUIRED = dict(_requirement(s) for s in PYPROJECT["dependencies"])
EXTRAS = {extra: {_requirement(s)[0] for s in specs}
          for extra, specs in PYPROJECT.get("optional-dependencies", {}).items()}
OPTIONAL = set().union(*(v for k, v in EXTRAS.items() if k != "dev")) - set(REQUIRED)


def _third_party_imports() -> dict[str, list[tuple[Path, ast.stmt, bool]]]:
    """Top-level module -> [(file, import statement, imported when the file is imported)]."""
    found: dict[str, list] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # Statements run on import: the module body, minus try blocks (an optional import's guard)
        # and `if TYPE_CHECKING:` blocks.
        eager = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "stylex" or top in sys.stdlib_module_names:
                    continue
                found.setdefault(top, []).append((path, node, id(node) in eager))
    return found


IMPORTS = _third_party_imports()


def _distribution(module: str) -> str | None:
    if module in DISTRIBUTION:
        return DISTRIBUTION[module]
    from importlib.metadata import packages_distributions

    dists = packages_distributions().get(module)
    return _normalise(dists[0]) if dists else None


def test_the_imports_were_read():
    assert {"torch", "PIL", "yaml", "hydra", "pytorch_lightning", "ninja"} <= set(IMPORTS)


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_every_third_party_import_is_declared(module):
    dist = _distribution(module)
    where = ", ".join(sorted({str(p.relative_to(REPO)) for p, _, _ in IMPORTS[module]}))
    assert dist is not None, (f"stylex imports {module} ({where}), which no installed distribution provides; "
                              "add it to pyproject.toml and to DISTRIBUTION in this test")
    assert dist in REQUIRED or dist in OPTIONAL, (
        f"stylex imports {module} ({where}) from the distribution {dist}, which pyproject.toml declares neither "
        "in [project] dependencies nor in an extra")


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _distribution(m) in OPTIONAL))
def test_an_extra_is_imported_only_where_it_is_used(module):
    eager = [f"{p.relative_to(REPO)}:{node.lineno}" for p, node, on_import in IMPORTS[module] if on_import]
    assert not eager, (f"{module} belongs to an optional extra but is imported when stylex is ({eager}); "
                       "import it inside the function that needs it")


def test_every_extra_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for extra in EXTRAS:
        assert f"| `{extra}` |" in readme, f"the extra [{extra}] is missing from README.md's table of extras"


@pytest.mark.parametrize("api", sorted(FLOORS))
def test_floors_cover_the_apis_the_code_calls(api):
    dist, release = FLOORS[api]
    users = [p for p in PACKAGE.rglob("*.py") if api in p.read_text()]
    if not users:
        pytest.skip(f"nothing calls {api} any more; its floor may go")
    floor = REQUIRED.get(dist)
    assert floor is not None and floor >= release, (
        f"{users[0].relative_to(REPO)} calls {api}, new in {dist} {'.'.join(map(str, release))}; "
        f"pyproject.toml must require {dist}>={'.'.join(map(str, release))}")


def test_pyyaml_and_the_build_backend_are_declared():
    assert "pyyaml" in REQUIRED
    assert "lpips" not in REQUIRED and not any("lpips" in v for v in EXTRAS.values())
    assert {"tensorboard", "ninja"} <= OPTIONAL and not {"tensorboard", "ninja"} & set(REQUIRED)


# ============================================================================ missing optional parts
def test_logger_tensorboard_without_tensorboard_names_the_extra(monkeypatch):
    import importlib.util

    from omegaconf import OmegaConf

    from stylex.cli import check_optional_packages
    from stylex.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    tb = OmegaConf.create({"logger": {"tensorboard": {"_target_": "pytorch_lightning.loggers.TensorBoardLogger"}}})
    with pytest.raises(UsageError, match=r"logger=tensorboard needs the tensorboard package.*stylex\[tensorboard\]"):
        check_optional_packages(tb)
    check_optional_packages(OmegaConf.create({"logger": {"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger"}}}))
    check_optional_packages(OmegaConf.create({"logger": {}}))


def test_lpips_without_local_weights_names_the_file_and_downloads_nothing(tmp_path, monkeypatch):
    import torch

    from stylex.errors import ConfigError
    from stylex.training.perceptual import LPIPSDistance, lpips_available, resolve_backend

    monkeypatch.delenv("STYLEX_LPIPS_WEIGHTS", raising=False)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))  # an empty torchvision cache
    try:
        monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("LPIPS downloaded"))
        assert not lpips_available() and resolve_backend("auto") == "classifier"
        expected = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
        with pytest.raises(ConfigError, match=re.escape(str(expected)) + r" does not exist.*STYLEX_LPIPS_WEIGHTS"):
            LPIPSDistance()
        with pytest.raises(ConfigError, match="nope.pth does not exist"):
            LPIPSDistance(weights=tmp_path / "nope.pth")
        junk = tmp_path / "junk.pth"
        junk.write_text("not weights")
        with pytest.raises(ConfigError, match="cannot be read as the weights of torchvision's alexnet"):
            LPIPSDistance(weights=junk)
    finally:
        torch.hub.set_dir(previous)


def test_lpips_with_local_weights_is_a_distance(tmp_path, monkeypatch):
    # Random backbone weights in torchvision's format stand in for the ImageNet ones: what is
    # checked is that the file is used, offline, and that the result behaves as a distance.
    import torch
    import torchvision

    from stylex.training.perceptual import LPIPSDistance, lpips_available

    torch.manual_seed(0)
    weights = tmp_path / "my squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    hub = torch.hub.get_dir()
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("LPIPS downloaded"))
    monkeypatch.setenv("STYLEX_LPIPS_WEIGHTS", str(weights))
    assert lpips_available("squeeze")
    lpips = LPIPSDistance("squeeze")
    assert torch.hub.get_dir() == hub, "the torch hub folder must be restored"
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training, "LPIPS stays in eval mode"
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    y = torch.rand(3, 3, 16, 16) * 2 - 1
    same, other = lpips(x, x), lpips(x, y)
    assert same.shape == other.shape == (3,)
    assert torch.equal(same, torch.zeros(3)) and (other > 0).all()
    assert torch.allclose(other, lpips(y, x), atol=1e-6), "symmetric"
