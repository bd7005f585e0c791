"""Convolutional building blocks shared by the denoiser UNet and the autoencoder.

The layout follows the ADM / CompVis UNet (Dhariwal & Nichol 2021; Rombach et al. 2022,
``ldm/modules/diffusionmodules/openaimodel.py``) so that pretrained weights map onto it by name:
a ResBlock is ``in_layers`` (norm, SiLU, conv), ``emb_layers`` (SiLU, linear), ``out_layers``
(norm, SiLU, dropout, conv) and ``skip_connection``.

Activations and residual sums are written into the block's own intermediates when autograd does
not need them (inference, ``torch.no_grad``): on a CPU a fresh activation-sized allocation costs
page faults that often exceed the element-wise op itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def silu_(h: torch.Tensor) -> torch.Tensor:
    """SiLU of ``h``, a tensor the caller just computed and owns: in place unless autograd needs h."""
    return F.silu(h, inplace=not h.requires_grad)


def add_(h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """h + other (other broadcast to h's shape), written into h, a tensor the caller just computed
    and owns, unless autograd needs h."""
    return h + other if h.requires_grad else h.add_(other)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (used for residual branches
    and output layers, so that a block starts as the identity / a network starts at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def normalization(channels: int, num_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with ``num_groups`` groups, or the largest divisor of ``channels`` below it
    when ``channels`` is not a multiple (so small test configs such as 24 channels work)."""
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly continuous) timesteps.

    t: (B,) float or integer tensor, or a scalar. Returns (B, dim) float32, laid out as
    [cos(t·ω_0..ω_{k-1}), sin(t·ω_0..ω_{k-1})] with ω_i = max_period^(-i/k), k = dim // 2, and a
    zero column when dim is odd — the order used by the CompVis UNet (and diffusers with
    ``flip_sin_to_cos=True, freq_shift=0``), so pretrained time embeddings load unchanged.
    """
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t[None]
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 conv (``op``, as in the CompVis UNet).

    asymmetric_padding: pad one pixel right and bottom only, then convolve unpadded — the
    reference first stage's convention (CompVis ``model.Downsample``), kept for its weights.
    """

    def __init__(self, channels: int, out_channels: int | None = None, asymmetric_padding: bool = False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.op(x)  # (B, C, H, W) -> (B, C', ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour ×2 then a 3×3 conv (``conv``)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class ResBlock(nn.Module):
    """Residual block: norm → SiLU → conv → (+ projected embedding) → norm → SiLU → dropout → conv,
    added to a skip path (identity, or a 1×1 conv when the channel count changes).

    emb_channels None: no embedding input (the autoencoder's blocks). zero_init_out: zero the
    last conv so the block starts as the identity (the diffusion UNet's convention; the
    autoencoder keeps the default init as in the reference first stage).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        emb_channels: int | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        eps: float = 1e-5,
        zero_init_out: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            normalization(channels, num_groups, eps),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = (
            nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels)) if emb_channels else None
        )
        out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.out_layers = nn.Sequential(
            normalization(out_channels, num_groups, eps),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(out_conv) if zero_init_out else out_conv,
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); emb: (B, emb_channels) or None. Returns (B, C_out, H, W)."""
        # The Sequentials hold the layers under their checkpoint names; the activations are
        # applied here, in place where allowed (see the module docstring).
        norm, _, conv = self.in_layers
        h = conv(silu_(norm(x)))  # (B, C_out, H, W)
        if self.emb_layers is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_channels and needs an embedding")
            h = add_(h, self.emb_layers(emb)[:, :, None, None])  # broadcast (B, C_out, 1, 1)
        norm, _, dropout, conv = self.out_layers
        h = conv(dropout(silu_(norm(h))))
        return add_(h, self.skip_connection(x))
