"""The tools a CUDA extension is compiled with: where they are, which versions, which targets.

Knows no op and no extension. :func:`find_cuda_home` finds the CUDA toolkit (wrapper scripts
and symbolic links included), :func:`nvcc_version` and :func:`check_versions` check it against
PyTorch, :func:`arch_choice` says what decides the GPU architectures compiled for, and
:func:`preflight` names a missing ninja or C++ compiler, and :func:`torch_cuda_home` and
:func:`env_var` point ``torch.utils.cpp_extension`` at them for the length of one compile. Every
failure is a :class:`BuildError` whose message names the cause and the remedy.

Architectures are ``torch.utils.cpp_extension``'s business: it reads ``$TORCH_CUDA_ARCH_LIST``,
and otherwise compiles for the visible GPUs. Only the case it cannot handle is ours: no GPU
visible and no ``$TORCH_CUDA_ARCH_LIST`` (a compile check on a build machine), where
:func:`fallback_arch` picks the newest architecture both this PyTorch and nvcc support.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

DEFAULT_TOOLKIT = Path("/usr/local/cuda")


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message names the cause and the remedy."""


# ---------------------------------------------------------------------------------------------
# CUDA toolkit discovery
# ---------------------------------------------------------------------------------------------


def _is_toolkit(folder: Path) -> bool:
    return (folder / "bin" / "nvcc").is_file() and (folder / "include" / "cuda_runtime.h").is_file()


def _toolkit_from_dryrun(nvcc: str, env: Mapping[str, str]) -> Path | None:
    """Ask nvcc where it lives: ``--dryrun`` prints ``TOP=<toolkit>/bin/..`` without compiling."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(env),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return Path(os.path.realpath(match.group(1).strip())) if match else None


def _toolkit_from_script(wrapper: Path) -> Path | None:
    """Read a small wrapper script for the absolute path of the nvcc it runs."""
    try:
        if wrapper.stat().st_size > 65536:
            return None
        text = wrapper.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    if not text.startswith("#!"):
        return None
    for match in re.finditer(r"(/[^\s'\"]+)/bin/nvcc\b", text):
        candidate = Path(os.path.realpath(match.group(1)))
        if _is_toolkit(candidate):
            return candidate
    return None


def find_cuda_home(
    environ: Mapping[str, str] | None = None,  # default os.environ
    default: Path = DEFAULT_TOOLKIT,  # last resort when nvcc is not on PATH
) -> Path:
    """The CUDA toolkit's root folder (holding ``bin/nvcc`` and ``include/``).

    ``$CUDA_HOME`` (or ``$CUDA_PATH``) wins when set. Otherwise the ``nvcc`` on ``PATH`` is
    followed through symbolic links; when it is a wrapper script living outside the toolkit
    (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-X/bin/nvcc``), nvcc itself is asked where
    its toolkit is, and failing that the script is read. PyTorch's own guess (the parent of
    nvcc's folder) then names the wrong folder and linking fails with ``cannot find -lcudart``.
    """
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = env.get(var)
        if value:
            home = Path(value)
            if not (home / "bin" / "nvcc").is_file():
                raise BuildError(
                    f"{var}={value} has no bin/nvcc: point {var} at the CUDA toolkit's folder (the one holding "
                    f"bin/nvcc and include/cuda_runtime.h), or unset it to search PATH"
                )
            return home
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if nvcc is not None:
        real = Path(os.path.realpath(nvcc))
        if _is_toolkit(real.parent.parent):
            return real.parent.parent
        for guess in (_toolkit_from_dryrun(nvcc, env), _toolkit_from_script(real)):
            if guess is not None and _is_toolkit(guess):
                return guess
        raise BuildError(
            f"found nvcc at {nvcc} but no CUDA toolkit around it (no include/cuda_runtime.h beside its bin/ "
            "folder, and neither `nvcc --dryrun` nor the script named one): set CUDA_HOME to the toolkit's folder"
        )
    if _is_toolkit(default):
        return default
    raise BuildError(
        "no CUDA compiler: nvcc is not on PATH, CUDA_HOME is not set and "
        f"{default} holds no toolkit. Install the CUDA toolkit matching PyTorch's CUDA "
        f"{torch.version.cuda} and set CUDA_HOME, or use ops.impl=ref"
    )


def nvcc_version(cuda_home: Path) -> str:
    """``"major.minor"`` of the toolkit's nvcc."""
    nvcc = cuda_home / "bin" / "nvcc"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"cannot run {nvcc}: {err}") from err
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise BuildError(f"{nvcc} --version did not report a CUDA release:\n{out.stdout}{out.stderr}")
    return f"{match.group(1)}.{match.group(2)}"


def check_versions(nvcc: str, torch_cuda: str | None, cuda_home: Path) -> None:
    """Raise when PyTorch has no CUDA or nvcc's major CUDA version differs from PyTorch's."""
    if not torch_cuda:
        raise BuildError(
            f"this PyTorch ({torch.__version__}) was built without CUDA, so it cannot load CUDA extensions: "
            "install a CUDA build of PyTorch or use ops.impl=ref"
        )
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        raise BuildError(
            f"CUDA version mismatch: nvcc in {cuda_home} is CUDA {nvcc} but PyTorch was built with CUDA "
            f"{torch_cuda}; install a matching toolkit and point CUDA_HOME at it, or use ops.impl=ref"
        )


def preflight() -> None:
    """Name a missing ninja or C++ compiler before the compile fails in a less readable way."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package ships the binary

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            raise BuildError(
                "ninja is not installed (the fused ops are compiled with it): `pip install ninja` (or the extra, "
                "`pip install 'stylex[cuda]'`), or use ops.impl=ref"
            ) from None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX or install g++), or use ops.impl=ref")


# ---------------------------------------------------------------------------------------------
# Pointing torch.utils.cpp_extension at the tools
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` while inside (``None``: leave it alone), restored after."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def torch_cuda_home(home: Path) -> Iterator[None]:
    """Point torch.utils.cpp_extension at our toolkit while it writes the build files."""
    with env_var("CUDA_HOME", str(home)):  # set first: cpp_extension reads it when first imported
        from torch.utils import cpp_extension

        saved_module = cpp_extension.CUDA_HOME
        cpp_extension.CUDA_HOME = str(home)
        try:
            yield
        finally:
            cpp_extension.CUDA_HOME = saved_module


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


# ---------------------------------------------------------------------------------------------
# Target architectures
# ---------------------------------------------------------------------------------------------


def _nvcc_sm_list(cuda_home: Path) -> list[int]:
    """Compute capabilities (as 75, 90, ...) that nvcc can generate code for."""
    try:
        out = subprocess.run(
            [str(cuda_home / "bin" / "nvcc"), "--list-gpu-code"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({int(m) for m in re.findall(r"\bsm_(\d+)\b", out)})


def fallback_arch(cuda_home: Path) -> str:
    """The architecture to compile for when no GPU is visible, as a ``TORCH_CUDA_ARCH_LIST`` entry.

    The newest one both this PyTorch (``torch.cuda.get_arch_list()``) and nvcc
    (``nvcc --list-gpu-code``) support, e.g. ``"9.0"``: one architecture keeps a compile check
    short, and the newest exercises the most of the kernels' code. When nvcc cannot list its
    architectures, PyTorch's newest is taken.
    """
    known = _nvcc_sm_list(cuda_home)
    torch_archs = [int(a[3:]) for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", a)]
    common = sorted(set(torch_archs) & set(known)) if known else sorted(torch_archs)
    if not common:
        raise BuildError(
            f"no GPU is visible and nvcc in {cuda_home} shares no architecture with this PyTorch "
            f"({torch.cuda.get_arch_list()}); set TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST=8.0"
        )
    return f"{common[-1] // 10}.{common[-1] % 10}"


def arch_choice(
    cuda_home: Path,
    environ: Mapping[str, str] | None = None,  # default os.environ
    capabilities: Sequence[tuple[int, int]] | None = None,  # default: every visible GPU's
) -> tuple[tuple[str, ...], str | None]:
    """``(archs, fallback)``: what decides the architectures compiled for, and our fallback.

    ``archs`` describes the choice for the cache key (the build differs whenever it does):
    ``("TORCH_CUDA_ARCH_LIST=<value>",)`` when that is set, else the visible GPUs' compute
    capabilities (``("gpu 8.6", "gpu 9.0")``), from which ``torch.utils.cpp_extension`` derives
    its targets; with neither, ``("fallback <arch>",)``. ``fallback`` is then the
    ``TORCH_CUDA_ARCH_LIST`` value to set while compiling (see :func:`fallback_arch`), and None
    in the other cases, where torch chooses by itself. ``TORCH_CUDA_ARCH_LIST=native`` means
    the visible GPUs to torch, and so here too.
    """
    env = os.environ if environ is None else environ
    arch_list = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list and arch_list != "native":
        return (f"TORCH_CUDA_ARCH_LIST={arch_list}",), None
    if capabilities is None:
        capabilities = (
            [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else []
        )
    if capabilities:
        return tuple(f"gpu {major}.{minor}" for major, minor in sorted(set(capabilities))), None
    fallback = fallback_arch(cuda_home)
    return (f"fallback {fallback}",), fallback
