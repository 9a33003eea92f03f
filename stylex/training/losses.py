"""The StylEx objectives, as plain functions of tensors.

Adversarial terms use the non-saturating logistic loss of the GAN literature; regularisers are
R1 (gradient penalty on real images) and path-length regularisation; the StylEx-specific terms
are the reconstruction losses of the encoder path and the classifier KL, which ties the
generator's output to the class probabilities it was conditioned on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def d_logistic_loss(
    real_logits: torch.Tensor,  # [B, 1] discriminator output on real images
    fake_logits: torch.Tensor,  # [B', 1] discriminator output on generated images
) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))) with D = sigmoid(logits), averaged over each batch."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the non-saturating generator loss."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(
    real_img: torch.Tensor,  # [B, C, H, W], requires_grad, the input that produced real_logits
    real_logits: torch.Tensor,  # [B, 1]
) -> torch.Tensor:
    """Mean over the batch of the squared gradient norm of D at real images (Mescheder et al. 2018).

    Computed with ``create_graph=True`` so the penalty itself can be differentiated w.r.t. D's
    parameters; call it outside autocast so the squared gradients are float32.
    """
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_img, create_graph=True)
    return grad.float().square().sum(dim=[1, 2, 3]).mean()


def path_length_penalty(
    img: torch.Tensor,  # [B, C, H, W] generated from w
    w: torch.Tensor,  # [B, W] the latent that produced img, requires_grad
    pl_mean: torch.Tensor,  # [] running mean of the path lengths (buffer, updated in place)
    decay: float = 0.01,
) -> torch.Tensor:
    """Path-length regulariser of StyleGAN2: ``(|J_w^T y| - a)^2`` for image-space noise y.

    ``y`` is scaled by ``1 / sqrt(H * W)`` so the expected length does not depend on the
    resolution; ``a`` follows the lengths with an exponential moving average.
    """
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img.float() * noise).sum(), w, create_graph=True)
    lengths = grad.float().square().sum(dim=1).sqrt()  # [B]
    with torch.no_grad():
        pl_mean.copy_(pl_mean.lerp(lengths.mean(), decay))
    return (lengths - pl_mean).square().mean()


def classifier_kl(
    target_probs: torch.Tensor,  # [B, K] class probabilities the image should carry (no gradient)
    logits: torch.Tensor,  # [B, K] classifier logits on the generated image
) -> torch.Tensor:
    """KL(target ‖ softmax(logits)) averaged over the batch, in nats."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_q, target_probs.detach().float(), reduction="batchmean")


def class_group_norm(
    weights: list[torch.Tensor],  # per style layer [channels, c_dim]: Generator.class_weights()
) -> torch.Tensor:  # [num_styles] what the class can move each style coordinate by
    """The group-lasso groups of the class conditioning: per style coordinate, the L2 norm of
    its class weights after removing their mean over the classes. The class vector holds
    probabilities that sum to 1, so a shift shared by every class column is a constant (the
    bias's business) and only the centred weights move the coordinate with the class."""
    rows = torch.cat([w.float() for w in weights])
    if rows.shape[1] > 1:
        rows = rows - rows.mean(dim=1, keepdim=True)
    # sqrt(x + eps): the norm's gradient stays finite at a row that has reached zero
    return (rows.square().sum(dim=1) + 1e-12).sqrt()


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference."""
    return (a - b).abs().mean()


def laplacian_pyramid(x: torch.Tensor, levels: int = 3) -> list[torch.Tensor]:
    """Band-pass levels of ``x`` [B, C, H, W], finest first: ``level_j = g_j - up(g_{j+1})``
    with ``g_0 = x``, ``g_{j+1}`` its 2x2 box average and ``up`` bilinear upsampling; the coarse
    remainder ``g_levels`` is left out (the plain L1 covers it). Sides that cannot be halved end
    the pyramid early."""
    out = []
    g = x
    for _ in range(levels):
        if min(g.shape[-2:]) < 2 or g.shape[-1] % 2 or g.shape[-2] % 2:
            break
        low = F.avg_pool2d(g, 2)
        out.append(g - F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False))
        g = low
    return out


def laplacian_l1(a: torch.Tensor, b: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Sum over the band-pass levels of the mean absolute difference of ``a`` and ``b``.

    Pixel L1 on a whole image is dominated by its large smooth regions: a generator learning to
    reconstruct a fundus gets its colour and size right long before it places an optic disc or a
    lesion a few pixels across, since those few pixels weigh little in the mean. Each band-pass
    level is averaged over its own pixels, so a small structure's edges count as much as the
    smooth regions do in the coarse levels. In the spirit of the Laplacian-pyramid loss of
    Bojanowski et al. (2018), "Optimizing the Latent Space of Generative Networks".

    The pyramid is linear, so one pyramid of ``a - b`` gives every level's difference."""
    return sum((level.abs().mean() for level in laplacian_pyramid(a.float() - b.float(), levels)),
               a.new_zeros((), dtype=torch.float32))
