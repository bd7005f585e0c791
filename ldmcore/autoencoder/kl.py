"""The KL-regularized first stage (Rombach et al. 2022, Sec. 3.1 and App. G).

The encoder E maps an image x ∈ [-1, 1]^(3×H×W) to a diagonal Gaussian posterior over a latent
z ∈ R^(c×H/f×W/f); a small KL(q(z|x) ‖ N(0, I)) term keeps the latent space well behaved. The
decoder D maps z back to an image. Like the paper's first stage (ResBlocks, stride-2 convs, a
middle block with optional attention), but sized for small images: every width is a multiple of
``base_channels`` and the encoder and decoder may have different depths.

Latents handed to the diffusion model are ``scale_factor · z`` (unit variance on the data);
``encode`` and ``decode`` work on *unscaled* latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.attention import SpatialSelfAttention
from ..nn.blocks import Downsample, ResBlock, Upsample, normalization
from .interface import LatentAutoencoder, Reconstruction
from .tiling import tiled

# The first stage's GroupNorm eps (CompVis ldm/modules/diffusionmodules/model.py: Normalize).
_EPS = 1e-6


class DiagonalGaussian:
    """A diagonal Gaussian N(mean, exp(logvar)) over latents of shape (B, C, h, w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite (same bounds as the reference)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """moments: (B, 2C, h, w), the mean then the log-variance along channels."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterized sample mean + std·ε, (B, C, h, w); differentiable in mean and std."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per sample, summed over C, h, w: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class Encoder(nn.Module):
    """conv_in → per level: ResBlocks then Downsample (not after the last) → mid → norm → SiLU → conv_out."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        res_blocks: int,
        out_channels: int,
        mid_attention: bool,
        num_groups: int,
        mid_res_blocks: int = 1,
        asymmetric_downsample: bool = False,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(_res_block(ch, width, num_groups))
                ch = width
            if level != len(widths) - 1:
                layers.append(Downsample(ch, asymmetric_padding=asymmetric_downsample))
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(ch, mid_attention, num_groups, mid_res_blocks)
        self.norm_out = normalization(ch, num_groups, _EPS)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(self.act(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in → mid → per level (deepest first): ResBlocks then Upsample (not after the top) →
    norm → SiLU → conv_out. The mirror image of the Encoder."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        res_blocks: int,
        out_channels: int,
        mid_attention: bool,
        num_groups: int,
        mid_res_blocks: int = 1,
    ):
        super().__init__()
        ch = widths[-1]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.mid = _mid_block(ch, mid_attention, num_groups, mid_res_blocks)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(res_blocks):
                layers.append(_res_block(ch, widths[level], num_groups))
                ch = widths[level]
            if level != 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = normalization(ch, num_groups, _EPS)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(self.act(self.norm_out(h)))


def _res_block(channels: int, out_channels: int, num_groups: int) -> ResBlock:
    # No timestep embedding, reference (non-zero) init of the residual branch.
    return ResBlock(channels, out_channels, num_groups=num_groups, eps=_EPS, zero_init_out=False)


def _mid_block(channels: int, attention: bool, num_groups: int, res_blocks: int) -> nn.Sequential:
    # ResBlock, optional attention, then any further ResBlocks (the reference has 2: block_1,
    # attn_1, block_2).
    layers: list[nn.Module] = [_res_block(channels, channels, num_groups)]
    if attention:
        layers.append(SpatialSelfAttention(channels, num_groups, _EPS))
    layers += [_res_block(channels, channels, num_groups) for _ in range(res_blocks - 1)]
    return nn.Sequential(*layers)


class KLAutoencoder(LatentAutoencoder):
    """KL-regularized autoencoder with downsample factor f = 2 ** (len(channel_mult) - 1).

    channel_mult: width of each level as a multiple of base_channels, e.g. base_channels=16,
        channel_mult=(1, 4, 8) gives 16 → 64 → 128 at f=4; (1,) is f=1, (1, 2) f=2, (1, 2, 2)
        f=4, (1, 2, 4, 4) f=8 and (1, 1, 2, 2, 4) f=16 (the paper's kl-f8 / kl-f16), one more
        level per further factor 2.
    encoder_res_blocks / decoder_res_blocks: ResBlocks per level on each side.
    scale_factor: multiplies latents before diffusion; a buffer (see LatentAutoencoder).

    The last three options exist to hold the reference first stage (Stable Diffusion's VAE:
    base_channels=128, channel_mult=(1, 2, 4, 4), encoder_res_blocks=2, decoder_res_blocks=3,
    mid_attention=True, mid_res_blocks=2, quant_conv=True, asymmetric_downsample=True):
    mid_res_blocks: ResBlocks in each middle block (the attention sits after the first).
    quant_conv: 1×1 convs on the moments (quant_conv) and before the decoder (post_quant_conv).
    asymmetric_downsample: pad right/bottom only before each stride-2 conv.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        encoder_res_blocks: int = 1,
        decoder_res_blocks: int = 2,
        latent_channels: int = 4,
        mid_attention: bool = False,
        num_groups: int = 32,
        scale_factor: float = 1.0,
        mid_res_blocks: int = 1,
        quant_conv: bool = False,
        asymmetric_downsample: bool = False,
    ):
        super().__init__(scale_factor)
        if not channel_mult:
            raise ValueError("channel_mult needs at least one level")
        widths = [base_channels * m for m in channel_mult]
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(in_channels, widths, encoder_res_blocks, 2 * latent_channels, mid_attention, num_groups,
                               mid_res_blocks, asymmetric_downsample)
        self.decoder = Decoder(latent_channels, widths, decoder_res_blocks, in_channels, mid_attention, num_groups,
                               mid_res_blocks)
        if quant_conv:
            self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        else:
            self.quant_conv = self.post_quant_conv = None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1], H and W divisible by f.
        Returns the posterior over unscaled latents (B, latent_channels, H/f, W/f)."""
        return DiagonalGaussian.from_moments(self._moments(x))

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> posterior mean and log-variance (B, 2·latent_channels, H/f, W/f)."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by f={self.downsample_factor}")
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latent (B, latent_channels, h, w) -> raw image (B, in_channels, h·f, w·f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_tiled(self, x: torch.Tensor, tile: int, overlap: int) -> DiagonalGaussian:
        """``encode`` tile by tile (tile and overlap in image pixels, multiples of f); the
        posterior's moments are cross-faded where tiles overlap (ldmcore/autoencoder/tiling.py)."""
        return DiagonalGaussian.from_moments(tiled(self._moments, x, tile, overlap, down=self.downsample_factor))

    def reconstruct(
        self, x: torch.Tensor, generator: torch.Generator | None = None, latent_noise: float = 0.0
    ) -> Reconstruction:
        """The training forward: decode a posterior sample (plus ``latent_noise``·N(0, I), which
        makes the decoder robust to slightly-off latents). losses["kl"] is KL(q ‖ N(0, I)) per
        latent element, so its weight does not depend on the latent size."""
        posterior = self.encode(x)
        z = posterior.sample(generator)  # (B, latent_channels, H/f, W/f)
        if latent_noise > 0:
            z = z + latent_noise * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        kl = posterior.kl().mean() / z[0].numel()
        return Reconstruction(self.decode(z), {"kl": kl}, {"kl": kl.item()})

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (sample=True) or its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
