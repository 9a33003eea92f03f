"""Exponential moving average of a network's weights, parametrised by a half-life in images."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(net: nn.Module) -> nn.Module:
    """A frozen deep copy of ``net`` to hold its moving average."""
    ema = copy.deepcopy(net).eval()
    ema.requires_grad_(False)
    return ema


def ema_beta(batch_size: int, images_seen: int, half_life_kimg: float, rampup: float | None) -> float:
    """Decay per step so that the weights' half-life is ``half_life_kimg`` thousand images.

    With ``rampup`` the half-life is at most ``rampup * images_seen``: early in training the
    average follows the network closely instead of remembering its random start.
    """
    half_life = half_life_kimg * 1000.0
    if rampup is not None:
        half_life = min(half_life, images_seen * rampup)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema ← lerp(net, ema, beta) for parameters; buffers (e.g. w_avg, fixed noise) are copied."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
