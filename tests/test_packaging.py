"""StylEx as a user installs it: a wheel with the configs and CUDA sources inside, and console
scripts that work from any folder.

The wheel is built from the project's files (offline, no build isolation), installed without
dependencies into a new virtual environment, and its commands are run from an empty folder, so
neither the checkout nor its ``configs/`` can be on the path.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

# What the build reads: pyproject.toml names README.md, setup.py maps configs/ and custom_ops/.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "stylex", "configs", "custom_ops")


def _outer_site_dirs() -> list[str]:
    """The site-packages folders this interpreter imports third-party packages from."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def _make_venv(folder: Path) -> Path:
    """A new virtual environment that sees this interpreter's packages but not the checkout;
    returns its python.

    ``venv --system-site-packages`` exposes the *base* interpreter's site-packages. When pytest
    itself runs in a virtual environment (the usual case), torch, Lightning and the rest live in
    that environment's site-packages instead, which the new one would not see, and the base's
    packages would shadow them. So the new environment is made without system packages, and a
    ``.pth`` file lists this interpreter's site folders, in this interpreter's order (a plain
    venv's, or a ``--system-site-packages`` venv's followed by its base's, or a system Python's).
    Path lines of a ``.pth`` file are appended to ``sys.path`` after the new environment's own
    site-packages, so the freshly installed stylex wins; and the ``.pth`` files inside those
    folders are not run, so an editable install of the checkout (a ``.pth`` import hook) stays out.
    """
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=os.name != "nt").create(folder)
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_outer_site_packages.pth").write_text("\n".join(_outer_site_dirs()) + "\n")
    return python


def _scripts(python: Path) -> Path:
    return python.parent


def _setuptools_version() -> tuple[int, ...] | None:
    try:
        from importlib.metadata import version

        return tuple(int(p) for p in version("setuptools").split(".")[:2])
    except Exception:  # not installed, or an unusual version string
        return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv python) with the wheel installed in the venv."""
    found = _setuptools_version()
    if found is None or found < (70, 1):
        pytest.skip("building the wheel without build isolation needs setuptools >= 70.1 in this environment "
                    "(pip install -e '.[dev]' installs it)")
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = root / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(dist)],
        cwd=src, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(dist.glob("stylex-*.whl"))
    assert len(wheels) == 1, wheels
    python = _make_venv(root / "venv")
    # The venv has no pip of its own: this interpreter's pip is importable through the .pth file.
    # --ignore-installed: a stylex installed in this interpreter (the editable checkout) is not ours.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheels[0])],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return wheels[0], python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STYLEX_CUSTOM_OPS_DIR", "STYLEX_RUN_DIR")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(installed, work: Path, command: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``command args`` of the installed package, run in the folder ``work`` (outside the checkout)."""
    _, python = installed
    return subprocess.run([str(_scripts(python) / command), *args], cwd=work, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


# ============================================================================ a source checkout
def test_a_checkout_finds_its_top_level_configs_and_cuda_sources(monkeypatch):
    from stylex import resources
    from stylex.ops import _build

    monkeypatch.delenv("STYLEX_CUSTOM_OPS_DIR", raising=False)
    assert resources.configs_dir() == REPO / "configs"
    assert resources.custom_ops_dir() == REPO / "custom_ops" == _build.source_dir()
    monkeypatch.setenv("STYLEX_CUSTOM_OPS_DIR", "/elsewhere/ops")
    assert _build.source_dir() == Path("/elsewhere/ops")


def test_train_py_and_explain_py_are_the_console_scripts():
    import ast

    for script, call in (("train.py", "train_main"), ("explain.py", "explain_main")):
        tree = ast.parse((REPO / script).read_text())
        calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        assert call in calls, f"{script} must call the console script's function {call}"
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{script} is a thin wrapper: it defines nothing of its own"


# ============================================================================ the installed wheel
@pytest.mark.slow
def test_the_wheel_holds_the_code_the_configs_and_the_cuda_sources(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "stylex").rglob("*.py"):
        assert f"stylex/{path.relative_to(REPO / 'stylex').as_posix()}" in names, f"{path} is not in the wheel"
    for path in (REPO / "configs").rglob("*.yaml"):
        assert f"stylex/resources/configs/{path.relative_to(REPO / 'configs').as_posix()}" in names
    for path in (REPO / "custom_ops").iterdir():
        assert f"stylex/resources/custom_ops/{path.name}" in names
    assert not [n for n in names if n.startswith(("tests/", "configs/", "custom_ops/")) or "__pycache__" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "stylex-train = stylex.cli:train_main" in text and "stylex-explain = stylex.cli:explain_main" in text


@pytest.mark.slow
def test_the_installed_package_finds_its_resources_and_not_the_checkout(installed, tmp_path):
    _, python = installed
    code = ("import stylex, stylex.resources as r\n"
            "from stylex.ops import _build\n"
            "print(stylex.__file__); print(r.configs_dir()); print(_build.source_dir())")
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env=_env())
    module, configs, ops = (Path(line) for line in out.stdout.split())
    package = module.parent
    assert REPO not in module.parents, f"stylex was imported from the checkout: {module}"
    assert configs == package / "resources" / "configs" and (configs / "train.yaml").is_file()
    assert ops == package / "resources" / "custom_ops" and (ops / "stylex_ops.cpp").is_file()


@pytest.mark.slow
def test_stylex_train_composes_the_packaged_config_from_any_folder(installed, tmp_path):
    proc = _run(installed, tmp_path, "stylex-train", "--cfg", "job", "dataset=folder", "dataset.root=/data/leaves")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the dataset group's keys, with the override applied, and the other groups' sections
    assert "_target_: stylex.data.FolderDataModule" in out and "root: /data/leaves" in out
    for section in ("model:", "classifier:", "loss:", "trainer:", "callbacks:", "module:"):
        assert section in out.splitlines(), f"{section} is missing from the composed config"
    assert not list(tmp_path.iterdir()), "--cfg job must not write anything"


@pytest.mark.slow
def test_stylex_train_help_and_a_user_error(installed, tmp_path):
    help_text = _run(installed, tmp_path, "stylex-train", "--help").stdout
    assert "Config groups" in help_text and "stylex-train" in help_text
    for option in ("synthetic", "retina", "folder", "cpu32", "gpu64", "tensorboard"):
        assert option in help_text
    proc = _run(installed, tmp_path, "stylex-train", "dataset=folder", f"dataset.root={tmp_path / 'nowhere'}",
                "logger=csv")
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_stylex_explain_help_ends_with_examples(installed, tmp_path):
    proc = _run(installed, tmp_path, "stylex-explain", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("usage: stylex-explain")
    assert text.index("--refine-steps") < text.index("examples:")
    assert "stylex-explain --top-k 4" in text and "stylex-explain --image eye1.png" in text
    proc = _run(installed, tmp_path, "stylex-explain")  # no runs under ./runs of the empty folder
    assert proc.returncode == 2 and proc.stderr.startswith("error: no run found under"), proc.stderr
