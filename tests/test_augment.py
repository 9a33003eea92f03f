"""The ADA augmentation pipe and its controller, against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from stylex.training.ada import AdaController
from stylex.training.augment import (
    COLOUR,
    TRANSFORMS,
    AugmentPipe,
    Draws,
    colour_matrix,
    geometric_matrix,
    resample,
)


def only(*names: str, p: float = 1.0) -> AugmentPipe:
    """A pipe that draws only the named transforms (the others' multipliers are 0)."""
    return AugmentPipe(p, {n: (1.0 if n in names else 0.0) for n in TRANSFORMS})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def luma(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, H, W]: the projection on (1, 1, 1)
    return x.mean(dim=1)


def ramp(h: int, w: int, a: float, b: float) -> torch.Tensor:  # [1, 3, H, W] a·u + b·v, centred pixel units
    u = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    v = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    return (a * u[None, :] + b * v[:, None]).expand(1, 3, h, w).float()


# ------------------------------------------------------------------ p = 0
@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (3, 3, 7, 5), (2, 1, 9, 9)])
def test_p_zero_is_the_exact_identity_and_draws_nothing(shape):
    x = torch.randn(shape)
    pipe = AugmentPipe(0.0)
    state = torch.get_rng_state()
    out = pipe(x)
    assert out is x
    assert torch.equal(torch.get_rng_state(), state), "p = 0 consumed random numbers"


def test_p_is_a_checkpointed_buffer_and_is_checked():
    pipe = AugmentPipe(0.25)
    assert set(pipe.state_dict()) == {"p"} and float(pipe.state_dict()["p"]) == 0.25
    other = AugmentPipe(0.0)
    other.load_state_dict(pipe.state_dict())
    assert other.p_value == pytest.approx(0.25)  # the host copy follows a load
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        AugmentPipe(1.5)
    with pytest.raises(ValueError, match="unknown transform"):
        AugmentPipe(0.5, {"blur": 1.0})


# ------------------------------------------------------------------ blit
def test_forward_is_apply_of_the_exposed_draws():
    x = torch.randn(6, 3, 12, 12)
    pipe = AugmentPipe(0.7)
    draws = pipe.sample(6, 12, 12, generator=gen(3))
    torch.testing.assert_close(pipe(x, generator=gen(3)), pipe.apply(x, draws), rtol=0, atol=0)


def test_xflip_alone_is_torch_flip():
    x = torch.randn(16, 3, 8, 6)
    pipe = only("xflip")
    draws = pipe.sample(16, 8, 6, generator=gen())
    out = pipe.apply(x, draws)
    flipped = draws.xflip.bool()
    assert 0 < int(flipped.sum()) < 16
    for i in range(16):
        assert torch.equal(out[i], torch.flip(x[i], dims=[2]) if flipped[i] else x[i])


def test_rotate90_alone_is_torch_rot90_by_the_drawn_k():
    x = torch.randn(32, 3, 9, 9)
    pipe = only("rotate90")
    draws = pipe.sample(32, 9, 9, generator=gen())
    out = pipe.apply(x, draws)
    ks = draws.rotate90.long()
    assert set(ks.tolist()) == {0, 1, 2, 3}
    for i in range(32):
        assert torch.equal(out[i], torch.rot90(x[i], int(ks[i]), dims=(1, 2)))
    # a non-square image keeps its shape: half turns only
    y = torch.randn(16, 3, 8, 6)
    d = pipe.sample(16, 8, 6, generator=gen(1))
    assert set(d.rotate90.long().tolist()) == {0, 2}
    out = pipe.apply(y, d)
    for i in range(16):
        assert torch.equal(out[i], torch.rot90(y[i], int(d.rotate90[i]), dims=(1, 2)))


def reflected_shift(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """img [C, H, W] moved by (dx, dy) pixels, mirrored about its outer edges where it leaves."""
    c, h, w = img.shape
    wide = torch.cat([img.flip(2), img, img.flip(2)], dim=2)
    tall = torch.cat([wide.flip(1), wide, wide.flip(1)], dim=1)  # [C, 3H, 3W]
    return tall[:, h - dy : 2 * h - dy, w - dx : 2 * w - dx]


def test_integer_translation_alone_is_a_reflected_shift():
    x = torch.randn(32, 3, 16, 24)
    pipe = only("xint")
    draws = pipe.sample(32, 16, 24, generator=gen())
    out = pipe.apply(x, draws)
    shifts = draws.xint.long()
    assert (shifts[:, 0].abs() <= 24 / 8).all() and (shifts[:, 1].abs() <= 16 / 8).all()
    assert (shifts != 0).any(dim=1).sum() > 16
    for i in range(32):
        dx, dy = shifts[i].tolist()
        assert torch.equal(out[i], reflected_shift(x[i], dx, dy)), (dx, dy)


# ------------------------------------------------------------------ colour
def draws_with(batch: int, **values) -> Draws:
    d = Draws.identity(batch)
    for k, v in values.items():
        setattr(d, k, torch.as_tensor(v, dtype=torch.float32).expand_as(getattr(d, k)).clone())
    return d


def test_brightness_adds_one_constant_to_every_channel():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    b = torch.tensor([0.1, -0.3, 0.0, 0.25])
    out = AugmentPipe(1.0).apply(x, draws_with(4, brightness=b))
    torch.testing.assert_close(out - x, b[:, None, None, None].expand_as(x), rtol=0, atol=1e-6)


def test_contrast_scales_about_zero():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    c = torch.tensor([0.5, 1.7, 1.0])
    out = AugmentPipe(1.0).apply(x, draws_with(3, contrast=c))
    torch.testing.assert_close(out, x * c[:, None, None, None], rtol=1e-6, atol=1e-6)


def test_luma_flip_twice_is_the_identity_and_once_negates_the_luma_only():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    pipe = AugmentPipe(1.0)
    flip = draws_with(4, lumaflip=1.0)
    once = pipe.apply(x, flip)
    torch.testing.assert_close(pipe.apply(once, flip), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(luma(once), -luma(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(once - luma(once)[:, None], x - luma(x)[:, None], rtol=0, atol=1e-6)  # chroma kept


def test_zero_saturation_gives_grey_with_the_same_luma():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    out = AugmentPipe(1.0).apply(x, draws_with(4, saturation=0.0))
    torch.testing.assert_close(out, luma(x)[:, None].expand_as(x), rtol=0, atol=1e-6)


def test_hue_rotation_keeps_luma_and_chroma_length_and_moves_the_colour():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    theta = torch.tensor([0.5, -2.0, math.pi, 1.0])
    out = AugmentPipe(1.0).apply(x, draws_with(4, hue=theta))
    torch.testing.assert_close(luma(out), luma(x), rtol=0, atol=1e-6)
    chroma = lambda y: (y - luma(y)[:, None]).norm(dim=1)  # noqa: E731
    torch.testing.assert_close(chroma(out), chroma(x), rtol=0, atol=1e-5)
    assert (out - x).abs().amax() > 0.1
    # a full turn, or two half turns, come back
    half = draws_with(4, hue=math.pi)
    torch.testing.assert_close(AugmentPipe(1.0).apply(AugmentPipe(1.0).apply(x, half), half), x, rtol=0, atol=1e-5)


def test_colour_matrix_composes_in_the_documented_order():
    d = draws_with(1, brightness=0.2, contrast=1.5, lumaflip=1.0, hue=0.7, saturation=0.4)
    v = torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3)
    vv = torch.outer(v, v)
    k = torch.tensor([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    eye = torch.eye(3)
    rot = math.cos(0.7) * eye + math.sin(0.7) * k + (1 - math.cos(0.7)) * vv
    lin = (vv + 0.4 * (eye - vv)) @ rot @ (eye - 2 * vv) * 1.5  # saturation · hue · luma flip · contrast
    rgb = torch.tensor([0.3, -0.5, 0.8])
    expected = lin @ (rgb + 0.2)  # brightness first
    got = colour_matrix(d)[0] @ torch.cat([rgb, torch.ones(1)])
    torch.testing.assert_close(got[:3], expected, rtol=1e-6, atol=1e-6)
    assert float(got[3]) == 1.0


# ------------------------------------------------------------------ geometry
def test_identity_matrix_through_the_bilinear_path_reproduces_the_image():
    x = torch.randn(3, 3, 11, 8)
    out = resample(x, torch.eye(3).repeat(3, 1, 1), exact=None)  # interpolated, not gathered
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    # scale 1 and zero angles/shifts are no geometric transform: the exact path, bit for bit
    assert torch.equal(AugmentPipe(1.0, {n: 0.0 for n in COLOUR}).apply(x, Draws.identity(3)), x)


def test_scaling_by_two_halves_a_centred_ramp():
    x = ramp(16, 16, a=0.1, b=-0.05)
    out = AugmentPipe(1.0).apply(x, draws_with(1, scale=2.0))  # reads the input at y / 2: inside the image
    torch.testing.assert_close(out, ramp(16, 16, a=0.05, b=-0.025), rtol=0, atol=1e-5)
    # anisotropic (2, 1/2): x stretched twofold, y squeezed (checked where the read stays inside)
    out = AugmentPipe(1.0).apply(ramp(16, 16, a=0.1, b=0.0), draws_with(1, aniso=2.0))
    torch.testing.assert_close(out, ramp(16, 16, a=0.05, b=0.0), rtol=0, atol=1e-5)
    out = AugmentPipe(1.0).apply(ramp(16, 16, a=0.0, b=0.1), draws_with(1, aniso=2.0))
    torch.testing.assert_close(out[..., 4:12, :], ramp(16, 16, a=0.0, b=0.2)[..., 4:12, :], rtol=0, atol=1e-5)


def test_rotation_and_fractional_translation_agree_with_their_exact_counterparts():
    x = torch.randn(2, 3, 10, 10)
    pipe = AugmentPipe(1.0, {n: 0.0 for n in COLOUR})
    quarter = pipe.apply(x, draws_with(2, rotate_pre=math.pi / 2))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, dims=(2, 3)), rtol=0, atol=1e-5)
    shifted = pipe.apply(x, draws_with(2, xfrac=torch.tensor([3.0, -2.0])))  # whole pixels through bilinear
    exact = pipe.apply(x, draws_with(2, xint=torch.tensor([3.0, -2.0])))
    torch.testing.assert_close(shifted, exact, rtol=0, atol=1e-5)
    half = pipe.apply(x, draws_with(2, xfrac=torch.tensor([0.5, 0.0])))  # half a pixel: the mean of neighbours
    torch.testing.assert_close(half[..., 1:], (x[..., 1:] + x[..., :-1]) / 2, rtol=0, atol=1e-5)


def test_geometric_matrix_is_the_hand_computed_composition():
    d = draws_with(1, xflip=1.0, rotate90=1.0, xint=torch.tensor([2.0, -1.0]), scale=1.3, rotate_pre=0.4,
                   aniso=0.8, rotate_post=-1.1, xfrac=torch.tensor([0.7, 0.2]))

    def rot(t):
        return torch.tensor([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1.0]],
                            dtype=torch.float64)

    def diag(a, b):
        return torch.diag(torch.tensor([a, b, 1.0], dtype=torch.float64))

    def shift(a, b):
        m = torch.eye(3, dtype=torch.float64)
        m[0, 2], m[1, 2] = a, b
        return m

    # output pixel -> input point: the inverse of each transform, in the order they apply
    expected = (diag(-1, 1) @ rot(math.pi / 2) @ shift(-2, 1) @ diag(1 / 1.3, 1 / 1.3) @ rot(0.4)
                @ diag(1 / 0.8, 0.8) @ rot(-1.1) @ shift(-0.7, -0.2))
    torch.testing.assert_close(geometric_matrix(d, torch.float64)[0], expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ distributions
def test_draws_follow_the_papers_distributions():
    n = 40_000
    d = AugmentPipe(1.0).sample(n, 32, 32, generator=gen())
    assert torch.log(d.scale).std().item() == pytest.approx(0.2 * math.log(2), rel=0.03)
    assert torch.log(d.aniso).std().item() == pytest.approx(0.2 * math.log(2), rel=0.03)
    assert torch.log(d.contrast).std().item() == pytest.approx(0.5 * math.log(2), rel=0.03)
    assert torch.log(d.saturation).std().item() == pytest.approx(math.log(2), rel=0.03)
    assert d.brightness.std().item() == pytest.approx(0.2, rel=0.03)
    assert (d.xfrac / 32).std().item() == pytest.approx(0.125, rel=0.03)
    assert d.hue.abs().max() <= math.pi and d.hue.std().item() == pytest.approx(math.pi / math.sqrt(3), rel=0.03)
    assert d.xflip.mean().item() == pytest.approx(0.5, abs=0.02)
    assert d.lumaflip.mean().item() == pytest.approx(0.5, abs=0.02)
    # at p: each transform with probability p, and some rotation with probability p
    p = 0.3
    d = AugmentPipe(p).sample(n, 32, 32, generator=gen(1))
    assert (d.scale != 1).float().mean().item() == pytest.approx(p, abs=0.01)
    assert (d.brightness != 0).float().mean().item() == pytest.approx(p, abs=0.01)
    assert (d.rotate_pre != 0).float().mean().item() == pytest.approx(1 - math.sqrt(1 - p), abs=0.01)
    rotated = (d.rotate_pre != 0) | (d.rotate_post != 0)
    assert rotated.float().mean().item() == pytest.approx(p, abs=0.01)
    assert only("hue", p=0.3).sample(n, 8, 8, generator=gen()).scale.eq(1).all()


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", TRANSFORMS)
def test_gradient_flows_through_each_transform(name):
    x = (torch.rand(8, 3, 12, 12) * 2 - 1).requires_grad_(True)
    out = only(name)(x, generator=gen())
    assert not torch.equal(out, x), f"{name} at p = 1 changed nothing"
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradcheck_of_the_whole_pipe_with_fixed_draws():
    x = (torch.rand(2, 3, 6, 6, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    pipe = AugmentPipe(1.0)
    draws = pipe.sample(2, 6, 6, generator=gen(5))
    assert draws.geometric().all()  # the interpolated path, with every colour transform
    assert torch.autograd.gradcheck(lambda y: pipe.apply(y, draws), (x,))
    blit = only("xflip", "rotate90", "xint", *COLOUR)
    draws = blit.sample(2, 6, 6, generator=gen(6))
    assert not draws.geometric().any()  # the exact (gathered) path
    assert torch.autograd.gradcheck(lambda y: blit.apply(y, draws), (x,))


def test_bf16_input_gives_bf16_output_and_float32_maths():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    pipe = AugmentPipe(1.0)
    draws = pipe.sample(4, 8, 8, generator=gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pipe.apply(x.bfloat16(), draws)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), pipe.apply(x.bfloat16().float(), draws), rtol=0, atol=2e-2)


# ------------------------------------------------------------------ controller
def logits_with_sign(sign: float, batch: int = 8) -> torch.Tensor:
    return sign * (torch.rand(batch, 1) + 0.1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_controller_moves_p_by_the_formulas_step_each_interval(sign):
    pipe = AugmentPipe(0.5)
    ada = AdaController(pipe, target=0.6, interval=4, kimg=2.0)
    for _ in range(3):
        assert ada.step(logits_with_sign(sign)) is None
        assert pipe.p_value == 0.5  # no update inside an interval
    rt = ada.step(logits_with_sign(sign))
    assert rt == sign
    assert pipe.p_value == pytest.approx(0.5 + sign * 8 * 4 / (2.0 * 1000), abs=1e-7)  # batch · interval / kimg
    assert float(pipe.p) == pytest.approx(pipe.p_value)  # the buffer follows


def test_controller_clamps_p_and_holds_it_at_the_target():
    pipe = AugmentPipe(0.99)
    ada = AdaController(pipe, interval=1, kimg=0.1)  # steps of 0.08
    ada.step(logits_with_sign(1.0))
    assert pipe.p_value == 1.0
    pipe.set_p(0.01)
    ada.step(logits_with_sign(-1.0))
    assert pipe.p_value == 0.0
    ada.step(logits_with_sign(-1.0))
    assert pipe.p_value == 0.0
    # r_t exactly at the target (here 0: half the signs up): p stays
    pipe.set_p(0.4)
    AdaController(pipe, target=0.0, interval=1).step(torch.tensor([[1.0], [-2.0], [3.0], [-0.5]]))
    assert pipe.p_value == 0.4


def test_controller_reduces_its_sums_before_updating():
    """Under DDP the sign sums and counts of every rank are summed first: two ranks that saw the same
    signs give the same r_t and a step twice as large (twice the images)."""
    import pytorch_lightning as pl

    reduced = []

    def two_ranks(t):
        reduced.append(t.clone())
        return t * 2

    pipe = AugmentPipe(0.5)
    ada = AdaController(pipe, interval=2, kimg=1.0)
    ada.step(torch.tensor([[1.0], [1.0], [-1.0], [1.0]]), reduce=two_ranks)
    rt = ada.step(torch.tensor([[1.0], [1.0], [1.0], [1.0]]), reduce=two_ranks)
    assert len(reduced) == 1 and reduced[0].tolist() == [6.0, 8.0]  # once per interval: (sign sum, count)
    assert rt == 0.75 and pipe.p_value == pytest.approx(0.5 + 16 / 1000)
    # a single-process strategy's reduce needs no process group
    strategy = pl.strategies.SingleDeviceStrategy(device="cpu")
    ada = AdaController(pipe, interval=1, kimg=1.0)
    assert ada.step(logits_with_sign(-1.0), reduce=lambda t: strategy.reduce(t, reduce_op="sum")) == -1.0
    assert pipe.p_value == pytest.approx(0.5 + 16 / 1000 - 8 / 1000)
