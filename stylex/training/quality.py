"""Generator quality during training: FID / KID, conditioning fidelity and causal-factor fidelity.

Every ``every_n_steps`` generator steps, and once more when training ends, the
:class:`GeneratorQuality` callback draws ``num_fake`` noise-path samples ``G_ema(z, one-hot c)``
(classes in the class mix of the real set) and measures, with :mod:`stylex.metrics`:

- ``val/fid``, ``val/kid`` and ``val/kid_std`` against ``num_real`` validation images, in the
  feature space of the frozen classifier (pooled features; those of the network of
  ``classifier.feature_checkpoint`` when one is set, named ``feature-net:<arch>``; Inception-v3
  only with ``inception_weights``, a local file). The feature space is named in ``summary.json``
  (``quality.feature``), in the plot titles and in the W&B config: FIDs of different spaces
  are not comparable. The real side is computed once per run and cached in
  ``<run>/metrics/real_<key>.pt`` (see :class:`~stylex.metrics.realism.RealismMeter`);
- ``val/cond_fidelity`` (and ``val/cond_fidelity/<class>``): the share of samples the
  classifier assigns to the class they were drawn for, the mean over classes;
- on the synthetic data (``factor_fidelity``, auto = on there): ``val/factor_ratio/<class>/
  <factor>``, the mean exudate / haemorrhage count read by the factor probe on generated
  samples divided by that on real images of the class (where the real mean is at least 0.25),
  ``val/factor_diff/<class>/<factor>``, their difference, and ``val/factor_contrast/<class>/
  <factor>``, whether the counts follow the class (generated over real difference from the first
  class, see :mod:`stylex.metrics.fidelity`). The probe is trained once per
  resolution and machine and cached (:func:`~stylex.metrics.probe.cached_factor_probe`).

The figures go to the loggers at the current step (W&B draws them as native charts), into
``trainer.callback_metrics`` (``pl_module.log``), into ``summary.json`` (through
:class:`~stylex.training.callbacks.Summary`) and onto ``<run>/quality.png``, redrawn at each
measurement against images seen; the history is kept in ``<run>/metrics/quality.json`` (so a
resumed run's plot keeps its earlier points).

It runs on rank zero only, under ``torch.no_grad()``, autocast off, with the EMA generator in
eval mode and the global RNG forked and seeded (the samples are the same at every measurement
and training's random stream is untouched). A failure logs a warning; training goes on.

Cost, measured with ``benchmarks/quality_bench.py`` alone on 2 CPU cores at the quickstart size
(cpu32: 32x32, resnet10t, batch 16, untrained networks): 1.7-2.1 s per measurement with 512
generated and 512 real images (drawing the samples is most of it; features, KID's 100 subsets,
FID and the plot take ~0.5 s), against 1.1-1.2 s per training step. The 600-step quickstart
measures 3 times (steps 200, 400, 600; the end coincides with step 600): ~6 s, under 1% of the
fit. Once per run the real side costs ~0.4 s, and the first run on a machine also trains the
factor probe (~17 s at 32x32), which every later run reads from the cache.
"""

# No ``from __future__ import annotations``: the signature's annotations stay real types, for
# the config generated from it.
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from stylex.data.base import spread_indices
from stylex.metrics.fidelity import (
    conditioning_from_predictions,
    factor_from_readings,
    key_name,
    matched_classes,
    predict,
    read_factors,
    sample_generator,
)
from stylex.metrics.probe import cached_factor_probe
from stylex.metrics.realism import RealismMeter, check_inception_weights, feature_extractor
from stylex.utils.io import atomic_write, atomic_write_json
from stylex.utils.loggers import is_wandb
from stylex.utils.plot import line_plot, stack
from stylex.utils.runs import in_run

log = logging.getLogger(__name__)

# Settings of the factor probe (train_factor_probe's keyword arguments; {} = its defaults, the
# probe explain.py --ground-truth uses too, so one cached probe serves both).
PROBE_SETTINGS: dict = {}
MIN_PROBE_R2 = 0.5  # below this held-out R^2 a causal factor's readings are flagged as unreliable


class LayoutSampler(torch.nn.Module):
    """``G(z, c)`` for a generator trained with the encoder's noise maps: the noise path then
    draws with the maps of real images (see ``StylexLoss._layout_maps``), so the samples take
    theirs from ``layouts``, in a seeded order drawn independently of the samples' classes."""

    def __init__(self, generator: torch.nn.Module, encoder: torch.nn.Module, layouts: torch.Tensor, seed: int = 0):
        super().__init__()
        self.generator, self.encoder = generator, encoder
        self.z_dim = generator.z_dim
        self.layouts = layouts
        self.order = torch.randperm(layouts.shape[0], generator=torch.Generator().manual_seed(int(seed) + 1))
        self.drawn = 0

    def forward(self, z: torch.Tensor, c: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        pick = self.order[torch.arange(self.drawn, self.drawn + z.shape[0]) % self.order.numel()]
        self.drawn += z.shape[0]
        maps = self.encoder.noise_maps(self.layouts[pick].to(z.device))
        return self.generator(z, c, noise_mode=noise_mode, noise=maps)


@torch.no_grad()
def evaluate_generator(
    generator: torch.nn.Module,  # G(z, one-hot c) -> [B, 3, R, R] in [-1, 1]
    classifier: torch.nn.Module,  # frozen, images -> logits
    meter: RealismMeter,  # with its real side set
    real_labels: torch.Tensor,  # [M] labels of the real set (the class mix of the samples)
    class_names: list,  # [K]
    num_fake: int,
    seed: int = 0,
    batch_size: int = 64,
    noise_mode: str = "random",
    probe: Optional[torch.nn.Module] = None,  # factor probe: causal-factor fidelity too
    real_readings: Optional[torch.Tensor] = None,  # [M, 2] the probe's readings of the real set
) -> dict:  # {"realism", "conditioning", "factors" (or None), "metrics": flat {"val/...": value}}
    """One measurement of a generator (the work of :class:`GeneratorQuality`, without a trainer)."""
    k = len(class_names)
    intended = matched_classes(real_labels, num_fake)
    meter.reset_fake()
    predicted, readings = [], []
    for images, _ in sample_generator(generator, intended, k, seed, batch_size, noise_mode):
        meter.add_fake(images)
        predicted.append(predict(classifier, images))
        if probe is not None:
            readings.append(read_factors(probe, images))
    realism = meter.compute()
    cond = conditioning_from_predictions(torch.cat(predicted), intended, k)
    metrics = {"val/fid": realism["fid"], "val/kid": realism["kid"], "val/kid_std": realism["kid_std"],
               "val/cond_fidelity": cond.overall}
    for name, share in zip(class_names, cond.per_class):
        if share is not None:
            metrics[f"val/cond_fidelity/{key_name(name)}"] = share
    factors = None
    if probe is not None and real_readings is not None:
        from stylex.data.synthetic import CAUSAL_FACTORS

        factors = factor_from_readings(torch.cat(readings), intended, real_readings, real_labels,
                                       CAUSAL_FACTORS, class_names)
        metrics.update({f"val/{key}": v for key, v in factors.flat().items()})
    return {"realism": realism, "conditioning": cond.to_dict(class_names),
            "factors": factors.to_dict() if factors is not None else None, "metrics": metrics}


class GeneratorQuality(pl.Callback):
    """Measures the EMA generator during training (see the module docstring).

    Args:
        every_n_steps: measure every N generator steps (0 = only when training ends).
        num_fake: generated images per measurement.
        num_real: validation images of the real side (fewer when the split is smaller).
        factor_fidelity: causal-factor fidelity with the factor probe; None = on for the
            synthetic dataset only (it needs the factors' ground truth).
        inception_weights: a local file of torch-fidelity's FID Inception weights
            (weights-inception-2015-12-05-6726825d.pth): measure in Inception space instead of
            the classifier's. Needs the torch-fidelity package; nothing is downloaded.
        enabled: False turns the callback into a no-op.
        plot: the PNG of the figures against images seen (relative: in the run folder).
        cache_dir: where the real statistics and the history are kept (relative: in the run).
        batch_size: images per generator / feature pass.
        seed: the latents and noise of the samples, and KID's subsets (not the run's seed, so
            runs of different seeds are measured on the same latents).
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        num_fake: int = 512,
        num_real: int = 512,
        factor_fidelity: Optional[bool] = None,
        inception_weights: Optional[str] = None,
        enabled: bool = True,
        plot: str = "quality.png",
        cache_dir: str = "metrics",
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if int(every_n_steps) < 0 or int(num_fake) < 2 or int(num_real) < 2 or int(batch_size) < 1:
            raise ValueError(f"quality needs every_n_steps >= 0, num_fake >= 2, num_real >= 2 and batch_size >= 1; "
                             f"got {every_n_steps}, {num_fake}, {num_real}, {batch_size}")
        self.enabled = bool(enabled)
        # Refuse a missing weights file before training starts (this runs when the config is checked).
        self.inception_weights = check_inception_weights(inception_weights) if self.enabled else None
        self.every = int(every_n_steps)
        self.num_fake = int(num_fake)
        self.num_real = int(num_real)
        self.factor_fidelity = factor_fidelity
        self.plot = Path(plot)
        self.cache_dir = Path(cache_dir)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.last: dict[str, Any] = {}  # the latest measurement: info and "metrics" (read by Summary)
        self.history: list[dict[str, Any]] = []
        self._meter: Optional[RealismMeter] = None
        self._labels: Optional[torch.Tensor] = None
        self._probe = None
        self._real_readings: Optional[torch.Tensor] = None
        self._probe_note: Optional[str] = None
        self._last_step = -1
        self._loaded_history = False

    # ---------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.count("g_steps")
        if self.enabled and self.every > 0 and step % self.every == 0:
            self.measure(trainer, pl_module, log_to_module=True)

    def on_train_end(self, trainer, pl_module):
        if self.enabled:
            self.measure(trainer, pl_module, log_to_module=False)  # self.log is closed once fit ends

    # ---------------------------------------------------------------- the work
    @rank_zero_only
    def measure(self, trainer, pl_module, log_to_module: bool = False) -> Optional[dict]:
        """Measure now (once per generator step), log, plot; None when skipped or failed."""
        step = pl_module.count("g_steps")
        if step == self._last_step:
            return None
        self._last_step = step
        device = pl_module.device
        generator = pl_module.G_ema
        was_training = generator.training
        t0 = time.perf_counter()
        forked = []  # the RNGs fork_rng saves and restores: the CPU's, and this CUDA device's
        if device.type == "cuda":
            forked = [device.index if device.index is not None else torch.cuda.current_device()]
        try:
            with (torch.no_grad(), torch.autocast(device_type=device.type, enabled=False),
                  torch.random.fork_rng(devices=forked)):
                torch.manual_seed(self.seed)
                generator.eval()
                self._prepare(trainer, pl_module)
                if getattr(pl_module.E, "noise_encoder", None) is not None:
                    generator = LayoutSampler(generator, pl_module.E, self._layouts, self.seed)
                result = evaluate_generator(
                    generator, pl_module.classifier, self._meter, self._labels, list(pl_module.class_names),
                    self.num_fake, self.seed, self.batch_size, probe=self._probe,
                    real_readings=self._real_readings)
        except Exception as e:  # a measurement must never stop training
            log.warning("generator quality at step %d failed (%s: %s); training goes on", step,
                        type(e).__name__, e, exc_info=True)
            return None
        finally:
            generator.train(was_training)
        seconds = time.perf_counter() - t0
        self._record(trainer, pl_module, result, seconds, log_to_module)
        return result

    def _prepare(self, trainer, pl_module) -> None:
        """Once per fit: the real set, its statistics (cached in the run) and the factor probe."""
        if self._meter is not None:
            return
        dm = trainer.datamodule
        dataset = getattr(dm, "val_dataset", None) or getattr(dm, "train_dataset", None)
        if dataset is None or len(dataset) < 2:
            raise RuntimeError("the data module has no validation images to compare with")
        idx = spread_indices(len(dataset), self.num_real)
        self._labels = torch.tensor([int(dataset[i]["label"]) for i in idx])
        if getattr(pl_module.E, "noise_encoder", None) is not None:  # the noise path's layouts (LayoutSampler)
            self._layouts = torch.stack([dataset[i]["image"] for i in idx])
        device = pl_module.device
        resolution = int(getattr(pl_module.G_ema, "resolution", 32))

        def real_batches():
            for a in range(0, len(idx), self.batch_size):
                yield torch.stack([dataset[i]["image"] for i in idx[a : a + self.batch_size]]).to(device)

        own = getattr(pl_module, "own_feature_classifier", None)
        network, role = (pl_module.classifier, "classifier") if own is None else (own, "feature-net")
        features = feature_extractor(network, self.inception_weights, resolution, role)
        meter = RealismMeter(features, batch_size=self.batch_size, seed=self.seed).to(device)
        identity = {"datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}",
                    "hparams": {k: v for k, v in dict(getattr(dm, "hparams", {}) or {}).items()
                                if k not in ("batch_size", "num_workers")},
                    "split": "val" if getattr(dm, "val_dataset", None) is not None else "train"}
        cached = meter.load_or_set_real(real_batches, identity, len(idx), in_run(trainer, self.cache_dir))
        log.info("generator quality: %d real images in %s features (%s)", len(idx), features.name,
                 "cached" if cached else "computed")
        if self._wants_factors(dm):
            from stylex.data.synthetic import CAUSAL_FACTORS

            scale = float(getattr(dm, "lesion_scale", 1.0))  # the probe learns lesions of the run's size
            settings = {**PROBE_SETTINGS, **({"lesion_scale": scale} if scale != 1.0 else {})}
            probe = cached_factor_probe(resolution, device=device, **settings)
            weak = [f for f in CAUSAL_FACTORS if probe.r2.get(f, float("-inf")) < MIN_PROBE_R2]
            if weak:
                self._probe_note = f"the factor probe reads {weak} with held-out R^2 < {MIN_PROBE_R2}"
                log.warning("generator quality: %s; their fidelity figures are unreliable", self._probe_note)
            self._real_readings = torch.cat([read_factors(probe, b) for b in real_batches()])
            self._probe = probe
        self._meter = meter
        for logger in trainer.loggers:
            if is_wandb(logger):  # the feature space, next to the charts (W&B scalars carry no text)
                try:
                    logger.experiment.config.update({"quality_feature": features.name}, allow_val_change=True)
                except Exception as e:  # a logging backend must never stop a run
                    log.warning("could not record the quality feature space in W&B: %s", e)

    def _wants_factors(self, dm) -> bool:
        from stylex.data.synthetic import SyntheticDataModule

        synthetic = isinstance(dm, SyntheticDataModule)
        if self.factor_fidelity and not synthetic:
            log.warning("callbacks.quality.factor_fidelity=true needs the synthetic dataset (its factors are the "
                        "truth); measuring without it")
        return synthetic if self.factor_fidelity is None else bool(self.factor_fidelity) and synthetic

    # ---------------------------------------------------------------- reporting
    def _record(self, trainer, pl_module, result: dict, seconds: float, log_to_module: bool) -> None:
        step, seen = pl_module.count("g_steps"), pl_module.count("images_seen")
        metrics = {k: float(v) for k, v in result["metrics"].items() if v is not None}
        realism = result["realism"]
        info = {"feature": realism["feature"], "g_steps": step, "images_seen": seen,
                "num_fake": realism["num_fake"], "num_real": realism["num_real"],
                "kid_subset_size": realism["kid_subset_size"], "seconds": round(seconds, 3),
                "conditioning": result["conditioning"], "factors": result["factors"]}
        if self._probe is not None:
            info["probe_r2"] = {k: round(v, 4) for k, v in self._probe.r2.items()}
        if self._probe_note:
            info["note"] = self._probe_note
        self.last = {**info, "metrics": metrics}
        log.info("generator quality at step %d (%.1f s, %s features): FID %.3f, KID %.4f, conditioning %.2f",
                 step, seconds, realism["feature"], metrics.get("val/fid", float("nan")),
                 metrics.get("val/kid", float("nan")), metrics.get("val/cond_fidelity", float("nan")))
        if log_to_module:  # callback_metrics (progress bar, checkpoint monitors); the loggers get them below
            for key, value in metrics.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, logger=False, batch_size=1)
        for logger in trainer.loggers:
            try:
                logger.log_metrics({**metrics, "quality/seconds": seconds}, step=int(trainer.global_step))
            except Exception as e:  # a logging backend must never stop a run
                log.warning("could not log the generator quality to %s: %s", type(logger).__name__, e)
        self._extend_history(trainer, {"g_steps": step, "images_seen": seen, "seconds": round(seconds, 3),
                                       **metrics})
        try:
            self._draw(trainer, realism)
        except Exception as e:  # a plot must never stop a run
            log.warning("could not draw %s: %s", self.plot, e)

    def _extend_history(self, trainer, entry: dict) -> None:
        path = in_run(trainer, self.cache_dir) / "quality.json"
        if not self._loaded_history and path.is_file():  # a resumed run: keep the points before this one
            try:
                old = json.loads(path.read_text()).get("history", [])
                self.history = [h for h in old if int(h.get("g_steps", -1)) < entry["g_steps"]]
            except (OSError, ValueError) as e:
                log.warning("could not read %s (%s); the quality history starts afresh", path, e)
        self._loaded_history = True
        self.history.append(entry)
        atomic_write_json(path, {"feature": self.last.get("feature"), "history": self.history})

    def _draw(self, trainer, realism: dict) -> None:
        xs = [h["images_seen"] / 1000 for h in self.history]
        xlabel = "thousands of images seen"
        size = (640, 340)
        feature = realism["feature"]
        sizes = f"{realism['num_fake']} generated vs {realism['num_real']} real"

        def series(key: str) -> list:
            return [h.get(key) for h in self.history]

        panels = [
            line_plot(xs, {"FID": series("val/fid")}, title=f"FID in {feature} features ({sizes})",
                      xlabel=xlabel, ylabel="FID", ylim=None, size=size),
            line_plot(xs, {"KID": series("val/kid")}, title=f"KID in {feature} features (mean of subsets)",
                      xlabel=xlabel, ylabel="KID", ylim=None, size=size),
        ]
        cond = {"all classes": series("val/cond_fidelity")}
        cond.update({k.rsplit("/", 1)[1]: series(k) for k in self.last["metrics"] if k.startswith("val/cond_fidelity/")})
        panels.append(line_plot(xs, cond, title="Conditioning fidelity: share classified as drawn",
                                xlabel=xlabel, ylabel="share", size=size))
        ratios = {k.split("/", 2)[2]: series(k) for k in self.last["metrics"] if k.startswith("val/factor_ratio/")}
        if ratios:
            panels.append(line_plot(xs, ratios, title="Causal factors: generated / real mean count (1 = faithful)",
                                    xlabel=xlabel, ylabel="ratio", ylim=None, size=size))
        contrast = {k.split("/", 2)[2]: series(k) for k in self.last["metrics"] if k.startswith("val/factor_contrast/")}
        if contrast:
            panels.append(line_plot(xs, contrast, title="Causal factors follow the class: generated / real "
                                    "difference from the first class (1 = faithful)",
                                    xlabel=xlabel, ylabel="contrast", ylim=None, size=size))
        image = stack(panels, gap=6)
        atomic_write(in_run(trainer, self.plot), lambda p: image.save(p, format="PNG"))
