"""StyleSpace: the generator's styles as one flat coordinate vector.

The styles of a generator are a mapping ``layer name -> [B, channels]``. StyleSpace lays them
end to end in synthesis order, giving a vector of ``S = generator.num_styles`` coordinates per
image. Coordinate ``i`` is channel ``i - offsets[layer]`` of the layer whose range
``[offsets[layer], offsets[layer] + channels)`` contains ``i``.

Everything that searches, edits or reports on style coordinates (AttFind, reports, dissection)
goes through this class, so those components never touch the generator's layer structure.

Typical use::

    space = StyleSpace(G)
    flat = space.flat_styles(w, c)                   # [B, S]
    i = space.index("b16.conv1", 7)
    edited = space.edit(flat, [i], [flat[:, i] + 3 * std[i]])
    img = space.render(edited)                        # deterministic: noise_mode="const"
    img = space.render(edited, noise=maps)            # each image's own noise maps (encoder_noise runs)

Prefix reuse: ``render(flat, cache={})`` records the synthesis state entering each layer; a
later ``render(edited, from_layer=space.first_layer(coords), cache=cache)`` re-runs only the
layers from the earliest edited one on (see :mod:`stylex.networks.synthesis`).
:meth:`StyleSpace.cache_rows` picks the cached state of some of the rendered images, so that
edits of different images share one resumed render.

Looking inside a render (the shape of netdissect's ``nethook``): within
``with space.trace(retain=["b8.conv1"], edit={"b16.conv0": fn}) as seen:`` every render keeps
the output of ``b8.conv1`` in ``seen["b8.conv1"]`` (``[B, C, H, W]``) and replaces the output of
``b16.conv0`` by ``fn(output)``. Layers are addressed by their style-layer names; a conv layer's
output is the feature map the next layer's style modulates.
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch

from stylex.networks.generator import Generator
from stylex.networks.synthesis import SynthesisState

Coordinate = Union[int, tuple[str, int]]  # a flat index or a (layer, channel) pair
NoiseMaps = Mapping[str, torch.Tensor]  # noise layer -> [N or 1, 1, r, r] (Generator.noise_layers)


def noise_rows(
    noise: NoiseMaps | None,
    rows: torch.Tensor | slice,  # which images: an index tensor or a slice of the batch
) -> dict[str, torch.Tensor] | None:
    """The noise maps of some images (rows of every map; a map of batch 1 is shared by all
    images and kept as it is). ``None`` stays ``None``: renders then use a noise mode."""
    if noise is None:
        return None
    out = {}
    for name, m in noise.items():
        out[name] = m if m.shape[0] == 1 else m[rows if isinstance(rows, slice) else rows.to(m.device)]
    return out


def check_noise(
    noise: NoiseMaps | None,  # {noise layer: [N or 1, 1, r, r]}
    n: int,  # the number of images
) -> NoiseMaps | None:
    """Noise maps checked to hold one map per image (or one shared by all)."""
    if noise is None:
        return None
    bad = {name: tuple(m.shape) for name, m in noise.items() if m.ndim != 4 or m.shape[0] not in (1, n)}
    if bad:
        raise ValueError(f"noise maps must have batch 1 or {n} (one per image), got {bad}")
    return noise


def encode_noise_maps(
    encoder: torch.nn.Module,  # a stylex Encoder
    images: torch.Tensor,  # [N, 3, R, R] in [-1, 1]
    batch_size: int,
    device: torch.device | str,
) -> dict[str, torch.Tensor] | None:  # noise layer -> [N, 1, r, r] on the CPU; None = E gives none
    """The encoder's noise maps of ``images``, ``batch_size`` at a time, when it was trained to
    give them (``model.encoder_noise``): the generator then draws each image's layout from them,
    and every render of the image (edited or not) must use them."""
    if getattr(encoder, "noise_encoder", None) is None:  # an encoder of the latent alone
        return None
    parts = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            maps = encoder.noise_maps(images[i : i + batch_size].to(device, torch.float32))
            parts.append({name: m.float().cpu() for name, m in maps.items()})
    return noise_cat(parts)


def noise_cat(parts: Sequence[NoiseMaps | None]) -> dict[str, torch.Tensor] | None:
    """Concatenate the noise maps of consecutive batches (all ``None`` or none of them)."""
    parts = list(parts)
    if not parts or all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("noise_cat got batches with and without noise maps")
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


class StyleSpace:
    """Flat view of a :class:`~stylex.networks.Generator`'s styles.

    Attributes:
        generator: the generator (held by reference; StyleSpace owns no tensors).
        layers: ``[(layer name, channels)]`` in synthesis order.
        dim: S, the total number of style channels.
        offsets: ``layer name -> index of its channel 0`` in the flat vector.
    """

    def __init__(
        self,
        generator: Generator,
    ) -> None:
        self.generator = generator
        self.layers: list[tuple[str, int]] = list(generator.style_layers)
        self.offsets: dict[str, int] = {}
        start = 0
        for name, channels in self.layers:
            self.offsets[name] = start
            start += channels
        self.dim: int = start
        self._channels = dict(self.layers)
        self._starts = [self.offsets[name] for name, _ in self.layers]  # sorted, for bisect

    def __repr__(self) -> str:
        return f"StyleSpace(dim={self.dim}, layers={len(self.layers)})"

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    # ---- coordinates ---------------------------------------------------------------------

    def layer_slice(
        self,
        layer: str,
    ) -> slice:
        """The flat range of a layer's channels."""
        self._check_layer(layer)
        start = self.offsets[layer]
        return slice(start, start + self._channels[layer])

    def coordinate(
        self,
        i: int,  # flat index in [0, dim)
    ) -> tuple[str, int]:  # (layer name, channel)
        """The layer and channel of flat index ``i``."""
        i = int(i)
        if not 0 <= i < self.dim:
            raise IndexError(
                f"style index {i} is out of range: StyleSpace has {self.dim} coordinates (0..{self.dim - 1})"
            )
        k = bisect.bisect_right(self._starts, i) - 1
        name = self.layers[k][0]
        return name, i - self.offsets[name]

    def index(
        self,
        layer: str,
        channel: int,
    ) -> int:
        """The flat index of ``channel`` of ``layer``."""
        self._check_layer(layer)
        channel = int(channel)
        if not 0 <= channel < self._channels[layer]:
            raise IndexError(
                f"channel {channel} is out of range for layer {layer!r}, which has {self._channels[layer]} channels"
            )
        return self.offsets[layer] + channel

    def resolve(
        self,
        coords: Iterable[Coordinate],
    ) -> list[int]:
        """Flat indices of coordinates given as ints or ``(layer, channel)`` pairs."""
        out = []
        for c in coords:
            if isinstance(c, tuple):
                out.append(self.index(*c))
            else:
                i = int(c)
                self.coordinate(i)  # range check with the StyleSpace message
                out.append(i)
        return out

    def layer_of(
        self,
        i: int,
    ) -> str:
        return self.coordinate(i)[0]

    def first_layer(
        self,
        coords: Iterable[Coordinate],
    ) -> str:
        """The earliest layer (in synthesis order) holding any of ``coords``: where a resumed
        render of an edit of those coordinates must start."""
        idx = self.resolve(coords)
        if not idx:
            raise ValueError("first_layer needs at least one coordinate")
        return self.layer_of(min(idx))

    def _check_layer(self, layer: str) -> None:
        if layer not in self._channels:
            raise KeyError(f"unknown style layer {layer!r}; the layers are {self.layer_names}")

    # ---- conversions ---------------------------------------------------------------------

    def flatten(
        self,
        styles: Mapping[str, torch.Tensor],  # layer name -> [B, channels]
    ) -> torch.Tensor:  # [B, S]
        """Concatenate the styles in synthesis order."""
        missing = [name for name in self._channels if name not in styles]
        extra = [name for name in styles if name not in self._channels]
        if missing or extra:
            raise ValueError(f"styles do not match the generator's layers: missing {missing}, unknown {extra}")
        parts = []
        for name, channels in self.layers:
            s = styles[name]
            if s.ndim != 2 or s.shape[1] != channels:
                raise ValueError(
                    f"the style of layer {name!r} must have shape [batch, {channels}], got {tuple(s.shape)}"
                )
            parts.append(s)
        return torch.cat(parts, dim=1)

    def unflatten(
        self,
        flat: torch.Tensor,  # [B, S]
    ) -> dict[str, torch.Tensor]:  # layer name -> [B, channels] (views of flat)
        """Split a flat vector back into per-layer styles."""
        self._check_flat(flat)
        return {name: flat[:, self.offsets[name] : self.offsets[name] + channels] for name, channels in self.layers}

    def _check_flat(self, flat: torch.Tensor) -> None:
        if not isinstance(flat, torch.Tensor) or flat.ndim != 2 or flat.shape[1] != self.dim:
            shape = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
            raise ValueError(f"flat styles must have shape [batch, {self.dim}], got {shape}")

    # ---- generator round trips -----------------------------------------------------------

    def styles(
        self,
        w: torch.Tensor,  # [B, w_dim], or [B, num_ws, w_dim] (one w per style layer)
        c: torch.Tensor | None,  # [B, c_dim] class probabilities
    ) -> dict[str, torch.Tensor]:
        """The styles of latent ``w`` under class vector ``c``."""
        g = self.generator
        return g.styles(g.condition(w, c))

    def flat_styles(
        self,
        w: torch.Tensor,  # [B, w_dim], or [B, num_ws, w_dim] (one w per style layer)
        c: torch.Tensor | None,  # [B, c_dim]
    ) -> torch.Tensor:  # [B, S]
        return self.flatten(self.styles(w, c))

    def render(
        self,
        styles: torch.Tensor | Mapping[str, torch.Tensor],  # [B, S] or layer name -> [B, channels]
        noise_mode: str = "const",
        from_layer: str | None = None,  # resume from `cache` at this layer (prefix reuse)
        cache: dict[str, SynthesisState] | None = None,
        noise: NoiseMaps | None = None,  # each row's own noise maps (an encoder's); replaces noise_mode
    ) -> torch.Tensor:  # [B, img_channels, R, R]
        """Render flat or per-layer styles. ``noise_mode="const"`` makes renders of the same
        styles identical, which explanations need. ``noise`` gives the rows their own noise
        maps (row j of every map belongs to row j of ``styles``; a map of batch 1 is shared),
        as a generator trained with ``model.encoder_noise`` draws an image's layout from them."""
        if isinstance(styles, torch.Tensor):
            styles = self.unflatten(styles)
            device = styles[self.layers[0][0]].device
        else:
            device = next(iter(styles.values())).device
        maps = {} if noise is None else {"noise": {name: m.to(device) for name, m in noise.items()}}
        return self.generator.synthesize(styles, noise_mode=noise_mode, from_layer=from_layer, cache=cache, **maps)

    def cache_rows(
        self,
        cache: Mapping[str, SynthesisState],  # filled by render(flat, cache={})
        layer: str,  # where the resumed render starts
        rows: torch.Tensor,  # [M] int64: which cached image each row of the resumed render edits
    ) -> dict[str, SynthesisState]:  # a cache holding only ``layer``, with batch M
        """The state entering ``layer`` of the cached images ``rows``, for
        ``render(edited, from_layer=layer, cache=...)`` where row j of ``edited`` edits image
        ``rows[j]`` of the cached render at ``layer`` or later."""
        if layer not in cache:
            raise ValueError(f"the cache holds no state entering {layer!r}; fill it with a full render first")
        x, img = cache[layer]
        return {layer: SynthesisState(x[rows], None if img is None else img[rows])}

    # ---- looking inside a render ---------------------------------------------------------

    @contextmanager
    def trace(
        self,
        retain: Iterable[str] = (),  # layers whose output every render keeps
        edit: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,  # layer -> new output
    ) -> Iterator[dict[str, torch.Tensor]]:  # layer -> its output in the latest render [B, C, H, W]
        """Keep or replace the outputs of synthesis layers during every render in the block.

        Built on forward hooks of the layer modules, removed on exit: the generator is never
        changed. ``edit`` functions get the layer's output and return a tensor of the same shape
        (e.g. zeroing some channels, or setting them inside a region); a retained layer that is
        also edited keeps the edited output. A resumed render (prefix reuse) runs only the
        layers from its start on, so only those are retained.
        """
        edit = dict(edit or {})
        retain = list(retain)
        for name in [*retain, *edit]:
            self._check_layer(name)
        modules = dict(self.generator.synthesis.named_layers())
        seen: dict[str, torch.Tensor] = {}
        handles = []

        def hook_for(name: str):
            def hook(module, inputs, output):
                if name in edit:
                    new = edit[name](output)
                    if not isinstance(new, torch.Tensor) or new.shape != output.shape:
                        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                        raise ValueError(f"the edit of {name!r} must return a tensor of shape "
                                         f"{tuple(output.shape)}, got {got}")
                    output = new
                if name in retain:
                    seen[name] = output
                return output

            return hook

        try:
            for name in dict.fromkeys([*retain, *edit]):
                handles.append(modules[name].register_forward_hook(hook_for(name)))
            yield seen
        finally:
            for h in handles:
                h.remove()

    # ---- editing and statistics ----------------------------------------------------------

    def edit(
        self,
        flat: torch.Tensor,  # [B, S]
        coords: Sequence[Coordinate],  # K coordinates: flat indices or (layer, channel) pairs
        values: float | Sequence[float] | torch.Tensor,  # scalar, [K] or [B, K]
        mode: str = "set",  # "set": s_i = value; "add": s_i += value
    ) -> torch.Tensor:  # [B, S], a new tensor; `flat` is left unchanged
        """A copy of ``flat`` with the given coordinates set to (or shifted by) ``values``.

        Differentiable with respect to both ``flat`` and ``values``.
        """
        self._check_flat(flat)
        if mode not in ("set", "add"):
            raise ValueError(f"edit mode must be 'set' or 'add', got {mode!r}")
        idx = self.resolve(coords)
        if len(set(idx)) != len(idx):
            raise ValueError(f"edit got repeated coordinates {idx}; give each coordinate once")
        k = len(idx)
        v = torch.as_tensor(values, dtype=flat.dtype, device=flat.device)
        if v.ndim == 0:
            v = v.expand(k)
        if v.shape not in ((k,), (flat.shape[0], k)):
            raise ValueError(
                f"edit values must be a scalar, [{k}] or [{flat.shape[0]}, {k}] for {k} coordinates, "
                f"got {tuple(v.shape)}"
            )
        v = v.expand(flat.shape[0], k)
        index = torch.tensor(idx, device=flat.device, dtype=torch.long).expand(flat.shape[0], k)
        if mode == "add":
            return flat.scatter_add(1, index, v)
        return flat.scatter(1, index, v)

    def statistics(
        self,
        flat: torch.Tensor,  # [N, S] styles of N images
    ) -> dict[str, torch.Tensor]:  # "min" / "max" / "mean" / "std" -> [S]
        """Per-coordinate min, max, mean and (population, i.e. divide-by-N) standard deviation."""
        self._check_flat(flat)
        if flat.shape[0] == 0:
            raise ValueError("statistics need at least one sample")
        flat = flat.detach()
        return {
            "min": flat.amin(dim=0),
            "max": flat.amax(dim=0),
            "mean": flat.mean(dim=0),
            "std": flat.std(dim=0, correction=0),
        }
