"""Every config option composes; presets build networks of the right shapes; trainer keys are real."""

from __future__ import annotations

import importlib
import inspect

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from helpers import CONFIGS, compose_cfg
from stylex.training.run import network_kwargs

GROUPS = ["dataset", "model", "classifier", "loss", "trainer", "logger", "callbacks", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]


def _import_target(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group, option):
    overrides = [f"{group}={option}"]
    if option in ("folder",) or group == "experiment":
        overrides.append("dataset.root=/some/folder")
    cfg = compose_cfg(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for node in _targets(resolved):
        target = node["_target_"]
        cls = _import_target(target)
        params = inspect.signature(cls).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            unknown = set(node) - set(params) - {"_target_", "name"}
            assert not unknown, f"{target} does not accept {sorted(unknown)}"


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node
        for v in node.values():
            yield from _targets(v)


def test_trainer_config_keys_are_trainer_arguments():
    accepted = set(inspect.signature(pl.Trainer).parameters)
    for p in (CONFIGS / "trainer").glob("*.yaml"):
        keys = set(OmegaConf.load(p)) - {"defaults"}
        assert keys <= accepted, f"{p.name}: not Trainer arguments: {sorted(keys - accepted)}"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_model_presets_build_networks_of_the_right_shapes(preset):
    from stylex.networks import Discriminator, Encoder, Generator

    cfg = compose_cfg([f"model={preset}"])
    g_kw, d_kw, e_kw = network_kwargs(cfg, num_classes=3)
    G, D, E = Generator(**g_kw), Discriminator(**d_kw), Encoder(**e_kw)
    r = cfg.model.resolution
    batch = 4
    with torch.no_grad():
        c = torch.softmax(torch.randn(batch, 3), 1)
        x = G(torch.randn(batch, cfg.model.z_dim), c)
        assert x.shape == (batch, 3, r, r)
        assert D(x, c).shape == (batch, 1)
        assert E(x).shape == (batch, cfg.model.w_dim)
    # One style vector per modulated conv and toRGB: 2 at 4x4, 3 per block above it.
    n_blocks = int(torch.log2(torch.tensor(r))) - 2
    assert len(G.style_layers) == 2 + 3 * n_blocks
