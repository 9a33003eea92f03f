"""AttFind: which style coordinates does the classifier react to?

For every image ``n``, style coordinate ``i`` and direction ``d`` (0 = toward the coordinate's
minimum over a reference image set, 1 = toward its maximum) AttFind renders the image with

    s_i  <-  s_i + shift_size * (target_d[i] - s_i)        (shift_size 1 = exactly the min/max)

and records the classifier's log-probabilities of the edited render. An *effect* is the change
relative to the unedited render, measured either as a probability change (``measure="prob"``)
or as a change of the one-vs-rest logit ``log p_c - log(1 - p_c)`` (``measure="logit"``).

From the effects:

- unstable images (more than ``unstable_count`` coordinates change some class probability by
  more than ``unstable_threshold``) are set aside, as their output is fragile;
- the class-specific top-K for class c (the paper's AttFind) is picked greedily among the
  stable images not predicted as c: each step takes the (coordinate, direction) with the
  largest mean effect toward c over the images not yet explained, and an image counts as
  explained once its accumulated effect reaches the one-vs-rest decision boundary of c (or
  ``cap``). Multi-class is handled one-vs-rest;
- the image-specific top-K of an image are the coordinates whose change lowers its predicted
  class the most.

Speed. Only the layers at and after an edited style are re-rendered (StyleSpace prefix reuse),
and many edits share one forward pass (:mod:`stylex.explain.evaluator`). With ``prescreen``
set, one gradient per image gives a first-order estimate of every effect, and only the most
promising (coordinate, direction) pairs are rendered: the ``prescreen`` best per class (on all
images) and the ``prescreen_image`` best per image (on that image). Pairs that were not
rendered hold NaN in :attr:`AttFindResult.logp`.

Scale-out. The per-image work runs as the ``predict_step`` of a LightningModule, either in a
plain loop on one device or through Lightning's predict loop over all devices of a machine
(``trainer_kwargs``; :mod:`stylex.explain.predict`).

This module holds the search itself, :class:`AttFind`; its settings, :class:`AttFindConfig`,
are in :mod:`stylex.explain.config` (re-exported here), the measures in
:mod:`stylex.explain.measures`, the rankings and the result in :mod:`stylex.explain.result`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from stylex.explain.config import AttFindConfig
from stylex.explain.evaluator import EffectEvaluator
from stylex.explain.measures import shift_targets, to_measure
from stylex.explain.predict import AttFindPredictor, ImageSet, merge_effects, merge_screen, run_predict
from stylex.explain.result import AttFindResult, greedy_class_ranking, searched_coordinates
from stylex.stylespace import check_noise, encode_noise_maps

__all__ = ["AttFind", "AttFindConfig"]


# ============================================================================ AttFind
class AttFind:
    """Runs the search on styles; see the module docstring for the method.

    Example::

        finder = AttFind(export.generator, export.classifier, AttFindConfig(prescreen=32))
        flat = finder.encode(export.encoder, images)          # [N, S]
        maps = finder.noise_maps(export.encoder, images)      # None unless E gives noise maps
        result = finder.run(flat, top_k=4, noise=maps)
        result.rankings[1][0].to_dict()
    """

    def __init__(
        self,
        generator: nn.Module,
        classifier: nn.Module,
        config: AttFindConfig | None = None,
        device: str | torch.device | None = None,  # None = where the generator is
    ) -> None:
        self.config = config or AttFindConfig()
        self.evaluator = EffectEvaluator(
            generator, classifier, batch_size=self.config.batch_size,
            reuse_prefix=self.config.reuse_prefix, noise_mode=self.config.noise_mode,
        )
        if device is not None:
            self.evaluator.to(device)
        self.space = self.evaluator.space

    @property
    def device(self) -> torch.device:
        return self.evaluator.device

    # ---------------------------------------------------------------- styles of the images
    @torch.no_grad()
    def encode(
        self,
        encoder: nn.Module,  # images -> w [B, w_dim] or [B, num_ws, w_dim]
        images: torch.Tensor,  # [N, 3, R, R] in [-1, 1]
    ) -> torch.Tensor:  # [N, S] on the CPU
        """Styles of real images: ``w = E(x)``, conditioned on the classifier's probabilities."""
        g = self.evaluator.generator
        r = int(getattr(g, "resolution", images.shape[-1]))
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (r, r):
            raise ValueError(f"images must be [N, 3, {r}, {r}] in [-1, 1] (the model's resolution), "
                             f"got {tuple(images.shape)}")
        out = []
        step = self.evaluator.batch_size
        for i in range(0, images.shape[0], step):
            x = images[i : i + step].to(self.device, torch.float32)
            c = self.evaluator.classify(x).exp()
            out.append(self.space.flat_styles(encoder(x), c).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.space.dim)

    @torch.no_grad()
    def noise_maps(
        self,
        encoder: nn.Module,  # stylex Encoder
        images: torch.Tensor,  # [N, 3, R, R] in [-1, 1]
    ) -> dict[str, torch.Tensor] | None:  # noise layer -> [N, 1, r, r] on the CPU; None = E has none
        """The encoder's noise maps of real images, when it was trained to give them
        (``model.encoder_noise``): the generator then draws each image's layout from its own
        maps, and every render of an image (edited or not) must use them."""
        return encode_noise_maps(encoder, images, self.evaluator.batch_size, self.device)

    @torch.no_grad()
    def styles_of(
        self,
        w: torch.Tensor,  # [N, w_dim] or [N, num_ws, w_dim] latents, e.g. refined ones (stylex.explain.refine)
        c: torch.Tensor,  # [N, K] class probabilities they are conditioned on
    ) -> torch.Tensor:  # [N, S] on the CPU
        """Styles of given latents under given class vectors."""
        step = self.evaluator.batch_size
        out = [self.space.flat_styles(w[i : i + step].to(self.device), c[i : i + step].to(self.device)).cpu()
               for i in range(0, w.shape[0], step)]
        return torch.cat(out) if out else torch.zeros(0, self.space.dim)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        seed: int = 0,
        truncation_psi: float = 1.0,
    ) -> torch.Tensor:  # [num, S] on the CPU
        """Styles of generated images: ``w = mapping(z)`` with one-hot class vectors cycling
        through the classes, so every class is represented."""
        g = self.evaluator.generator
        gen = torch.Generator().manual_seed(int(seed))
        z = torch.randn(num, g.z_dim, generator=gen).to(self.device)
        w = g.mapping(z, truncation_psi=truncation_psi, update_w_avg=False)
        c = torch.nn.functional.one_hot(torch.arange(num) % g.c_dim, g.c_dim).float().to(self.device)
        return self.space.flat_styles(w, c).cpu()

    # ---------------------------------------------------------------- the search
    def run(
        self,
        flat: torch.Tensor,  # [N, S] styles of the explained images
        top_k: int = 4,
        classes: Iterable[int] | None = None,  # None = every class
        reference: torch.Tensor | None = None,  # [M, S] styles whose min/max set the targets; None = flat
        trainer_kwargs: dict[str, Any] | None = None,  # Lightning Trainer args for multi-device predict
        images_per_step: int | None = None,  # images per predict step; None = enough for a few full batches
        progress: Callable[[str], None] | None = None,
        show_progress: bool | None = None,  # progress bars: None = when stderr is a terminal
        noise: dict[str, torch.Tensor] | None = None,  # the images' own noise maps (noise_maps); None = noise_mode
    ) -> AttFindResult:
        """Rank the style coordinates of ``flat`` (from :meth:`encode` or :meth:`sample`) by their
        effect on the classifier: ``result.rankings[c]`` holds class c's top ``top_k``
        :class:`~stylex.explain.result.Attribute` s (layer, channel, direction, mean effect)."""
        cfg = self.config
        space = self.space
        if flat.ndim != 2 or flat.shape[1] != space.dim:
            raise ValueError(f"styles must be [N, {space.dim}], got {tuple(flat.shape)}")
        if flat.shape[0] == 0:
            raise ValueError("AttFind needs at least one image")
        if check_noise(noise, flat.shape[0]) is not None:
            noise = {name: m.detach().float().cpu() for name, m in noise.items()}
        if not 1 <= int(top_k) <= space.dim:
            raise ValueError(f"top_k must lie in [1, {space.dim}] (the number of style coordinates), got {top_k}")
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        flat = flat.detach().float().cpu()
        stats = space.statistics(flat if reference is None else torch.cat([reference.detach().float().cpu(), flat]))
        predictor = AttFindPredictor(self.evaluator, stats["min"], stats["max"], cfg.shift_size)
        if trainer_kwargs is None:
            predictor.to(self.device)
        targets = shift_targets(flat, stats["min"], stats["max"], cfg.shift_size)
        n, s = flat.shape
        say = progress or (lambda msg: None)

        # ---- which pairs each image renders (only those of the searched coordinates)
        searched = searched_coordinates(space, cfg.layers)
        searched_pairs = torch.nonzero(searched.repeat_interleave(2)).flatten()  # pair id = 2 * coordinate + direction
        estimate = None
        if cfg.prescreen is None:
            pair_lists = [searched_pairs] * n
            mode = "exhaustive"
        else:
            say(f"pre-screening {n} images with one gradient each")
            t = time.perf_counter()
            predictor.phase = "screen"
            step = images_per_step or max(1, self.evaluator.batch_size // 8)
            outs = run_predict(predictor, ImageSet(flat, None, noise), step, trainer_kwargs,
                               desc="AttFind: pre-screening", progress=show_progress)
            logp0, jac = merge_screen(outs, n)
            timings["prescreen"] = time.perf_counter() - t
            estimate = jac.permute(0, 2, 1)[:, :, None, :] * (targets - flat[:, :, None])[..., None]  # [N,S,2,K]
            estimate[:, ~searched] = math.nan  # coordinates outside the search are neither rendered nor estimated
            pair_lists = self._candidates(estimate, logp0, classes, top_k)
            mode = "prescreen"

        say(f"rendering {sum(len(p) for p in pair_lists)} edits of {n} images")
        t = time.perf_counter()
        predictor.phase = "effects"
        edits = sum(len(p) for p in pair_lists) / n
        step = images_per_step or max(1, min(n, math.ceil(4 * self.evaluator.batch_size / max(1.0, edits))))
        outs = run_predict(predictor, ImageSet(flat, pair_lists, noise), step, trainer_kwargs,
                           desc="AttFind: rendering edits", progress=show_progress)
        logp_base, logp = merge_effects(outs, n, s)
        timings["effects"] = time.perf_counter() - t
        result = self.rank(flat, targets, logp_base, logp, top_k, classes, estimate)
        result.noise = noise
        result.mode = mode
        result.seconds = time.perf_counter() - t0
        result.timings = timings
        return result

    def _candidates(
        self,
        estimate: torch.Tensor,  # [N, S, 2, K] first-order probability changes
        logp_base: torch.Tensor,  # [N, K]
        classes: Iterable[int] | None,
        top_k: int,
    ) -> list[torch.Tensor]:  # per image: pair ids to render
        cfg = self.config
        n, s, _, k = estimate.shape
        if cfg.measure == "logit":
            # d logit / d p = 1 / (p (1 - p)): the same first-order estimate in logit units
            p = logp_base.exp().clamp(1e-6, 1 - 1e-6)
            estimate = estimate / (p * (1 - p))[:, None, None, :]
        pred = logp_base.argmax(dim=1)
        m = min(2 * s, max(int(cfg.prescreen), top_k))
        m_img = cfg.prescreen_image if cfg.prescreen_image is not None else max(4, m // 2)
        m_img = min(2 * s, m_img)
        searched = searched_coordinates(self.space, cfg.layers).repeat_interleave(2)  # [2S], by pair id

        def best(score: torch.Tensor, count: int) -> torch.Tensor:  # the `count` best searched pair ids
            ids = torch.topk(torch.nan_to_num(score.flatten(), nan=-math.inf), count).indices
            return ids[searched[ids]]

        shared: list[torch.Tensor] = []
        for c in _class_list(classes, k):
            pool = pred != c
            rows = estimate[pool] if pool.any() else estimate
            shared.append(best(rows[..., c].mean(dim=0), m))
        shared_ids = torch.unique(torch.cat(shared)) if shared else torch.zeros(0, dtype=torch.long)
        lists = []
        for i in range(n):
            own = best(-estimate[i, :, :, pred[i]], m_img) if m_img else shared_ids[:0]
            lists.append(torch.unique(torch.cat([shared_ids, own])))
        return lists

    def rank(
        self,
        flat: torch.Tensor,  # [N, S]
        targets: torch.Tensor,  # [N, S, 2]
        logp_base: torch.Tensor,  # [N, K]
        logp: torch.Tensor,  # [N, S, 2, K] (NaN = not rendered)
        top_k: int,
        classes: Iterable[int] | None = None,
        estimate: torch.Tensor | None = None,  # [N, S, 2, K] first-order probability changes
    ) -> AttFindResult:
        """Stability filter and class rankings from rendered effects."""
        cfg = self.config
        n, s = flat.shape
        k = logp_base.shape[1]
        warnings: list[str] = []
        # ---- stability: rendered probability changes, first-order estimates where not rendered
        dp = logp.exp() - logp_base.exp()[:, None, None, :]
        if estimate is not None:
            dp = torch.where(torch.isnan(dp), estimate, dp)
        sensitive = (torch.nan_to_num(dp, nan=0.0).abs().amax(dim=(2, 3)) > cfg.unstable_threshold).sum(dim=1)
        searched = int(searched_coordinates(self.space, cfg.layers).sum())
        limit = cfg.unstable_count if cfg.unstable_count is not None else max(1, searched // 10)
        stable = sensitive <= limit
        if not stable.any():
            warnings.append(
                f"every image has more than {limit} coordinates changing a class probability by more than "
                f"{cfg.unstable_threshold}; ranking over all images instead (raise unstable_count or "
                "unstable_threshold to silence this)"
            )
            stable = torch.ones(n, dtype=torch.bool)

        result = AttFindResult(
            space=self.space, config=cfg, flat=flat, targets=targets, logp_base=logp_base, logp=logp,
            stable=stable, sensitive=sensitive, classes=_class_list(classes, k), rankings={}, pools={},
            top_k=int(top_k), mode="exhaustive", seconds=0.0, estimate=estimate, warnings=warnings,
        )
        pred = result.predicted
        eff = result.effects()  # [N, S, 2, K]
        base_measure = to_measure(logp_base, cfg.measure)  # [N, K]
        boundary = 0.5 if cfg.measure == "prob" else 0.0
        for c in result.classes:
            pool = torch.nonzero(stable & (pred != c)).flatten()
            if pool.numel() == 0:
                pool = torch.nonzero(stable).flatten()
                warnings.append(
                    f"class {c}: every stable image is already predicted as this class; its ranking "
                    "uses them all (explain more images for a sharper ranking)"
                )
            need = (torch.full((pool.numel(),), float(cfg.cap)) if cfg.cap is not None
                    else (boundary - base_measure[pool, c]).clamp_min(0.0))
            picks = greedy_class_ranking(eff[pool][..., c], need, int(top_k))
            result.pools[c] = pool
            ranked = []
            for r, (i, d) in enumerate(picks, start=1):
                a = result.attribute(i, d, c, pool)
                a.rank = r
                ranked.append(a)
            if len(ranked) < top_k:
                warnings.append(f"class {c}: only {len(ranked)} of {top_k} attributes could be ranked "
                                "(too few pairs were rendered on every image; raise prescreen)")
            result.rankings[c] = ranked
        return result


def _class_list(classes: Iterable[int] | None, k: int) -> list[int]:
    out = list(range(k)) if classes is None else [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < k]
    if bad:
        raise ValueError(f"classes {bad} are out of range: the classifier has {k} classes (0..{k - 1})")
    return out
