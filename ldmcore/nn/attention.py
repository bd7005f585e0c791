"""Attention blocks: multi-head (cross-)attention, the GEGLU feed-forward, the transformer block
and the SpatialTransformer that the UNet interleaves with its ResBlocks.

Cross-attention is the paper's conditioning mechanism (Rombach et al. 2022, Sec. 3.3):
Q = W_Q·φ(z_t), K = W_K·τθ(y), V = W_V·τθ(y), Attention = softmax(QKᵀ/√d)·V.
Module names follow CompVis ``ldm/modules/attention.py`` (attn1 / attn2 / ff, to_q / to_k /
to_v / to_out, proj_in / proj_out) so Stable Diffusion weights load by name. The forward passes
use those weights as they are, in fewer and larger matrix products: q, k and v of self-attention
in one, k and v of cross-attention in one, and the transformer's projections directly on the
token layout (no copy into or out of it). `reuse_context` lets a sampler project a context once.

Token regions: a condition may say where in the image each of its tokens applies, as maps
(B, L, R_h, R_w) with values in [0, 1] (1: this token is about this place; a token about the
whole image is 1 everywhere). Cross-attention then adds log(region) at each query's position to
the logits, so attention is the learned weights times the spatial prior — the region masks that
eDiff-I's "paint with words" adds to the cross-attention logits (Balaji et al. 2022, Sec. 4.3),
here given while training as well as at sampling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .blocks import add_, normalization, zero_module


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
        self.is_cross_attention = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        # context -> (k, v) while a `reuse_context` block is open, else None
        self.context_cache: dict | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim); context: (B, L, context_dim) or None; bias: None or added to the
        attention logits, broadcastable to (B, heads, N, L) (``region_bias``). Returns (B, N, query_dim)."""
        if context is None:
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3·inner, query_dim)
            qkv = F.linear(x, w)  # (B, N, 3·inner): one product instead of three
            q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # views
        else:
            q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, heads, N, d)
            k, v = self.keys_values(context)  # (B, heads, L, d) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))  # (B, heads, N, d), scale 1/√d
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, query_dim)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context (B, L, context_dim), each (B, heads, L, d), from one matrix
        product; taken from the cache inside a `reuse_context` block when autograd is off."""
        use_cache = self.context_cache is not None and not torch.is_grad_enabled()
        if use_cache:
            key = _tensor_key(context)
            if key in self.context_cache:
                return self.context_cache[key][1:]
        w = torch.cat([self.to_k.weight, self.to_v.weight])  # (2·inner, context_dim)
        k, v = rearrange(F.linear(context, w), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        if use_cache:
            self.context_cache[key] = (context, k, v)  # holding context keeps its memory from reuse
        return k, v


# The smallest region value: a token where its map is 0 gets log(1e-4) ≈ -9.2 added to its logits
# (masked out in practice, yet every query keeps a finite row even if all its maps were 0).
REGION_FLOOR = 1e-4


def region_bias(regions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Token regions (B, L, R_h, R_w) in [0, 1] -> cross-attention logit bias (B, 1, height·width, L)
    for a feature map of height × width: the region maps brought to that size — max-pooled where
    the map is finer (a token applies to a cell if it applies to any part of it), nearest where it
    is coarser — then log(max(region, REGION_FLOOR))."""
    b, length = regions.shape[:2]
    if regions.shape[-2] >= height and regions.shape[-1] >= width:
        resized = F.adaptive_max_pool2d(regions, (height, width))
    else:
        resized = F.interpolate(regions, size=(height, width), mode="nearest")
    bias = resized.clamp_min(REGION_FLOOR).log()  # (B, L, H, W)
    return bias.reshape(b, 1, length, height * width).transpose(2, 3)  # (B, 1, H·W, L)


class RegionBiases:
    """The cross-attention logit biases of one forward pass's token regions (B, L, R_h, R_w), made
    once per feature-map size (``region_bias``) and shared by every transformer at that size."""

    def __init__(self, regions: torch.Tensor):
        self.regions = regions
        self._by_size: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._by_size:
            self._by_size[height, width] = region_bias(self.regions, height, width)
        return self._by_size[height, width]


def _tensor_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents while it is alive: its memory, shape and strides, and its
    version counter (bumped by in-place changes; inference tensors have none and must not change)."""
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), version)


@contextmanager
def reuse_context(module: nn.Module) -> Iterator[None]:
    """Within the block, every cross-attention layer of ``module`` projects a context to keys and
    values once and reuses them whenever the same context tensor (same memory, unchanged) comes
    back. A sampler hands the denoiser one context at every step, so this saves the context
    projections — 2·B·L·context_dim·inner FLOPs per layer, as much as the query side at low
    resolutions — at every step but the first. Only without autograd (sampling); with it enabled
    the layers compute as usual.

        with reuse_context(unet):
            x0 = sample_ddim(model, x, sigmas)
    """
    layers = [m for m in module.modules() if isinstance(m, Attention) and m.is_cross_attention]
    for layer in layers:
        layer.context_cache = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.context_cache = None


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2·dim_out, half gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # 2 × (..., dim_out), views
        gate = F.gelu(gate)
        return x * gate if gate.requires_grad else gate.mul_(x)


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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, dim); context: (B, L, context_dim), required iff built with context_dim;
        context_bias: None or the cross-attention logit bias (B, 1, N, L) of token regions."""
        x = add_(self.attn1(self.norm1(x)), x)
        if self.attn2 is not None:
            if context is None:
                raise ValueError("this transformer block has cross-attention and needs a context")
            x = add_(self.attn2(self.norm2(x), context, context_bias), x)
        elif context is not None:
            raise ValueError("a context was given to a transformer block built without cross-attention")
        return add_(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around it:
    GroupNorm → proj_in → depth × BasicTransformerBlock → proj_out (zero-init) → + input.

    use_linear False: proj_in/proj_out are held as 1×1 convs (SD 1.x); True: as linear layers
    (SD 2.x). The arithmetic is the same (a per-pixel matrix product, applied here on the token
    layout); only the checkpoint layout differs. The GroupNorm eps 1e-6 matches the reference.
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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                regions: torch.Tensor | RegionBiases | None = None) -> torch.Tensor:
        """x: (B, C, H, W), either memory format; context: (B, L, context_dim) or None; regions:
        None or the context's token regions (B, L, R_h, R_w) (module docstring), or their
        ``RegionBiases`` shared across a network's transformers. Returns (B, C, H, W) in x's memory format."""
        batch, height = x.shape[0], x.shape[2]
        if regions is not None and not isinstance(regions, RegionBiases):
            regions = RegionBiases(regions)
        bias = None if regions is None else regions.at(height, x.shape[3])  # (B, 1, H·W, L)
        # proj_in / proj_out as matrices, whichever layer type holds them (1×1 conv or linear)
        w_in, w_out = self.proj_in.weight.flatten(1), self.proj_out.weight.flatten(1)  # (inner, C), (C, inner)
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, H·W, C), a view of either layout
        h = torch.baddbmm(self.proj_in.bias, tokens, w_in.t().expand(batch, -1, -1))  # (B, H·W, inner)
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        if x.is_contiguous():  # (B, C, H·W) = proj_out · hᵀ is x's layout
            out = torch.baddbmm(self.proj_out.bias[:, None], w_out.expand(batch, -1, -1), h.transpose(1, 2))
            out = out.view(x.shape)
        else:  # channels-last: (B, H·W, C) is x's layout
            out = torch.baddbmm(self.proj_out.bias, h, w_out.t().expand(batch, -1, -1))
            out = rearrange(out, "b (h w) c -> b c h w", h=height)
        return add_(out, x)


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
