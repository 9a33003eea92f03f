"""Lazy, cached, once-per-process build of a CUDA extension described by data.

Knows no op. An :class:`ExtensionSpec` names an extension's sources and headers in
``custom_ops/`` (found by :func:`source_dir`; ``$STYLEX_CUSTOM_OPS_DIR`` overrides) and the
prefix of its module names; a :class:`JitExtension` builds it on first use (never at import) with
``torch.utils.cpp_extension`` and ninja, and caches it in ``$STYLEX_CACHE_DIR`` (default
``~/.cache/stylex/ops``) in a folder named by a hash of the sources, the PyTorch, CUDA and
Python versions, the target architectures and the flags (:meth:`BuildConfig.key`). A changed
source or a new environment therefore rebuilds; the same one loads the cached build.

The architectures are torch's choice (``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs'): we
pass no ``-gencode`` flags. Only where torch has nothing to choose from (no GPU and no
``$TORCH_CUDA_ARCH_LIST``) do we set ``TORCH_CUDA_ARCH_LIST`` to our fallback
(:func:`~stylex.ops._toolkit.arch_choice`), for the length of the compile.

Builds happen in a private temporary folder that is renamed into place when complete, so a
reader never sees half a build; a failed compile leaves ``<cache>/<name>.failed.log``. A
:class:`~stylex.ops._lock.BuildLock` on ``<cache>/<name>.lock`` lets one process compile while
the others wait, and the next build after a killed one says so and rebuilds. Within a process
a thread lock serialises the build and a failed build is not retried.

The same sources also build for the CPU (:func:`host_config`, :meth:`JitExtension.load_host`):
the ``.cu`` files compiled as C++, so that tests check the kernels' arithmetic without a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch

from stylex.ops._lock import BuildLock
from stylex.ops._toolkit import (
    BuildError,
    arch_choice,
    check_versions,
    env_var,
    find_cuda_home,
    nvcc_version,
    preflight,
    quiet_logger,
    torch_cuda_home,
)

DEFAULT_CACHE = Path("~/.cache/stylex/ops")


@dataclass(frozen=True)
class ExtensionSpec:
    """What an extension is made of; the build machinery needs nothing else from its user."""

    prefix: str  # module names: <prefix>_<key>, or <prefix>_host_<key> for the host build
    sources: tuple[str, ...]  # files in custom_ops/ to compile: .cpp, and .cu (C++ in the host build)
    headers: tuple[str, ...]  # files the sources include: part of the cache key, not compiled
    title: str = "the CUDA extension"  # how messages name it


# ---------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------


def source_dir() -> Path:
    """The kernels' sources: ``$STYLEX_CUSTOM_OPS_DIR`` when set, else the installed package's
    ``stylex/resources/custom_ops`` or a checkout's ``custom_ops/`` (:mod:`stylex.resources`)."""
    from stylex.resources import custom_ops_dir

    override = os.environ.get("STYLEX_CUSTOM_OPS_DIR")
    return Path(override) if override else custom_ops_dir()


def cache_root() -> Path:
    return Path(os.environ.get("STYLEX_CACHE_DIR") or DEFAULT_CACHE).expanduser()


def sources_digest(
    folder: Path,  # the custom_ops folder
    names: tuple[str, ...],  # every source and header, in a fixed order
) -> str:
    """sha256 over the names and bytes of every source and header."""
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        if not path.is_file():
            raise BuildError(
                f"the CUDA sources are missing: {path} does not exist. The fused ops are built from the "
                "custom_ops/ folder of a source checkout (stylex/resources/custom_ops when installed); "
                "set STYLEX_CUSTOM_OPS_DIR to it, reinstall stylex, or use ops.impl=ref"
            )
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Build configuration and cache key
# ---------------------------------------------------------------------------------------------


def _python_tag() -> str:
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the compiled module; :meth:`key` hashes all of it."""

    spec: ExtensionSpec
    sources: Path  # the custom_ops folder
    cuda_home: Path
    nvcc: str  # "major.minor"
    archs: tuple[str, ...]  # what decides the architectures (see _toolkit.arch_choice)
    arch_fallback: str | None = None  # TORCH_CUDA_ARCH_LIST while compiling; None: torch's own choice
    torch_version: str = field(default_factory=lambda: torch.__version__)
    torch_cuda: str = field(default_factory=lambda: str(torch.version.cuda))
    python: str = field(default_factory=_python_tag)
    defines: tuple[str, ...] = ()  # extra -D definitions, "NAME" or "NAME=VALUE"
    cflags: tuple[str, ...] = ("-O3",)
    # No --use_fast_math: it loosens tanh/exp beyond 1e-5. No flag may contain "arch": torch
    # would then leave the architectures to us and compile for nvcc's default only.
    cuda_cflags: tuple[str, ...] = ("-O3",)
    target: str = "cuda"  # "cuda", or "host": the same kernels run on the CPU (see host_config)

    def key(self) -> str:
        fields = {
            "sources": sources_digest(self.sources, self.spec.sources + self.spec.headers),
            "torch": self.torch_version,
            "torch_cuda": self.torch_cuda,
            "nvcc": self.nvcc,
            "python": self.python,
            "archs": list(self.archs),
            "arch_fallback": self.arch_fallback,
            "defines": list(self.defines),
            "cflags": list(self.cflags),
            "cuda_cflags": list(self.cuda_cflags),
            "target": self.target,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """Module name, unique per key so that two builds can live in one process."""
        infix = "" if self.target == "cuda" else f"{self.target}_"
        return f"{self.spec.prefix}_{infix}{self.key()}"

    def folder(self, root: Path | None = None) -> Path:
        return (cache_root() if root is None else Path(root)) / self.name


def current_config(spec: ExtensionSpec, **overrides) -> BuildConfig:
    """The configuration of ``spec`` for this machine; runs the toolkit checks (no compilation)."""
    home = find_cuda_home()
    version = nvcc_version(home)
    check_versions(version, torch.version.cuda, home)
    archs, fallback = arch_choice(home)
    config = BuildConfig(
        spec=spec, sources=source_dir(), cuda_home=home, nvcc=version, archs=archs, arch_fallback=fallback
    )
    return replace(config, **overrides) if overrides else config


def host_config(spec: ExtensionSpec) -> BuildConfig:
    """The kernels compiled as ordinary C++ for CPU tensors (``custom_ops/host_kernels.h``).

    A launch then runs every thread of its grid in turn, which computes what the GPU computes
    because the kernels share nothing between threads. It is far too slow for real work; it exists
    so that the kernels' arithmetic is tested against the reference on machines without a GPU.
    Needs a C++ compiler and ninja, not the CUDA toolkit.
    """
    return BuildConfig(
        spec=spec,
        sources=source_dir(),
        cuda_home=Path(),
        nvcc="none",
        archs=(),
        torch_cuda="none",
        defines=("STYLEX_HOST_KERNELS",),
        cflags=("-O2", "-Wno-unknown-pragmas"),
        cuda_cflags=(),
        target="host",
    )


# ---------------------------------------------------------------------------------------------
# Compile, publish, load
# ---------------------------------------------------------------------------------------------


def _library_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.so"


def is_published(folder: Path, name: str) -> bool:
    return (folder / "build.json").is_file() and _library_path(folder, name).is_file()


def _import_built(folder: Path, name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    path = _library_path(folder, name)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as err:  # a corrupt or foreign build
        raise BuildError(f"the cached build {path} cannot be loaded ({err}); delete {folder} to rebuild it") from err
    sys.modules[name] = module
    return module


def explain_failure(log: str, config: BuildConfig) -> str:
    """A one-line cause for a failed compile, followed by the compiler's own output."""
    if re.search(r"unsupported (GNU|clang|Microsoft Visual Studio) version", log):
        cause = (
            f"unsupported host compiler: nvcc (CUDA {config.nvcc}) rejects the C++ compiler "
            f"({os.environ.get('CXX', 'c++')}). Install a compiler version this CUDA release supports and point "
            "CXX and NVCC_CCBIN at it"
        )
    elif "cannot find -lcudart" in log:
        cause = f"the linker cannot find libcudart under {config.cuda_home}; set CUDA_HOME to the CUDA toolkit's folder"
    elif re.search(r"nvcc(: | )(not found|No such file)", log):
        cause = f"nvcc could not be run from {config.cuda_home}/bin; set CUDA_HOME to the CUDA toolkit's folder"
    elif "Unknown CUDA arch" in log:
        cause = (
            f"PyTorch does not know an architecture in TORCH_CUDA_ARCH_LIST="
            f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}; write entries like 8.6 or 9.0+PTX, or unset it"
        )
    else:
        cause = f"compiling {config.spec.title} failed"
    tail = log[-8000:]
    return f"{cause}.\n--- compiler output (last {len(tail)} characters) ---\n{tail}"


def _compile_host(config: BuildConfig, workdir: Path) -> ModuleType:
    """The host build: the .cu files enter through small .cpp files so that g++ compiles them."""
    defines = [f"-D{d}" for d in config.defines]
    wrappers = []
    for name in config.spec.sources:
        if name.endswith(".cu"):
            wrapper = workdir / f"host_{Path(name).stem}.cpp"
            wrapper.write_text(f'#include "{name}"\n')
            wrappers.append(str(wrapper))
        else:
            wrappers.append(str(config.sources / name))
    with warnings.catch_warnings(), quiet_logger("torch.utils.cpp_extension"):
        warnings.simplefilter("ignore")
        from torch.utils import cpp_extension  # on first import it logs where CUDA is: moot here

        try:
            return cpp_extension.load(
                name=config.name,
                sources=wrappers,
                extra_cflags=[*config.cflags, *defines],
                extra_include_paths=[str(config.sources)],
                build_directory=str(workdir),
                with_cuda=False,
                verbose=False,
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            tail = str(err)[-8000:]
            raise BuildError(f"compiling the host build of the kernels failed.\n--- compiler output ---\n{tail}") from err


def _compile(config: BuildConfig, workdir: Path) -> ModuleType:
    preflight()
    if config.target == "host":
        return _compile_host(config, workdir)
    defines = [f"-D{d}" for d in config.defines]
    with (
        warnings.catch_warnings(),
        torch_cuda_home(config.cuda_home),
        # torch reads TORCH_CUDA_ARCH_LIST while it writes the build files; only our no-GPU
        # fallback sets it, and only for this compile.
        env_var("TORCH_CUDA_ARCH_LIST", config.arch_fallback),
    ):
        warnings.simplefilter("ignore")  # torch's notes about ABI / missing GPU are noise here
        from torch.utils import cpp_extension

        try:
            return cpp_extension.load(
                name=config.name,
                sources=[str(config.sources / s) for s in config.spec.sources],
                extra_cflags=[*config.cflags, *defines],
                extra_cuda_cflags=[*config.cuda_cflags, *defines],  # no -gencode: torch adds its own
                extra_include_paths=[str(config.sources)],
                build_directory=str(workdir),
                verbose=False,
            )
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as err:
            # ValueError: torch rejected an entry of TORCH_CUDA_ARCH_LIST
            raise BuildError(explain_failure(str(err), config)) from err


def build(config: BuildConfig, root: Path | None = None) -> tuple[ModuleType, bool]:
    """Load the extension for ``config``, compiling it first if no build is cached.

    Returns ``(module, compiled)``, ``compiled`` being False for a cache hit.
    """
    root = cache_root() if root is None else Path(root)
    final = config.folder(root)
    if is_published(final, config.name):
        return _import_built(final, config.name), False
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BuildError(
            f"cannot create the build cache {root} ({err}); set STYLEX_CACHE_DIR to a writable folder"
        ) from err
    with BuildLock(root / f"{config.name}.lock", what=config.spec.title):
        if is_published(final, config.name):  # another process built it while we waited
            return _import_built(final, config.name), False
        # Work folders of this name left by killed builds: nobody else builds it while we hold the lock.
        for leftover in root.glob(f".{config.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{config.name}-", dir=root))
        try:
            start = time.monotonic()
            try:
                module = _compile(config, workdir)
            except BuildError as err:
                (root / f"{config.name}.failed.log").write_text(str(err))
                raise
            info = {
                "name": config.name,
                "seconds": round(time.monotonic() - start, 1),
                "torch": config.torch_version,
                "cuda": config.torch_cuda,
                "nvcc": config.nvcc,
                "archs": list(config.archs),
                "python": config.python,
                "defines": list(config.defines),
                "built_by": f"{socket.gethostname()}:{os.getpid()}",
            }
            (workdir / "build.json").write_text(json.dumps(info, indent=1))
            if final.exists():  # a half-published leftover of an older layout
                shutil.rmtree(final, ignore_errors=True)
            os.rename(workdir, final)  # atomic: readers see all of the build or none of it
        finally:
            if workdir.exists():
                shutil.rmtree(workdir, ignore_errors=True)
        sys.modules[config.name] = module
        return module, True


# ---------------------------------------------------------------------------------------------
# Process-wide state: one build attempt per process
# ---------------------------------------------------------------------------------------------


class JitExtension:
    """One extension, built on first use and then held for the life of the process."""

    # available() warns for the caller of the public op:
    # JitExtension.available <- dispatch.available <- dispatch.use_cuda <- op <- caller.
    _WARN_STACKLEVEL = 5

    def __init__(self, spec: ExtensionSpec) -> None:
        self.spec = spec
        self._state_lock = threading.Lock()
        self._module: ModuleType | None = None  # the loaded module, once built
        self._failure: BuildError | None = None  # the first build's failure, never retried
        self._warned = False  # whether the fallback warning was given

    def load(self) -> ModuleType:
        """The compiled module, building it on first use; a failure is remembered, not retried."""
        if self._module is not None:
            return self._module
        with self._state_lock:
            if self._module is None and self._failure is None:
                try:
                    self._module = build(current_config(self.spec))[0]
                except (BuildError, OSError) as err:  # OSError: lock time-out, unwritable cache, ...
                    if not isinstance(err, BuildError):
                        err = BuildError(f"building {self.spec.title} failed: {err}")
                    self._failure = err
            if self._failure is not None:
                raise BuildError(str(self._failure))
            return self._module

    def available(
        self,
        strict: bool,  # raise instead of warning (ops.impl=cuda)
        what: str,  # what the caller wanted, for the message: "the fused CUDA kernel for bias_act"
    ) -> bool:
        """Whether the module can be loaded; builds on first use.

        ``strict`` raises :class:`BuildError` with the cause; otherwise a failure warns once per
        process and the caller takes its reference path.
        """
        if self._module is not None:
            return True
        try:
            self.load()
            return True
        except BuildError as err:
            if strict:
                raise BuildError(f"ops.impl=cuda, but {what} is unavailable: {err}") from None
            with self._state_lock:
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"{self.spec.title} could not be built, so the slower reference implementation is used. "
                        f"{err}\nSet ops.impl=ref to skip the build, or ops.impl=cuda to make this an error.",
                        RuntimeWarning,
                        stacklevel=self._WARN_STACKLEVEL,
                    )
            return False

    def load_host(self) -> ModuleType:
        """The host build (see :func:`host_config`), built and cached on first use.

        Same interface as the CUDA module, for CPU tensors. Tests put it in place of :meth:`load`
        to run the ops' autograd wrappers on the CPU.
        """
        return build(host_config(self.spec))[0]
