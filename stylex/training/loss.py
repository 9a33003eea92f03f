"""The StylEx objective, in phases.

One training step has two updates, and the objective is split into the phases that feed them
(the shape of StyleGAN2-ADA's loss: main terms and lazy regularisers apart):

==========  ====================================================================  ===========
phase       terms                                                                 trains
==========  ====================================================================  ===========
renders     x̂ and x̃ of the step's paths, once, with G's (and E's) graph; D main    (none)
            reads them detached, G main backpropagates through them
D main      logistic loss, real images vs generated ones, given the class output  D
D reg       lazy R1 on the same real pass, every ``r1_interval`` D steps (f32)    D
G main      encoder path ``x̂ = G(E(x) ⊕ C(x))``: L1 + perceptual + latent L1 +    G (and E)
            KL(C(x) ‖ C(x̂)) + adversarial; noise path ``x̃ = G(M(z) ⊕ p̃)``:
            adversarial + KL(p̃ ‖ C(x̃))
G reg       lazy path-length penalty, every ``pl_interval`` G steps (f32)          G
E fit       after training: E alone against the frozen EMA generator              E
==========  ====================================================================  ===========

Every image D sees goes through the augmentation pipe first (``augment``, see
:mod:`stylex.training.augment`): reals and fakes of both paths, in D main, in R1 (whose
gradient is taken at the un-augmented reals, through the pipe) and in the generator's
adversarial terms. The classifier, and so the KL terms, and the reconstruction terms see the
un-augmented images; the E fit never augments.

Each phase returns ``(loss, logs)``; :class:`~stylex.training.module.StylexModule` owns the
optimisers, the counters that decide when a lazy phase is due, and the logging.

:class:`LossConfig` holds every option and its default: it is the one source of these values
(the Hydra group ``loss`` is built from it; ``configs/loss/stylex.yaml`` only ties R1 to the
model preset).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Mapping, NamedTuple

import torch
import torch.nn as nn

from stylex.networks.generator import mix_latents
from stylex.networks.layers import NOISE_MODES
from stylex.training import losses
from stylex.training.perceptual import ClassifierFeatures, feature_distance, resolve_backend

BATCH_MODES = ("both", "alternate")
D_FAKES = ("both", "encoder", "noise")
ENCODER_LOSSES = ("reconstruction", "all")
AUGMENTS = ("auto", "ada", "fixed", "none")


@dataclass
class LossConfig:
    """Weights and schedules of the StylEx objective (``loss.*`` on the command line)."""

    adv: float = 1.0  # non-saturating adversarial loss of the generator
    rec_l1: float = 1.0  # L1(x, x̂), pixels in [-1, 1]
    rec_lap: float = 0.0  # L1 of the band-pass (Laplacian-pyramid) levels of x and x̂: weight on small detail
    perceptual: float = 1.0  # perceptual(x, x̂)
    perceptual_backend: str = "auto"  # auto | lpips | classifier | none (auto: LPIPS if its weights are local)
    latent_l1: float = 0.1  # L1(E(x̂), E(x))
    kl_rec: float = 1.0  # KL(C(x) ‖ C(x̂)) on the encoder path
    kl_gen: float = 1.0  # KL(p̃ ‖ C(G(z, p̃))) on the noise path
    # KL(p̃ ‖ C(G(E(x), p̃))) with the class vector p̃ of another image (and x's noise maps when E
    # encodes them), E's outputs detached, with the adversarial term beside it: the class swapped
    # on real styles and layouts (0 = off; see StylexLoss.render)
    kl_swap: float = 0.0
    # Group lasso on the class conditioning: this weight times the sum, over style coordinates,
    # of the norm of the (class-centred) weights by which the class vector moves each one. The
    # class then enters StyleSpace through few coordinates, and the KL terms make those few carry
    # what the classifier needs: the single-coordinate edits AttFind ranks (0 = off)
    class_sparsity: float = 0.0
    r1_gamma: float = 0.05  # R1 weight (the penalty is gamma / 2 · |∇D|²); the model presets set it
    r1_interval: int = 16  # lazy R1: every N discriminator steps (0 = never)
    pl_weight: float = 0.0  # path-length regularisation (0 = off; StyleGAN2 uses 2)
    pl_interval: int = 4  # lazy path length: every N generator steps
    pl_decay: float = 0.01  # decay of the running mean of path lengths
    # StyleGAN's mixing regularisation on the noise path: the share of its images whose styles come
    # from two latents, switching at a random layer (0 = off; StyleGAN2 uses 0.9)
    style_mixing: float = 0.0
    # The noise inputs of the encoder path's renders: random (fresh per render, as on the noise
    # path) | const (the fixed maps every explanation renders with) | none. Under random noise the
    # reconstruction terms penalise any use of noise, which keeps the learnt strengths at zero.
    rec_noise: str = "random"
    batch_mode: str = "both"  # both | alternate: encoder and noise paths every step, or in turns
    d_fakes: str = "both"  # which fakes the discriminator sees: both | encoder | noise
    encoder_losses: str = "reconstruction"  # what trains E: reconstruction (pixel, perceptual, latent) | all
    # auto | ada | fixed | none: augment what D sees, with p adapted to D's overfitting (ada), constant
    # (fixed), or not at all; auto = ada, except on generated data (train() resolves it), whose
    # size is not limited and where an early, confident D made ADA worsen short runs
    augment: str = "auto"
    augment_p: float = 0.0  # augmentation probability: the starting p of ada, the constant p of fixed
    ada_target: float = 0.6  # ada: the target of r_t = E[sign(D(real))]; p rises while r_t is above it
    ada_interval: int = 4  # ada: discriminator steps between updates of p
    ada_kimg: float = 10.0  # ada: kimg for p to go 0 -> 1 (paper: 500 for millions; runs here see 10-60k: 0.1 per 1k)
    # D also reads the frozen classifier's feature maps of every image it sees, through heads of
    # its own (stylex.networks.discriminator.FeatureHeads), and adds their logit to its own
    d_features: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"loss.{f.name} must be a number, got {value!r}")
        if not 0.0 <= self.style_mixing <= 1.0:
            raise ValueError(f"loss.style_mixing must be in [0, 1] (a share of the noise-path images), "
                             f"got {self.style_mixing!r}")
        if self.class_sparsity < 0:
            raise ValueError(f"loss.class_sparsity must be >= 0 (the group-lasso weight; 0 = off), "
                             f"got {self.class_sparsity!r}")
        if self.rec_noise not in NOISE_MODES:
            raise ValueError(f"loss.rec_noise must be 'random', 'const' or 'none', got {self.rec_noise!r}")
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"loss.batch_mode must be 'both' or 'alternate', got {self.batch_mode!r}")
        if self.d_fakes not in D_FAKES:
            raise ValueError(f"loss.d_fakes must be 'both', 'encoder' or 'noise', got {self.d_fakes!r}")
        if self.encoder_losses not in ENCODER_LOSSES:
            raise ValueError(f"loss.encoder_losses must be 'reconstruction' or 'all', got {self.encoder_losses!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"loss.augment must be 'auto', 'ada', 'fixed' or 'none', got {self.augment!r}")
        if not 0.0 <= self.augment_p <= 1.0:
            raise ValueError(f"loss.augment_p must be in [0, 1] (a probability), got {self.augment_p!r}")
        if not -1.0 <= self.ada_target <= 1.0:
            raise ValueError(f"loss.ada_target must be in [-1, 1] (the range of r_t), got {self.ada_target!r}")
        if self.ada_interval < 1 or not self.ada_kimg > 0:
            raise ValueError(f"loss.ada_interval must be >= 1 and loss.ada_kimg > 0, "
                             f"got {self.ada_interval!r} and {self.ada_kimg!r}")
        if not isinstance(self.d_features, bool):
            raise ValueError(f"loss.d_features must be true or false, got {self.d_features!r}")
        resolve_backend(self.perceptual_backend)  # names the option when the backend is unknown

    @classmethod
    def coerce(cls, loss: "LossConfig | Mapping[str, Any] | None") -> "LossConfig":
        """``loss`` itself, or a config built (and checked) from a mapping of options."""
        if isinstance(loss, cls):
            return loss
        options = dict(loss or {})
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown loss option(s) {unknown}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepInputs(NamedTuple):
    """What every phase of one step reads: the batch and the frozen classifier's view of it."""

    x: torch.Tensor  # [B, 3, R, R] real images in [-1, 1]
    c_real: torch.Tensor  # [B, K] C(x) as probabilities: the encoder path's conditioning
    c_noise: torch.Tensor  # [B, K] the noise path's conditioning: c_real of other images of the batch
    feats_real: list[torch.Tensor]  # classifier features of x (perceptual backend "classifier"), or []


class Renders(NamedTuple):
    """The generator's images of one step, rendered once: the G phase backpropagates through
    them and the D phase reads them detached (they are the same images either way: D main
    would otherwise run E and G again, without gradients, on the same inputs)."""

    w: torch.Tensor | None  # [B, L, w_dim] or [B, w_dim]: E(x), with E's graph (encoder path)
    w_in: torch.Tensor | None  # what G starts from: a detached leaf copy of w (see _encoder_surrogate), or w
    x_rec: torch.Tensor | None  # [B, 3, R, R] G(w_in, C(x)), with G's graph (encoder path)
    x_gen: torch.Tensor | None  # [B, 3, R, R] G(z, c_noise), with G's graph (noise path)
    maps: dict[str, torch.Tensor] | None = None  # E's noise maps of x, with E's graph (None: E encodes w alone)
    maps_in: dict[str, torch.Tensor] | None = None  # what G's noise inputs take: leaf copies of maps, or maps
    x_swap: torch.Tensor | None = None  # [B, 3, R, R] G(E(x), c_noise), E detached (loss.kl_swap > 0)


Logs = dict[str, torch.Tensor]


class StylexLoss:
    """The phases of the StylEx objective over the networks of a :class:`StylexModule`.

    Holds references, not copies, and is not an ``nn.Module``: the networks stay registered in
    (and are moved, saved and synchronised by) the LightningModule alone.
    """

    def __init__(
        self,
        config: LossConfig,
        G: nn.Module,  # the live generator
        D: nn.Module,
        E: nn.Module,
        G_ema: nn.Module,  # its moving average (the encoder fit's target)
        C: ClassifierFeatures,  # the frozen classifier, with its intermediate features
        lpips: nn.Module | None = None,  # the LPIPS distance, when that is the perceptual backend
        augment: nn.Module | None = None,  # AugmentPipe applied to every image D sees; None = no augmentation
        features: ClassifierFeatures | None = None,  # the realism features (perceptual, D's heads); None = C
    ) -> None:
        self.cfg = config
        self.G, self.D, self.E, self.G_ema, self.C = G, D, E, G_ema, C
        self.F = C if features is None else features
        self.perceptual_backend = resolve_backend(config.perceptual_backend) if config.perceptual > 0 else "none"
        self.lpips = lpips
        self.augment = augment
        # D's raw logits on the (augmented) reals of the last D phase: the ADA controller's input.
        self.last_real_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ shared pieces
    def _discriminate(self, img: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """D's logits on ``img`` after the augmentation pipe (differentiable in ``img``); a D with
        feature heads also gets the classifier's feature maps of the augmented image."""
        x = img if self.augment is None else self.augment(img)
        if getattr(self.D, "feature_heads", None) is None:
            return self.D(x, c)
        return self.D(x, c, features=self.F(x)[1])

    def _classify(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The explained classifier's logits of ``x`` and, when asked for (perceptual backend
        "classifier"), the feature network's maps: one pass when the two are the same network."""
        if not (features and self.perceptual_backend == "classifier"):
            return self.C.classifier(x), []
        if self.F is self.C:
            return self.C(x)
        return self.C.classifier(x), self.F(x)[1]

    def _perceptual(self, x_rec, x, feats_rec, feats_real) -> torch.Tensor:
        if self.perceptual_backend == "classifier":
            return feature_distance(feats_rec, [f.detach() for f in feats_real]).mean()
        if self.perceptual_backend == "lpips":
            return self.lpips(x_rec, x).mean()
        return x.new_zeros(())

    @staticmethod
    @contextmanager
    def _float32(device: torch.device) -> Iterator[None]:
        """Full precision inside autocast (for R1 and path length: squared gradients overflow or
        lose all precision in half formats)."""
        with torch.autocast(device_type=device.type, enabled=False):
            yield

    def paths(self, g_step: int) -> tuple[bool, bool]:
        """(encoder path, noise path) taken at this generator step (``batch_mode``)."""
        both = self.cfg.batch_mode == "both"
        return both or g_step % 2 == 0, both or g_step % 2 == 1

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> StepInputs:
        """The classifier pass of a step, shared by every phase."""
        logits_real, feats_real = self._classify(x, features=True)
        c_real = logits_real.float().softmax(dim=1)
        # Class vectors of other images of the batch, so that the generator sees the same
        # distribution of conditionings on both paths.
        c_noise = c_real[torch.randperm(c_real.shape[0], device=c_real.device)]
        return StepInputs(x, c_real, c_noise, feats_real)

    # ------------------------------------------------------------------ renders
    def render(self, inputs: StepInputs, paths: tuple[bool, bool]) -> Renders:
        """The generator's images of the step's paths, with the graphs of G (and E) kept for the
        G phase. Call it while G and E require gradients."""
        x = inputs.x
        use_enc, use_noise = paths
        split = self.cfg.encoder_losses == "reconstruction"
        w = w_in = x_rec = x_gen = maps = maps_in = x_swap = None
        if use_enc:
            w, maps = self.E(x), self.E.noise_maps(x)
            w_in = w.detach().requires_grad_(True) if split else w
            if maps is not None:
                maps_in = {k: v.detach().requires_grad_(True) for k, v in maps.items()} if split else maps
            x_rec = self._encoder_images(w_in, inputs.c_real, maps_in)
            if self.cfg.kl_swap > 0:
                # The image's own styles and layout under another image's class vector: the
                # generator learns to draw, or leave out, what that class needs on real content.
                # E's outputs are detached: this term trains the generator only.
                x_swap = self._encoder_images(w.detach(), inputs.c_noise,
                                              None if maps is None else {k: v.detach() for k, v in maps.items()})
        if use_noise:
            x_gen = self._noise_images(inputs.c_noise, self._layout_maps(x, maps))
        return Renders(w, w_in, x_rec, x_gen, maps, maps_in, x_swap)

    def _encoder_images(
        self,
        w: torch.Tensor,
        c: torch.Tensor,
        maps: Mapping[str, torch.Tensor] | None = None,  # E's noise maps of the images; None: rec_noise's noise
    ) -> torch.Tensor:  # [B, 3, R, R] G(w, c)
        """The encoder path's images for latents ``w = E(x)``, with E's noise maps of x when it
        encodes them and otherwise the noise of ``rec_noise``."""
        return self.G.generate(w, c, noise_mode=self.cfg.rec_noise, noise=maps)

    def _layout_maps(
        self,
        x: torch.Tensor,
        maps: Mapping[str, torch.Tensor] | None,  # E's maps of x when the step already has them
    ) -> dict[str, torch.Tensor] | None:
        """The noise path's noise maps when E encodes them: the maps of the batch's real images,
        detached, in an order drawn independently of ``c_noise``'s. The generator then meets
        the same kind of maps on both paths, and a class vector drawn for another image than
        the layout's teaches it to draw or leave out what the class needs (lesions, say) from
        the styles, which are what AttFind edits. None when E encodes the latent alone."""
        if self.E.noise_encoder is None:
            return None
        with torch.no_grad():
            maps = self.E.noise_maps(x) if maps is None else maps
            order = torch.randperm(x.shape[0], device=x.device)
            return {k: v.detach()[order] for k, v in maps.items()}

    def _noise_images(
        self,
        c: torch.Tensor,
        maps: Mapping[str, torch.Tensor] | None = None,  # noise maps (see _layout_maps); None: random noise
    ) -> torch.Tensor:  # [B, 3, R, R] G(M(z), c), style-mixed
        """The noise path's images for class vectors ``c``; with ``style_mixing`` that share of
        them takes its styles from two mapped latents (:func:`~stylex.networks.generator.mix_latents`)."""
        z = torch.randn(c.shape[0], self.G.z_dim, device=c.device)
        if self.cfg.style_mixing <= 0:
            return self.G(z, c, noise=maps)
        w = self.G.mapping(z)
        w2 = self.G.mapping(torch.randn_like(z), update_w_avg=False)
        return self.G.generate(mix_latents(w, w2, self.G.num_ws, self.cfg.style_mixing), c, noise=maps)

    # ------------------------------------------------------------------ D main + D reg
    def discriminator(
        self,
        inputs: StepInputs,
        paths: tuple[bool, bool],  # (encoder path, noise path) of this step
        r1: bool,  # whether the lazy R1 penalty is due
        renders: Renders | None = None,  # the step's renders (read detached); None: rendered here
    ) -> tuple[torch.Tensor, Logs]:
        """Logistic loss of D on real images vs the fakes of the step's paths; with ``r1`` the
        R1 penalty (scaled by ``r1_interval``) rides on the same real pass, in float32."""
        cfg, x = self.cfg, inputs.x
        use_enc, use_noise = paths
        fakes, conds = [], []
        with torch.no_grad():
            if use_enc and cfg.d_fakes in ("both", "encoder"):
                have = renders is not None and renders.x_rec is not None
                fakes.append(renders.x_rec.detach() if have
                             else self._encoder_images(self.E(x), inputs.c_real, self.E.noise_maps(x)))
                conds.append(inputs.c_real)
            if use_noise and cfg.d_fakes in ("both", "noise") or not fakes:
                if renders is not None and renders.x_gen is not None:
                    fakes.append(renders.x_gen.detach())
                else:  # also the noise fakes D needs on an encoder-path step when d_fakes="noise"
                    fakes.append(self._noise_images(inputs.c_noise, self._layout_maps(x, None)))
                conds.append(inputs.c_noise)
        fake_logits = torch.cat([self._discriminate(f, c) for f, c in zip(fakes, conds)])
        logs: Logs = {}
        if r1:
            with self._float32(x.device):
                # The leaf is the un-augmented image: the penalty's gradient runs back through the pipe.
                x_r1 = x.detach().float().requires_grad_(True)
                real_logits = self._discriminate(x_r1, inputs.c_real)
                penalty = losses.r1_penalty(x_r1, real_logits)
        else:
            real_logits = self._discriminate(x, inputs.c_real)
        self.last_real_logits = real_logits.detach()
        loss = losses.d_logistic_loss(real_logits, fake_logits)
        logs["train/loss_d"] = loss.detach()
        logs["train/d_real"] = real_logits.detach().mean()
        if r1:
            loss = loss + penalty * (cfg.r1_gamma / 2 * cfg.r1_interval)
            logs["train/r1"] = penalty.detach()
        return loss, logs

    # ------------------------------------------------------------------ G main
    def generator(
        self,
        inputs: StepInputs,
        paths: tuple[bool, bool],
        renders: Renders | None = None,  # from :meth:`render` (with their graphs); None: rendered here
    ) -> tuple[torch.Tensor, torch.Tensor | None, Logs]:
        """The generator's (and encoder's) loss of the step's paths.

        Returns ``(loss, encoder_surrogate, logs)``. With ``encoder_losses="reconstruction"``
        the generator sees ``w = E(x)`` as a leaf and E learns from the reconstruction terms
        alone, through ``encoder_surrogate`` (see :meth:`_encoder_surrogate`), which the caller
        adds to the same backward pass; it is None otherwise.
        """
        cfg, x = self.cfg, inputs.x
        use_enc, use_noise = paths
        loss = x.new_zeros((), dtype=torch.float32)
        surrogate = None
        logs: Logs = {}
        if renders is None:
            renders = self.render(inputs, paths)
        if use_enc:
            w, w_in, x_rec = renders.w, renders.w_in, renders.x_rec
            split = cfg.encoder_losses == "reconstruction"
            logits_rec, feats_rec = self._classify(x_rec, features=True)
            rec_l1 = losses.l1(x_rec.float(), x.float())
            perc = self._perceptual(x_rec, x, feats_rec, inputs.feats_real) if cfg.perceptual > 0 else x.new_zeros(())
            lat = losses.l1(self.E(x_rec).float(), w_in.float())
            kl_rec = losses.classifier_kl(inputs.c_real, logits_rec)
            adv_rec = losses.g_nonsaturating_loss(self._discriminate(x_rec, inputs.c_real))
            reconstruction = cfg.rec_l1 * rec_l1 + cfg.perceptual * perc + cfg.latent_l1 * lat
            if cfg.rec_lap > 0:
                rec_lap = losses.laplacian_l1(x_rec, x)
                reconstruction = reconstruction + cfg.rec_lap * rec_lap
                logs["train/rec_lap"] = rec_lap.detach()
            loss = loss + reconstruction + cfg.kl_rec * kl_rec + cfg.adv * adv_rec
            if split:
                pairs = [(w, w_in)] + ([(renders.maps[k], renders.maps_in[k]) for k in renders.maps]
                                       if renders.maps is not None else [])
                surrogate = self._encoder_surrogate(reconstruction, pairs)
            logs.update({
                "train/rec_l1": rec_l1.detach(), "train/perceptual": perc.detach(), "train/latent_l1": lat.detach(),
                "train/kl_rec": kl_rec.detach(), "train/adv_rec": adv_rec.detach(),
            })
        if renders.x_swap is not None:
            logits_swap, _ = self._classify(renders.x_swap, features=False)
            kl_swap = losses.classifier_kl(inputs.c_noise, logits_swap)
            adv_swap = losses.g_nonsaturating_loss(self._discriminate(renders.x_swap, inputs.c_noise))
            loss = loss + cfg.kl_swap * kl_swap + cfg.adv * adv_swap
            logs.update({"train/kl_swap": kl_swap.detach(), "train/adv_swap": adv_swap.detach()})
        if cfg.class_sparsity > 0:
            groups = losses.class_group_norm(list(self.G.class_weights().values()))
            loss = loss + cfg.class_sparsity * groups.sum()
            top = groups.detach().topk(min(10, groups.numel())).values.sum()
            logs.update({"train/class_sparsity": groups.detach().sum(),
                         "train/class_top10": top / groups.detach().sum().clamp_min(1e-12)})
        if use_noise:
            x_gen = renders.x_gen
            logits_gen, _ = self._classify(x_gen, features=False)
            kl_gen = losses.classifier_kl(inputs.c_noise, logits_gen)
            adv_gen = losses.g_nonsaturating_loss(self._discriminate(x_gen, inputs.c_noise))
            loss = loss + cfg.kl_gen * kl_gen + cfg.adv * adv_gen
            logs.update({"train/kl_gen": kl_gen.detach(), "train/adv_gen": adv_gen.detach()})
        return loss, surrogate, logs

    @staticmethod
    def _encoder_surrogate(
        reconstruction: torch.Tensor,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],  # (E's output, the leaf G started from): w, then any maps
    ) -> torch.Tensor:
        """A term whose gradient gives E exactly the gradient of ``reconstruction`` through its
        outputs (the latent w, and the noise maps when E encodes them).

        E inverts the generator, so it learns from the pixel, perceptual and latent terms only;
        the classifier-KL and adversarial terms train the generator. Through a sharp classifier
        the KL gradient is large and erratic, and mixed into E's Adam steps it drowns the
        reconstruction signal: E(x) collapses toward one latent and reconstructions keep the
        class (from the conditioning) but not the image. The generator's graph starts at the
        leaf ``w_in``; ``g = d reconstruction / d w_in`` is taken first, and ``sum(w * g)``
        (value irrelevant, gradient ``J_E^T g``) joins the one backward pass of the step, so a
        distributed run still reduces every gradient once.
        """
        outs, leaves = [o for o, _ in pairs], [leaf for _, leaf in pairs]
        grads = torch.autograd.grad(reconstruction, leaves, retain_graph=True, allow_unused=True)
        total = outs[0].sum() * 0.0
        for out, g in zip(outs, grads):
            if g is not None:
                total = total + (out.float() * g.detach().float()).sum()
        return total

    # ------------------------------------------------------------------ G reg
    def path_length(
        self,
        inputs: StepInputs,
        pl_mean: torch.Tensor,  # [] running mean of path lengths (a buffer, updated in place)
    ) -> tuple[torch.Tensor, Logs]:
        """The lazy path-length penalty, scaled by ``pl_weight * pl_interval``, in float32."""
        cfg, x = self.cfg, inputs.x
        with self._float32(x.device):
            pl_b = max(1, x.shape[0] // 2)
            z = torch.randn(pl_b, self.G.z_dim, device=x.device)
            # Not detached: as in StyleGAN2 the penalty also shapes the mapping network.
            w_pl = self.G.mapping(z, update_w_avg=False)
            img = self.G.generate(w_pl, inputs.c_noise[:pl_b])
            penalty = losses.path_length_penalty(img, w_pl, pl_mean, cfg.pl_decay)
        return penalty * (cfg.pl_weight * cfg.pl_interval), {"train/path_length": penalty.detach()}

    # ------------------------------------------------------------------ E fit
    def encoder_fit(
        self,
        x: torch.Tensor,  # [B, 3, R, R] real images
        kl_weight: float = 0.0,  # weight of KL(C(x) ‖ C(x̂)) added to the reconstruction terms
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (loss, pixel L1)
        """The encoder's objective on ``x`` through the frozen EMA generator: the weighted pixel,
        perceptual and latent terms, plus ``kl_weight`` times the classifier KL of the
        reconstruction.

        It repeats the reconstruction terms of :meth:`generator` on purpose: the training step
        needs ``w`` as a leaf and the surrogate gradient, the fit needs neither.
        """
        cfg = self.cfg
        perceptual = cfg.perceptual > 0
        with torch.no_grad():
            logits, feats_real = self._classify(x, features=perceptual)
            c = logits.float().softmax(dim=1)
        w = self.E(x)
        x_rec = self.G_ema.generate(w, c, noise_mode="const", noise=self.E.noise_maps(x))
        rec_l1 = losses.l1(x_rec.float(), x.float())
        loss = cfg.rec_l1 * rec_l1
        if cfg.rec_lap > 0:
            loss = loss + cfg.rec_lap * losses.laplacian_l1(x_rec, x)
        if perceptual or kl_weight > 0:
            logits_rec, feats_rec = self._classify(x_rec, features=perceptual)
            if perceptual:
                loss = loss + cfg.perceptual * self._perceptual(x_rec, x, feats_rec, feats_real)
            if kl_weight > 0:
                loss = loss + kl_weight * losses.classifier_kl(c, logits_rec)
        if cfg.latent_l1 > 0:
            loss = loss + cfg.latent_l1 * losses.l1(self.E(x_rec).float(), w.float())
        return loss, rec_l1

