"""The VQ-regularized first stage (Rombach et al. 2022, Sec. 3.1; VQGAN, Esser et al. 2021).

The encoder and decoder are the KL first stage's (ldmcore/autoencoder/kl.py). Between them a
codebook of ``codebook_size`` vectors replaces each latent pixel by its nearest code. As in the
paper, the quantization layer is absorbed into the decoder: ``encode`` returns the
*pre-quantization* latents, on which the diffusion model runs, and ``decode`` quantizes first.

The encoder learns through the straight-through estimator (van den Oord et al. 2017: the
decoder's gradient at the quantized latent is copied to the encoder's output) and the commitment
loss β·‖z − sg(e)‖². The codebook learns either from the codebook loss ‖sg(z) − e‖²
(``codebook_update="gradient"``, VQGAN) or by exponential moving averages of the encoder outputs
assigned to each code (``"ema"``, van den Oord et al. 2017, App. A.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .interface import LatentAutoencoder, Reconstruction
from .kl import Decoder, Encoder
from .tiling import tiled

CODEBOOK_UPDATES = ("gradient", "ema")


@dataclass
class Quantized:
    """The quantizer's training output.

    latent: the quantized latent with straight-through gradient to the input (B, D, h, w).
    indices: the chosen code per latent pixel (B, h, w).
    loss: codebook loss (gradient updates only) + β · commitment loss, a scalar.
    perplexity: exp(entropy) of the codes' frequencies in this batch, in [1, codebook_size].
    usage: the fraction of codes used at least once in this batch.
    """

    latent: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    perplexity: float
    usage: float


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of (B, D, h, w) latents against ``codebook_size`` codes of
    dimension ``dim``.

    beta: weight of the commitment loss (0.25 in van den Oord et al. 2017 and VQGAN).
    update: "gradient" (the codebook is a parameter trained by the codebook loss) or "ema" (it is
        a buffer moved towards the mean of its assigned vectors with ``ema_decay``).
    restart_threshold: in training, a code whose moving-average count of assignments per batch
        falls below this is moved onto a random encoder output of the batch (dead-code restart);
        0 turns it off. The counts are kept with ``ema_decay`` in both update modes.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        update: str = "gradient",
        ema_decay: float = 0.99,
        restart_threshold: float = 0.0,
    ):
        super().__init__()
        if update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook_update must be one of {', '.join(CODEBOOK_UPDATES)}, got {update!r}")
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be at least 1, got {codebook_size}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.update, self.ema_decay, self.restart_threshold = update, ema_decay, restart_threshold
        # VQGAN's init: uniform in ±1/K.
        codebook = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.codebook = nn.Parameter(codebook, requires_grad=update == "gradient")  # (K, D)
        # Moving-average assignments per code and batch; starting at 1 (with the sums at the
        # codebook) keeps an unused code where it is under EMA updates instead of dividing by ~0.
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,)
        if update == "ema":
            self.register_buffer("embed_sum", codebook.clone())  # (K, D)

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance) for each row of flat (N, D): (N,)."""
        codebook = self.codebook.detach()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)[None]  # (N, K)
        return distances.argmin(dim=1)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest codes of z (B, D, h, w) -> (B, D, h, w); no statistics, no updates."""
        flat = _flatten(z)  # (B·h·w, D)
        return _unflatten(F.embedding(self.nearest(flat), self.codebook), z)

    def forward(self, z: torch.Tensor) -> Quantized:
        """The training forward on z (B, D, h, w); in training mode it also updates the codebook
        (EMA) and restarts dead codes, after the codes of this batch are chosen."""
        if z.shape[1] != self.dim:
            raise ValueError(f"the quantizer expects {self.dim} latent channels, got {z.shape[1]}")
        flat = _flatten(z)  # (N, D), N = B·h·w
        indices = self.nearest(flat)  # (N,)
        quantized = _unflatten(F.embedding(indices, self.codebook), z)  # (B, D, h, w)
        loss = self.beta * F.mse_loss(z, quantized.detach())  # commitment: the encoder moves towards its code
        if self.update == "gradient":
            loss = loss + F.mse_loss(quantized, z.detach())  # codebook loss: the code moves towards the encoder
        counts = torch.bincount(indices, minlength=self.codebook_size).to(flat.dtype)  # (K,)
        probs = counts / counts.sum()
        perplexity = math.exp(-float((probs * probs.clamp_min(1e-10).log()).sum()))
        usage = float((counts > 0).to(flat.dtype).mean())
        if self.training:
            self._update(flat.detach(), indices, counts)
        straight_through = z + (quantized - z).detach()  # forward: the codes; backward: identity to z
        return Quantized(straight_through, indices.view(z.shape[0], *z.shape[2:]), loss, perplexity, usage)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.update == "ema":  # N_i ← γN_i + (1−γ)n_i,  m_i ← γm_i + (1−γ)Σ z,  e_i = m_i / N_i
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # (K, D)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            self.codebook.copy_(self.embed_sum / self.cluster_size.clamp_min(1e-5)[:, None])
        if self.restart_threshold > 0:
            dead = self.cluster_size < self.restart_threshold  # (K,)
            n_dead = int(dead.sum())
            if n_dead:
                fresh = flat[torch.randint(len(flat), (n_dead,), device=flat.device)]  # (n_dead, D)
                self.codebook[dead] = fresh
                # A restarted code gets the average count, so it is not restarted again at once.
                self.cluster_size[dead] = counts.sum() / self.codebook_size
                if self.update == "ema":
                    self.embed_sum[dead] = fresh * self.cluster_size[dead][:, None]


def _flatten(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, D, h, w) -> (B·h·w, D)


def _unflatten(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, d, h, w = like.shape
    return flat.view(b, h, w, d).permute(0, 3, 1, 2)  # (B·h·w, D) -> (B, D, h, w)


class PointPosterior:
    """The VQ encoder's output seen as a posterior concentrated on one latent (B, C, h, w):
    the interface of ``DiagonalGaussian`` with std 0, so the rest of ldmcore treats both alike."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent
        self.std = torch.zeros_like(latent)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])  # (B,): no KL term for a VQ first stage


class VQAutoencoder(LatentAutoencoder):
    """VQ-regularized autoencoder with downsample factor f = 2 ** (len(channel_mult) - 1).

    The encoder/decoder options are the KL first stage's (KLAutoencoder); latent_channels is
    the codebook's dimension (VQGAN's embed_dim). codebook_size, beta, codebook_update,
    ema_decay and restart_threshold configure the VectorQuantizer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        encoder_res_blocks: int = 1,
        decoder_res_blocks: int = 2,
        latent_channels: int = 3,
        codebook_size: int = 1024,
        beta: float = 0.25,
        codebook_update: str = "gradient",
        ema_decay: float = 0.99,
        restart_threshold: float = 0.0,
        mid_attention: bool = False,
        num_groups: int = 32,
        scale_factor: float = 1.0,
        mid_res_blocks: int = 1,
    ):
        super().__init__(scale_factor)
        if not channel_mult:
            raise ValueError("channel_mult needs at least one level")
        widths = [base_channels * m for m in channel_mult]
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(in_channels, widths, encoder_res_blocks, latent_channels, mid_attention, num_groups,
                               mid_res_blocks)
        self.quantizer = VectorQuantizer(codebook_size, latent_channels, beta, codebook_update, ema_decay,
                                         restart_threshold)
        self.decoder = Decoder(latent_channels, widths, decoder_res_blocks, in_channels, mid_attention, num_groups,
                               mid_res_blocks)

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> pre-quantization latent (B, latent_channels, H/f, W/f)."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by f={self.downsample_factor}")
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> PointPosterior:
        """x: (B, in_channels, H, W) in [-1, 1], H and W divisible by f. Returns the
        *pre-quantization* latent (B, latent_channels, H/f, W/f), unscaled."""
        return PointPosterior(self._latent(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: pre-quantization latent (B, latent_channels, h, w), e.g. a diffusion sample
        (unscaled); it is quantized, then decoded to (B, in_channels, h·f, w·f)."""
        return self.decoder(self.quantizer.quantize(z))

    def encode_tiled(self, x: torch.Tensor, tile: int, overlap: int) -> PointPosterior:
        """``encode`` tile by tile (tile and overlap in image pixels, multiples of f); latents are
        cross-faded where tiles overlap (ldmcore/autoencoder/tiling.py)."""
        return PointPosterior(tiled(self._latent, x, tile, overlap, down=self.downsample_factor))

    def reconstruct(
        self, x: torch.Tensor, generator: torch.Generator | None = None, latent_noise: float = 0.0
    ) -> Reconstruction:
        """The training forward: encode, add ``latent_noise``·N(0, I) (the decoder then learns to
        decode slightly-off latents, as a diffusion sample is), quantize, decode.
        losses["codebook"] is the quantizer's loss (codebook + β·commitment)."""
        z = self._latent(x)  # (B, latent_channels, H/f, W/f)
        if latent_noise > 0:
            z = z + latent_noise * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        q = self.quantizer(z)
        metrics = {"codebook_loss": q.loss.item(), "perplexity": q.perplexity, "codebook_usage": q.usage}
        return Reconstruction(self.decoder(q.latent), {"codebook": q.loss}, metrics)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, PointPosterior]:
        """Reconstruct x through its quantized latent (``sample`` is ignored: nothing is random)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode()), posterior
