"""Reference (CPU) path of the low-level ops against independent definitions.

``upfirdn2d`` is checked against a literal, loop-based transcription of its definition
(zero insertion, pad/crop, full 2-D convolution, decimation, gain) in numpy; ``bias_act``
against explicit formulas for every activation. Gradients are checked numerically in float64.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from stylex.ops import (
    ACTIVATIONS,
    bias_act,
    downsample2d,
    filter2d,
    get_default_impl,
    set_default_impl,
    setup_filter,
    upfirdn2d,
    upsample2d,
)
from stylex.ops import dispatch



# ---------------------------------------------------------------------------------------------
# upfirdn2d: independent definition
# ---------------------------------------------------------------------------------------------


def upfirdn2d_numpy(
    x: np.ndarray,  # [n, c, h, w]
    f: np.ndarray,  # [k] (separable) or [kh, kw]
    up: tuple[int, int],  # (x, y)
    down: tuple[int, int],  # (x, y)
    pad: tuple[int, int, int, int],  # (x0, x1, y0, y1); negative = crop
    flip_filter: bool,
    gain: float,
) -> np.ndarray:
    """The definition of upfirdn2d, step by step, with explicit loops (slow; tiny shapes only)."""
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = pad
    f2 = np.outer(f, f) if f.ndim == 1 else f
    kh, kw = f2.shape
    n, c, h, w = x.shape
    out = []
    for ni in range(n):
        planes = []
        for ci in range(c):
            # 1. zero insertion
            u = np.zeros((h * upy, w * upx))
            for i in range(h):
                for j in range(w):
                    u[i * upy, j * upx] = x[ni, ci, i, j]
            # 2. padding then cropping, one side at a time
            p = np.zeros((u.shape[0] + max(py0, 0) + max(py1, 0), u.shape[1] + max(px0, 0) + max(px1, 0)))
            p[max(py0, 0) : max(py0, 0) + u.shape[0], max(px0, 0) : max(px0, 0) + u.shape[1]] = u
            p = p[max(-py0, 0) : p.shape[0] - max(-py1, 0), max(-px0, 0) : p.shape[1] - max(-px1, 0)]
            # 3. "valid" convolution: y[i, j] = sum_{a, b} p[i + a, j + b] * f[kh-1-a, kw-1-b]
            oh, ow = p.shape[0] - kh + 1, p.shape[1] - kw + 1
            conv = np.zeros((oh, ow))
            for i in range(oh):
                for j in range(ow):
                    acc = 0.0
                    for a in range(kh):
                        for b in range(kw):
                            tap = f2[a, b] if flip_filter else f2[kh - 1 - a, kw - 1 - b]
                            acc += p[i + a, j + b] * tap
                    conv[i, j] = acc
            # 4. decimation, 5. gain
            planes.append(conv[::downy, ::downx] * gain)
        out.append(planes)
    return np.array(out)


def _run_both(x, f, up, down, pad, flip, gain):
    got = upfirdn2d(x, f, up=up, down=down, padding=pad, flip_filter=flip, gain=gain, impl="ref")
    want = upfirdn2d_numpy(x.double().numpy(), f.double().numpy(), up, down, pad, flip, gain)
    return got, torch.from_numpy(want)


_gen = torch.Generator().manual_seed(1234)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen, dtype=dtype)


UP_DOWN = [
    ((1, 1), (1, 1)),
    ((2, 2), (1, 1)),
    ((4, 4), (1, 1)),
    ((1, 1), (2, 2)),
    ((1, 1), (4, 4)),
    ((2, 1), (1, 1)),
    ((1, 4), (1, 1)),
    ((1, 1), (1, 2)),
    ((1, 1), (4, 2)),
    ((2, 4), (4, 2)),
    ((4, 2), (2, 1)),
]


@pytest.mark.parametrize("up,down", UP_DOWN)
@pytest.mark.parametrize("separable", [True, False])
def test_upfirdn2d_matches_definition_over_factors(up, down, separable):
    x = _rand(2, 3, 5, 7)  # odd sizes, batch and channels > 1
    f = _rand(4) if separable else _rand(3, 4)  # 2-D filter is non-square and non-symmetric
    fw = f.shape[-1]
    fh = f.shape[0]
    pad = (fw - 1, fw - 2, fh - 1, fh - 1)
    got, want = _run_both(x, f, up, down, pad, False, 1.0)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "pad",
    [
        (0, 0, 0, 0),
        (3, 1, 2, 0),
        (-1, 2, 1, -2),  # crop on one side, pad on the other
        (-2, -1, -1, -3),  # crop everywhere
        (5, 5, 4, 4),  # padding larger than the filter
    ],
)
@pytest.mark.parametrize("flip", [False, True])
def test_upfirdn2d_padding_cropping_and_flip(pad, flip):
    x = _rand(1, 2, 6, 9)
    f = torch.tensor([[1.0, 2.0, -3.0], [0.5, 4.0, 0.0]])  # asymmetric: flip matters
    got, want = _run_both(x, f, (2, 1), (1, 2), pad, flip, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_flip_changes_result_for_asymmetric_filter():
    x = _rand(1, 1, 6, 6)
    f = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    a = upfirdn2d(x, f, padding=1, impl="ref")
    b = upfirdn2d(x, f, padding=1, flip_filter=True, impl="ref")
    assert not torch.allclose(a, b), "flip_filter had no effect on an asymmetric filter"
    # correlation with f == convolution with f rotated by 180 degrees
    torch.testing.assert_close(b, upfirdn2d(x, f.flip([0, 1]), padding=1, impl="ref"))


@pytest.mark.parametrize("gain", [1.0, 4.0, 0.3])
@pytest.mark.parametrize("separable", [True, False])
def test_upfirdn2d_gain(gain, separable):
    x = _rand(2, 2, 4, 5)
    f = _rand(3) if separable else _rand(3, 3)
    got, want = _run_both(x, f, (2, 2), (1, 1), (2, 1, 1, 2), False, gain)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_separable_equals_outer_product():
    x = _rand(2, 3, 8, 8)
    f = _rand(4)
    a = upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), gain=4.0, impl="ref")
    b = upfirdn2d(x, torch.outer(f, f), up=2, padding=(2, 1, 2, 1), gain=4.0, impl="ref")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_identity_filter_none():
    x = _rand(2, 3, 4, 5)
    torch.testing.assert_close(upfirdn2d(x, None, impl="ref"), x)


def test_upfirdn2d_rejects_empty_output_and_bad_args():
    x = _rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="empty"):
        upfirdn2d(x, torch.ones(4), impl="ref")
    with pytest.raises(ValueError, match="up and down must be >= 1"):
        upfirdn2d(x, None, up=0, impl="ref")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        upfirdn2d(x[0], None, impl="ref")
    with pytest.raises(ValueError, match="padding"):
        upfirdn2d(x, None, padding=(1, 2, 3), impl="ref")


# ---------------------------------------------------------------------------------------------
# resampling helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 2, 1], [1, 1]])
@pytest.mark.parametrize("factor", [2, 4])
def test_resample_helpers_sizes(taps, factor):
    f = setup_filter(taps)
    x = _rand(2, 3, 8, 12)
    assert upsample2d(x, f, up=factor, impl="ref").shape == (2, 3, 8 * factor, 12 * factor)
    assert upsample2d(x, f, up=factor, padding=1, impl="ref").shape == (2, 3, 8 * factor + 2, 12 * factor + 2)
    assert downsample2d(x, f, down=factor, impl="ref").shape == (2, 3, 8 // factor, 12 // factor)
    assert filter2d(x, f, impl="ref").shape == x.shape
    assert filter2d(x, f, padding=2, impl="ref").shape == (2, 3, 12, 16)


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 2, 1]])
def test_resample_helpers_preserve_dc(taps):
    """A constant image stays constant away from the borders, where zero padding leaks in."""
    f = setup_filter(taps)
    k = len(taps)
    x = torch.full((1, 2, 16, 16), 0.7)
    up = upsample2d(x, f, up=2, impl="ref")
    down = downsample2d(x, f, down=2, impl="ref")
    filt = filter2d(x, f, impl="ref")
    torch.testing.assert_close(up[..., k:-k, k:-k], torch.full_like(up[..., k:-k, k:-k], 0.7))
    torch.testing.assert_close(down[..., k:-k, k:-k], torch.full_like(down[..., k:-k, k:-k], 0.7))
    torch.testing.assert_close(filt[..., k:-k, k:-k], torch.full_like(filt[..., k:-k, k:-k], 0.7))
    # and the border really differs, so the crop above is not hiding a global scale error
    assert not torch.allclose(filt[..., 0, 0], torch.tensor(0.7))


def test_upsample_then_downsample_is_lowpass_roundtrip():
    """Upsampling a smooth ramp by 2 and box-downsampling returns the ramp in the interior."""
    f = setup_filter([1, 3, 3, 1])
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    back = downsample2d(upsample2d(ramp, f, impl="ref"), setup_filter([1, 1]), impl="ref")
    torch.testing.assert_close(back[..., 3:-3, 3:-3], ramp[..., 3:-3, 3:-3], rtol=1e-5, atol=1e-5)


def test_setup_filter_normalisation():
    f1 = setup_filter([1, 3, 3, 1])
    assert f1.ndim == 1
    torch.testing.assert_close(torch.outer(f1, f1).sum(), torch.tensor(1.0))
    f2 = setup_filter([1, 3, 3, 1], separable=False)
    assert f2.shape == (4, 4)
    torch.testing.assert_close(f2, torch.outer(f1, f1))
    with pytest.raises(ValueError, match="non-empty"):
        setup_filter(torch.ones(2, 2, 2))


# ---------------------------------------------------------------------------------------------
# bias_act: independent formulas
# ---------------------------------------------------------------------------------------------

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _expected_act(name: str, x: torch.Tensor, alpha: float) -> torch.Tensor:
    if name == "linear":
        return x
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    if name == "lrelu":
        return torch.where(x > 0, x, alpha * x)
    if name == "tanh":
        return (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x))
    if name == "sigmoid":
        return 1 / (1 + torch.exp(-x))
    if name == "elu":
        return torch.where(x > 0, x, torch.exp(x) - 1)
    if name == "selu":
        return SELU_SCALE * torch.where(x > 0, x, SELU_ALPHA * (torch.exp(x) - 1))
    if name == "softplus":
        return torch.log(1 + torch.exp(x))
    if name == "swish":
        return x / (1 + torch.exp(-x))
    raise AssertionError(f"no expected formula for {name}")


EXPECTED_DEFAULT_GAIN = {"relu": math.sqrt(2), "lrelu": math.sqrt(2), "swish": math.sqrt(2)}


def test_activation_table_is_complete_and_codes_unique():
    assert set(ACTIVATIONS) == {"linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish"}
    codes = [spec.code for spec in ACTIVATIONS.values()]
    # the CUDA kernel switches on these codes
    assert sorted(codes) == list(range(len(codes))), "activation codes must be 0..n-1"
    for name, spec in ACTIVATIONS.items():
        assert spec.default_gain == pytest.approx(EXPECTED_DEFAULT_GAIN.get(name, 1.0)), name
    assert ACTIVATIONS["lrelu"].default_alpha == pytest.approx(0.2)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dim", [1, 0, 2, -1])
def test_bias_act_default_gain_matches_formula(name, dim):
    x = _rand(3, 4, 5, 2, dtype=torch.float64) * 2
    b = _rand(x.shape[dim], dtype=torch.float64)
    shape = [1] * x.ndim
    shape[dim] = -1
    got = bias_act(x, b, dim=dim, act=name, impl="ref")
    want = _expected_act(name, x + b.reshape(shape), 0.2) * EXPECTED_DEFAULT_GAIN.get(name, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_bias_act_alpha_gain_clamp(name):
    x = _rand(4, 6, 3, dtype=torch.float64) * 3
    b = _rand(6, dtype=torch.float64)
    got = bias_act(x, b, act=name, alpha=0.05, gain=2.5, clamp=1.2, impl="ref")
    alpha = 0.05
    want = (_expected_act(name, x + b.view(1, -1, 1), alpha) * 2.5).clamp(-1.2, 1.2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got.abs().max() <= 1.2 + 1e-12


def test_bias_act_lrelu_alpha_is_used():
    x = torch.tensor([[-2.0, 3.0]])
    y = bias_act(x, act="lrelu", alpha=0.5, gain=1.0, impl="ref")
    torch.testing.assert_close(y, torch.tensor([[-1.0, 3.0]]))


def test_bias_act_without_bias_and_float32():
    x = _rand(8, 16)
    got = bias_act(x, None, act="swish", impl="ref")
    torch.testing.assert_close(got, _expected_act("swish", x, 0.0) * math.sqrt(2), rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32


def test_bias_act_errors():
    x = _rand(2, 3, 4)
    with pytest.raises(ValueError, match=r"bias of shape \(4,\) does not fit dimension 1"):
        bias_act(x, torch.zeros(4), dim=1, impl="ref")
    with pytest.raises(ValueError, match="does not fit dimension 5"):
        bias_act(x, torch.zeros(3), dim=5, impl="ref")
    with pytest.raises(ValueError, match="does not fit"):
        bias_act(x, torch.zeros(1, 3), dim=1, impl="ref")
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'.*lrelu"):
        bias_act(x, act="gelu", impl="ref")
    with pytest.raises(ValueError, match="clamp must be >= 0"):
        bias_act(x, act="relu", clamp=-1.0, impl="ref")


def test_bias_act_clamp_zeroes_gradient_where_active():
    x = torch.tensor([-3.0, -0.5, 0.5, 3.0], requires_grad=True)
    y = bias_act(x, None, dim=0, act="linear", clamp=1.0, impl="ref")
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# gradients (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "up,down,pad,separable,flip,gain",
    [
        ((2, 2), (1, 1), (2, 1, 2, 1), True, False, 4.0),
        ((1, 1), (2, 2), (1, 1, 1, 1), True, True, 1.0),
        ((2, 1), (1, 2), (1, -1, 0, 2), False, False, 0.5),
        ((1, 1), (1, 1), (1, 1, 1, 1), False, True, 1.0),
    ],
)
def test_upfirdn2d_gradcheck(up, down, pad, separable, flip, gain):
    x = _rand(1, 2, 5, 4, dtype=torch.float64).requires_grad_()
    f = _rand(3, dtype=torch.float64) if separable else _rand(3, 2, dtype=torch.float64)

    def fn(inp):
        return upfirdn2d(inp, f, up=up, down=down, padding=pad, flip_filter=flip, gain=gain, impl="ref")

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize(
    "name,dim,clamp",
    [
        ("lrelu", 1, None),
        ("swish", 0, None),
        ("elu", 2, 5.0),
        ("softplus", -1, None),
        ("tanh", 1, 0.5),
        ("selu", 1, None),
        ("sigmoid", 1, None),
    ],
)
def test_bias_act_gradcheck(name, dim, clamp):
    # keep samples away from the kinks at 0 and at +-clamp where finite differences break down
    x = _rand(2, 3, 4, dtype=torch.float64)
    x = torch.where(x.abs() < 0.1, x.sign() * 0.1 + x, x)
    x.requires_grad_()
    b = torch.zeros(x.shape[dim], dtype=torch.float64, requires_grad=True)

    def fn(inp, bias):
        return bias_act(inp, bias, dim=dim, act=name, clamp=clamp, impl="ref")

    if clamp is not None:
        y = fn(x.detach(), b.detach())
        keep = ((y.abs() - clamp).abs() > 0.05)
        x = torch.where(keep, x.detach(), x.detach() * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_cuda_build(monkeypatch):
    """Fail loudly if any call tries to consult the CUDA extension."""

    def refuse(*args, **kwargs):
        raise AssertionError("the reference path must not consult the CUDA build")

    monkeypatch.setattr(dispatch, "available", refuse)
    monkeypatch.setattr(dispatch, "extension", refuse)
    # the modules, not the functions that stylex.ops exports under the same names
    monkeypatch.setattr(sys.modules["stylex.ops.upfirdn2d"], "_upfirdn2d_cuda", refuse)
    monkeypatch.setattr(sys.modules["stylex.ops.bias_act"], "_bias_act_cuda", refuse)


@pytest.mark.parametrize("impl", ["ref", "auto", "cuda", None])
def test_cpu_tensors_take_reference_path(no_cuda_build, impl):
    x = _rand(1, 2, 6, 6)
    f = setup_filter([1, 3, 3, 1])
    torch.testing.assert_close(
        upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), impl=impl),
        upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), impl="ref"),
    )
    torch.testing.assert_close(bias_act(x, None, act="relu", impl=impl), torch.relu(x) * math.sqrt(2))


def test_invalid_impl_names_option(monkeypatch):
    x = _rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"impl='fast' is not one of auto, cuda, ref"):
        upfirdn2d(x, None, impl="fast")
    with pytest.raises(ValueError, match=r"impl='fast'"):
        bias_act(x, impl="fast")
    with pytest.raises(ValueError, match=r"ops\.impl='gpu'"):
        set_default_impl("gpu")
    monkeypatch.setattr(dispatch, "_default_impl", None)
    monkeypatch.setenv("STYLEX_OPS_IMPL", "nope")
    with pytest.raises(ValueError, match="STYLEX_OPS_IMPL='nope'"):
        get_default_impl()


def test_default_impl_roundtrip(monkeypatch):
    monkeypatch.setattr(dispatch, "_default_impl", None)
    monkeypatch.delenv("STYLEX_OPS_IMPL", raising=False)
    assert get_default_impl() == "auto"
    monkeypatch.setenv("STYLEX_OPS_IMPL", "ref")
    assert get_default_impl() == "ref"
    set_default_impl("cuda")
    assert get_default_impl() == "cuda"  # explicit setting beats the environment
