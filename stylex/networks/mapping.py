"""The mapping network ``z -> w`` with the running mean of ``w`` used for truncation."""

from __future__ import annotations

import torch
from torch import nn

from stylex.networks.layers import EqualizedLinear, normalize_2nd_moment


class MappingNetwork(nn.Module):
    """``z [B, z_dim] -> w [B, w_dim]``: unit-second-moment normalisation of z, then
    ``num_layers`` fully connected lrelu layers with learning-rate multiplier ``lr_mul``.

    ``w_avg`` is an exponential moving average of the batch mean of w (decay ``w_avg_beta``),
    updated on every forward call in training mode. Truncation pulls w toward it:
    ``w_avg + psi * (w - w_avg)``.

    The class conditioning of StylEx is not applied here: the generator concatenates the
    classifier output to w after mapping.
    """

    def __init__(
        self,
        z_dim: int,
        w_dim: int,
        num_layers: int = 8,
        lr_mul: float = 0.01,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        if z_dim < 1 or w_dim < 1:
            raise ValueError(f"MappingNetwork needs z_dim >= 1 and w_dim >= 1, got z_dim={z_dim}, w_dim={w_dim}")
        if num_layers < 1:
            raise ValueError(f"MappingNetwork needs at least one layer, got num_layers={num_layers}")
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        sizes = [z_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[
                EqualizedLinear(sizes[i], sizes[i + 1], lr_mul=lr_mul, activation="lrelu")
                for i in range(num_layers)
            ]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: torch.Tensor,  # [batch, z_dim] latent codes, any scale
        truncation_psi: float = 1.0,  # 1 = no truncation, 0 = always w_avg
        update_w_avg: bool | None = None,  # None = update in training mode only
    ) -> torch.Tensor:  # [batch, w_dim]
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"the mapping network expects z of shape [batch, {self.z_dim}], got {tuple(z.shape)}")
        w = self.layers(normalize_2nd_moment(z))
        if self.training if update_w_avg is None else update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(dim=0).to(self.w_avg.dtype).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w
