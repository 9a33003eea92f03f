"""The rendering engine of AttFind: renders styles, edited or not, and classifies the renders.

:class:`EffectEvaluator` holds a generator and a classifier and answers three questions:

- :meth:`~EffectEvaluator.log_probs`: the classifier's log-probabilities of full renders;
- :meth:`~EffectEvaluator.edit_log_probs`: those of many single-coordinate edits of a few
  images. The edits of all images are sorted by layer and rendered ``batch_size`` at a time,
  each batch resuming from the state the unedited images had when entering the earliest edited
  layer (StyleSpace prefix reuse, :meth:`StyleSpace.cache_rows`), so edits of different images
  share forward passes;
- :meth:`~EffectEvaluator.probability_jacobian`: the gradient of every class probability with
  respect to every style coordinate (the first-order estimate behind pre-screening).

It never changes the networks' weights or modes; renders use ``noise_mode="const"`` by default
so that renders of equal styles are identical. Every method takes ``noise``: the images' own
noise maps (``[B or 1, 1, r, r]`` per noise layer, as an encoder trained with
``model.encoder_noise`` gives them), which then follow their image into every edit of it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from stylex.stylespace import NoiseMaps, StyleSpace, noise_rows


class EffectEvaluator(nn.Module):
    """Renders styles (edited or not) and classifies the renders.

    Holds the generator and classifier as submodules so that the pair moves between devices as
    one module; it never changes their weights or modes.
    """

    def __init__(
        self,
        generator: nn.Module,  # stylex Generator (the EMA one of a run)
        classifier: nn.Module,  # images [B, 3, R, R] in [-1, 1] -> logits [B, K]
        batch_size: int | None = None,  # renders per forward pass; None = by device (see AttFindConfig)
        reuse_prefix: bool = True,
        noise_mode: str = "const",
    ) -> None:
        super().__init__()
        self.generator = generator
        self.classifier = classifier
        self.space = StyleSpace(generator)
        self._batch_size = None if batch_size is None else int(batch_size)
        self.reuse_prefix = bool(reuse_prefix)
        self.noise_mode = noise_mode

    # Never switch the wrapped networks to training mode (BatchNorm statistics must not move).
    def train(self, mode: bool = True) -> "EffectEvaluator":
        return self

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def batch_size(self) -> int:
        if self._batch_size is not None:
            return self._batch_size
        if self.device.type == "cpu":
            return 64
        r = int(getattr(self.generator, "resolution", 64))
        return int(min(512, max(16, 512 * (64 / r) ** 2)))

    def classify(
        self,
        images: torch.Tensor,  # [B, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # [B, K] float32 log-probabilities
        return self.classifier(images).float().log_softmax(dim=-1)

    def render(
        self,
        flat: torch.Tensor,  # [B, S] styles
        noise: NoiseMaps | None = None,  # the images' noise maps; None = noise_mode
        **kwargs,  # from_layer, cache (StyleSpace.render)
    ) -> torch.Tensor:  # [B, 3, R, R]
        """One render of ``flat`` with this evaluator's noise (the maps when given)."""
        return self.space.render(flat, noise_mode=self.noise_mode, noise=noise, **kwargs)

    def log_probs(
        self,
        flat: torch.Tensor,  # [B, S] styles
        noise: NoiseMaps | None = None,  # [B or 1, 1, r, r] per noise layer; None = noise_mode
    ) -> torch.Tensor:  # [B, K]
        """Log-probabilities of full renders, ``batch_size`` at a time."""
        b = self.batch_size
        outs = [self.classify(self.render(flat[i : i + b], noise_rows(noise, slice(i, i + b))))
                for i in range(0, flat.shape[0], b)]
        return torch.cat(outs) if outs else flat.new_zeros(0, 0)

    def _chunks(
        self,
        coords: torch.Tensor,  # [M] sorted ascending
    ) -> list[tuple[int, int]]:
        """``(start, stop)`` slices of ``coords`` rendered together.

        Edits of one layer resume from that layer. Small groups of consecutive layers are
        merged and resumed from the earliest of them: a few rows more of the deeper layers cost
        less than an extra, half-empty forward pass.
        """
        m = coords.shape[0]
        if m == 0:
            return []
        layer_starts = torch.tensor([self.space.offsets[name] for name in self.space.layer_names])
        layer_of = torch.bucketize(coords.cpu(), layer_starts, right=True) - 1  # [M] layer index
        bounds = [0] + (torch.nonzero(layer_of[1:] != layer_of[:-1]).flatten() + 1).tolist() + [m]
        min_chunk = max(1, self.batch_size // 4)
        chunks: list[tuple[int, int]] = []
        start = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            size = a - start
            if size > 0 and (size >= min_chunk or (b - start) > self.batch_size):
                chunks.append((start, a))
                start = a
            while b - start > self.batch_size:  # a layer larger than one batch
                chunks.append((start, start + self.batch_size))
                start += self.batch_size
        if start < m:
            chunks.append((start, m))
        return chunks

    def edit_log_probs(
        self,
        flat: torch.Tensor,  # [B, S] styles of B images
        image: torch.Tensor,  # [M] int64: which image each edit belongs to
        coords: torch.Tensor,  # [M] int64: the coordinate it changes (any order, repeats allowed)
        values: torch.Tensor,  # [M]: the coordinate's new value
        noise: NoiseMaps | None = None,  # the B images' noise maps; None = noise_mode
    ) -> tuple[torch.Tensor, torch.Tensor]:  # log p of the unedited renders [B, K], of each edit [M, K]
        """Classify B images under M single-coordinate edits.

        The edits of all images are sorted by layer and rendered ``batch_size`` at a time, each
        batch resuming from the state the unedited images had when entering the earliest
        edited layer, so edits of different images share forward passes (small per-image edit
        lists, as under pre-screening, still make full batches).
        """
        assert flat.ndim == 2 and flat.shape[1] == self.space.dim, (
            f"styles must be [B, {self.space.dim}], got {tuple(flat.shape)}"
        )
        m = coords.shape[0]
        assert coords.ndim == 1 and image.shape == values.shape == coords.shape, (
            f"image, coords and values must all be [M], got {tuple(image.shape)}, {tuple(coords.shape)}, "
            f"{tuple(values.shape)}"
        )
        cache: dict | None = {} if self.reuse_prefix else None
        base = self.log_probs(flat, noise) if cache is None else self.classify(
            self.render(flat, noise, cache=cache))
        order = torch.argsort(coords, stable=True)
        sorted_coords, sorted_values, sorted_image = coords[order], values[order], image[order]
        out = torch.empty(m, base.shape[1], device=base.device)
        for a, b in self._chunks(sorted_coords):
            rows = sorted_image[a:b]
            edited = flat[rows].scatter(1, sorted_coords[a:b, None], sorted_values[a:b, None].to(flat.dtype))
            maps = noise_rows(noise, rows)  # each edit keeps its image's noise maps
            if cache is None:
                img = self.render(edited, maps)
            else:
                start = self.space.layer_of(int(sorted_coords[a]))
                # The state entering `start` of the image each row edits (the prefix is unedited).
                state = self.space.cache_rows(cache, start, rows)
                img = self.render(edited, maps, from_layer=start, cache=state)
            out[order[a:b]] = self.classify(img)
        return base, out

    def probability_jacobian(
        self,
        flat: torch.Tensor,  # [B, S]
        noise: NoiseMaps | None = None,  # the B images' noise maps; None = noise_mode
    ) -> tuple[torch.Tensor, torch.Tensor]:  # log p [B, K]; d p_k / d s_i [B, K, S]
        """Gradient of every class probability with respect to every style coordinate.

        One backward pass per image: the image is repeated K times and row k differentiates
        p_k. Parameters receive no gradient (``torch.autograd.grad`` on the styles only).
        """
        b, s = flat.shape
        with torch.enable_grad():
            k = None
            logps, jacs = [], []
            step = max(1, self.batch_size // 8)
            for i in range(0, b, step):
                x = flat[i : i + step].detach()
                rows = torch.arange(i, i + x.shape[0], device=x.device)
                if k is None:
                    with torch.no_grad():
                        k = self.classify(self.render(x[:1], noise_rows(noise, rows[:1]))).shape[1]
                rep = x.repeat_interleave(k, dim=0).requires_grad_(True)  # [bk * K, S]
                maps = noise_rows(noise, rows.repeat_interleave(k))
                logp = self.classify(self.render(rep, maps))  # [bk * K, K]
                probs = logp.exp().view(-1, k, k)
                diag = torch.diagonal(probs, dim1=1, dim2=2)  # [bk, K]: row k of copy k
                (grad,) = torch.autograd.grad(diag.sum(), rep)
                logps.append(logp.view(-1, k, k)[:, 0].detach())
                jacs.append(grad.view(-1, k, s).detach())
        return torch.cat(logps), torch.cat(jacs)
