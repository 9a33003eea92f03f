"""The StylEx LightningModule: wires generator, encoder, discriminator and the frozen classifier.

One training step (manual optimisation, three optimisers):

1. Discriminator: logistic loss on real images vs. generated ones, conditioned on the
   classifier's output; every ``r1_interval`` discriminator steps the lazy R1 penalty (float32).
2. Generator (mapping + synthesis) and encoder, from the same loss:

   - encoder path: ``w = E(x)``, ``x̂ = G(w ⊕ C(x))``; L1(x, x̂) + perceptual(x, x̂) +
     L1(E(x̂), w) + KL(C(x) ‖ C(x̂)) + adversarial. By default (``encoder_losses``) only the
     first three train the encoder; all of them train the generator;
   - noise path: ``w = M(z)``, ``x̃ = G(w ⊕ p̃)`` with ``p̃`` the classifier output of another real
     image of the batch; adversarial + KL(p̃ ‖ C(x̃)).

   ``batch_mode="both"`` runs both paths every step; ``"alternate"`` alternates them.
   Every ``pl_interval`` generator steps the lazy path-length penalty (when its weight > 0).
3. The EMA generator (a frozen submodule, used for samples, validation and export) follows.

The networks know nothing of Lightning: this class only owns the losses, the optimisers and the
counters that lazy regularisation needs (Lightning's ``global_step`` counts every optimiser step,
so it cannot tell generator steps from discriminator steps).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import pytorch_lightning as pl
import torch
import torch.nn as nn

from stylex.networks import Discriminator, Encoder, Generator
from stylex.training import losses
from stylex.training.ema import ema_beta, make_ema, update_ema
from stylex.training.perceptual import ClassifierFeatures, LPIPSDistance, feature_distance, resolve_backend

DEFAULT_LOSS = {
    "adv": 1.0,  # non-saturating adversarial loss of the generator
    "rec_l1": 1.0,  # L1(x, x̂), pixels in [-1, 1]
    "perceptual": 1.0,  # perceptual(x, x̂)
    "perceptual_backend": "auto",  # auto | lpips | classifier | none
    "latent_l1": 0.1,  # L1(E(x̂), E(x))
    "kl_rec": 1.0,  # KL(C(x) ‖ C(x̂)) on the encoder path
    "kl_gen": 1.0,  # KL(p̃ ‖ C(x̃)) on the noise path
    "r1_gamma": 0.05,  # R1 weight (the penalty is gamma / 2 · |∇D|²)
    "r1_interval": 16,  # lazy R1: every N discriminator steps (0 = never)
    "pl_weight": 0.0,  # path-length weight (0 = off)
    "pl_interval": 4,  # lazy path-length: every N generator steps
    "pl_decay": 0.01,
    "batch_mode": "both",  # both | alternate
    "d_fakes": "both",  # which fakes D sees: both | encoder | noise
    "encoder_losses": "reconstruction",  # what trains E: reconstruction (pixel, perceptual, latent) | all
}

DEFAULT_OPTIM = {"lr_g": 0.0025, "lr_d": 0.0025, "lr_e": 0.0025, "betas": (0.0, 0.99), "eps": 1e-8}


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class NonFiniteGradientError(FloatingPointError):
    pass


def check_loss_config(loss: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loss options with defaults filled in; ValueError naming the option when one is wrong."""
    cfg = {**DEFAULT_LOSS, **dict(loss or {})}
    unknown = set(cfg) - set(DEFAULT_LOSS)
    if unknown:
        raise ValueError(f"unknown loss option(s) {sorted(unknown)}; known: {sorted(DEFAULT_LOSS)}")
    for key, default in DEFAULT_LOSS.items():
        if isinstance(default, (int, float)) and not isinstance(cfg[key], (int, float)):
            raise ValueError(f"loss.{key} must be a number, got {cfg[key]!r}")
    if cfg["batch_mode"] not in ("both", "alternate"):
        raise ValueError(f"loss.batch_mode must be 'both' or 'alternate', got {cfg['batch_mode']!r}")
    if cfg["d_fakes"] not in ("both", "encoder", "noise"):
        raise ValueError(f"loss.d_fakes must be 'both', 'encoder' or 'noise', got {cfg['d_fakes']!r}")
    if cfg["encoder_losses"] not in ("reconstruction", "all"):
        raise ValueError(f"loss.encoder_losses must be 'reconstruction' or 'all', got {cfg['encoder_losses']!r}")
    resolve_backend(cfg["perceptual_backend"])
    return cfg


COUNTERS = ("d_steps", "g_steps", "images_seen")


def _forget_host_counts(module: "StylexModule", incompatible_keys) -> None:
    module._host_counts = None


class StylexModule(pl.LightningModule):
    """StylEx training. ``classifier`` must be a frozen classifier taking [-1, 1] images."""

    def __init__(
        self,
        generator: Mapping[str, Any],  # Generator kwargs (c_dim = number of classes)
        discriminator: Mapping[str, Any],  # Discriminator kwargs
        encoder: Mapping[str, Any],  # Encoder kwargs
        classifier: nn.Module,  # frozen; classifier(x) -> logits [B, K]
        loss: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        ema_kimg: float = 1.0,  # EMA half-life in thousands of images
        ema_rampup: float | None = 0.05,
        class_names: list[str] | None = None,
        val_noise_mode: str = "const",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["classifier"])
        self.automatic_optimization = False
        self.loss_cfg = check_loss_config(loss)
        self.optim_cfg = {**DEFAULT_OPTIM, **dict(optim or {})}

        self.G = Generator(**generator)
        self.D = Discriminator(**discriminator)
        self.E = Encoder(**encoder)
        self.G_ema = make_ema(self.G)
        if getattr(classifier, "frozen", True) is False and hasattr(classifier, "freeze"):
            classifier.freeze()
        classifier.eval().requires_grad_(False)
        self.C = ClassifierFeatures(classifier)
        self.num_classes = int(generator["c_dim"])
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]

        backend = resolve_backend(self.loss_cfg["perceptual_backend"]) if self.loss_cfg["perceptual"] > 0 else "none"
        self.perceptual_backend = backend
        self.lpips = LPIPSDistance() if backend == "lpips" else None

        # Counters restored on resume (they live in the state dict). Reads go through host copies
        # (``count``), so neither the training step nor a callback waits for the device to read one.
        for name in COUNTERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("pl_mean", torch.zeros(()))
        self._host_counts: dict[str, int] | None = None
        self.register_load_state_dict_post_hook(_forget_host_counts)

    # ------------------------------------------------------------------ helpers
    def count(self, name: str) -> int:
        """A training counter: ``"g_steps"``, ``"d_steps"`` or ``"images_seen"``."""
        if self._host_counts is None:  # first read, or after a state dict was loaded
            self._host_counts = {n: int(getattr(self, n)) for n in COUNTERS}
        return self._host_counts[name]

    def _advance(self, name: str, by: int) -> None:
        self.count(name)
        self._host_counts[name] += by
        getattr(self, name).add_(by)

    @property
    def classifier(self) -> nn.Module:
        return self.C.classifier

    def train(self, mode: bool = True):
        super().train(mode)
        self.G_ema.eval()
        self.C.eval()
        return self

    @contextmanager
    def _float32(self):
        """Full precision inside autocast (for R1 and path length: squared gradients overflow or
        lose all precision in half formats)."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            yield

    def _classify(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if features and self.perceptual_backend == "classifier":
            return self.C(x)
        return self.C.classifier(x), []

    def _perceptual(self, x_rec, x, feats_rec, feats_real) -> torch.Tensor:
        if self.perceptual_backend == "classifier":
            return feature_distance(feats_rec, [f.detach() for f in feats_real]).mean()
        if self.perceptual_backend == "lpips":
            return self.lpips(x_rec, x).mean()
        return x.new_zeros(())

    def _check_finite(self, params: list[nn.Parameter], what: str) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)  # one fused reduction; the check below is the step's sync
        if not torch.isfinite(norm):
            raise NonFiniteGradientError(
                f"non-finite gradient in the {what} update at step {self.count('g_steps')} "
                f"(losses: {', '.join(f'{k}={float(v):.4g}' for k, v in self._last_losses.items())}). "
                "Lower the learning rate (model.lr), raise loss.r1_gamma, set model.conv_clamp "
                "(e.g. 256) or train in full precision (trainer.precision=32)."
            )

    def _noise_condition(self, c_real: torch.Tensor) -> torch.Tensor:
        """Conditioning for the noise path: classifier outputs of other images of the batch, so the
        generator sees the same distribution of class vectors on both paths."""
        return c_real[torch.randperm(c_real.shape[0], device=c_real.device)]

    def _step(self, opt, counted: bool) -> None:
        """Step an optimiser; only the generator's step counts toward ``trainer.global_step``.

        Lightning counts every optimiser step, so with three optimisers ``trainer.max_steps``
        would stop after a third of the training steps a user asked for. The uncounted steps go
        through the strategy exactly like a counted one (precision plugin, gradient scaling).
        """
        if counted:
            opt.step()
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)

    @staticmethod
    def _encoder_surrogate(reconstruction: torch.Tensor, w: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
        """A term whose gradient gives E exactly the gradient of ``reconstruction`` through w.

        E inverts the generator, so it learns from the pixel, perceptual and latent terms only;
        the classifier-KL and adversarial terms train the generator. Through a sharp classifier
        the KL gradient is large and erratic, and mixed into E's Adam steps it drowns the
        reconstruction signal: E(x) collapses toward one latent and reconstructions keep the
        class (from the conditioning) but not the image. The generator's graph starts at the
        leaf ``w_in``; ``g = d reconstruction / d w_in`` is taken first, and ``sum(w * g)``
        (value irrelevant, gradient ``J_E^T g``) joins the one backward pass of the step, so a
        distributed run still reduces every gradient once.
        """
        (g,) = torch.autograd.grad(reconstruction, w_in, retain_graph=True, allow_unused=True)
        if g is None:
            return w.sum() * 0.0
        return (w.float() * g.detach().float()).sum()

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        # Lazy regularisation here adds its (interval-scaled) penalty to the main loss of that
        # step rather than taking an extra optimiser step, so the optimisers need no lr/beta
        # correction for extra steps.
        o = self.optim_cfg
        betas = tuple(o["betas"])
        opt_g = torch.optim.Adam(self.G.parameters(), lr=o["lr_g"], betas=betas, eps=o["eps"])
        opt_d = torch.optim.Adam(self.D.parameters(), lr=o["lr_d"], betas=betas, eps=o["eps"])
        opt_e = torch.optim.Adam(self.E.parameters(), lr=o["lr_e"], betas=betas, eps=o["eps"])
        return [opt_g, opt_d, opt_e]

    def setup(self, stage: str) -> None:
        # Per-rank randomness for latents; the weights are made equal by DDP at wrap time.
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int):
        opt_g, opt_d, opt_e = self.optimizers()
        cfg = self.loss_cfg
        x = batch["image"]
        b = x.shape[0]
        self._last_losses: dict[str, torch.Tensor] = {}  # for the message of a non-finite gradient

        with torch.no_grad():
            logits_real, feats_real = self._classify(x, features=True)
            c_real = logits_real.float().softmax(dim=1)
        c_noise = self._noise_condition(c_real)

        step = self.count("g_steps")
        use_enc = cfg["batch_mode"] == "both" or step % 2 == 0
        use_noise = cfg["batch_mode"] == "both" or step % 2 == 1

        # ---------------------------------------------------------------- discriminator
        _requires_grad(self.G, False)
        _requires_grad(self.E, False)
        _requires_grad(self.D, True)
        fakes, conds = [], []
        with torch.no_grad():
            if use_enc and cfg["d_fakes"] in ("both", "encoder"):
                fakes.append(self.G.generate(self.E(x), c_real))
                conds.append(c_real)
            if use_noise and cfg["d_fakes"] in ("both", "noise") or not fakes:
                z = torch.randn(b, self.G.z_dim, device=self.device)
                fakes.append(self.G(z, c_noise))
                conds.append(c_noise)
        fake_logits = torch.cat([self.D(f, c) for f, c in zip(fakes, conds)])

        r1_every = cfg["r1_interval"]
        do_r1 = r1_every > 0 and cfg["r1_gamma"] > 0 and self.count("d_steps") % r1_every == 0
        if do_r1:
            with self._float32():
                x_r1 = x.detach().float().requires_grad_(True)
                real_logits = self.D(x_r1, c_real)
                r1 = losses.r1_penalty(x_r1, real_logits)
        else:
            real_logits = self.D(x, c_real)
        loss_d = losses.d_logistic_loss(real_logits, fake_logits)
        self._last_losses["d"] = loss_d.detach()
        if do_r1:
            loss_d = loss_d + r1 * (cfg["r1_gamma"] / 2 * r1_every)
            self.log("train/r1", r1.detach(), on_step=True, prog_bar=False)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        self._check_finite(list(self.D.parameters()), "discriminator")
        self._step(opt_d, counted=False)
        self._advance("d_steps", 1)

        # ---------------------------------------------------------------- generator + encoder
        _requires_grad(self.D, False)
        _requires_grad(self.G, True)
        _requires_grad(self.E, True)
        logs: dict[str, torch.Tensor] = {"train/loss_d": loss_d.detach(), "train/d_real": real_logits.detach().mean()}
        loss_g = x.new_zeros((), dtype=torch.float32)
        encoder_surrogate = None
        if use_enc:
            w = self.E(x)
            # With encoder_losses="reconstruction" the generator sees w as a leaf, and E learns
            # from the reconstruction terms alone (see _encoder_surrogate).
            split = cfg["encoder_losses"] == "reconstruction"
            w_in = w.detach().requires_grad_(True) if split else w
            x_rec = self.G.generate(w_in, c_real)
            logits_rec, feats_rec = self._classify(x_rec, features=True)
            rec_l1 = losses.l1(x_rec.float(), x.float())
            perc = self._perceptual(x_rec, x, feats_rec, feats_real) if cfg["perceptual"] > 0 else x.new_zeros(())
            lat = losses.l1(self.E(x_rec).float(), w_in.float())
            kl_rec = losses.classifier_kl(c_real, logits_rec)
            adv_rec = losses.g_nonsaturating_loss(self.D(x_rec, c_real))
            reconstruction = cfg["rec_l1"] * rec_l1 + cfg["perceptual"] * perc + cfg["latent_l1"] * lat
            loss_g = loss_g + reconstruction + cfg["kl_rec"] * kl_rec + cfg["adv"] * adv_rec
            if split:
                encoder_surrogate = self._encoder_surrogate(reconstruction, w, w_in)
            logs.update({
                "train/rec_l1": rec_l1.detach(), "train/perceptual": perc.detach(), "train/latent_l1": lat.detach(),
                "train/kl_rec": kl_rec.detach(), "train/adv_rec": adv_rec.detach(),
            })
        if use_noise:
            z = torch.randn(b, self.G.z_dim, device=self.device)
            x_gen = self.G(z, c_noise)
            logits_gen, _ = self._classify(x_gen, features=False)
            kl_gen = losses.classifier_kl(c_noise, logits_gen)
            adv_gen = losses.g_nonsaturating_loss(self.D(x_gen, c_noise))
            loss_g = loss_g + cfg["kl_gen"] * kl_gen + cfg["adv"] * adv_gen
            logs.update({"train/kl_gen": kl_gen.detach(), "train/adv_gen": adv_gen.detach()})

        pl_every = cfg["pl_interval"]
        if cfg["pl_weight"] > 0 and pl_every > 0 and step % pl_every == 0:
            with self._float32():
                pl_b = max(1, b // 2)
                z = torch.randn(pl_b, self.G.z_dim, device=self.device)
                # Not detached: as in StyleGAN2 the penalty also shapes the mapping network.
                w_pl = self.G.mapping(z, update_w_avg=False)
                img = self.G.generate(w_pl, c_noise[:pl_b])
                pl_pen = losses.path_length_penalty(img, w_pl, self.pl_mean, cfg["pl_decay"])
            loss_g = loss_g + pl_pen * (cfg["pl_weight"] * pl_every)
            logs["train/path_length"] = pl_pen.detach()

        self._last_losses.update({k.split("/")[-1]: v for k, v in logs.items()})
        opt_g.zero_grad(set_to_none=True)
        opt_e.zero_grad(set_to_none=True)
        self.manual_backward(loss_g if encoder_surrogate is None else loss_g + encoder_surrogate)
        self._check_finite(list(self.G.parameters()) + list(self.E.parameters()), "generator/encoder")
        self._step(opt_e, counted=False)
        self._step(opt_g, counted=True)
        self._advance("g_steps", 1)
        _requires_grad(self.D, True)

        # ---------------------------------------------------------------- EMA
        world = self.trainer.world_size if self.trainer is not None else 1
        self._advance("images_seen", b * world)
        beta = ema_beta(b * world, self.count("images_seen"), self.hparams.ema_kimg, self.hparams.ema_rampup)
        update_ema(self.G_ema, self.G, beta)

        logs["train/loss_g"] = loss_g.detach()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=b)
        self.log("g_step", float(self.count("g_steps")), on_step=True, prog_bar=False, batch_size=b)
        if use_enc:
            self.log("rec", logs["train/rec_l1"], prog_bar=True, on_step=True, batch_size=b, logger=False)
        self.log("d", logs["train/loss_d"], prog_bar=True, on_step=True, batch_size=b, logger=False)

    # ------------------------------------------------------------------ encoder fit
    def encoder_reconstruction_loss(
        self,
        x: torch.Tensor,  # [B, 3, R, R] real images
        kl_weight: float = 0.0,  # weight of KL(C(x) || C(x_rec)) added to the reconstruction terms
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's objective on ``x`` through the EMA generator: the weighted pixel,
        perceptual and latent terms, plus ``kl_weight`` times the classifier KL of the
        reconstruction. Returns (loss, pixel L1)."""
        cfg = self.loss_cfg
        g = self.G_ema
        perceptual = cfg["perceptual"] > 0
        with torch.no_grad():
            logits, feats_real = self._classify(x, features=perceptual)
            c = logits.float().softmax(dim=1)
        w = self.E(x)
        x_rec = g.generate(w, c, noise_mode="const")
        rec_l1 = losses.l1(x_rec.float(), x.float())
        loss = cfg["rec_l1"] * rec_l1
        if perceptual or kl_weight > 0:
            logits_rec, feats_rec = self._classify(x_rec, features=perceptual)
            if perceptual:
                loss = loss + cfg["perceptual"] * self._perceptual(x_rec, x, feats_rec, feats_real)
            if kl_weight > 0:
                loss = loss + kl_weight * losses.classifier_kl(c, logits_rec)
        if cfg["latent_l1"] > 0:
            loss = loss + cfg["latent_l1"] * losses.l1(self.E(x_rec).float(), w.float())
        return loss, rec_l1

    def fit_encoder_to_ema(
        self,
        batches: Iterator[Mapping[str, torch.Tensor]],  # endless training batches
        steps: int,
        lr: float,
        check: torch.Tensor,  # [N, 3, R, R] images to measure the reconstruction on
        kl_weight: float = 0.0,  # classifier-KL weight in the fit (see encoder_reconstruction_loss)
    ) -> dict[str, float]:
        """Train the encoder alone against the frozen EMA generator for ``steps`` steps.

        Joint training pairs E with the live generator, while reconstructions, the export and
        AttFind use the EMA generator; early in training the two differ enough that E(x) misses
        its image under the EMA weights. A short fit at the end makes the exported pair agree.
        Fitted to pixels alone, E(x) can override the class vector and reconstruct every image
        in one class; a small ``kl_weight`` keeps the reconstructions in the class of their
        originals.
        """

        def measure() -> tuple[float, float]:
            """(pixel L1, share of reconstructions the classifier puts in the class of the original)."""
            l1_sum, agree_sum = 0.0, 0.0
            for i in range(0, check.shape[0], 64):
                x = check[i : i + 64].to(self.device)
                figures = self.reconstruction_figures(x, live=False)
                l1_sum += float(figures["val/recon_l1"]) * x.shape[0]
                agree_sum += float(figures["val/agreement"]) * x.shape[0]
            return l1_sum / check.shape[0], agree_sum / check.shape[0]

        before = measure()
        start = time.perf_counter()
        opt = torch.optim.Adam(self.E.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-8)
        was_training = self.E.training
        self.E.train()
        _requires_grad(self.E, True)
        with torch.enable_grad():
            for _ in range(int(steps)):
                x = next(batches)["image"].to(self.device)
                loss, _ = self.encoder_reconstruction_loss(x, kl_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.E.train(was_training)
        after = measure()
        return {"steps": int(steps), "kl_weight": float(kl_weight), "check_images": int(check.shape[0]),
                "recon_l1_before": before[0], "recon_l1_after": after[0],
                "agreement_before": before[1], "agreement_after": after[1],
                "seconds": round(time.perf_counter() - start, 2)}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, noise_mode: str = "const") -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder → EMA generator reconstruction. Returns (x̂ [B,3,R,R], the conditioning [B,K])."""
        c = self.classifier(x).float().softmax(dim=1)
        return self.G_ema.generate(self.E(x), c, noise_mode=noise_mode), c

    @torch.no_grad()
    def reconstruction_figures(
        self,
        x: torch.Tensor,  # [B, 3, R, R]
        noise_mode: str = "const",
        live: bool = True,  # also through the live generator
    ) -> dict[str, torch.Tensor]:
        """Reconstruction of ``x`` through the EMA generator (``val/*``, what the export and
        AttFind use) and through the live generator (``val/*_live``, the pairing training
        optimises): pixel L1, class agreement with the original, and classifier KL. The two
        differ most while G still moves fast; the encoder fit after training pairs E with G_ema."""
        c = self.classifier(x).float().softmax(dim=1)
        w = self.E(x)
        out = {}
        pairings = (("", self.G_ema), ("_live", self.G)) if live else (("", self.G_ema),)
        for suffix, g in pairings:
            x_rec = g.generate(w, c, noise_mode=noise_mode)
            logits_rec = self.classifier(x_rec)
            out[f"val/recon_l1{suffix}"] = losses.l1(x_rec.float(), x.float())
            out[f"val/agreement{suffix}"] = (logits_rec.argmax(dim=1) == c.argmax(dim=1)).float().mean()
            out[f"val/kl_rec{suffix}"] = losses.classifier_kl(c, logits_rec)
        return out

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int):
        x = batch["image"]
        self.log_dict(self.reconstruction_figures(x, self.hparams.val_noise_mode),
                      on_epoch=True, sync_dist=True, batch_size=x.shape[0], prog_bar=False)
