"""What the rest of ldmcore asks of a first stage, what its training forward returns, and the
part the first stages share.

A first stage (``KLAutoencoder``, ``VQAutoencoder``) provides:

- ``encode(x) -> latent distribution`` with ``mean``, ``std`` (B, C, h, w), ``mode()``,
  ``sample(generator)`` and ``kl()`` (B,): the latents the diffusion model runs on, unscaled;
- ``decode(z) -> image`` (B, 3, H, W), for any latent ``encode`` can give (a VQ first stage
  quantizes inside ``decode``);
- ``encode_tiled`` / ``decode_tiled``: the same, tile by tile (ldmcore/autoencoder/tiling.py);
- ``reconstruct(x, generator, latent_noise) -> Reconstruction``: the training forward;
- ``latent_channels``, ``downsample_factor`` (f), a ``scale_factor`` buffer and ``last_layer``
  (the decoder's output weight, for the adaptive adversarial weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .tiling import tiled


@dataclass
class Reconstruction:
    """The first-stage training forward's result.

    image: the reconstruction (B, 3, H, W).
    losses: the regularizer's unweighted scalar terms by name ("kl" for the KL first stage,
        "codebook" for the VQ one); the training loop weighs each by its option.
    metrics: numbers to log (floats), e.g. the codebook's perplexity and usage in this batch.
    """

    image: torch.Tensor
    losses: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


class LatentAutoencoder(nn.Module):
    """What the first stages share: the ``scale_factor`` buffer (saved with the weights, and
    settable like the float it stands for: ``ae.scale_factor = 1 / std``), ``last_layer`` and the
    tiled decode. A subclass builds ``self.decoder`` (ending in ``conv_out``), sets
    ``downsample_factor`` and implements ``encode``, ``decode``, ``encode_tiled`` and ``reconstruct``."""

    downsample_factor: int

    def __init__(self, scale_factor: float):
        super().__init__()
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))

    def __setattr__(self, name: str, value) -> None:
        if name == "scale_factor" and isinstance(value, (int, float)) and "scale_factor" in self._buffers:
            self._buffers["scale_factor"].fill_(float(value))
            return
        super().__setattr__(name, value)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output-conv weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def decode_tiled(self, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """``decode`` tile by tile (tile and overlap in latent pixels): (B, C, h, w) -> (B, 3, h·f, w·f)."""
        return tiled(self.decode, z, tile, overlap, up=self.downsample_factor)
