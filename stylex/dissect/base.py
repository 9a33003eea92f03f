"""What every part of dissection shares: units, the segmenter contract, layer checks.

Units. A *unit* is one channel of the output of a synthesis conv layer (``b8.conv1``,
``b16.conv0``, ...), addressed ``(layer, channel)`` with the layer's StyleSpace name. A conv
layer's output is the feature map that the *next* style layers modulate: StyleSpace coordinate
``(L, i)`` scales input channel ``i`` of layer ``L``, and that input is unit ``(P, i)`` with ``P``
the latest conv layer before ``L`` in synthesis order (``b8.conv1`` feeds ``b8.torgb`` and
``b16.conv0``). The first layer reads the learned constant, which is no unit. ToRGB layers
produce images, not feature maps, so they hold no units; their inputs are the units of the conv
before them.

Segmenter. Anything with ``concepts`` (names), ``resolution`` (the image side it reads),
``source`` (one line saying what it is, shown in reports) and ``__call__(images)`` mapping
generator-range images ``[B, 3, R, R]`` in ``[-1, 1]`` to boolean concept masks
``[B, len(concepts), R, R]``. Masks may overlap (class-evidence maps do); a semantic
segmenter's masks are one-hot.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from stylex.stylespace import StyleSpace

Unit = tuple[str, int]  # (conv layer name, channel)


@runtime_checkable
class Segmenter(Protocol):
    concepts: list[str]
    resolution: int
    source: str

    def __call__(
        self,
        images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # bool [B, len(concepts), R, R]
        ...


def is_torgb(layer: str) -> bool:
    return layer.rsplit(".", 1)[-1] == "torgb"


def unit_layers(
    space: StyleSpace,
) -> list[str]:
    """The layers whose output channels are units: every synthesis layer but the ToRGBs, in
    synthesis order."""
    return [name for name in space.layer_names if not is_torgb(name)]


def unit_counts(
    space: StyleSpace,
) -> dict[str, int]:
    """``layer -> number of units``: a conv layer's output channels, read from the style width of
    the layer after it (which modulates exactly those channels)."""
    names = space.layer_names
    widths = dict(space.layers)
    counts: dict[str, int] = {}
    for i, name in enumerate(names):
        if is_torgb(name):
            continue
        if i + 1 >= len(names):
            raise ValueError(f"layer {name!r} is the last synthesis layer; no style layer reads its output")
        counts[name] = widths[names[i + 1]]
    return counts


def feeding_unit_layer(
    space: StyleSpace,
    style_layer: str,  # a StyleSpace layer name
) -> str | None:
    """The conv layer whose output channel ``i`` the style ``(style_layer, i)`` modulates;
    ``None`` for the first layer (it modulates the learned constant)."""
    names = space.layer_names
    if style_layer not in names:
        raise KeyError(f"unknown style layer {style_layer!r}; the layers are {names}")
    before = [n for n in names[: names.index(style_layer)] if not is_torgb(n)]
    return before[-1] if before else None


def modulating_styles(
    space: StyleSpace,
    unit_layer: str,
) -> list[str]:
    """The style layers whose coordinate ``i`` scales unit ``(unit_layer, i)``."""
    return [n for n in space.layer_names if feeding_unit_layer(space, n) == unit_layer]


def check_layers(
    space: StyleSpace,
    layers: Sequence[str] | None,  # None = every unit layer
) -> list[str]:
    """``layers`` checked against the unit layers (a ValueError lists the valid ones)."""
    valid = unit_layers(space)
    if layers is None:
        return valid
    layers = list(layers)
    bad = [name for name in layers if name not in valid]
    if bad:
        raise ValueError(f"unknown unit layer(s) {bad}; the valid layers are {', '.join(valid)}")
    if not layers:
        raise ValueError(f"no layers given; the valid layers are {', '.join(valid)}")
    return layers
