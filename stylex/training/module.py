"""The StylEx LightningModule: wires generator, encoder, discriminator and the frozen classifier.

One training step (manual optimisation, three optimisers) runs the phases of
:class:`~stylex.training.loss.StylexLoss`:

1. discriminator: D main, plus D reg (lazy R1) every ``r1_interval`` discriminator steps; every
   image D sees goes through the augmentation pipe (``self.augment``, ``loss.augment``), and
   with ``loss.augment=ada`` the ADA controller then adapts its p (logged as ``train/ada_p``,
   and ``train/rt`` at each update of p);
2. generator and encoder, from one backward pass: G main (encoder and noise paths, see
   ``batch_mode``), plus G reg (lazy path length) every ``pl_interval`` generator steps;
3. the EMA generator (a frozen submodule, used for samples, validation and export) follows.

The EMA generator, validation, the samples, the encoder fit and the export never augment.

This class owns only the optimisers, the counters that lazy regularisation needs (Lightning's
``global_step`` counts every optimiser step, so it cannot tell generator steps from
discriminator steps), the checks on gradients and the logging. The networks know nothing of
Lightning.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Mapping

import pytorch_lightning as pl
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from stylex.networks import Discriminator, Encoder, Generator
from stylex.networks.encoder import complete_kwargs
from stylex.training import losses
from stylex.training.ada import AdaController
from stylex.training.augment import AugmentPipe
from stylex.training.ema import ema_beta, make_ema, update_ema
from stylex.training.loss import LossConfig, StylexLoss
from stylex.training.perceptual import ClassifierFeatures, LPIPSDistance

# The encoder's Adam keeps momentum (beta1 0.9): it regresses a latent, where momentum helps, not
# a GAN player; fitted to a frozen generator for 600 steps it reached pixel L1 0.077 against
# 0.087 with beta1 0 (synthetic fundi, w+ 0.061; the README has the figures).
DEFAULT_OPTIM = {"lr_g": 0.0025, "lr_d": 0.0025, "lr_e": 0.0025, "betas": (0.0, 0.99), "betas_e": (0.9, 0.99),
                 "eps": 1e-8}
COUNTERS = ("d_steps", "g_steps", "images_seen")


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class NonFiniteGradientError(FloatingPointError):
    pass


def _forget_host_counts(module: "StylexModule", incompatible_keys) -> None:
    module._host_counts = None


def _tolerate_augment_state(module: "StylexModule", incompatible_keys) -> None:
    """A checkpoint saved with another ``loss.augment`` (or before ADA existed) still loads: a
    missing p keeps the configured ``augment_p``, a p the module has no pipe for is ignored."""
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        while "augment.p" in keys:
            keys.remove("augment.p")


class StylexModule(pl.LightningModule):
    """StylEx training. ``classifier`` must be a frozen classifier taking [-1, 1] images."""

    def __init__(
        self,
        generator: Mapping[str, Any],  # Generator kwargs (c_dim: see num_classes)
        discriminator: Mapping[str, Any],  # Discriminator kwargs
        encoder: Mapping[str, Any],  # Encoder kwargs
        classifier: nn.Module,  # frozen; classifier(x) -> logits [B, K]
        num_classes: int | None = None,  # K, the conditioning size; None = generator["c_dim"]
        loss: LossConfig | Mapping[str, Any] | None = None,  # see LossConfig
        optim: Mapping[str, Any] | None = None,  # lr_g, lr_d, lr_e, betas, betas_e, eps (DEFAULT_OPTIM)
        ema_kimg: float = 1.0,  # EMA half-life in thousands of images
        ema_rampup: float | None = 0.05,
        class_names: list[str] | None = None,
        val_noise_mode: str = "const",
        info: Mapping[str, Any] | None = None,  # what the run records with the model (export, summary)
        feature_classifier: nn.Module | None = None,  # frozen; judges realism (perceptual, FID, D's heads); None = classifier
    ):
        super().__init__()
        self.automatic_optimization = False
        if num_classes is None:
            num_classes = generator.get("c_dim")
        if num_classes is None:
            raise ValueError("StylexModule needs num_classes (or generator['c_dim']): the classifier's class count")
        generator = {**dict(generator), "c_dim": int(num_classes)}
        discriminator = {**dict(discriminator), "c_dim": int(num_classes)}
        self.loss_cfg = LossConfig.coerce(loss)
        self.optim_cfg = {**DEFAULT_OPTIM, **dict(optim or {})}
        unknown = sorted(set(self.optim_cfg) - set(DEFAULT_OPTIM))
        if unknown:
            raise ValueError(f"unknown optimiser option(s) {unknown}; known: {sorted(DEFAULT_OPTIM)}")
        self.G = Generator(**generator)
        encoder = complete_kwargs(encoder, self.G.num_ws, self.G.noise_layers)
        if encoder.get("noise_maps") and float(generator.get("noise_init", 0.0)) == 0.0:
            raise ValueError("the encoder's noise maps (model.encoder_noise=true) need noise inputs that start "
                             "above zero (model.noise_init, e.g. 1): at StyleGAN2's 0 no gradient reaches the maps")
        self.save_hyperparameters({
            "generator": generator, "discriminator": discriminator, "encoder": encoder,
            "loss": self.loss_cfg.to_dict(), "optim": dict(optim or {}), "ema_kimg": float(ema_kimg),
            "ema_rampup": ema_rampup, "class_names": class_names, "val_noise_mode": val_noise_mode,
            "info": dict(info or {}),
        }, logger=False)  # the run logs its whole resolved config once (stylex.training.run)

        if getattr(classifier, "frozen", True) is False and hasattr(classifier, "freeze"):
            classifier.freeze()
        classifier.eval().requires_grad_(False)
        self.C = ClassifierFeatures(classifier)
        # The realism features: the explained classifier's own unless a second network is given
        # (a submodule only then: C registered twice would put its weights twice in checkpoints).
        if feature_classifier is not None:
            feature_classifier.eval().requires_grad_(False)
        self.feature_net = ClassifierFeatures(feature_classifier) if feature_classifier is not None else None
        # The feature heads' sizes follow the feature network (not saved: the loss config rebuilds them).
        features = {"feature_channels": self.F.channels(int(generator["resolution"]))} if self.loss_cfg.d_features else {}
        self.D = Discriminator(**discriminator, **features)
        self.E = Encoder(**encoder)
        self.G_ema = make_ema(self.G)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        # The pipe is a submodule, so its p is checkpointed and restored on resume; "fixed" never
        # changes p, "ada" hands it to the controller, "none" builds nothing.
        cfg = self.loss_cfg
        mode = "ada" if cfg.augment == "auto" else cfg.augment  # train() resolves auto by the dataset first
        self.augment = AugmentPipe(cfg.augment_p) if mode != "none" else None
        self.ada = (AdaController(self.augment, cfg.ada_target, cfg.ada_interval, cfg.ada_kimg)
                    if mode == "ada" else None)
        self.loss = StylexLoss(self.loss_cfg, self.G, self.D, self.E, self.G_ema, self.C, augment=self.augment,
                               features=self.F)
        self.lpips = LPIPSDistance() if self.loss.perceptual_backend == "lpips" else None
        self.loss.lpips = self.lpips

        # Counters restored on resume (they live in the state dict). Reads go through host copies
        # (``count``), so neither the training step nor a callback waits for the device to read one.
        for name in COUNTERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("pl_mean", torch.zeros(()))
        self._host_counts: dict[str, int] | None = None
        self.register_load_state_dict_post_hook(_forget_host_counts)
        self.register_load_state_dict_post_hook(_tolerate_augment_state)

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

    @property
    def F(self) -> ClassifierFeatures:
        """The realism features (perceptual distance, FID, D's feature heads)."""
        return self.feature_net if self.feature_net is not None else self.C

    @property
    def own_feature_classifier(self) -> nn.Module | None:
        """The realism network of ``classifier.feature_checkpoint``; None when the explained
        classifier judges realism itself."""
        return self.feature_net.classifier if self.feature_net is not None else None

    @property
    def feature_classifier(self) -> nn.Module:
        """The network whose features judge realism: the explained classifier unless
        ``classifier.feature_checkpoint`` gave another."""
        return self.F.classifier

    @property
    def perceptual_backend(self) -> str:
        return self.loss.perceptual_backend

    def train(self, mode: bool = True):
        super().train(mode)
        self.G_ema.eval()
        self.C.eval()
        self.F.eval()
        return self

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

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every process (the strategy's all-reduce; ``t`` itself on one process
        or outside a trainer)."""
        trainer = self._trainer
        return t if trainer is None else trainer.strategy.reduce(t, reduce_op="sum")

    @staticmethod
    def _due(interval: int, count: int) -> bool:
        """Whether a lazy phase run every ``interval`` steps (0 = never) is due at ``count``."""
        return interval > 0 and count % interval == 0

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        # Lazy regularisation here adds its (interval-scaled) penalty to the main loss of that
        # step rather than taking an extra optimiser step, so the optimisers need no lr/beta
        # correction for extra steps.
        o = self.optim_cfg
        betas = tuple(o["betas"])
        opt_g = torch.optim.Adam(self.G.parameters(), lr=o["lr_g"], betas=betas, eps=o["eps"])
        opt_d = torch.optim.Adam(self.D.parameters(), lr=o["lr_d"], betas=betas, eps=o["eps"])
        opt_e = torch.optim.Adam(self.E.parameters(), lr=o["lr_e"], betas=tuple(o["betas_e"]), eps=o["eps"])
        return [opt_g, opt_d, opt_e]

    def setup(self, stage: str) -> None:
        # Per-rank randomness for latents; the weights are made equal by DDP at wrap time.
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int):
        opt_g, opt_d, opt_e = self.optimizers()
        cfg = self.loss_cfg
        b = batch["image"].shape[0]
        self._last_losses: dict[str, torch.Tensor] = {}  # for the message of a non-finite gradient
        inputs = self.loss.prepare(batch["image"])
        step = self.count("g_steps")
        paths = self.loss.paths(step)

        # ---- the step's renders, once: the D phase reads them detached (no second forward of E
        # and G), the G phase backpropagates through them after D's update
        _requires_grad(self.G, True)
        _requires_grad(self.E, True)
        renders = self.loss.render(inputs, paths)

        # ---- discriminator: D main (+ D reg)
        _requires_grad(self.D, True)
        r1_due = cfg.r1_gamma > 0 and self._due(cfg.r1_interval, self.count("d_steps"))
        loss_d, logs = self.loss.discriminator(inputs, paths, r1=r1_due, renders=renders)
        self._last_losses["d"] = logs["train/loss_d"]
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        self._check_finite(list(self.D.parameters()), "discriminator")
        self._step(opt_d, counted=False)
        self._advance("d_steps", 1)
        if self.ada is not None:
            rt = self.ada.step(self.loss.last_real_logits, reduce=self._sum_over_ranks)
            # Host numbers (Lightning puts them on the module's device): logging them reads nothing back.
            logs["train/ada_p"] = self.augment.p_value
            if rt is not None:  # logged at updates only: r_t is the mean over one interval
                logs["train/rt"] = rt

        # ---- generator and encoder: G main (+ G reg)
        _requires_grad(self.D, False)
        loss_g, surrogate, g_logs = self.loss.generator(inputs, paths, renders=renders)
        logs.update(g_logs)
        if cfg.pl_weight > 0 and self._due(cfg.pl_interval, step):
            loss_pl, pl_logs = self.loss.path_length(inputs, self.pl_mean)
            loss_g = loss_g + loss_pl
            logs.update(pl_logs)
        self._last_losses.update({k.split("/")[-1]: v for k, v in logs.items()})
        opt_g.zero_grad(set_to_none=True)
        opt_e.zero_grad(set_to_none=True)
        self.manual_backward(loss_g if surrogate is None else loss_g + surrogate)
        self._check_finite(list(self.G.parameters()) + list(self.E.parameters()), "generator/encoder")
        self._step(opt_e, counted=False)
        self._step(opt_g, counted=True)
        self._advance("g_steps", 1)
        _requires_grad(self.D, True)

        # ---- EMA
        world = self.trainer.world_size if self.trainer is not None else 1
        self._advance("images_seen", b * world)
        beta = ema_beta(b * world, self.count("images_seen"), self.hparams.ema_kimg, self.hparams.ema_rampup)
        update_ema(self.G_ema, self.G, beta)

        logs["train/loss_g"] = loss_g.detach()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=b)
        self.log("g_step", float(self.count("g_steps")), on_step=True, prog_bar=False, batch_size=b)
        if "train/rec_l1" in logs:
            self.log("rec", logs["train/rec_l1"], prog_bar=True, on_step=True, batch_size=b, logger=False)
        self.log("d", logs["train/loss_d"], prog_bar=True, on_step=True, batch_size=b, logger=False)

    # ------------------------------------------------------------------ encoder fit
    def encoder_reconstruction_loss(
        self,
        x: torch.Tensor,  # [B, 3, R, R] real images
        kl_weight: float = 0.0,  # weight of KL(C(x) || C(x_rec)) added to the reconstruction terms
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's objective on ``x`` through the EMA generator (the loss's E-fit phase).
        Returns (loss, pixel L1)."""
        return self.loss.encoder_fit(x, kl_weight)

    def fit_encoder_to_ema(
        self,
        batches: Iterator[Mapping[str, torch.Tensor]],  # endless training batches
        steps: int,
        lr: float,
        check: torch.Tensor,  # [N, 3, R, R] images to measure the reconstruction on
        kl_weight: float = 0.0,  # classifier-KL weight in the fit (see encoder_reconstruction_loss)
        progress: bool = False,  # a progress bar over the steps
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
        opt = torch.optim.Adam(self.E.parameters(), lr=lr, betas=tuple(self.optim_cfg["betas_e"]),
                               eps=self.optim_cfg["eps"])
        was_training = self.E.training
        self.E.train()
        _requires_grad(self.E, True)
        with torch.enable_grad(), tqdm(total=int(steps), desc="encoder fit", unit="step", disable=not progress,
                                       leave=False) as bar:
            for _ in range(int(steps)):
                x = next(batches)["image"].to(self.device)
                loss, _ = self.encoder_reconstruction_loss(x, kl_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        self.E.train(was_training)
        after = measure()
        # The baseline a reconstruction must beat to carry anything of its image: every check
        # image predicted by their mean image.
        mean_image_l1 = float((check - check.mean(dim=0, keepdim=True)).abs().mean())
        return {"steps": int(steps), "kl_weight": float(kl_weight), "check_images": int(check.shape[0]),
                "recon_l1_before": before[0], "recon_l1_after": after[0], "mean_image_l1": mean_image_l1,
                "agreement_before": before[1], "agreement_after": after[1],
                "seconds": round(time.perf_counter() - start, 2)}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,  # [B, z_dim]
        c: torch.Tensor,  # [B, K] class vectors
        layout: torch.Tensor | None = None,  # [B, 3, R, R] real images whose noise maps to draw with
        noise_mode: str = "const",
    ) -> torch.Tensor:
        """Noise-path images of the EMA generator. With the encoder's noise maps the generator
        was trained on the maps of real images on this path too, so ``layout`` gives them (other
        images than the ones a sample is compared with); without, it is not used."""
        maps = self.E.noise_maps(layout) if layout is not None else None
        return self.G_ema(z, c, noise_mode=noise_mode, noise=maps)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, noise_mode: str = "const") -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder → EMA generator reconstruction. Returns (x̂ [B,3,R,R], the conditioning [B,K])."""
        c = self.classifier(x).float().softmax(dim=1)
        return self.G_ema.generate(self.E(x), c, noise_mode=noise_mode, noise=self.E.noise_maps(x)), c

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
        w, maps = self.E(x), self.E.noise_maps(x)
        out = {}
        pairings = (("", self.G_ema), ("_live", self.G)) if live else (("", self.G_ema),)
        for suffix, g in pairings:
            x_rec = g.generate(w, c, noise_mode=noise_mode, noise=maps)
            logits_rec = self.classifier(x_rec)
            out[f"val/recon_l1{suffix}"] = losses.l1(x_rec.float(), x.float())
            out[f"val/agreement{suffix}"] = (logits_rec.argmax(dim=1) == c.argmax(dim=1)).float().mean()
            out[f"val/kl_rec{suffix}"] = losses.classifier_kl(c, logits_rec)
        return out

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int):
        x = batch["image"]
        self.log_dict(self.reconstruction_figures(x, self.hparams.val_noise_mode),
                      on_epoch=True, sync_dist=True, batch_size=x.shape[0], prog_bar=False)
