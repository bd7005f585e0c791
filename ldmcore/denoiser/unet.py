"""The time-conditional UNet εθ(z_t, t, context, y) of the latent diffusion model.

Layout of the ADM / CompVis UNet (``openaimodel.UNetModel``), kept module for module so that
Stable Diffusion checkpoints map onto it by name (``input_blocks.4.1.transformer_blocks.0.attn2
.to_k.weight`` ...):

    time_embed      sinusoidal(model_channels) → Linear → SiLU → Linear (4·model_channels)
    vector_embed    Linear(vector_dim → 4·model_channels), added to the time embedding (the
                    "vector"/y path of class-conditional ADM and SD-XL)
    input_blocks    conv_in, then per level: num_res_blocks × [ResBlock (+ SpatialTransformer)],
                    then a Downsample except at the last level
    middle_block    ResBlock, SpatialTransformer, ResBlock
    output_blocks   per level (deepest first): (num_res_blocks + 1) × [ResBlock on the
                    concatenation with the matching skip (+ SpatialTransformer)], then an Upsample
                    except at the top level
    out             GroupNorm → SiLU → zero-initialized 3×3 conv
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.attention import RegionBiases, SpatialTransformer
from ..nn.blocks import Downsample, ResBlock, Upsample, normalization, silu_, timestep_embedding, zero_module


class EmbedSequential(nn.Sequential):
    """A sequence of layers that hands the timestep embedding to ResBlocks and the context to
    SpatialTransformers (CompVis ``TimestepEmbedSequential``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                regions: RegionBiases | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, regions)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """εθ: maps a noisy latent (with any concatenated spatial condition) to a prediction of the
    same spatial size.

    attention_resolutions: downsample factors (1 = full latent resolution, 2 = half, ...) at
        which a SpatialTransformer follows each ResBlock.
    num_heads / head_dim: either a fixed number of heads (head_dim = channels // num_heads) or,
        when head_dim is given, a fixed head width (num_heads = channels // head_dim, as SD 2.x).
    transformer_depth: blocks per SpatialTransformer; an int, or one per level (the middle block
        then uses the last level's depth).
    context_dim: width of the cross-attention context; None builds no cross-attention.
    vector_dim: width of the vector condition y added to the timestep embedding; None: no y.
    use_linear_proj: linear instead of 1×1-conv proj_in/proj_out in the transformers (SD 2.x).
    coordinate_frequencies: F > 0 appends 4·F fixed channels to the input, sin and cos of π·2^k·u
        (k < F) for each axis u in [-1, 1] across the latent (CoordConv, Liu et al. 2018, with the
        Fourier features of Tancik et al. 2020). A convolutional UNet knows where it is only through
        its padding, and at 8×8 latents the first attention's receptive field does not reach the
        border from the centre; a condition that names positions through cross-attention (boxes,
        "left of") needs them. 0 (the default) keeps the CompVis / SD layout exactly; None is 0 here
        (``ldmcore.system.build_system`` resolves the config's null from the selected conditions).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (2,),
        num_heads: int = 4,
        head_dim: int | None = None,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        vector_dim: int | None = None,
        dropout: float = 0.0,
        use_linear_proj: bool = False,
        num_groups: int = 32,
        coordinate_frequencies: int | None = 0,
    ):
        super().__init__()
        coordinate_frequencies = coordinate_frequencies or 0  # None (the config's "auto", unresolved: no condition asks)
        if coordinate_frequencies < 0:
            raise ValueError(f"coordinate_frequencies must be >= 0, got {coordinate_frequencies}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.coordinate_frequencies = coordinate_frequencies
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        depths = (
            [transformer_depth] * len(channel_mult)
            if isinstance(transformer_depth, int)
            else list(transformer_depth)
        )
        if len(depths) != len(channel_mult):
            raise ValueError(f"transformer_depth needs one entry per level ({len(channel_mult)}), got {depths}")

        time_embed_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.vector_embed = nn.Linear(vector_dim, time_embed_dim) if vector_dim is not None else None

        def res_block(channels: int, out: int) -> ResBlock:
            return ResBlock(channels, out, time_embed_dim, dropout, num_groups)

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            if head_dim is not None:
                heads, width = channels // head_dim, head_dim
            else:
                heads, width = num_heads, channels // num_heads
            if heads * width != channels:
                raise ValueError(f"{channels} channels do not split into heads (num_heads={num_heads}, head_dim={head_dim})")
            return SpatialTransformer(
                channels, heads, width, depth, context_dim, dropout, use_linear_proj, num_groups
            )

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels + 4 * coordinate_frequencies, model_channels, 3, padding=1))])
        skip_channels = [model_channels]  # channels of each input block's output, consumed by the decoder
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and depths[level] > 0:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res_block(ch, ch), transformer(ch, max(depths[-1], 1)), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and depths[level] > 0:
                    layers.append(transformer(ch, depths[level]))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, num_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        context_regions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, h, w), h and w divisible by downsample_factor; t: (B,) or scalar,
        float (continuous) or integer timesteps; context: (B, L, context_dim); y: (B, vector_dim);
        context_regions: None or where each context token applies, (B, L, R_h, R_w) in [0, 1]
        (``ldmcore.nn.attention``, "Token regions"). Returns (B, out_channels, h, w)."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor}")
        if (context is not None) != (self.context_dim is not None):
            raise ValueError(
                f"UNet built with context_dim={self.context_dim} got context={'None' if context is None else 'a tensor'}"
            )
        if context_regions is not None and (context is None or context_regions.dim() != 4
                                            or context_regions.shape[:2] != context.shape[:2]):
            raise ValueError(f"context_regions must be (B, L, R_h, R_w) with the context's (B, L) = "
                             f"{None if context is None else tuple(context.shape[:2])}, got {tuple(context_regions.shape)}")
        if (y is not None) != (self.vector_dim is not None):
            raise ValueError(f"UNet built with vector_dim={self.vector_dim} got y={'None' if y is None else 'a tensor'}")

        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))  # (B, 4·mc)
        if self.vector_embed is not None:
            emb = emb + self.vector_embed(y)

        skips = []
        regions = None if context_regions is None else RegionBiases(context_regions)  # one bias per resolution
        h = torch.cat([x, self.coordinates(x)], dim=1) if self.coordinate_frequencies else x
        for block in self.input_blocks:
            h = block(h, emb, context, regions)
            skips.append(h)
        h = self.middle_block(h, emb, context, regions)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, regions)  # (B, C + C_skip, h', w')
        norm, _, conv = self.out
        return conv(silu_(norm(h)))

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4·F, h, w) Fourier features of each latent position, u in [-1, 1] from edge to edge of
        x (so at a larger sampling size they still span the image): sin of each frequency, then cos, for x then y."""
        b, _, h, w = x.shape
        omega = torch.pi * 2.0 ** torch.arange(self.coordinate_frequencies, device=x.device, dtype=torch.float32)  # (F,)
        def axis(n: int) -> torch.Tensor:  # (2F, n): sin then cos, pixel centres
            angles = omega[:, None] * ((torch.arange(n, device=x.device, dtype=torch.float32) + 0.5) / n * 2 - 1)
            return torch.cat([angles.sin(), angles.cos()])
        features = torch.cat([axis(w)[:, None, :].expand(-1, h, w), axis(h)[:, :, None].expand(-1, h, w)])  # (4F, h, w)
        return features.to(x.dtype).expand(b, -1, -1, -1)
