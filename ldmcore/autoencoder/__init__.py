"""The first stage: an autoencoder between images and latents, and its training losses."""

from .kl import DiagonalGaussian, KLAutoencoder
from .losses import (
    PatchDiscriminator,
    adaptive_weight,
    edge_weight_map,
    generator_adversarial_loss,
    hinge_d_loss,
    reconstruction_loss,
)

__all__ = [
    "DiagonalGaussian",
    "KLAutoencoder",
    "PatchDiscriminator",
    "adaptive_weight",
    "edge_weight_map",
    "generator_adversarial_loss",
    "hinge_d_loss",
    "reconstruction_loss",
]
