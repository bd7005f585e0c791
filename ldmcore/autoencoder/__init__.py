"""The first stage: an autoencoder between images and latents, and its training losses."""

from .identity import IdentityFirstStage
from .interface import LatentAutoencoder, Reconstruction
from .kl import DiagonalGaussian, KLAutoencoder
from .losses import (
    PatchDiscriminator,
    adaptive_weight,
    edge_weight_map,
    generator_adversarial_loss,
    hinge_d_loss,
    reconstruction_loss,
)
from .tiling import tiled
from .vq import PointPosterior, VectorQuantizer, VQAutoencoder

__all__ = [
    "DiagonalGaussian",
    "IdentityFirstStage",
    "KLAutoencoder",
    "LatentAutoencoder",
    "PatchDiscriminator",
    "PointPosterior",
    "Reconstruction",
    "VQAutoencoder",
    "VectorQuantizer",
    "adaptive_weight",
    "edge_weight_map",
    "generator_adversarial_loss",
    "hinge_d_loss",
    "reconstruction_loss",
    "tiled",
]
