"""Tests of the flat StyleSpace view of the generator."""

from __future__ import annotations

import pytest
import torch

from stylex.networks import Generator, NoiseInjection
from stylex.stylespace import StyleSpace


@pytest.fixture(scope="module")
def space() -> StyleSpace:
    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, c_dim=3, resolution=16, channel_base=128, channel_max=16, mapping_layers=2)
    for m in G.modules():
        if isinstance(m, NoiseInjection):
            m.strength.data.fill_(0.2)  # make "const" noise visible in the renders
    return StyleSpace(G.eval())


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, generator=g), torch.softmax(torch.randn(batch, 3, generator=g), dim=1)


def test_layout_follows_the_generator(space):
    G = space.generator
    assert space.layers == G.style_layers
    assert space.dim == G.num_styles
    # Offsets are the running sums of the channel counts, in synthesis order.
    running = 0
    for name, ch in space.layers:
        assert space.offsets[name] == running
        assert space.layer_slice(name) == slice(running, running + ch)
        running += ch
    assert running == space.dim


def test_coordinate_and_index_are_inverse(space):
    for name, ch in space.layers:
        for k in range(ch):
            assert space.coordinate(space.index(name, k)) == (name, k)
    assert [space.index(*space.coordinate(i)) for i in range(space.dim)] == list(range(space.dim))
    with pytest.raises(IndexError, match=f"{space.dim} coordinates"):
        space.coordinate(space.dim)
    with pytest.raises(IndexError, match="out of range"):
        space.coordinate(-1)
    with pytest.raises(KeyError, match="unknown style layer 'b8.conv2'"):
        space.index("b8.conv2", 0)
    with pytest.raises(IndexError, match="'b16.torgb', which has 8 channels"):
        space.index("b16.torgb", 8)


def test_flatten_unflatten_round_trip(space):
    w, c = inputs()
    styles = space.styles(w, c)
    flat = space.flatten(styles)
    assert flat.shape == (2, space.dim)
    back = space.unflatten(flat)
    assert list(back) == list(styles)
    for name in styles:
        assert torch.equal(back[name], styles[name])
    # Coordinate i of the flat vector is channel k of layer l.
    for i in (0, space.dim // 2, space.dim - 1):
        name, k = space.coordinate(i)
        assert torch.equal(flat[:, i], styles[name][:, k])
    with pytest.raises(ValueError, match="missing"):
        space.flatten({k: v for k, v in styles.items() if k != "b8.conv0"})
    with pytest.raises(ValueError, match=rf"\[batch, {space.dim}\]"):
        space.unflatten(flat[:, :-1])


def test_render_of_flat_styles_equals_generate(space):
    w, c = inputs()
    with torch.no_grad():
        via_space = space.render(space.flat_styles(w, c))
        direct = space.generator.generate(w, c, noise_mode="const")
    torch.testing.assert_close(via_space, direct, rtol=0, atol=1e-6)


def test_edit_changes_one_coordinate_and_the_image(space):
    w, c = inputs()
    with torch.no_grad():
        flat = space.flat_styles(w, c)
        before = flat.clone()
        i = space.index("b8.conv1", 3)
        edited = space.edit(flat, [i], [flat[0, i].item() + 5.0])
        assert torch.equal(flat, before)  # a copy, not in place
        changed = (edited != flat).any(dim=0).nonzero().flatten().tolist()
        assert changed == [i]
        assert torch.allclose(edited[:, i], torch.full([2], flat[0, i].item() + 5.0))
        # The edit reaches the image, and only through that style.
        assert not torch.allclose(space.render(edited), space.render(flat))
        styles_after = space.unflatten(edited)
        for name, s in space.unflatten(flat).items():
            assert torch.equal(styles_after[name], s) == (name != "b8.conv1"), name

        # (layer, channel) pairs, per-sample values and additive edits.
        j = space.index("b16.torgb", 0)
        shift = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
        added = space.edit(flat, [("b8.conv1", 3), j], shift, mode="add")
        torch.testing.assert_close(added[:, [i, j]], flat[:, [i, j]] + shift)
        with pytest.raises(ValueError, match="repeated"):
            space.edit(flat, [i, ("b8.conv1", 3)], 0.0)
        with pytest.raises(ValueError, match=r"\[2\] or \[2, 2\]"):
            space.edit(flat, [i, j], [1.0, 2.0, 3.0])


def test_prefix_reuse_render(space):
    w, c = inputs(batch=1)
    with torch.no_grad():
        flat = space.flat_styles(w, c)
        cache: dict = {}
        base = space.render(flat, cache=cache)
        coords = [("b16.conv0", 2), ("b8.torgb", 1)]
        edited = space.edit(flat, coords, [4.0, -3.0])
        first = space.first_layer(coords)
        assert first == "b8.torgb"
        full = space.render(edited)
        resumed = space.render(edited, from_layer=first, cache=cache)
        torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
        assert not torch.allclose(full, base)


def test_statistics_match_direct_computation(space):
    torch.manual_seed(0)
    flat = torch.randn(50, space.dim) * torch.linspace(0.1, 3.0, space.dim) + torch.arange(space.dim)
    stats = space.statistics(flat)
    assert set(stats) == {"min", "max", "mean", "std"}
    for i in (0, 17, space.dim - 1):
        col = flat[:, i].tolist()
        mean = sum(col) / len(col)
        std = (sum((v - mean) ** 2 for v in col) / len(col)) ** 0.5
        assert stats["min"][i].item() == pytest.approx(min(col))
        assert stats["max"][i].item() == pytest.approx(max(col))
        assert stats["mean"][i].item() == pytest.approx(mean, rel=1e-5)
        assert stats["std"][i].item() == pytest.approx(std, rel=1e-4)


def test_cache_rows_resumes_edits_of_chosen_images(space):
    w, c = inputs(batch=3, seed=2)
    with torch.no_grad():
        flat = space.flat_styles(w, c)
        cache: dict = {}
        space.render(flat, cache=cache)
        rows = torch.tensor([2, 0, 2])  # image 2 twice, edited differently
        # Before the first toRGB (no image yet) and after it (the image of b4 is carried along).
        for layer in ("b4.conv1", "b8.conv1"):
            i, j = space.index(layer, 1), space.index("b16.torgb", 4)
            edited = space.edit(flat[rows], [i, j], torch.tensor([[3.0, -1.0], [-2.0, 0.5], [0.0, 2.0]]))
            state = space.cache_rows(cache, layer, rows)
            assert list(state) == [layer] and state[layer].x.shape[0] == 3
            resumed = space.render(edited, from_layer=layer, cache=state)
            torch.testing.assert_close(resumed, space.render(edited), rtol=0, atol=1e-6)
            assert not torch.allclose(resumed[0], resumed[2])
        with pytest.raises(ValueError, match="fill it with a full render"):
            space.cache_rows({}, "b8.conv1", rows)


def _no_hooks(space) -> bool:
    return all(not m._forward_hooks for m in space.generator.modules())


def test_trace_retains_layer_outputs(space):
    w, c = inputs()
    with torch.no_grad():
        flat = space.flat_styles(w, c)
        plain = space.render(flat)
        cache: dict = {}
        with space.trace(retain=["b8.conv0", "b16.conv1"]) as seen:
            traced = space.render(flat, cache=cache)
        assert torch.equal(traced, plain)  # retaining changes nothing
        # A conv layer's output is the state entering the next layer ...
        assert torch.equal(seen["b8.conv0"], cache["b8.conv1"].x)
        assert torch.equal(seen["b16.conv1"], cache["b16.torgb"].x)
        # ... and what the layer computes from the state entering it.
        layer = space.generator.synthesis.blocks["b8"].conv0
        styles = space.unflatten(flat)
        direct = layer(cache["b8.conv0"].x, styles["b8.conv0"], "const")
        torch.testing.assert_close(seen["b8.conv0"], direct, rtol=0, atol=1e-6)
        # A resumed render runs (and retains) only the layers from its start on.
        with space.trace(retain=["b4.conv1", "b16.conv0"]) as seen:
            space.render(flat, from_layer="b8.conv0", cache=cache)
        assert set(seen) == {"b16.conv0"}
        assert _no_hooks(space)
        with pytest.raises(KeyError, match="unknown style layer 'b8.conv2'"):
            with space.trace(retain=["b8.conv2"]):
                pass


def test_trace_edits_layer_outputs(space):
    from stylex.networks.synthesis import SynthesisState

    w, c = inputs()
    zero = [1, 3]

    def kill(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, zero] = 0
        return out

    with torch.no_grad():
        flat = space.flat_styles(w, c)
        cache: dict = {}
        plain = space.render(flat, cache=cache)
        with space.trace(retain=["b8.conv1"], edit={"b8.conv1": kill}) as seen:
            edited = space.render(flat)
        assert not torch.allclose(edited, plain)
        assert (seen["b8.conv1"][:, zero] == 0).all()  # a retained layer keeps its edited output
        # The same as resuming from the state entering the next layer with those channels zeroed.
        x, img = cache["b8.torgb"]
        x = x.clone()
        x[:, zero] = 0
        resumed = space.render(flat, from_layer="b8.torgb", cache={"b8.torgb": SynthesisState(x, img)})
        torch.testing.assert_close(edited, resumed, rtol=0, atol=1e-6)
        # The hooks are gone after the block.
        assert _no_hooks(space)
        assert torch.equal(space.render(flat), plain)
        # An edit must keep the output's shape; a failing block removes its hooks as well.
        with pytest.raises(ValueError, match=r"must return a tensor of shape \(2, 16, 8, 8\)"):
            with space.trace(edit={"b8.conv1": lambda out: out[:, :2]}):
                space.render(flat)
        assert _no_hooks(space)
        assert torch.equal(space.render(flat), plain)
