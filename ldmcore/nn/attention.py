"""Attention blocks: multi-head (cross-)attention, the GEGLU feed-forward, the transformer block
and the SpatialTransformer that the UNet interleaves with its ResBlocks.

Cross-attention is the paper's conditioning mechanism (Rombach et al. 2022, Sec. 3.3):
Q = W_Q·φ(z_t), K = W_K·τθ(y), V = W_V·τθ(y), Attention = softmax(QKᵀ/√d)·V.
Module names follow CompVis ``ldm/modules/attention.py`` (attn1 / attn2 / ff, to_q / to_k /
to_v / to_out, proj_in / proj_out) so Stable Diffusion weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .blocks import normalization, zero_module


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention`` (scale 1/√head_dim).

    context_dim None: self-attention (keys and values come from x). Otherwise cross-attention:
    keys and values are projected from a context of width context_dim.
    """

    def __init__(
        self,
        query_dim: int,
        num_heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = num_heads * head_dim
        kv_dim = context_dim if context_dim is not None else query_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim); context: (B, L, context_dim) or None. Returns (B, N, query_dim)."""
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, heads, N, d)
        k = rearrange(self.to_k(context), "b l (h d) -> b h l d", h=self.num_heads)  # (B, heads, L, d)
        v = rearrange(self.to_v(context), "b l (h d) -> b h l d", h=self.num_heads)  # (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d), scale 1/√d
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, heads·d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2·dim_out, half gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # 2 × (..., dim_out)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a mult× wider inner layer: ``net`` = GEGLU, dropout, linear."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block on a token sequence:
    x + attn1(norm1(x)), then x + attn2(norm2(x), context) [only when context_dim is given],
    then x + ff(norm3(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim, dropout=dropout)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, num_heads, head_dim, context_dim=context_dim, dropout=dropout)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, dim); context: (B, L, context_dim), required iff built with context_dim."""
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None:
            if context is None:
                raise ValueError("this transformer block has cross-attention and needs a context")
            x = self.attn2(self.norm2(x), context) + x
        elif context is not None:
            raise ValueError("a context was given to a transformer block built without cross-attention")
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around it:
    GroupNorm → proj_in → depth × BasicTransformerBlock → proj_out (zero-init) → + input.

    use_linear False: proj_in/proj_out are 1×1 convs applied on the map (SD 1.x); True: linear
    layers applied on the token sequence (SD 2.x). The GroupNorm eps 1e-6 matches the reference.
    """

    def __init__(
        self,
        in_channels: int,
        num_heads: int,
        head_dim: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_linear: bool = False,
        num_groups: int = 32,
        eps: float = 1e-6,
    ):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.use_linear = use_linear
        self.norm = normalization(in_channels, num_groups, eps)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, num_heads, head_dim, context_dim, dropout) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, L, context_dim) or None. Returns (B, C, H, W)."""
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = rearrange(h, "b c h w -> b (h w) c").contiguous()  # (B, H·W, C|inner)
        if self.use_linear:
            h = self.proj_in(h)  # (B, H·W, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)  # (B, H·W, C)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width).contiguous()  # (B, C|inner, H, W)
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, H, W)
        return h + x


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over pixels, as in the first stage's middle block
    (CompVis ``AttnBlock``): GroupNorm → q, k, v (1×1 convs) → attention → proj_out → + input."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.norm = normalization(channels, num_groups, eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        height, width = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/√C
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width).contiguous()
        return x + self.proj_out(h)
