"""Networks of StylEx: the classifier-conditioned StyleGAN2 generator, its discriminator and
the encoder, built from equalised-learning-rate layers."""

from stylex.networks.discriminator import Discriminator, DiscriminatorBlock, MinibatchStd, ResidualTrunk
from stylex.networks.encoder import Encoder, NoiseMapEncoder
from stylex.networks.generator import Generator, mix_latents
from stylex.networks.layers import (
    EqualizedConv2d,
    EqualizedLinear,
    ModulatedConv2d,
    NoiseInjection,
    conv2d_resample,
    normalize_2nd_moment,
)
from stylex.networks.mapping import MappingNetwork
from stylex.networks.synthesis import (
    SynthesisBlock,
    SynthesisLayer,
    SynthesisNetwork,
    SynthesisState,
    ToRGBLayer,
    block_resolutions,
    channels_at,
)

__all__ = [
    "Discriminator",
    "DiscriminatorBlock",
    "Encoder",
    "NoiseMapEncoder",
    "EqualizedConv2d",
    "EqualizedLinear",
    "Generator",
    "MappingNetwork",
    "MinibatchStd",
    "ModulatedConv2d",
    "NoiseInjection",
    "ResidualTrunk",
    "SynthesisBlock",
    "SynthesisLayer",
    "SynthesisNetwork",
    "SynthesisState",
    "ToRGBLayer",
    "block_resolutions",
    "channels_at",
    "conv2d_resample",
    "mix_latents",
    "normalize_2nd_moment",
]
