"""The fused CUDA ops: build machinery, autograd rules, and the kernels against the reference.

Four groups:

* no marker: build-system logic with fakes (toolkit discovery behind a wrapper nvcc, cache keys,
  the stale-lock recovery, error messages, once-per-process fallback) and the autograd rules of
  the ops' fused paths driven by an *emulated* extension on the CPU in float64. The emulation only
  tests how gradients are composed; it never stands in for kernel results.
* ``cuda_build``: compiles the real extension (nvcc and a CUDA build of PyTorch; no GPU needed).
* ``test_kernels_*[host]`` (no marker, needs a C++ compiler): the kernel sources compiled for the
  CPU (``custom_ops/host_kernels.h``) against the reference for values, gradients and
  second-order gradients: index arithmetic, padding, layouts, paths and 16-bit conversions.
* ``test_kernels_*[cuda]`` (``gpu``): the same checks with the kernels on a GPU."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stylex.ops import ACTIVATIONS, _build, _lock, _toolkit, bias_act, dispatch, setup_filter, upfirdn2d
from stylex.ops._toolkit import BuildError
from stylex.ops.bias_act import _bias_act_cuda, bias_act_ref
from stylex.ops.upfirdn2d import (
    _upfirdn2d_cuda,
    adjoint_padding,
    force_generic_upfirdn2d,
    upfirdn2d_path,
    upfirdn2d_ref,
)

REPO = Path(__file__).resolve().parents[1]




def _toolkit_or_skip() -> Path:
    if not torch.version.cuda:
        pytest.skip("this PyTorch has no CUDA support, so the extension cannot be built")
    try:
        return _toolkit.find_cuda_home()
    except BuildError as err:
        pytest.skip(f"no CUDA toolkit to compile with: {err}")


def _gpu_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")
    _toolkit_or_skip()


@pytest.fixture
def fresh_state(monkeypatch):
    """A process state in which the extension has not been built or tried yet."""
    monkeypatch.setattr(dispatch.EXTENSION, "_module", None)
    monkeypatch.setattr(dispatch.EXTENSION, "_failure", None)
    monkeypatch.setattr(dispatch.EXTENSION, "_warned", False)


# =============================================================================================
# toolkit discovery (fakes; no compiler needed)
# =============================================================================================


def _write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _fake_toolkit(root: Path, release: str = "13.0", dryrun: bool = True, sm: str = "sm_80 sm_90") -> Path:
    """A folder that looks like a CUDA toolkit, with an nvcc that answers the queries we make."""
    (root / "include").mkdir(parents=True, exist_ok=True)
    (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    top = f'echo "#\\$ TOP={root}/bin/.."' if dryrun else "exit 1"
    _write_script(
        root / "bin" / "nvcc",
        f"""case "$1" in
  --version) echo "Cuda compilation tools, release {release}, V{release}.1" ;;
  --dryrun) {top} ;;
  --list-gpu-code) for a in {sm}; do echo $a; done ;;
  *) exit 2 ;;
esac
""",
    )
    return root


def _wrapper(bin_dir: Path, target: Path) -> Path:
    """An nvcc wrapper outside the toolkit, like /usr/local/bin/nvcc."""
    return _write_script(bin_dir / "nvcc", f'exec {target} "$@"\n')


def test_wrapper_nvcc_resolves_to_the_real_toolkit(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrap_bin = tmp_path / "usr" / "local" / "bin"
    _wrapper(wrap_bin, toolkit / "bin" / "nvcc")
    # PyTorch's guess would be the parent of the wrapper's folder, which is no toolkit
    assert not (wrap_bin.parent / "include" / "cuda_runtime.h").exists()
    found = _toolkit.find_cuda_home({"PATH": str(wrap_bin)}, default=tmp_path / "none")
    assert found.resolve() == toolkit.resolve()


def test_wrapper_script_is_read_when_nvcc_cannot_say(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-12.4", dryrun=False)
    wrap_bin = tmp_path / "wrap"
    _wrapper(wrap_bin, toolkit / "bin" / "nvcc")
    assert _toolkit.find_cuda_home({"PATH": str(wrap_bin)}, default=tmp_path / "none").resolve() == toolkit.resolve()


def test_symlinked_nvcc_is_followed(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0", dryrun=False)
    link_bin = tmp_path / "links"
    link_bin.mkdir()
    (link_bin / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    assert _toolkit.find_cuda_home({"PATH": str(link_bin)}, default=tmp_path / "none").resolve() == toolkit.resolve()


def test_cuda_home_wins_over_path(tmp_path):
    on_path = _fake_toolkit(tmp_path / "cuda-a")
    chosen = _fake_toolkit(tmp_path / "cuda-b")
    env = {"PATH": str(on_path / "bin"), "CUDA_HOME": str(chosen)}
    assert _toolkit.find_cuda_home(env) == chosen


def test_bad_cuda_home_and_missing_nvcc_are_named(tmp_path):
    with pytest.raises(BuildError, match=r"CUDA_HOME=.*has no bin/nvcc"):
        _toolkit.find_cuda_home({"PATH": "", "CUDA_HOME": str(tmp_path)})
    with pytest.raises(BuildError, match="no CUDA compiler: nvcc is not on PATH"):
        _toolkit.find_cuda_home({"PATH": str(tmp_path)}, default=tmp_path / "nowhere")
    lonely = _write_script(tmp_path / "lonely" / "nvcc", "exit 1\n")
    with pytest.raises(BuildError, match=f"found nvcc at {lonely}.*set CUDA_HOME"):
        _toolkit.find_cuda_home({"PATH": str(lonely.parent)}, default=tmp_path / "nowhere")


def test_nvcc_version_and_mismatch_message(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-11.8", release="11.8")
    assert _toolkit.nvcc_version(toolkit) == "11.8"
    expected = r"CUDA version mismatch: nvcc in .* is CUDA 11\.8 but PyTorch was built with CUDA 12\.4"
    with pytest.raises(BuildError, match=expected):
        _toolkit.check_versions("11.8", "12.4", toolkit)
    _toolkit.check_versions("12.1", "12.4", toolkit)  # same major: compatible
    with pytest.raises(BuildError, match="built without CUDA"):
        _toolkit.check_versions("12.4", None, toolkit)


def test_no_gpu_fallback_is_the_newest_arch_torch_and_nvcc_share(tmp_path, monkeypatch):
    """With no GPU and no TORCH_CUDA_ARCH_LIST torch has nothing to choose from; we pick one."""
    toolkit = _fake_toolkit(tmp_path / "cuda", sm="sm_75 sm_80 sm_86 sm_90 sm_100")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_120", "compute_120"])
    assert _toolkit.fallback_arch(toolkit) == "9.0"  # sm_120: too new for this nvcc; sm_100: not in torch
    assert _toolkit.arch_choice(toolkit, {}, capabilities=[]) == (("fallback 9.0",), "9.0")
    # "native" means the visible GPUs to torch: none here, so the fallback too
    assert _toolkit.arch_choice(toolkit, {"TORCH_CUDA_ARCH_LIST": "native"}, capabilities=[])[1] == "9.0"
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90", "sm_100"])
    assert _toolkit.fallback_arch(toolkit) == "10.0"
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_120"])
    expected = r"no GPU is visible and nvcc in .* shares no architecture with this PyTorch .*TORCH_CUDA_ARCH_LIST=8\.0"
    with pytest.raises(BuildError, match=expected):
        _toolkit.arch_choice(toolkit, {}, capabilities=[])


def test_arch_choice_follows_torch_and_enters_the_cache_key(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda", sm="sm_80 sm_90")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])

    def key(environ, capabilities):
        archs, fallback = _toolkit.arch_choice(toolkit, environ, capabilities)
        return _config(archs=archs, arch_fallback=fallback).key()

    # TORCH_CUDA_ARCH_LIST wins over the visible GPUs, as in torch, and torch reads it itself
    chosen = _toolkit.arch_choice(toolkit, {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}, capabilities=[(8, 6)])
    assert chosen == (("TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX",), None)
    assert key({"TORCH_CUDA_ARCH_LIST": "8.0"}, []) != key({"TORCH_CUDA_ARCH_LIST": "9.0"}, [])
    # else the visible GPUs' capabilities, from which torch derives its targets
    assert _toolkit.arch_choice(toolkit, {}, capabilities=[(9, 0), (8, 6), (9, 0)]) == (("gpu 8.6", "gpu 9.0"), None)
    assert key({}, [(8, 6)]) != key({}, [(9, 0)])
    assert key({}, [(9, 0), (9, 0)]) == key({}, [(9, 0)])
    # the fallback (sm_90 without PTX) is another build than torch's choice for a 9.0 GPU
    assert key({}, []) != key({}, [(9, 0)])


def test_compile_leaves_the_architectures_to_torch(tmp_path, monkeypatch):
    """No -gencode of ours; TORCH_CUDA_ARCH_LIST is set for the no-GPU fallback only, and only
    while torch compiles."""
    from torch.utils import cpp_extension

    seen: list[tuple[dict, str | None]] = []

    def fake_load(**kwargs):
        seen.append((kwargs, os.environ.get("TORCH_CUDA_ARCH_LIST")))
        return SimpleNamespace(name=kwargs["name"])

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_build, "preflight", lambda: None)  # no ninja or compiler is run
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    cuda_home_before = os.environ.get("CUDA_HOME")
    _build._compile(_config(archs=("fallback 9.0",), arch_fallback="9.0"), tmp_path)
    _build._compile(_config(archs=("gpu 9.0",)), tmp_path)
    assert [arch_list for _, arch_list in seen] == ["9.0", None]
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ, "the fallback must not outlive the compile"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6+PTX")  # the user's own list reaches torch untouched
    _build._compile(_config(archs=("TORCH_CUDA_ARCH_LIST=8.6+PTX",)), tmp_path)
    assert seen[-1][1] == "8.6+PTX" and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6+PTX"
    for kwargs, _ in seen:
        flags = [*kwargs["extra_cflags"], *kwargs["extra_cuda_cflags"]]
        # any flag naming an architecture would also make torch drop its own choice
        assert not [f for f in flags if "gencode" in f or "arch" in f], flags

    def failing_load(**kwargs):
        raise RuntimeError("error: boom")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    with pytest.raises(BuildError, match="boom"):
        _build._compile(_config(archs=("fallback 9.0",), arch_fallback="9.0"), tmp_path)
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ, "a failed compile must restore the environment too"
    assert os.environ.get("CUDA_HOME") == cuda_home_before


# =============================================================================================
# cache keys and error messages
# =============================================================================================


def _config(**kw) -> _build.BuildConfig:
    base = dict(
        spec=dispatch.SPEC, sources=_build.source_dir(), cuda_home=Path("/opt/cuda"), nvcc="13.0", archs=("gpu 9.0",)
    )
    base.update(kw)
    return _build.BuildConfig(**base)


def test_cache_folder_is_keyed_by_everything_that_matters(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    base = _config()
    assert base.folder(root) == _config().folder(root), "the same configuration must reuse its folder"
    variants = [
        _config(defines=("STYLEX_EXTRA=1",)),
        _config(archs=("gpu 8.0",)),
        _config(torch_version="0.0.0"),
        _config(torch_cuda="11.8"),
        _config(nvcc="12.9"),
        _config(python="cpython-3.99"),
        _config(cuda_cflags=("-O2",)),
    ]
    folders = {v.folder(root) for v in variants} | {base.folder(root)}
    assert len(folders) == len(variants) + 1

    # a changed source changes the key
    copy = tmp_path / "src"
    copy.mkdir()
    for name in dispatch.SPEC.sources + dispatch.SPEC.headers:
        (copy / name).write_bytes((_build.source_dir() / name).read_bytes())
    assert _config(sources=copy).folder(root).name == base.folder(root).name
    (copy / "bias_act.cu").write_text((copy / "bias_act.cu").read_text() + "\n// changed\n")
    assert _config(sources=copy).folder(root) != base.folder(root)

    monkeypatch.setattr(_build, "sources_digest", lambda folder, names: "0" * 64)
    patched = _config().folder(root)
    monkeypatch.undo()
    assert patched != base.folder(root)


def test_missing_sources_are_reported(tmp_path):
    with pytest.raises(BuildError, match=r"CUDA sources are missing: .*stylex_ops\.cpp.*STYLEX_CUSTOM_OPS_DIR"):
        _config(sources=tmp_path).key()


@pytest.mark.parametrize(
    "log,cause",
    [
        ("#error -- unsupported GNU version! gcc versions later than 13 are not supported!", "unsupported host"),
        ("/usr/bin/ld: cannot find -lcudart: No such file or directory", "the linker cannot find libcudart"),
        ("/bin/sh: 1: /opt/cuda/bin/nvcc: not found", "nvcc could not be run"),
        ("error: expected ';' before '}' token", "compiling the fused CUDA ops failed"),
    ],
)
def test_build_failures_name_their_cause(log, cause):
    message = _build.explain_failure("Error building extension 'x': " + log, _config())
    assert message.startswith(cause)
    assert log in message, "the compiler's own output must be kept"


def test_preflight_names_missing_ninja_and_compiler(monkeypatch):
    real_which = _toolkit.shutil.which
    no_ninja = lambda name, *a, **k: None if name == "ninja" else real_which(name, *a, **k)  # noqa: E731
    monkeypatch.setattr(_toolkit.shutil, "which", no_ninja)
    monkeypatch.setitem(sys.modules, "ninja", None)  # the PyPI package is not importable either
    with pytest.raises(BuildError, match=r"ninja is not installed.*pip install ninja"):
        _toolkit.preflight()
    monkeypatch.setattr(_toolkit.shutil, "which", lambda name, *a, **k: "/usr/bin/ninja" if name == "ninja" else None)
    monkeypatch.setenv("CXX", "g++-404")
    with pytest.raises(BuildError, match="no C\\+\\+ compiler: 'g\\+\\+-404' is not on PATH"):
        _toolkit.preflight()


# =============================================================================================
# locking, atomic publishing, once-per-process fallback (fake compiles)
# =============================================================================================

_HOLD_LOCK = """
import sys, time
from stylex.ops._lock import BuildLock
lock = BuildLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _spawn_holder(lock_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-c", _HOLD_LOCK, str(lock_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_held_by_live_process_times_out_naming_it(tmp_path):
    lock_path = tmp_path / "x.lock"
    holder = _spawn_holder(lock_path)
    try:
        with pytest.raises(TimeoutError, match=f"held by process {holder.pid}.*STYLEX_BUILD_LOCK_TIMEOUT"):
            _lock.BuildLock(lock_path, timeout=0.5, poll=0.05).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_killed_build_is_detected_and_recovered(tmp_path):
    lock_path = tmp_path / "x.lock"
    holder = _spawn_holder(lock_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    with pytest.warns(UserWarning, match=f"stale build lock .* process {holder.pid} .*no longer running"):
        lock = _lock.BuildLock(lock_path, timeout=5.0, poll=0.05)
        lock.acquire()
    assert time.monotonic() - start < 2.0, "a dead holder must not make the next run wait"
    assert lock.stale_owner["pid"] == holder.pid
    lock.release()
    # a clean release leaves no owner record: the next holder does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _lock.BuildLock(lock_path, timeout=1.0):
            pass


def _fake_compile(calls: list, delay: float = 0.0):
    def compile_(config, workdir):
        calls.append(threading.get_ident())
        time.sleep(delay)
        (workdir / f"{config.name}.so").write_bytes(b"not really a library")
        return SimpleNamespace(name=config.name, fake=True)

    return compile_


def test_build_publishes_atomically_once_and_then_hits_the_cache(tmp_path, monkeypatch):
    config = _config(defines=("STYLEX_TEST_FAKE=1",))
    monkeypatch.delitem(sys.modules, config.name, raising=False)
    calls: list = []
    monkeypatch.setattr(_build, "_compile", _fake_compile(calls, delay=0.3))
    results = []
    threads = [threading.Thread(target=lambda: results.append(_build.build(config, tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1, "concurrent builders must compile once"
    assert sorted(built for _, built in results) == [False, False, True]
    assert _build.is_published(config.folder(tmp_path), config.name)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary build folders left behind: {leftovers}"
    module, built = _build.build(config, tmp_path)
    assert built is False and module.fake


def test_failed_build_publishes_nothing_and_keeps_the_log(tmp_path, monkeypatch):
    config = _config(defines=("STYLEX_TEST_FAIL=1",))

    def failing(config, workdir):
        (workdir / "half.o").write_text("partial")
        raise BuildError("compiling the fused CUDA ops failed.\nerror: boom")

    monkeypatch.setattr(_build, "_compile", failing)
    with pytest.raises(BuildError, match="boom"):
        _build.build(config, tmp_path)
    assert not config.folder(tmp_path).exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert "boom" in (tmp_path / f"{config.name}.failed.log").read_text()


def test_unwritable_cache_is_named(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(BuildError, match="cannot create the build cache .*STYLEX_CACHE_DIR"):
        _build.build(_config(), blocker / "cache")


def test_build_after_a_killed_build_recovers(tmp_path, monkeypatch):
    config = _config(defines=("STYLEX_TEST_STALE=1",))
    monkeypatch.delitem(sys.modules, config.name, raising=False)
    holder = _spawn_holder(tmp_path / f"{config.name}.lock")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (tmp_path / f".{config.name}-killed").mkdir()  # its unfinished work folder
    calls: list = []
    monkeypatch.setattr(_build, "_compile", _fake_compile(calls))
    with pytest.warns(UserWarning, match="stale build lock"):
        _, built = _build.build(config, tmp_path)
    assert built and len(calls) == 1
    assert _build.is_published(config.folder(tmp_path), config.name)
    assert not (tmp_path / f".{config.name}-killed").exists(), "the killed build's work folder must be cleared"


def test_failed_build_is_tried_once_per_process_and_warns_once(fresh_state, monkeypatch):
    attempts = []

    def broken_config(*args, **kw):
        attempts.append(1)
        raise BuildError("no CUDA compiler: nvcc is not on PATH")

    monkeypatch.setattr(_build, "current_config", broken_config)
    with pytest.warns(RuntimeWarning, match="reference implementation is used. no CUDA compiler") as record:
        for _ in range(5):
            assert dispatch.available("upfirdn2d") is False
            assert dispatch.available("bias_act") is False
    assert len(record) == 1
    assert len(attempts) == 1
    expected = "ops.impl=cuda, but the fused CUDA kernel for bias_act is unavailable: no CUDA compiler"
    with pytest.raises(BuildError, match=expected):
        dispatch.available("bias_act", strict=True)
    assert len(attempts) == 1
    with pytest.raises(ValueError, match="no fused CUDA kernel for 'conv2d'"):
        dispatch.available("conv2d")


def test_importing_the_package_builds_nothing():
    code = (
        "import sys, stylex.ops, stylex.ops._build, stylex.ops.dispatch; "
        "print('torch.utils.cpp_extension' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# =============================================================================================
# autograd rules, driven by an emulated extension (CPU, float64)
# =============================================================================================


class EmulatedExtension:
    """The extension's interface computed with non-differentiable torch code.

    Stands in for the compiled module so that the autograd Functions of the ops' fused paths
    can be checked numerically on the CPU; every call is recorded.
    """

    def __init__(self):
        self.calls: list[tuple] = []

    def upfirdn2d(self, x, f, upx, upy, downx, downy, px0, px1, py0, py1, flip_filter, gain, force_generic):
        self.calls.append(("upfirdn2d", (upx, upy), (downx, downy), (px0, px1, py0, py1), flip_filter))
        with torch.no_grad():
            return upfirdn2d_ref(x, f, (upx, upy), (downx, downy), (px0, px1, py0, py1), flip_filter, gain)

    def bias_act(self, x, b, g1, g2, order, dim, act, alpha, gain, clamp):
        self.calls.append(("bias_act", order))
        name = next(n for n, s in ACTIVATIONS.items() if s.code == act)
        with torch.no_grad():
            z = x
            if b is not None:
                shape = [1] * x.ndim
                shape[dim] = -1
                z = x + b.reshape(shape)
        with torch.enable_grad():
            zz = z.detach().requires_grad_()
            derivs = [ACTIVATIONS[name].fn(zz, alpha)]
            for _ in range(2):
                d = derivs[-1]
                derivs.append(
                    torch.autograd.grad(d.sum(), zz, create_graph=True)[0] if d.requires_grad else torch.zeros_like(zz)
                )
        value, d1, d2 = (d.detach() for d in derivs)
        v = value * gain
        inside = (v.abs() <= clamp) if clamp >= 0 else torch.ones_like(v, dtype=torch.bool)
        if order == 0:
            return v.clamp(-clamp, clamp) if clamp >= 0 else v
        if order == 1:
            return g1 * gain * d1 * inside
        return g2 * g1 * gain * d2 * inside


@pytest.fixture
def emulated(monkeypatch):
    ext = EmulatedExtension()
    monkeypatch.setattr(dispatch, "extension", lambda: ext)
    monkeypatch.setattr(dispatch, "KERNEL_DTYPES", (torch.float64,))  # let float64 reach the Functions
    return ext


@pytest.mark.parametrize(
    "up,down,pad,separable,flip",
    [
        ((2, 2), (1, 1), (2, 1, 2, 1), True, False),
        ((1, 1), (2, 2), (1, 1, 1, 1), True, True),
        ((4, 1), (1, 2), (3, 0, -1, 2), False, False),
        ((1, 2), (4, 1), (0, -2, 2, 1), False, True),
    ],
)
def test_upfirdn2d_autograd_rule_any_order(emulated, up, down, pad, separable, flip):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3 if separable else (3, 2), generator=g, dtype=torch.float64)

    def fn(inp):
        return _upfirdn2d_cuda(inp, f, up, down, pad, flip, 1.5)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))
    # the gradient really is an upfirdn2d with swapped factors and the flipped filter
    emulated.calls.clear()
    fn(x).sum().backward()
    assert emulated.calls[-1][1:3] == (down, up) and emulated.calls[-1][4] == (not flip)


@pytest.mark.parametrize("in_size", [(5, 7), (1, 1), (8, 3)])
@pytest.mark.parametrize(
    "up,down,taps", [((2, 2), (1, 1), 4), ((1, 1), (2, 2), 4), ((4, 2), (3, 1), 5), ((1, 1), (1, 1), 1)]
)
def test_adjoint_padding_matches_reference_gradient(in_size, up, down, taps):
    """The padding formula alone, checked against autograd of the reference (no extension)."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(taps, 3, generator=g, dtype=torch.float64)
    pad = (2, 1, 0, 3)
    x = torch.randn(1, 1, *in_size, generator=g, dtype=torch.float64, requires_grad=True)
    y = upfirdn2d_ref(x, f, up, down, pad, False, 2.0)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (want,) = torch.autograd.grad(y, x, dy)
    gpad = adjoint_padding(tuple(x.shape[2:]), tuple(y.shape[2:]), f, up, down, pad)
    got = upfirdn2d_ref(dy, f, down, up, gpad, True, 2.0)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dim,clamp", [(1, None), (0, 0.7), (-1, None)])
def test_bias_act_autograd_rule_second_order(emulated, name, dim, clamp):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.1, x).requires_grad_()  # away from the kinks at 0
    b = (0.1 * torch.randn(x.shape[dim], generator=g, dtype=torch.float64)).requires_grad_()
    spec = ACTIVATIONS[name]

    def fn(inp, bias):
        return _bias_act_cuda(inp, bias, dim, spec.code, 0.2, spec.default_gain, clamp)

    if clamp is not None:  # move samples off the clamp boundary, where finite differences break
        with torch.no_grad():
            for _ in range(10):
                near = (bias_act_ref(x, b, dim, name, 0.2, spec.default_gain, clamp).abs() - clamp).abs() < 1e-3
                near &= bias_act_ref(x, b, dim, name, 0.2, spec.default_gain, None).abs() < clamp + 1e-3
                if not near.any():
                    break
                x += 0.01 * near
    torch.testing.assert_close(fn(x, b), bias_act_ref(x, b, dim, name, 0.2, spec.default_gain, clamp))
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    # the first and second derivatives go through the fused orders 1 and 2
    emulated.calls.clear()
    (gx,) = torch.autograd.grad(fn(x, b).square().sum(), x, create_graph=True)
    gx.sum().backward()
    orders = {c[1] for c in emulated.calls if c[0] == "bias_act"}
    if name == "linear" and clamp is None:
        assert orders == {0}, "unclamped linear needs no derivative kernel"
    elif name in ("linear", "relu", "lrelu"):
        assert orders == {0, 1}, "piecewise-linear activations have no second-derivative term"
    else:
        assert orders == {0, 1, 2}


@pytest.mark.parametrize("name", ["tanh", "swish", "softplus"])
def test_bias_act_third_order_matches_reference(emulated, name):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    code = ACTIVATIONS[name].code

    def third(fn):
        y = fn(x, b).sum()
        (g1,) = torch.autograd.grad(y, x, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), x, create_graph=True)
        return torch.autograd.grad(g2.sum(), [x, b])

    got = third(lambda i, bb: _bias_act_cuda(i, bb, 1, code, 0.2, 1.3, None))
    want = third(lambda i, bb: bias_act_ref(i, bb, 1, name, 0.2, 1.3, None))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


def test_linear_bias_act_saves_nothing_and_scales_gradient(emulated):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = _bias_act_cuda(x, b, 1, ACTIVATIONS["linear"].code, 0.0, 3.0, None)
    assert y.grad_fn.__class__.__name__.startswith("_LinearBiasAct")
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(b.grad, torch.full_like(b, 12.0))


# =============================================================================================
# cuda_build: the real compile (nvcc + CUDA build of PyTorch; no GPU needed)
# =============================================================================================


@pytest.mark.cuda_build
def test_extension_compiles_and_second_build_is_a_cache_hit():
    _toolkit_or_skip()
    config = _build.current_config(dispatch.SPEC)
    start = time.monotonic()
    module, compiled = _build.build(config)
    first = time.monotonic() - start
    folder = config.folder()
    assert _build.is_published(folder, config.name)
    start = time.monotonic()
    again, compiled_again = _build.build(config)
    assert compiled_again is False, "a second build of the same configuration must load the cached one"
    assert again is module
    assert time.monotonic() - start < 5.0
    print(f"fused ops: {'compiled' if compiled else 'cached'} in {first:.1f} s into {folder}")
    # the bindings exist and check their arguments (no GPU needed for either)
    assert module.upfirdn2d_path(4, 4, 2, 2, 1, 1) == "k4_up2"
    assert module.upfirdn2d_path(4, 4, 1, 1, 2, 2) == "k4_down2"
    assert module.upfirdn2d_path(4, 4, 1, 1, 1, 1) == "k4"
    assert module.upfirdn2d_path(3, 3, 2, 2, 1, 1) == "generic"
    assert module.upfirdn2d_path(4, 4, 2, 1, 1, 1) == "generic"
    with pytest.raises(RuntimeError, match="bias_act: x must be a CUDA tensor"):
        module.bias_act(torch.ones(3), None, None, None, 0, 0, 1, 0.2, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="upfirdn2d: x must be a CUDA tensor"):
        module.upfirdn2d(torch.ones(1, 1, 4, 4), torch.ones(4), 1, 1, 1, 1, 0, 0, 0, 0, False, 1.0, False)
    # a changed key names another folder (not built here: that would be a second compile)
    assert replace_defines(config).folder() != folder


def replace_defines(config: _build.BuildConfig) -> _build.BuildConfig:
    from dataclasses import replace

    return replace(config, defines=config.defines + ("STYLEX_KEY_PROBE=1",))


@pytest.mark.cuda_build
def test_real_toolkit_is_found_behind_a_wrapper():
    home = _toolkit_or_skip()
    assert (home / "include" / "cuda_runtime.h").is_file()
    nvcc = _toolkit.shutil.which("nvcc")
    if nvcc and not os.environ.get("CUDA_HOME"):
        real = Path(os.path.realpath(nvcc))
        if not (real.parent.parent / "include" / "cuda_runtime.h").exists():
            # the wrapper case: PyTorch's guess (parent of nvcc's folder) would be wrong
            assert home != real.parent.parent


# =============================================================================================
# the kernels against the reference: on the GPU ("cuda", marked gpu) and, everywhere, the same
# kernel sources compiled for the CPU ("host", see custom_ops/host_kernels.h)
# =============================================================================================

_host_module = None


def _host_kernels():
    """The host build, compiled once per test session (and cached across sessions)."""
    global _host_module
    if _host_module is None:
        cxx = os.environ.get("CXX", "c++")
        if _toolkit.shutil.which(cxx) is None:
            pytest.skip(f"no C++ compiler ({cxx!r} is not on PATH) to build the host kernels with")
        _host_module = dispatch.load_host_kernels()  # a failed compile fails the test: it is a bug
    return _host_module


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "host"])
def kernels(request, monkeypatch):
    """The device the fused kernels run on for this test: "cuda", or "cpu" for the host build.

    For the host build the public ops send CPU tensors down the fused path (which they never do
    outside tests) and the fused path finds the host module in place of the CUDA one.
    """
    if request.param == "cuda":
        _gpu_or_skip()
        return "cuda"
    module = _host_kernels()
    monkeypatch.setattr(dispatch, "extension", lambda: module)

    def use_host(x, impl, op):
        impl = impl if impl is not None else dispatch.get_default_impl()
        return impl != "ref"

    monkeypatch.setattr(dispatch, "use_cuda", use_host)
    return "cpu"


def test_host_kernels_refuse_cuda_tensors_and_cuda_build_refuses_cpu():
    """Each build names the device it runs on when given a tensor from another."""
    module = _host_kernels()
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="bias_act: x must be a CPU \\(host build\\) tensor"):
            module.bias_act(torch.ones(3, device="cuda"), None, None, None, 0, 0, 1, 0.2, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="upfirdn2d: x must have shape"):
        module.upfirdn2d(torch.ones(4, 4), torch.ones(4), 1, 1, 1, 1, 0, 0, 0, 0, False, 1.0, False)
    assert module.upfirdn2d_path(4, 4, 2, 2, 1, 1) == "k4_up2"


def test_fast_division_is_exact_where_the_kernels_use_it():
    """The host build's bias index (fast division by stride and size) at awkward divisors.

    A wrong magic number shows as a bias added to the wrong channel: x = 0 and linear
    activation make the output the bias itself, so every element must equal b[its channel].
    """
    module = _host_kernels()
    for c, inner in [(3, 1), (7, 5), (641, 3), (1, 9), (1000, 1), (255, 257)]:
        b = torch.arange(c, dtype=torch.float32) + 1
        x = torch.zeros(2, c, inner)
        y = module.bias_act(x, b, None, None, 0, 1, 0, 0.0, 1.0, -1.0)
        assert torch.equal(y, b.view(1, c, 1).expand_as(x)), (c, inner)

# Tolerances, relative to the largest magnitude of the reference (computed in float32 from the
# same rounded inputs). float32: 1e-5 for values, gradients and second-order gradients.
# float16 / bfloat16 round the output (unit roundoff 2^-11 and 2^-8; accumulation is float32),
# and their gradients also round the incoming gradient, hence 4x looser.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def grad_tol(dtype: torch.dtype) -> float:
    return TOL[dtype] if dtype == torch.float32 else 4 * TOL[dtype]


@pytest.fixture(autouse=True)
def _exact_float32_reference():
    """TF32 convolutions would make the reference itself 1e-3 inexact on Ampere and newer."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-6)
    assert err <= rel * scale, f"{what}: max error {err:.3g} exceeds {rel:.1g} x {scale:.3g}"


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view
    return x.contiguous()


UPFIRDN_CASES = {
    # name: (filter, up, down, pad, gain, expected path)
    "k4_up2_sep": ([1, 3, 3, 1], (2, 2), (1, 1), (2, 1, 2, 1), 4.0, "k4_up2"),
    "k4_up2_2d": ("rand4x4", (2, 2), (1, 1), (2, 1, 2, 1), 4.0, "k4_up2"),
    "k4_down2_sep": ([1, 3, 3, 1], (1, 1), (2, 2), (1, 1, 1, 1), 1.0, "k4_down2"),
    "k4_down2_2d": ("rand4x4", (1, 1), (2, 2), (1, 1, 1, 1), 1.0, "k4_down2"),
    "k4_sep": ([1, 3, 3, 1], (1, 1), (1, 1), (2, 1, 2, 1), 1.0, "k4"),
    "k4_2d_crop": ("rand4x4", (1, 1), (1, 1), (-1, 2, 3, -1), 1.0, "k4"),
    "generic_3tap_up2": ([1, 2, 1], (2, 2), (1, 1), (1, 1, 1, 1), 4.0, "generic"),
    "generic_up4_sep": ([1, 3, 3, 1], (4, 4), (1, 1), (3, 2, 3, 2), 16.0, "generic"),
    "generic_mixed_2d": ("rand3x5", (4, 2), (1, 2), (2, -1, 0, 3), 1.5, "generic"),
    "generic_6tap_down2": ([1, 5, 10, 10, 5, 1], (1, 1), (2, 2), (2, 2, 2, 2), 1.0, "generic"),
}


def _case_filter(spec, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if spec == "rand4x4":
        return torch.randn(4, 4, generator=g).to(device)
    if spec == "rand3x5":
        return torch.randn(3, 5, generator=g).to(device)
    return setup_filter(spec, device=device)


def _upfirdn_check(x, f, up, down, pad, gain, dtype, what, second_order=True):
    """Forward, gradient and second-order gradient of the CUDA path against the reference."""
    rel = TOL[dtype]
    assert x.dtype == dtype
    xin = x.detach().requires_grad_()  # keeps x's strides
    xref = x.detach().float().requires_grad_()
    y = _upfirdn2d_cuda(xin, f, up, down, pad, False, gain)
    yref = upfirdn2d_ref(xref, f, up, down, pad, False, gain)
    assert y.dtype == dtype
    assert_rel_close(y, yref, rel, f"{what} forward")
    w = torch.randn_like(yref)
    # loss = sum(w * y^2): its gradient depends on x, so the second derivative is not trivial
    (g,) = torch.autograd.grad((w * y.float().square()).sum(), xin, create_graph=second_order)
    (gref,) = torch.autograd.grad((w * yref.square()).sum(), xref, create_graph=second_order)
    assert_rel_close(g, gref, grad_tol(dtype), f"{what} gradient")
    if second_order and dtype == torch.float32:
        v = torch.randn_like(gref)
        (h,) = torch.autograd.grad((g * v).sum(), xin)
        (href,) = torch.autograd.grad((gref * v).sum(), xref)
        assert_rel_close(h, href, TOL[torch.float32], f"{what} second-order gradient")


@pytest.mark.parametrize("case", list(UPFIRDN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("forced_generic", [False, True], ids=["auto_path", "generic"])
def test_kernels_upfirdn2d_matches_reference(case, dtype, layout, forced_generic, kernels):
    spec, up, down, pad, gain, path = UPFIRDN_CASES[case]
    f = _case_filter(spec, kernels)
    g = torch.Generator(device=kernels).manual_seed(11)
    x = _layout(torch.randn(3, 5, 9, 7, generator=g, device=kernels).to(dtype), layout)
    ctx = force_generic_upfirdn2d() if forced_generic else contextlib.nullcontext()
    with ctx:
        assert upfirdn2d_path(f, up, down) == ("generic" if forced_generic else path)
        _upfirdn_check(x, f, up, down, pad, gain, dtype, f"{case}/{layout}")


@pytest.mark.parametrize(
    "shape,case",
    [
        ((1, 1, 1, 1), "k4_up2_sep"),  # 1x1 image
        ((1, 1, 1, 1), "generic_up4_sep"),
        ((1, 600, 5, 3), "k4_down2_sep"),  # batch 1, many channels, odd sizes
        ((2, 3, 2, 2), "k4_down2_2d"),
        ((4, 2, 33, 1), "generic_mixed_2d"),  # one column
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_upfirdn2d_odd_shapes(shape, case, layout, kernels):
    spec, up, down, pad, gain, _ = UPFIRDN_CASES[case]
    f = _case_filter(spec, kernels)
    x = _layout(torch.randn(*shape, device=kernels), layout)
    _upfirdn_check(x, f, up, down, pad, gain, torch.float32, f"{case}{shape}/{layout}")


def test_kernels_upfirdn2d_keeps_layout_and_dispatches(kernels):
    f = setup_filter([1, 3, 3, 1], device=kernels)
    x = torch.randn(2, 8, 16, 16, device=kernels).contiguous(memory_format=torch.channels_last)
    y = upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), gain=4.0, impl="cuda")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(y, upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), gain=4.0, impl="ref"), 1e-5, "impl=cuda")
    # float64 is outside the kernels' types and takes the reference path even with impl="cuda"
    xd = torch.randn(1, 1, 5, 5, device=kernels, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: upfirdn2d(t, f.double(), up=2, padding=1, impl="cuda"), (xd,))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dim,clamp", [(1, None), (1, 0.9), (3, None)])
def test_kernels_bias_act_matches_reference(name, dtype, layout, dim, clamp, kernels):
    g = torch.Generator(device=kernels).manual_seed(5)
    x = _layout((1.5 * torch.randn(4, 6, 5, 3, generator=g, device=kernels)).to(dtype), layout)
    b = torch.randn(x.shape[dim], generator=g, device=kernels).to(dtype)
    spec = ACTIVATIONS[name]
    xin = x.detach().requires_grad_()
    bin_ = b.detach().requires_grad_()
    xref = x.detach().float().requires_grad_()
    bref = b.detach().float().requires_grad_()
    y = bias_act(xin, bin_, dim=dim, act=name, clamp=clamp, impl="cuda")
    yref = bias_act_ref(xref, bref, dim, name, spec.default_alpha, spec.default_gain, clamp)
    rel = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert_rel_close(y, yref, rel, f"{name} forward")
    w = torch.randn_like(yref)
    # R1-like: the gradient of sum(w * y^2) and then the gradient of that gradient's square
    gx, gb = torch.autograd.grad((w * y.float().square()).sum(), [xin, bin_], create_graph=True)
    gxr, gbr = torch.autograd.grad((w * yref.square()).sum(), [xref, bref], create_graph=True)
    assert_rel_close(gx, gxr, grad_tol(dtype), f"{name} dx")
    assert_rel_close(gb, gbr, grad_tol(dtype), f"{name} db")
    if dtype == torch.float32:
        hx, hb = torch.autograd.grad(gx.square().sum() + gb.sum(), [xin, bin_])
        hxr, hbr = torch.autograd.grad(gxr.square().sum() + gbr.sum(), [xref, bref])
        assert_rel_close(hx, hxr, TOL[torch.float32], f"{name} second-order dx")
        assert_rel_close(hb, hbr, TOL[torch.float32], f"{name} second-order db")


@pytest.mark.parametrize("shape,dim", [((1,), 0), ((7,), 0), ((2, 1000), 1), ((1, 512, 1, 1), 1), ((3, 5, 2), 2)])
def test_kernels_bias_act_odd_shapes_and_no_bias(shape, dim, kernels):
    x = torch.randn(*shape, device=kernels)
    b = torch.randn(shape[dim], device=kernels)
    for bias in (b, None):
        for act in ("lrelu", "swish", "linear"):
            assert_rel_close(
                bias_act(x, bias, dim=dim, act=act, impl="cuda"),
                bias_act(x, bias, dim=dim, act=act, impl="ref"),
                1e-5,
                f"{act}{shape}",
            )


def test_kernels_r1_through_both_ops(kernels):
    """A discriminator-like chain (filter, bias+lrelu, downsample) and its R1 penalty gradient."""
    f = setup_filter([1, 3, 3, 1], device=kernels)
    b = torch.randn(8, device=kernels, requires_grad=True)

    def net(img, impl):
        h = upfirdn2d(img, f, padding=(2, 1, 2, 1), impl=impl)
        h = bias_act(h, b, act="lrelu", impl=impl)
        h = upfirdn2d(h, f, down=2, padding=1, impl=impl)
        return bias_act(h, None, act="swish", clamp=4.0, impl=impl).sum(dim=(1, 2, 3))

    img = torch.randn(4, 8, 16, 16, device=kernels)
    results = {}
    for impl in ("cuda", "ref"):
        x = img.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(x, impl).sum(), x, create_graph=True)
        penalty = g.square().sum()
        results[impl] = torch.autograd.grad(penalty, [x, b])
    for a, r, what in zip(results["cuda"], results["ref"], ("d penalty / d img", "d penalty / d bias")):
        assert_rel_close(a, r, TOL[torch.float32], what)


def test_kernels_in_a_whole_training_step(kernels, monkeypatch):
    """Generator forward, discriminator logits and the R1 penalty's gradient with the fused ops
    (as the networks call them, through the default impl) against the reference ops."""
    from stylex.networks import Discriminator, Generator

    torch.manual_seed(0)
    kw = dict(channel_base=256, channel_max=16, conv_clamp=64.0)
    G = Generator(z_dim=16, w_dim=16, c_dim=2, resolution=16, mapping_layers=2, **kw).to(kernels)
    D = Discriminator(resolution=16, c_dim=2, **kw).to(kernels)
    z = torch.randn(4, 16, device=kernels)
    c = torch.softmax(torch.randn(4, 2, device=kernels), dim=1)
    results = {}
    for impl in ("cuda", "ref"):
        monkeypatch.setattr(dispatch, "_default_impl", impl)
        img = G(z, c, noise_mode="const")
        x = img.detach().requires_grad_()
        logits = D(x, c)
        (g,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        penalty = g.square().sum()
        first_weight = next(D.parameters())
        dx, dw = torch.autograd.grad(penalty, [x, first_weight])
        results[impl] = (img, logits, penalty, dx, dw)
    for got, want, what in zip(results["cuda"], results["ref"], ("image", "logits", "R1", "dR1/dx", "dR1/dW0")):
        assert_rel_close(got, want, 1e-4, what)
