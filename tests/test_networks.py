"""Tests of the networks against independent definitions of what each part computes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stylex.networks import (
    Discriminator,
    Encoder,
    EqualizedConv2d,
    EqualizedLinear,
    Generator,
    MappingNetwork,
    MinibatchStd,
    ModulatedConv2d,
    NoiseInjection,
    NoiseMapEncoder,
    mix_latents,
)
from stylex.networks.discriminator import FeatureHeads
from stylex.ops import setup_filter, upsample2d

TINY = dict(channel_base=256, channel_max=16)  # 16 channels up to 16x16, then fewer


def tiny_generator(resolution=16, c_dim=3, w_dim=32, **kw) -> Generator:
    return Generator(z_dim=w_dim, w_dim=w_dim, c_dim=c_dim, resolution=resolution, mapping_layers=2, **TINY, **kw)


def probs(batch, c_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, c_dim, generator=g), dim=1)


def set_noise_strength(module, value):
    for m in module.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(value)


# ---- shapes and layer names -------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_shapes_and_style_layers(resolution):
    torch.manual_seed(0)
    kw = dict(channel_base=512, channel_max=16)
    G = Generator(z_dim=32, w_dim=32, c_dim=4, resolution=resolution, mapping_layers=2, **kw)
    D = Discriminator(resolution, 4, **kw)
    E = Encoder(resolution, 32, **kw)
    z, c = torch.randn(2, 32), probs(2, 4)
    with torch.no_grad():
        img = G(z, c)
        assert img.shape == (2, 3, resolution, resolution)
        assert torch.isfinite(img).all()
        assert D(img, c).shape == (2, 1)
        assert E(img).shape == (2, 32)

    expected = ["b4.conv1", "b4.torgb"]
    r = 8
    while r <= resolution:
        expected += [f"b{r}.conv0", f"b{r}.conv1", f"b{r}.torgb"]
        r *= 2
    names = [n for n, _ in G.style_layers]
    assert names == expected
    assert len(names) == 2 + 3 * (int(math.log2(resolution)) - 2)
    # A layer's style modulates its input channels: min(channel_base // r_in, channel_max).
    for name, ch in G.style_layers:
        r_out = int(name.split(".")[0][1:])
        r_in = r_out // 2 if name.endswith("conv0") else r_out
        assert ch == min(kw["channel_base"] // r_in, kw["channel_max"]), name
    assert G.num_styles == sum(ch for _, ch in G.style_layers)
    assert list(G.styles(G.condition(torch.randn(2, 32), c))) == expected


def test_bad_resolution_and_bad_c_are_reported():
    with pytest.raises(ValueError, match="power of two"):
        tiny_generator(resolution=24)
    G = tiny_generator(c_dim=3)
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        G(torch.randn(2, 32), torch.ones(2, 5))
    with pytest.raises(ValueError, match="conditioned on 3 classes"):
        G(torch.randn(2, 32), None)


# ---- equalised learning rate ------------------------------------------------------------------


def test_equalized_linear_runtime_scaling():
    torch.manual_seed(0)
    layer = EqualizedLinear(20, 7, bias_init=0.5, lr_mul=0.01)
    # Stored weights are N(0, 1) / lr_mul, so the stored scale is about 100.
    assert 70 < layer.weight.std().item() < 130
    w_eff = layer.weight * 0.01 / math.sqrt(20)
    torch.testing.assert_close(layer.effective_weight(), w_eff)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), x @ w_eff.T + layer.bias * 0.01)
    torch.testing.assert_close(layer.bias * 0.01, torch.full([7], 0.5))  # bias_init is the effective start

    lrelu = EqualizedLinear(20, 7, activation="lrelu")
    y = x @ (lrelu.weight / math.sqrt(20)).T
    torch.testing.assert_close(lrelu(x), F.leaky_relu(y, 0.2) * math.sqrt(2))


def test_equalized_conv_runtime_scaling():
    torch.manual_seed(0)
    conv = EqualizedConv2d(6, 5, 3, activation="lrelu")
    conv.bias.data.normal_()
    x = torch.randn(2, 6, 9, 9)
    w_eff = conv.weight / math.sqrt(6 * 9)
    torch.testing.assert_close(conv.effective_weight(), w_eff)
    ref = F.leaky_relu(F.conv2d(x, w_eff, conv.bias, padding=1), 0.2) * math.sqrt(2)
    torch.testing.assert_close(conv(x), ref)


def _blur_by_hand(x, taps, pad):
    """Depthwise true convolution with outer(taps, taps) / sum ** 2 after zero padding."""
    f = torch.tensor(taps, dtype=x.dtype)
    f2 = torch.outer(f, f) / f.sum() ** 2
    c = x.shape[1]
    return F.conv2d(F.pad(x, pad), f2.flip([0, 1]).expand(c, 1, *f2.shape), groups=c)


def test_equalized_conv_down2_is_blur_then_strided_conv():
    torch.manual_seed(0)
    conv = EqualizedConv2d(4, 3, 3, down=2)
    x = torch.randn(2, 4, 12, 12)
    ref = F.conv2d(_blur_by_hand(x, [1, 3, 3, 1], [2, 2, 2, 2]), conv.weight / math.sqrt(36), stride=2)
    out = conv(x)
    assert out.shape == (2, 3, 6, 6)
    torch.testing.assert_close(out, ref)

    skip = EqualizedConv2d(4, 3, 1, bias=False, down=2)
    ref = F.conv2d(_blur_by_hand(x, [1, 3, 3, 1], [1, 1, 1, 1])[:, :, ::2, ::2], skip.weight / 2.0)
    torch.testing.assert_close(skip(x), ref)


def test_down2_keeps_the_grid_centred():
    # A linear ramp stays a ramp: the 2x downsampled pixel j sits at fine position 2j + 0.5, so
    # away from the border a 1x1 identity conv returns exactly the mean of pixels 2j and 2j+1.
    conv = EqualizedConv2d(1, 1, 1, bias=False, down=2)
    conv.weight.data.fill_(1.0)
    ramp = torch.arange(16.0).expand(1, 1, 16, 16)
    out = conv(ramp)[0, 0, 4, 2:-2]
    torch.testing.assert_close(out, torch.arange(2, 6) * 2 + 0.5)


# ---- modulated convolution --------------------------------------------------------------------


def _modulated_weight_by_hand(conv, s, demodulate):
    w = conv.weight / math.sqrt(conv.weight[0].numel())
    w = w.unsqueeze(0) * s[:, None, :, None, None]  # [B, O, I, k, k]
    if demodulate:
        w = w / (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).sqrt()
    return w


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "scaled"])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_modulated_conv_matches_per_sample_conv(demodulate, kernel_size, grouped):
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 4, kernel_size, demodulate=demodulate, grouped=grouped).double()
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64)
    s = torch.rand(3, 5, dtype=torch.float64) * 2 + 0.1
    w = _modulated_weight_by_hand(conv, s, demodulate)
    ref = torch.cat([F.conv2d(x[b : b + 1], w[b], padding=kernel_size // 2) for b in range(3)])
    torch.testing.assert_close(conv(x, s), ref)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "scaled"])
def test_modulated_conv_up2_matches_zero_insertion_definition(grouped):
    # Independent definition of "transposed conv then FIR": insert zeros between samples, take the
    # full true convolution with the kernel (flipped so that away from the borders it agrees
    # with conv2d after upsampling), then the [1,3,3,1] filter (x4) with padding 1.
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 2, 3, up=2, grouped=grouped).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    s = torch.rand(2, 3, dtype=torch.float64) + 0.5
    w = _modulated_weight_by_hand(conv, s, True)
    refs = []
    for b in range(2):
        u = torch.zeros(1, 3, 9, 9, dtype=torch.float64)
        u[:, :, ::2, ::2] = x[b : b + 1]
        y = F.conv2d(u, w[b], padding=2)  # full correlation = transposed conv with flipped kernel
        refs.append(_blur_by_hand(y, [1.0, 3.0, 3.0, 1.0], [1, 1, 1, 1]) * 4)
    out = conv(x, s)
    assert out.shape == (2, 2, 10, 10)
    torch.testing.assert_close(out, torch.cat(refs))

    # Alignment: away from the border, identical to upsample2d followed by an ordinary conv.
    f = setup_filter([1, 3, 3, 1]).double()
    alt = torch.cat([F.conv2d(upsample2d(x[b : b + 1], f), w[b], padding=1) for b in range(2)])
    torch.testing.assert_close(out[:, :, 2:-2, 2:-2], alt[:, :, 2:-2, 2:-2])


def test_demodulation_keeps_unit_variance():
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 32, 3, demodulate=True)
    x = torch.randn(4, 64, 32, 32)
    s = torch.rand(4, 64) * 3 + 0.05  # very uneven styles
    y = conv(x, s)[:, :, 1:-1, 1:-1]  # the zero padding lowers the variance at the border
    var = y.var(dim=[0, 2, 3])  # per output channel
    assert (var - 1).abs().max() < 0.15, var

    raw = ModulatedConv2d(64, 32, 3, demodulate=False)
    raw.weight.data.copy_(conv.weight.data)
    assert (raw(x, s * 3)[:, :, 1:-1, 1:-1].var() - 1).abs() > 1  # without it the scale follows s


# ---- mapping ----------------------------------------------------------------------------------


def test_mapping_normalises_z_and_tracks_w_avg():
    torch.manual_seed(0)
    m = MappingNetwork(16, 8, num_layers=3)
    z = torch.randn(6, 16)
    m.eval()
    torch.testing.assert_close(m(z), m(z * 7.5))  # only the direction of z matters
    assert torch.equal(m.w_avg, torch.zeros(8))  # no update in eval mode

    m.train()
    w = m(z)
    torch.testing.assert_close(m.w_avg, w.detach().mean(0) * (1 - 0.995))
    m.eval()
    torch.testing.assert_close(m(z, truncation_psi=0.0), m.w_avg.expand(6, 8))
    torch.testing.assert_close(m(z, truncation_psi=0.5), m.w_avg + 0.5 * (m(z) - m.w_avg))


# ---- generator --------------------------------------------------------------------------------


def test_image_skip_adds_upsampled_lower_resolution_rgb():
    # With every toRGB above 4x4 silenced, the output must be the 4x4 image upsampled twice.
    torch.manual_seed(0)
    G = tiny_generator(resolution=16).eval()
    w, c = torch.randn(2, 32), probs(2, 3)
    styles = G.styles(G.condition(w, c))
    with torch.no_grad():
        for r in (8, 16):
            G.synthesis.blocks[f"b{r}"].torgb.conv.weight.zero_()
        b4 = G.synthesis.blocks["b4"]
        x = b4.conv1(b4.const.expand(2, -1, -1, -1), styles["b4.conv1"], "const")
        img4 = b4.torgb(x, styles["b4.torgb"])
        f = G.synthesis.resample_filter
        torch.testing.assert_close(G.synthesize(styles), upsample2d(upsample2d(img4, f), f))


def test_per_layer_latents_drive_their_own_layer():
    # wc of shape [B, num_ws, w_dim + c_dim] (style mixing): row k feeds layer k only.
    torch.manual_seed(0)
    G = tiny_generator()
    wc = G.condition(torch.randn(2, 32), probs(2, 3))
    shared = G.styles(wc)
    rows = wc.unsqueeze(1).repeat(1, G.num_ws, 1)
    for name in shared:
        torch.testing.assert_close(G.styles(rows)[name], shared[name])
    rows[:, 3] = rows[:, 3] + 1.0
    per_layer = G.styles(rows)
    names = [n for n, _ in G.style_layers]
    assert [not torch.allclose(per_layer[n], shared[n], atol=1e-5) for n in names] == [i == 3 for i in range(len(names))]
    w_plus = torch.randn(2, G.num_ws, 32)
    assert G.condition(w_plus, probs(2, 3)).shape == (2, G.num_ws, 35)


def test_the_class_moves_each_style_by_its_class_weights_times_the_class_gain():
    # styles = A_w w + gain * A_c c + b: a class switch moves coordinate j by gain * A_c[j] . (c1 - c0),
    # with A_c the affine's own weight columns that read c (an independent read of the parameters).
    torch.manual_seed(0)
    plain = tiny_generator()
    loud = tiny_generator(class_gain=4.0)
    loud.load_state_dict(plain.state_dict())
    w, c0, c1 = torch.randn(2, 32), probs(2, 3, seed=1), probs(2, 3, seed=2)
    for G, gain in ((plain, 1.0), (loud, 4.0)):
        a, b = G.styles(G.condition(w, c0)), G.styles(G.condition(w, c1))
        weights = G.class_weights()
        for name, layer in G.synthesis.named_layers():
            cols = layer.affine.weight[:, 32:] * layer.affine.weight_gain
            torch.testing.assert_close(weights[name], gain * cols)
            torch.testing.assert_close(b[name] - a[name], (c1 - c0) @ (gain * cols).T, rtol=1e-4, atol=1e-5)
    # the w part is untouched by the gain
    same_c = probs(2, 3)
    for name, s in plain.styles(plain.condition(w, same_c)).items():
        delta = loud.styles(loud.condition(w, same_c))[name] - s
        torch.testing.assert_close(delta, same_c @ (3.0 * plain.class_weights()[name]).T, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="class_gain must be a number > 0"):
        tiny_generator(class_gain=0)


def test_style_mixing_switches_from_the_first_latent_to_the_second_at_one_layer():
    torch.manual_seed(0)
    n, layers = 4000, 7
    w1, w2 = torch.randn(n, 5), torch.randn(n, 5)
    mixed = mix_latents(w1, w2, layers, prob=0.5)
    assert mixed.shape == (n, layers, 5)
    from_second = torch.stack([(mixed[:, k] == w2).all(1) for k in range(layers)], 1)  # [n, layers]
    from_first = torch.stack([(mixed[:, k] == w1).all(1) for k in range(layers)], 1)
    assert bool((from_first ^ from_second).all())  # every layer takes one latent or the other
    crossover = layers - from_second.sum(1)  # the first layer of w2 (layers = unmixed)
    # one switch per image: after the crossover every layer is w2, before it every layer w1
    assert bool((from_second == (torch.arange(layers)[None] >= crossover[:, None])).all())
    share = float((crossover < layers).double().mean())
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n)
    assert set(crossover[crossover < layers].tolist()) == set(range(1, layers))  # never layer 0
    assert bool((mix_latents(w1, w2, layers, prob=0.0) == w1[:, None]).all())
    assert bool((mix_latents(w1, w2, layers, prob=1.0)[:, -1] == w2).all())
    with pytest.raises(ValueError, match="style-mixing probability"):
        mix_latents(w1, w2, layers, prob=1.5)


def test_noise_modes():
    torch.manual_seed(0)
    G = tiny_generator().eval()
    set_noise_strength(G, 0.5)
    w, c = torch.randn(2, 32), probs(2, 3)
    with torch.no_grad():
        assert torch.equal(G.generate(w, c, "const"), G.generate(w, c, "const"))
        assert not torch.allclose(G.generate(w, c, "random"), G.generate(w, c, "random"))
        assert not torch.allclose(G.generate(w, c, "const"), G.generate(w, c, "none"))
        set_noise_strength(G, 0.0)
        torch.testing.assert_close(G.generate(w, c, "const"), G.generate(w, c, "none"))
        with pytest.raises(ValueError, match="noise_mode"):
            G.generate(w, c, "fixed")


def test_noise_inputs_start_at_noise_init():
    strengths = lambda G: [m.strength.item() for m in G.modules() if isinstance(m, NoiseInjection)]  # noqa: E731
    assert set(strengths(tiny_generator())) == {0.0}  # StyleGAN2's start: noise unused until learnt
    G = tiny_generator(noise_init=0.2).eval()
    assert strengths(G) == pytest.approx([0.2] * (2 * len(G.synthesis.blocks) - 1))  # every conv's noise input
    w, c = torch.randn(2, 32), probs(2, 3)
    with torch.no_grad():
        assert not torch.allclose(G.generate(w, c, "const"), G.generate(w, c, "none"))


def test_given_noise_maps_replace_the_noise_modes():
    torch.manual_seed(0)
    G = tiny_generator().eval()
    set_noise_strength(G, 0.5)
    w, c = torch.randn(2, 32), probs(2, 3)
    layers = dict(G.synthesis.named_layers())
    assert [name for name, _ in G.noise_layers] == [n for n in layers if not n.endswith("torgb")]
    const = {name: layers[name].noise.noise_const for name, _ in G.noise_layers}  # batch 1, broadcast
    zeros = {name: torch.zeros(2, 1, r, r) for name, r in G.noise_layers}
    with torch.no_grad():
        # the maps are used in place of the noise: the constant maps give the "const" render, zero maps "none"
        torch.testing.assert_close(G.generate(w, c, "random", noise=const), G.generate(w, c, "const"))
        torch.testing.assert_close(G.generate(w, c, "random", noise=zeros), G.generate(w, c, "none"))
        # one image's map changed changes that image only
        moved = dict(zeros, **{"b16.conv1": torch.cat([torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)])})
        a, b = G.generate(w, c, noise=zeros), G.generate(w, c, noise=moved)
        assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="'b8.conv0'"):
        G.generate(w, c, noise={k: v for k, v in zeros.items() if k != "b8.conv0"})
    with pytest.raises(ValueError, match=r"'b8.conv1'.*\[2 or 1, 1, 8, 8\]"):
        G.generate(w, c, noise=dict(zeros, **{"b8.conv1": torch.zeros(2, 1, 4, 4)}))
    with pytest.raises(ValueError, match="b8.torgb"):
        G.generate(w, c, noise=dict(zeros, **{"b8.torgb": torch.zeros(2, 1, 8, 8)}))


def test_per_channel_noise_strengths_let_one_style_coordinate_gate_a_map():
    from stylex.stylespace import StyleSpace

    inj = NoiseInjection(4, channels=3)
    inj.strength.data = torch.tensor([0.0, 1.0, 2.0])
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(inj(x, noise=m), x + m * torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1))
    assert inj.strength.shape == (3,) and NoiseInjection(4).strength.shape == ()

    torch.manual_seed(0)
    w, c = torch.randn(2, 32), probs(2, 3)
    for per_channel in (True, False):
        G = tiny_generator(noise_per_channel=per_channel).eval()
        space = StyleSpace(G)
        j = 2
        with torch.no_grad():
            if per_channel:  # b16.conv0's map enters channel j only
                G.synthesis.blocks["b16"].conv0.noise.strength[j] = 1.0
            else:
                G.synthesis.blocks["b16"].conv0.noise.strength.fill_(1.0)
            flat = space.flat_styles(w, c)
            zeros = {name: torch.zeros(2, 1, r, r) for name, r in G.noise_layers}
            marked = dict(zeros, **{"b16.conv0": torch.randn(2, 1, 16, 16)})
            gated = space.edit(flat, [("b16.conv1", j)], 0.0)  # the style that reads channel j, closed
            open_change = (space.render(flat, noise=marked) - space.render(flat, noise=zeros)).abs().max()
            shut_change = (space.render(gated, noise=marked) - space.render(gated, noise=zeros)).abs().max()
        assert open_change > 1e-2
        if per_channel:  # closing one coordinate removes everything the map marked
            assert shut_change < 1e-6
        else:  # a map shared by all channels passes through the others
            assert shut_change > 1e-2


def test_the_noise_map_encoder_gives_every_noise_layer_a_map_that_training_reaches():
    torch.manual_seed(0)
    G = tiny_generator(noise_init=1.0)
    N = NoiseMapEncoder(G.noise_layers)
    x = torch.randn(3, 3, 16, 16)
    maps = N(x)
    assert list(maps) == [name for name, _ in G.noise_layers]
    assert all(maps[name].shape == (3, 1, r, r) for name, r in G.noise_layers)
    # each image's maps depend on that image alone
    x2 = x.clone()
    x2[2] += 1.0
    maps2 = N(x2)
    assert all(torch.equal(maps[n][:2], maps2[n][:2]) and not torch.equal(maps[n][2], maps2[n][2]) for n in maps)
    # a reconstruction loss through the generator reaches every head
    G.generate(torch.randn(3, 32), probs(3, 3), noise=maps).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in N.parameters())
    with pytest.raises(ValueError, match="at least 16x16"):
        N(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="noise layers"):
        NoiseMapEncoder([])


def test_noise_maps_from_the_image_let_the_generator_place_what_the_latent_cannot():
    # Planted: black 16x16 images with one white 4x4 square at a random place. The latent can say
    # that there is a square but hardly where; the encoder's noise maps can. Same networks, seed,
    # data and steps with and without the maps.
    def squares(n, gen):
        img = torch.full((n, 3, 16, 16), -1.0)
        for k, (i, j) in enumerate(torch.randint(0, 13, (n, 2), generator=gen).tolist()):
            img[k, :, i:i + 4, j:j + 4] = 1.0
        return img

    def fit(with_maps):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        G = tiny_generator(c_dim=0, w_dim=16, noise_init=1.0 if with_maps else 0.0)
        E = Encoder(16, 16, **TINY)
        N = NoiseMapEncoder(G.noise_layers, channels=8) if with_maps else None
        params = list(G.parameters()) + list(E.parameters()) + (list(N.parameters()) if N else [])
        opt = torch.optim.Adam(params, lr=3e-3, betas=(0.9, 0.99))
        for _ in range(150):
            x = squares(16, gen)
            loss = (G.generate(E(x), None, "const", noise=N(x) if N else None) - x).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        x = squares(64, torch.Generator().manual_seed(2))
        with torch.no_grad():
            err = float((G.generate(E(x), None, "const", noise=N(x) if N else None) - x).abs().mean())
        return err, float((x + 1).abs().mean())  # and the error of drawing no square at all

    (blind, nothing), (placed, _) = fit(False), fit(True)
    assert placed < 0.5 * min(blind, nothing), (placed, blind, nothing)


def test_synthesize_reports_missing_and_misshapen_layers():
    G = tiny_generator()
    styles = G.styles(G.condition(torch.randn(2, 32), probs(2, 3)))
    broken = dict(styles)
    del broken["b8.conv1"]
    with pytest.raises(ValueError, match="'b8.conv1'"):
        G.synthesize(broken)
    broken = dict(styles, **{"b16.torgb": torch.ones(2, 5)})
    with pytest.raises(ValueError, match=r"'b16.torgb'.*\[batch, 16\]"):
        G.synthesize(broken)
    with pytest.raises(ValueError, match="b9.conv0"):
        G.synthesize(dict(styles, **{"b9.conv0": torch.ones(2, 16)}))


def test_prefix_reuse_equals_full_render():
    torch.manual_seed(0)
    G = tiny_generator(resolution=32).eval()
    set_noise_strength(G, 0.3)
    styles = G.styles(G.condition(torch.randn(1, 32), probs(1, 3)))
    three = {k: v.repeat(3, 1) for k, v in styles.items()}
    cache1: dict = {}
    cache3: dict = {}
    with torch.no_grad():
        base = G.synthesize(styles, cache=cache1)
        G.synthesize(three, cache=cache3)
        assert list(cache1) == [n for n, _ in G.style_layers]
        for layer in ("b4.torgb", "b16.conv0", "b16.torgb", "b32.conv1"):
            edited = dict(three)  # three edits of one image
            edited[layer] = edited[layer] + torch.linspace(-2, 2, 3)[:, None]
            full = G.synthesize(edited)
            assert not torch.allclose(full[0], base[0])
            resumed = G.synthesize(edited, from_layer=layer, cache=cache3)
            torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
            # A batch-1 cache is broadcast to the edits; batch 1 and batch 3 convolutions may
            # round differently, hence the float32-level tolerance.
            resumed = G.synthesize(edited, from_layer=layer, cache=cache1)
            torch.testing.assert_close(resumed, full, rtol=1e-4, atol=1e-5)
        # The resumed render reads only the layers from `from_layer` on.
        tail = {k: v for k, v in styles.items() if k.startswith("b32")}
        torch.testing.assert_close(G.synthesize(tail, from_layer="b32.conv0", cache=cache1), base, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="cache"):
            G.synthesize(styles, from_layer="b8.conv0")


def test_generator_is_differentiable_in_c():
    torch.manual_seed(0)
    G = tiny_generator(resolution=8).double().eval()
    w = torch.randn(2, 32, dtype=torch.float64)
    c = probs(2, 3).double().requires_grad_(True)
    probe = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def f(c_):
        return (G.generate(w, c_, "const") * probe).sum()

    (grad,) = torch.autograd.grad(f(c), c)
    assert grad.abs().sum() > 0
    # Agreement with a central finite difference along a random direction.
    d = torch.randn_like(c)
    eps = 1e-5
    fd = (f(c + eps * d) - f(c - eps * d)) / (2 * eps)
    torch.testing.assert_close((grad * d).sum(), fd.detach(), rtol=1e-5, atol=1e-8)


def test_path_length_style_second_order_gradients():
    torch.manual_seed(0)
    G = tiny_generator(resolution=16)
    set_noise_strength(G, 0.1)
    w = torch.randn(2, 32, requires_grad=True)
    img = G.generate(w, probs(2, 3), "const")
    y = torch.randn_like(img) / 16
    (gw,) = torch.autograd.grad((img * y).sum(), w, create_graph=True)
    gw.square().sum(dim=1).mean().backward()
    for name, p in G.synthesis.named_parameters():
        if "noise" in name or "torgb.bias" in name:
            continue  # the bias of the last toRGB and noise-free paths need not affect d img / d w
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    weights = [p for n, p in G.synthesis.named_parameters() if n.endswith("conv.weight") or n.endswith("affine.weight")]
    assert all(p.grad.abs().sum() > 0 for p in weights)


# ---- discriminator and encoder ----------------------------------------------------------------


def test_discriminator_projection_uses_c():
    torch.manual_seed(0)
    D = Discriminator(16, 3, **TINY, mbstd_group_size=2)
    img = torch.randn(4, 3, 16, 16)
    c = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        a = D(img, c)
        b = D(img, torch.eye(3)[[1, 2, 0, 1]])
        assert (a - b).abs().min() > 1e-6  # every sample reacts to its class
        # The projection is linear in the head's features: the logit equals <h, cmap(c)> / sqrt(d).
        x = D.conv(D.mbstd(D.trunk(img)))
        h = D.out(D.fc(x.flatten(1)))
        e = D.embed(c)
        e = e / e.square().mean(1, keepdim=True).add(1e-8).sqrt()
        torch.testing.assert_close(a, (h * D.cmap(e)).sum(1, keepdim=True) / math.sqrt(D.cmap_dim))
    with pytest.raises(ValueError, match=r"\[4, 3\]"):
        D(img, torch.ones(4, 2))


def test_unconditional_discriminator():
    torch.manual_seed(0)
    D = Discriminator(16, 0, **TINY)
    img = torch.randn(4, 3, 16, 16)
    assert D(img, None).shape == (4, 1)
    torch.testing.assert_close(D(img, torch.zeros(4, 0)), D(img, None))
    with pytest.raises(ValueError, match="unconditional"):
        D(img, torch.ones(4, 2))


def test_minibatch_std_couples_group_members_only():
    torch.manual_seed(0)
    D = Discriminator(16, 0, **TINY, mbstd_group_size=2)
    img = torch.randn(4, 3, 16, 16)
    changed = img.clone()
    changed[3] = torch.randn(3, 16, 16)
    with torch.no_grad():
        a, b = D(img, None), D(changed, None)
    assert torch.equal(a[:2], b[:2])  # group {0, 1} does not see sample 3
    assert (a[2] - b[2]).abs() > 1e-6  # sample 2 shares a group with sample 3

    # The extra feature is the group std averaged over channels and pixels.
    x = torch.randn(6, 5, 4, 4)
    out = MinibatchStd(group_size=3)(x)
    for g in range(2):
        grp = x[3 * g : 3 * g + 3]
        expected = grp.var(dim=0, unbiased=False).add(1e-8).sqrt().mean()
        torch.testing.assert_close(out[3 * g : 3 * g + 3, 5], expected.expand(3, 4, 4))
    with pytest.raises(ValueError, match="not divisible by the group size 4"):
        MinibatchStd(group_size=4)(torch.randn(6, 5, 4, 4))
    assert MinibatchStd(group_size=4)(torch.randn(3, 5, 4, 4)).shape == (3, 6, 4, 4)  # G = min(4, 3)


def _feature_maps(batch, channels=(4, 6), sizes=(8, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, ch, s, s, generator=g).relu() for ch, s in zip(channels, sizes)]


def test_feature_heads_add_a_projected_patch_logit_per_scale():
    torch.manual_seed(0)
    D = Discriminator(16, 3, **TINY, mbstd_group_size=2, feature_channels=[4, 6])
    plain = Discriminator(16, 3, **TINY, mbstd_group_size=2)
    missing = plain.load_state_dict(D.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(k.startswith("feature_heads.") for k in missing.unexpected_keys)
    img, c, feats = torch.randn(4, 3, 16, 16), probs(4, 3), _feature_maps(4)
    heads = D.feature_heads
    with torch.no_grad():
        # Independent definition: each scale's 3 convs written out with F.conv2d and the
        # equalised-lr gains, averaged over positions, projected on the class map; scales summed / sqrt(S).
        e = heads.embedding.embed.weight * heads.embedding.embed.weight_gain
        emb = F.linear(c, e, heads.embedding.embed.bias)
        emb = emb / emb.square().mean(1, keepdim=True).add(1e-8).sqrt()
        cm = heads.embedding.cmap
        cmap = F.leaky_relu(F.linear(emb, cm.weight * cm.weight_gain, cm.bias), 0.2) * math.sqrt(2)
        expected = 0
        for head, f in zip(heads.heads, feats):
            h = f
            for i, conv in enumerate(head):
                h = F.conv2d(h, conv.weight * conv.weight_gain, conv.bias, padding=conv.weight.shape[-1] // 2)
                if i < 2:
                    h = F.leaky_relu(h, 0.2) * math.sqrt(2)
            expected = expected + (h.mean(dim=(2, 3)) * cmap).sum(1, keepdim=True) / math.sqrt(cmap.shape[1])
        expected = expected / math.sqrt(2)
        torch.testing.assert_close(D(img, c, features=feats) - plain(img, c), expected, rtol=1e-4, atol=1e-5)
        # the class reaches the feature logit too
        assert (heads(feats, c) - heads(feats, torch.eye(3)[[1, 2, 0, 1]])).abs().min() > 1e-6
    with pytest.raises(ValueError, match="pass features="):
        D(img, c)
    with pytest.raises(ValueError, match="no feature heads"):
        plain(img, c, features=feats)
    with pytest.raises(ValueError, match=r"channels \[4, 6\]"):
        D(img, c, features=_feature_maps(4, channels=(4, 5)))


def test_feature_heads_learn_to_tell_two_feature_distributions_apart_and_pass_gradients_back():
    torch.manual_seed(0)
    heads = FeatureHeads([4, 6], c_dim=0)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3, betas=(0.0, 0.99))
    real = _feature_maps(32, seed=1)
    fake = [f.clone() for f in _feature_maps(32, seed=2)]
    fake[0][:, 1] += 0.5  # one channel of one scale is off
    losses = []
    for _ in range(60):
        loss = F.softplus(-heads(real, None)).mean() + F.softplus(heads(fake, None)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # the generator's side: the logit's gradient reaches the feature maps it reads
    leaf = [f.clone().requires_grad_(True) for f in fake]
    heads(leaf, None).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in leaf)


def test_an_encoder_into_w_plus_gives_one_latent_per_style_layer_and_w_is_its_special_case():
    torch.manual_seed(0)
    G = Generator(z_dim=8, w_dim=8, c_dim=2, resolution=16, mapping_layers=1, **TINY).eval()
    E = Encoder(16, 8, latent="w+", num_ws=G.num_ws, **TINY)
    x = torch.randn(3, 3, 16, 16)
    c = probs(3, 2)
    wp = E(x)
    assert wp.shape == (3, G.num_ws, 8)
    with torch.no_grad():
        # the same w at every layer renders exactly as that w
        w = torch.randn(3, 8)
        torch.testing.assert_close(G.generate(w[:, None].expand(-1, G.num_ws, -1), c, noise_mode="const"),
                                   G.generate(w, c, noise_mode="const"))
        # a layer's latent moves that layer's style alone
        moved = wp.clone()
        moved[:, 2] += 1.0
        a, b = G.styles(G.condition(wp, c)), G.styles(G.condition(moved, c))
        names = [n for n, _ in G.style_layers]
        assert [n for n in names if not torch.equal(a[n], b[n])] == [names[2]]
    # the whole w+ is learnable from pixels: gradients reach every layer's slice of the output
    G.generate(wp, c, noise_mode="const").square().mean().backward()
    grad = E.out.weight.grad.view(G.num_ws, 8, -1)
    assert all(grad[i].abs().sum() > 0 for i in range(G.num_ws))
    with pytest.raises(ValueError, match="needs num_ws"):
        Encoder(16, 8, latent="w+", **TINY)
    with pytest.raises(ValueError, match="'w' or 'w\\+', got 'z'"):
        Encoder(16, 8, latent="z", **TINY)
    assert Encoder(16, 8, **TINY)(x).shape == (3, 8)


def test_r1_second_order_gradients_reach_d():
    torch.manual_seed(0)
    D = Discriminator(16, 3, **TINY)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    (gx,) = torch.autograd.grad(D(x, probs(4, 3)).sum(), x, create_graph=True)
    gx.square().sum(dim=[1, 2, 3]).mean().backward()
    for name, p in D.named_parameters():
        if name == "out.bias":
            continue  # adds a constant to the logit per c: no effect on d logit / d x
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("weight"):
            assert p.grad.abs().sum() > 0, name


def test_encoder_learns_to_invert_fixed_latents():
    torch.manual_seed(0)
    E = Encoder(16, 8, **TINY)
    imgs = torch.randn(8, 3, 16, 16)
    target = torch.randn(8, 8)
    opt = torch.optim.Adam(E.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (E(imgs) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    with pytest.raises(ValueError, match=r"\[batch, 3, 16, 16\]"):
        E(torch.randn(2, 3, 32, 32))
