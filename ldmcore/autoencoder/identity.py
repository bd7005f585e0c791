"""The pass-through first stage: diffusion in pixel space (the paper's f = 1, "LDM-1").

A ``KLAutoencoder`` with one level also has f = 1, but it is a learned encoder and decoder; the
paper's f = 1 baseline is a plain pixel-space diffusion model, with no first stage at all. This
module gives that model the first-stage interface, so that the rest of ldmcore (latent pool,
scale factor, sampling, checkpoints) runs it unchanged. It has no parameters: nothing is trained
or cached for it (``ldmcore/training/first_stage.py``).
"""

from __future__ import annotations

import torch

from .interface import LatentAutoencoder, Reconstruction
from .vq import PointPosterior


class IdentityFirstStage(LatentAutoencoder):
    """encode(x) = x and decode(z) = z: latents are the images themselves, (B, C, H, W).

    latent_channels: C, the image channels, which are the latent channels too (3 for RGB).
    scale_factor: as for every first stage, set on the data to give unit-variance latents.
    """

    downsample_factor = 1

    def __init__(self, latent_channels: int = 3, scale_factor: float = 1.0):
        super().__init__(scale_factor)
        if latent_channels < 1:
            raise ValueError(f"autoencoder.model.latent_channels must be at least 1, got {latent_channels}")
        self.latent_channels = latent_channels

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(f"the identity first stage takes (B, {self.latent_channels}, H, W) tensors, got {tuple(x.shape)}")
        return x

    def encode(self, x: torch.Tensor) -> PointPosterior:
        """x: (B, C, H, W) in [-1, 1] -> a point posterior at x itself (std 0, no KL)."""
        return PointPosterior(self._check(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latent (B, C, H, W) -> the same tensor, as the image."""
        return self._check(z)

    def encode_tiled(self, x: torch.Tensor, tile: int, overlap: int) -> PointPosterior:
        """Tiling changes nothing for a pointwise map: the same as ``encode``."""
        return self.encode(x)

    def decode_tiled(self, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        return self.decode(z)

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None,
                    latent_noise: float = 0.0) -> Reconstruction:
        """The reconstruction is the input (plus ``latent_noise``·N(0, I) when asked); no loss terms."""
        if latent_noise > 0:
            x = x + latent_noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return Reconstruction(self._check(x), {})
