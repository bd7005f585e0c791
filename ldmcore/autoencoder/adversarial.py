"""The optional adversarial part of the first-stage loss (Esser et al. 2021, used by the paper's
autoencoders): a patch discriminator trained with the hinge loss, and a generator term whose
weight adapts so its gradient at the decoder's last layer matches the reconstruction loss's."""

from __future__ import annotations

import torch

from .losses import PatchDiscriminator, adaptive_weight, generator_adversarial_loss, hinge_d_loss


class AdversarialLoss:
    """Owns the discriminator and its optimizer; the autoencoder's loop calls
    ``generator_loss`` (added to its loss) and then ``step`` (updates the discriminator)."""

    def __init__(self, weight: float, lr: float, base_channels: int = 32, n_layers: int = 2):
        self.weight = weight
        self.discriminator = PatchDiscriminator(base_channels=base_channels, n_layers=n_layers, norm="group")
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))

    def generator_loss(self, reconstruction_loss: torch.Tensor, recon: torch.Tensor, autoencoder) -> torch.Tensor:
        self.discriminator.requires_grad_(False)
        g_loss = generator_adversarial_loss(self.discriminator(recon))
        self.discriminator.requires_grad_(True)
        return self.weight * adaptive_weight(reconstruction_loss, g_loss, autoencoder.last_layer) * g_loss

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        loss = hinge_d_loss(self.discriminator(real), self.discriminator(fake.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()
