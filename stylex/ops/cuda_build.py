"""Lazy build of the fused CUDA kernels in ``custom_ops/`` and their autograd wrappers.

Nothing is compiled at import. The first call that wants the CUDA path (see
:mod:`stylex.ops.dispatch`) compiles one extension module holding both ops with
``torch.utils.cpp_extension`` and ninja, for the current GPU's architecture only, and caches it
in ``$STYLEX_CACHE_DIR`` (default ``~/.cache/stylex/ops``) in a folder named by a hash of the
sources, the PyTorch, CUDA and Python versions, the target architectures and the flags. A
changed source or a new environment therefore rebuilds; the same one loads the cached build.

Builds happen in a private temporary folder that is renamed into place when complete, so a
reader never sees half a build. An ``flock`` on ``<cache>/<name>.lock`` lets one process (one
rank of a multi-GPU job) compile while the others wait; the kernel drops the lock of a killed
process, and the next run notices the stale owner record, says so and rebuilds. Within a
process a thread lock serialises the build and a failed build is not retried.

The autograd functions express every derivative with the same fused kernels: the gradient of
``upfirdn2d`` is an ``upfirdn2d`` with swapped factors and the flipped filter (so gradients of
any order work), and ``bias_act`` has kernels for its first and second derivatives (R1 and
path-length regularisation differentiate twice).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
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
from typing import Iterator, Mapping, Sequence

import torch

OPS = ("upfirdn2d", "bias_act")
EXTENSION_PREFIX = "stylex_fused_ops"
SOURCE_FILES = ("stylex_ops.cpp", "bias_act.cu", "upfirdn2d.cu")
HEADER_FILES = ("stylex_ops.h", "dtype_io.cuh", "host_kernels.h")
DEFAULT_CACHE = Path("~/.cache/stylex/ops")
DEFAULT_TOOLKIT = Path("/usr/local/cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOCK_TIMEOUT_S = 3600.0  # a waiter gives up after this long ($STYLEX_BUILD_LOCK_TIMEOUT overrides)


class BuildError(RuntimeError):
    """The fused ops cannot be built or loaded here; the message names the cause and the remedy."""


# ---------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------


def source_dir() -> Path:
    """``custom_ops/`` of the source tree (``$STYLEX_CUSTOM_OPS_DIR`` overrides)."""
    override = os.environ.get("STYLEX_CUSTOM_OPS_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "custom_ops"


def cache_root() -> Path:
    return Path(os.environ.get("STYLEX_CACHE_DIR") or DEFAULT_CACHE).expanduser()


def sources_digest(folder: Path) -> str:
    """sha256 over the names and bytes of every source and header."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES + HEADER_FILES:
        path = folder / name
        if not path.is_file():
            raise BuildError(
                f"the CUDA sources are missing: {path} does not exist. The fused ops are built from the "
                "source tree's custom_ops/ folder; set STYLEX_CUSTOM_OPS_DIR to it or use ops.impl=ref"
            )
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


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


def _parse_arch_list(text: str) -> list[str]:
    """``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0+PTX", "8.6 8.9") to nvcc targets (sm_80, compute_90)."""
    targets: list[str] = []
    for item in re.split(r"[;\s,]+", text.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item)
        if match is None:
            if item:
                raise BuildError(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not of the form 8.6 or 9.0+PTX")
            continue
        cc = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        targets.append(f"sm_{cc}")
        if match.group(4):
            targets.append(f"compute_{cc}")
    return targets


def target_archs(
    cuda_home: Path,
    environ: Mapping[str, str] | None = None,
    capabilities: Sequence[tuple[int, int]] | None = None,  # default: every visible GPU
) -> tuple[str, ...]:
    """Architectures to compile for, fewest first: compile time grows with each one.

    ``$TORCH_CUDA_ARCH_LIST`` wins; otherwise the visible GPUs' own architectures (as PTX of the
    newest older one when nvcc is too old to know a GPU); with no GPU (a compile check) the
    newest architecture both PyTorch and nvcc support.
    """
    env = os.environ if environ is None else environ
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return tuple(_parse_arch_list(env["TORCH_CUDA_ARCH_LIST"]))
    if capabilities is None:
        capabilities = (
            [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else []
        )
    known = _nvcc_sm_list(cuda_home)
    targets: list[str] = []
    for major, minor in sorted(set(capabilities)):
        cc = major * 10 + minor
        if not known or cc in known:
            targets.append(f"sm_{cc}")
        else:
            older = [k for k in known if k <= cc]
            if not older:
                raise BuildError(
                    f"nvcc in {cuda_home} cannot generate code for this GPU (compute capability {major}.{minor}); "
                    "install a newer CUDA toolkit"
                )
            targets.append(f"compute_{older[-1]}")
    if targets:
        return tuple(dict.fromkeys(targets))
    torch_archs = [int(a[3:]) for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", a)]
    common = sorted(set(torch_archs) & set(known)) if known else sorted(torch_archs)
    if not common:
        raise BuildError(
            f"no GPU is visible and nvcc in {cuda_home} shares no architecture with this PyTorch "
            f"({torch.cuda.get_arch_list()}); set TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST=8.0"
        )
    return (f"sm_{common[-1]}",)


def _gencode_flags(archs: Sequence[str]) -> list[str]:
    flags = []
    for arch in archs:
        cc = arch.split("_", 1)[1]
        code = arch if arch.startswith("sm_") else f"compute_{cc}"
        flags.append(f"-gencode=arch=compute_{cc},code={code}")
    return flags


# ---------------------------------------------------------------------------------------------
# Build configuration and cache key
# ---------------------------------------------------------------------------------------------


def _python_tag() -> str:
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the compiled module; :meth:`key` hashes all of it."""

    sources: Path  # the custom_ops folder
    cuda_home: Path
    nvcc: str  # "major.minor"
    archs: tuple[str, ...]  # e.g. ("sm_90",); compute_XX means PTX
    torch_version: str = field(default_factory=lambda: torch.__version__)
    torch_cuda: str = field(default_factory=lambda: str(torch.version.cuda))
    python: str = field(default_factory=_python_tag)
    defines: tuple[str, ...] = ()  # extra -D definitions, "NAME" or "NAME=VALUE"
    cflags: tuple[str, ...] = ("-O3",)
    cuda_cflags: tuple[str, ...] = ("-O3",)  # no --use_fast_math: it loosens tanh/exp beyond 1e-5
    target: str = "cuda"  # "cuda", or "host": the same kernels run on the CPU (see host_config)

    def key(self) -> str:
        fields = {
            "sources": sources_digest(self.sources),
            "torch": self.torch_version,
            "torch_cuda": self.torch_cuda,
            "nvcc": self.nvcc,
            "python": self.python,
            "archs": list(self.archs),
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
        return f"{EXTENSION_PREFIX}_{infix}{self.key()}"

    def folder(self, root: Path | None = None) -> Path:
        return (cache_root() if root is None else Path(root)) / self.name


def current_config(**overrides) -> BuildConfig:
    """The configuration for this machine; runs the toolkit checks (no compilation)."""
    home = find_cuda_home()
    version = nvcc_version(home)
    check_versions(version, torch.version.cuda, home)
    config = BuildConfig(sources=source_dir(), cuda_home=home, nvcc=version, archs=target_archs(home))
    return replace(config, **overrides) if overrides else config


def host_config() -> BuildConfig:
    """The kernels compiled as ordinary C++ for CPU tensors (``custom_ops/host_kernels.h``).

    A launch then runs every thread of its grid in turn, which computes what the GPU computes
    because the kernels share nothing between threads. It is far too slow for real work; it exists
    so that the kernels' arithmetic is tested against the reference on machines without a GPU.
    Needs a C++ compiler and ninja, not the CUDA toolkit.
    """
    return BuildConfig(
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
# Cross-process build lock
# ---------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """An exclusive ``flock`` on ``path``, with the holder recorded in the file.

    The operating system drops the lock of a process that dies, so a killed build never blocks
    the next run. Its owner record stays behind, which is how the next holder learns that the
    previous build was interrupted (and says so). Waiters report who they wait for, and give up
    after ``timeout`` seconds with a message naming the holder.
    """

    def __init__(self, path: Path, timeout: float | None = None, poll: float = 0.25) -> None:
        self.path = Path(path)
        if timeout is None:
            timeout = float(os.environ.get("STYLEX_BUILD_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
        self.timeout = timeout
        self.poll = poll
        self._fd: int | None = None
        self.stale_owner: dict | None = None  # the record of an interrupted build, if one was found

    def _read_owner(self) -> dict | None:
        try:
            text = self.path.read_text()
        except OSError:
            return None
        try:
            owner = json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return {"pid": None, "host": "?", "raw": text[:200]}
        return owner if isinstance(owner, dict) else None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start = time.monotonic()
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as err:  # a file system without flock: go on unlocked (publishing stays atomic)
                    warnings.warn(
                        f"cannot lock {self.path} ({err}); building without a cross-process lock",
                        stacklevel=3,
                    )
                    break
                owner = self._read_owner() or {}
                waited = time.monotonic() - start
                if waited > self.timeout:
                    raise TimeoutError(
                        f"waited {waited:.0f} s for the build lock {self.path}, held by process {owner.get('pid')} on "
                        f"{owner.get('host')}. If no build is running there, delete the lock file; to wait longer "
                        "set STYLEX_BUILD_LOCK_TIMEOUT (seconds)"
                    )
                if not told:
                    print(
                        f"stylex: waiting for process {owner.get('pid')} on {owner.get('host')} to finish building "
                        f"the fused CUDA ops ({self.path})",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
                time.sleep(self.poll)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        previous = self._read_owner()
        if previous:
            self.stale_owner = previous
            pid = previous.get("pid")
            alive = previous.get("host") == socket.gethostname() and isinstance(pid, int) and _pid_alive(pid)
            state = "still running but no longer holds it" if alive else "no longer running"
            warnings.warn(
                f"found a stale build lock {self.path} left by process {previous.get('pid')} on {previous.get('host')} "
                f"({state}: a killed or interrupted build); recovering by building again",
                stacklevel=3,
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        # Clear the owner record before unlocking: an empty file means a clean finish.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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


def _preflight(config: BuildConfig) -> None:
    """Name the missing tool before the compiler fails in a less readable way."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI package ships the binary

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            raise BuildError(
                "ninja is not installed (the fused ops are compiled with it): `pip install ninja`, or use ops.impl=ref"
            ) from None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX or install g++), or use ops.impl=ref")


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
    else:
        cause = "compiling the fused CUDA ops failed"
    tail = log[-8000:]
    return f"{cause}.\n--- compiler output (last {len(tail)} characters) ---\n{tail}"


@contextlib.contextmanager
def _torch_cuda_home(home: Path) -> Iterator[None]:
    """Point torch.utils.cpp_extension at our toolkit while it writes the build files."""
    saved_env = os.environ.get("CUDA_HOME")
    os.environ["CUDA_HOME"] = str(home)  # set first: cpp_extension reads it when first imported
    from torch.utils import cpp_extension

    saved_module = cpp_extension.CUDA_HOME
    cpp_extension.CUDA_HOME = str(home)
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_module
        if saved_env is None:
            os.environ.pop("CUDA_HOME", None)
        else:
            os.environ["CUDA_HOME"] = saved_env


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _compile_host(config: BuildConfig, workdir: Path) -> ModuleType:
    """The host build: the .cu files enter through small .cpp files so that g++ compiles them."""
    defines = [f"-D{d}" for d in config.defines]
    wrappers = []
    for name in SOURCE_FILES:
        if name.endswith(".cu"):
            wrapper = workdir / f"host_{Path(name).stem}.cpp"
            wrapper.write_text(f'#include "{name}"\n')
            wrappers.append(str(wrapper))
        else:
            wrappers.append(str(config.sources / name))
    with warnings.catch_warnings(), _quiet_logger("torch.utils.cpp_extension"):
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
    _preflight(config)
    if config.target == "host":
        return _compile_host(config, workdir)
    defines = [f"-D{d}" for d in config.defines]
    with warnings.catch_warnings(), _torch_cuda_home(config.cuda_home):
        warnings.simplefilter("ignore")  # torch's notes about ABI / missing GPU are noise here
        from torch.utils import cpp_extension

        try:
            return cpp_extension.load(
                name=config.name,
                sources=[str(config.sources / s) for s in SOURCE_FILES],
                extra_cflags=[*config.cflags, *defines],
                extra_cuda_cflags=[*config.cuda_cflags, *defines, *_gencode_flags(config.archs)],
                extra_include_paths=[str(config.sources)],
                build_directory=str(workdir),
                verbose=False,
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
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
    with BuildLock(root / f"{config.name}.lock"):
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

_state_lock = threading.Lock()
_module: ModuleType | None = None
_failure: BuildError | None = None
_warned = False


def load_extension() -> ModuleType:
    """The compiled module, building it on first use; a failure is remembered, not retried."""
    global _module, _failure
    if _module is not None:
        return _module
    with _state_lock:
        if _module is None and _failure is None:
            try:
                _module = build(current_config())[0]
            except (BuildError, OSError) as err:  # OSError: lock time-out, unwritable cache, ...
                if not isinstance(err, BuildError):
                    err = BuildError(f"building the fused CUDA ops failed: {err}")
                _failure = err
        if _failure is not None:
            raise BuildError(str(_failure))
        return _module


def load_host_kernels() -> ModuleType:
    """The kernels built for CPU tensors (see :func:`host_config`); built and cached on first use.

    Same interface as the CUDA module. Tests put it in place of :func:`load_extension` to run the
    autograd wrappers of this module on CPU tensors.
    """
    return build(host_config())[0]


def available(op: str, strict: bool = False) -> bool:
    """Whether the fused kernel for ``op`` can run; builds on first use.

    ``strict`` (``impl="cuda"``) raises :class:`BuildError` with the cause; otherwise a failure
    warns once per process and the caller takes the reference path.
    """
    global _warned
    if op not in OPS:
        raise ValueError(f"no fused CUDA kernel for {op!r}; the fused ops are {', '.join(OPS)}")
    if _module is not None:
        return True
    try:
        load_extension()
        return True
    except BuildError as err:
        if strict:
            raise BuildError(f"ops.impl=cuda, but the fused CUDA kernel for {op} is unavailable: {err}") from None
        with _state_lock:
            if not _warned:
                _warned = True
                warnings.warn(
                    f"the fused CUDA ops could not be built, so the slower reference implementation is used. {err}\n"
                    "Set ops.impl=ref to skip the build, or ops.impl=cuda to make this an error.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return False


# ---------------------------------------------------------------------------------------------
# upfirdn2d
# ---------------------------------------------------------------------------------------------

_force_generic = False


@contextlib.contextmanager
def force_generic_upfirdn2d() -> Iterator[None]:
    """Route upfirdn2d through the generic kernel even where a specialised one applies (tests)."""
    global _force_generic
    saved, _force_generic = _force_generic, True
    try:
        yield
    finally:
        _force_generic = saved


def upfirdn2d_path(
    f: torch.Tensor,  # [taps] or [taps_y, taps_x]
    up: tuple[int, int],  # (x, y)
    down: tuple[int, int],  # (x, y)
) -> str:
    """Name of the kernel a configuration takes: ``generic``, ``k4``, ``k4_up2`` or ``k4_down2``."""
    fw, fh = (f.shape[0], f.shape[0]) if f.ndim == 1 else (f.shape[1], f.shape[0])
    if _force_generic:
        return "generic"
    return load_extension().upfirdn2d_path(fw, fh, up[0], up[1], down[0], down[1])


def adjoint_padding(
    in_size: tuple[int, int],  # (height, width) of upfirdn2d's input
    out_size: tuple[int, int],  # (height, width) of its output
    f: torch.Tensor,
    up: tuple[int, int],
    down: tuple[int, int],
    pad: tuple[int, int, int, int],  # (x0, x1, y0, y1)
) -> tuple[int, int, int, int]:
    """Padding that makes ``upfirdn2d(dy, f, up=down, down=up, flip_filter=not flip)`` the adjoint.

    The adjoint of the valid convolution is a full correlation (``taps - 1`` of padding, less
    the forward's leading padding); the trailing side is cut so that the result, decimated by
    ``up``, is exactly the input's size.
    """
    fw, fh = (f.shape[0], f.shape[0]) if f.ndim == 1 else (f.shape[1], f.shape[0])
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    upx, upy = up
    downx, downy = down
    px0, _, py0, _ = pad
    return (
        fw - px0 - 1,
        in_w * upx - out_w * downx + px0 - upx + 1,
        fh - py0 - 1,
        in_h * upy - out_h * downy + py0 - upy + 1,
    )


class _Upfirdn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, up, down, pad, flip_filter, gain):  # noqa: D102
        y = load_extension().upfirdn2d(x, f, *up, *down, *pad, flip_filter, gain, _force_generic)
        ctx.save_for_backward(f)
        ctx.config = (up, down, pad, flip_filter, gain, tuple(x.shape[2:]), tuple(y.shape[2:]))
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        (f,) = ctx.saved_tensors
        up, down, pad, flip_filter, gain, in_size, out_size = ctx.config
        dx = None
        if ctx.needs_input_grad[0]:
            gpad = adjoint_padding(in_size, out_size, f, up, down, pad)
            dx = _Upfirdn2d.apply(dy, f, down, up, gpad, not flip_filter, gain)
        return dx, None, None, None, None, None, None


def upfirdn2d(
    x: torch.Tensor,  # [batch, channels, height, width], CUDA
    f: torch.Tensor,  # [taps] or [taps_y, taps_x]
    up: tuple[int, int],  # (x, y)
    down: tuple[int, int],  # (x, y)
    pad: tuple[int, int, int, int],  # (x0, x1, y0, y1); negative crops
    flip_filter: bool,
    gain: float,
) -> torch.Tensor:
    """Fused :func:`stylex.ops.upfirdn2d`; differentiable to any order with respect to ``x``.

    Float64 inputs (gradcheck) and filters that need a gradient take the reference path: the
    kernels cover float32, float16 and bfloat16 and differentiate with respect to ``x`` only.
    """
    if x.dtype not in KERNEL_DTYPES or (f.requires_grad and torch.is_grad_enabled()):
        from stylex.ops.upfirdn2d import upfirdn2d_ref

        return upfirdn2d_ref(x, f, up, down, pad, flip_filter, gain)
    return _Upfirdn2d.apply(x, f, tuple(up), tuple(down), tuple(pad), bool(flip_filter), float(gain))


# ---------------------------------------------------------------------------------------------
# bias_act
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ActConfig:
    dim: int
    code: int
    alpha: float
    gain: float
    clamp: float  # < 0: none

    @property
    def curved(self) -> bool:
        """Whether act'' is nonzero somewhere (linear, relu and lrelu are piecewise linear)."""
        return self.code not in (0, 1, 2)


def _sum_except(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.ndim) if d != dim])


def _kernel(order: int, x, b, g1, g2, cfg: _ActConfig) -> torch.Tensor:
    return load_extension().bias_act(x, b, g1, g2, order, cfg.dim, cfg.code, cfg.alpha, cfg.gain, cfg.clamp)


class _BiasAct(torch.autograd.Function):
    """y = clamp(act(x + b) * gain)."""

    @staticmethod
    def forward(ctx, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.save_for_backward(x, b)
        return _kernel(0, x, b, None, None, cfg)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, b = ctx.saved_tensors
        cfg = ctx.cfg
        dz = _BiasActGrad.apply(dy, x, b, cfg)
        dx = dz if ctx.needs_input_grad[0] else None
        db = _sum_except(dz, cfg.dim).to(b.dtype) if b is not None and ctx.needs_input_grad[1] else None
        return dx, db, None


class _BiasActGrad(torch.autograd.Function):
    """dL/dz = dy * gain * act'(x + b), zero where the clamp was active."""

    @staticmethod
    def forward(ctx, dy, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.save_for_backward(dy, x, b)
        return _kernel(1, x, b, dy, None, cfg)

    @staticmethod
    def backward(ctx, ddz):  # noqa: D102
        dy, x, b = ctx.saved_tensors
        cfg = ctx.cfg
        need_dy, need_x, need_b = ctx.needs_input_grad[:3]
        g_dy = _BiasActGrad.apply(ddz, x, b, cfg) if need_dy else None  # linear in dy
        g_x = g_b = None
        if (need_x or (need_b and b is not None)) and cfg.curved:
            d2 = _BiasActGrad2.apply(ddz, dy, x, b, cfg)
            g_x = d2 if need_x else None
            g_b = _sum_except(d2, cfg.dim).to(b.dtype) if need_b and b is not None else None
        return g_dy, g_x, g_b, None


def _act_derivative_ref(z: torch.Tensor, cfg: _ActConfig, order: int) -> torch.Tensor:
    """The ``order``-th derivative of the activation at ``z`` by autograd of the reference.

    Only the third derivative comes here (differentiating the fused second-order kernel), which
    no training step of this project takes; it keeps higher orders correct, not fast.
    """
    from stylex.ops.bias_act import ACTIVATIONS

    fn = next(spec.fn for spec in ACTIVATIONS.values() if spec.code == cfg.code)
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_()
        d = fn(zz, cfg.alpha)
        for _ in range(order):
            (d,) = torch.autograd.grad(d.sum(), zz, create_graph=True)
    return d


class _BiasActGrad2(torch.autograd.Function):
    """ddz * dy * gain * act''(x + b), zero where the clamp was active."""

    @staticmethod
    def forward(ctx, ddz, dy, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.save_for_backward(ddz, dy, x, b)
        return _kernel(2, x, b, dy, ddz, cfg)

    @staticmethod
    def backward(ctx, gout):  # noqa: D102
        ddz, dy, x, b = ctx.saved_tensors
        cfg = ctx.cfg
        need_ddz, need_dy, need_x, need_b = ctx.needs_input_grad[:4]
        g_ddz = _BiasActGrad2.apply(gout, dy, x, b, cfg) if need_ddz else None
        g_dy = _BiasActGrad2.apply(ddz, gout, x, b, cfg) if need_dy else None
        g_x = g_b = None
        if need_x or (need_b and b is not None):
            z = x
            if b is not None:
                shape = [1] * x.ndim
                shape[cfg.dim] = -1
                z = x + b.to(x.dtype).reshape(shape)
            value = _act_derivative_ref(z.detach(), cfg, 0).detach() * cfg.gain
            inside = (value.abs() <= cfg.clamp) if cfg.clamp >= 0 else torch.ones_like(value, dtype=torch.bool)
            g_x = gout * ddz * dy * cfg.gain * _act_derivative_ref(z, cfg, 3) * inside
            g_b = _sum_except(g_x, cfg.dim).to(b.dtype) if need_b and b is not None else None
            g_x = g_x if need_x else None
        return g_ddz, g_dy, g_x, g_b, None


def bias_act(
    x: torch.Tensor,  # any shape, CUDA
    b: torch.Tensor | None,  # [x.shape[dim]] or None
    dim: int,  # the dimension of x that b runs along
    act_code: int,  # ACTIVATIONS[name].code
    alpha: float,
    gain: float,
    clamp: float | None,  # None: no clamp
) -> torch.Tensor:
    """Fused :func:`stylex.ops.bias_act`; first and second derivatives use fused kernels too.

    Float64 inputs take the reference path (the kernels cover float32, float16, bfloat16).
    """
    if x.dtype not in KERNEL_DTYPES:
        from stylex.ops.bias_act import ACTIVATIONS, bias_act_ref

        name = next(n for n, spec in ACTIVATIONS.items() if spec.code == act_code)
        return bias_act_ref(x, b, dim, name, alpha, gain, clamp)
    cfg = _ActConfig(
        dim=dim % x.ndim if x.ndim else 0,
        code=int(act_code),
        alpha=float(alpha),
        gain=float(gain),
        clamp=-1.0 if clamp is None else float(clamp),
    )
    if cfg.code == 0 and cfg.clamp < 0:
        # Linear and unclamped: the gradient is dy * gain, which needs neither x nor a kernel.
        return _LinearBiasAct.apply(x, b, cfg)
    return _BiasAct.apply(x, b, cfg)


class _LinearBiasAct(torch.autograd.Function):
    """(x + b) * gain, saving nothing for backward."""

    @staticmethod
    def forward(ctx, x, b, cfg):  # noqa: D102
        ctx.cfg = cfg
        ctx.has_bias = b is not None
        ctx.bias_dtype = b.dtype if b is not None else None
        return _kernel(0, x, b, None, None, cfg)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        cfg = ctx.cfg
        dz = dy * cfg.gain
        db = _sum_except(dz, cfg.dim).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (dz if ctx.needs_input_grad[0] else None), db, None
