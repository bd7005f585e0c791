"""A token-sequence transformer: embeddings, learned absolute positions, pre-norm encoder layers.

This is the τθ of the paper's sequence conditions (Rombach et al. 2022, Sec. 4.3 and App. E.2:
a transformer trained jointly with the denoiser whose output tokens are the cross-attention
context). It knows token ids and a padding mask, nothing about what the tokens stand for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` with a key mask."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim); keep: (B, L) bool, False on keys to ignore (padding). Returns (B, L, dim)."""
        q, k, v = rearrange(self.to_qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)  # 3 × (B, h, L, d)
        mask = None if keep is None else rearrange(keep, "b l -> b 1 1 l")  # (B, 1, 1, L), broadcast over queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + ff(norm(x)) with a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.ff(self.norm2(x))


class SequenceTransformer(nn.Module):
    """Token ids (B, L) -> contextual token features (B, L, dim).

    vocab_size  number of token ids (embedding rows); max_length  the longest sequence (positions)
    dim, depth, num_heads, ff_mult, dropout  as in any transformer encoder

    Padding positions (``keep`` False) are ignored as keys but still produce an output row, so the
    output always has L rows; every sequence must keep at least one position.
    """

    def __init__(self, vocab_size: int, max_length: int, dim: int = 256, depth: int = 2, num_heads: int = 4,
                 ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.max_length, self.dim = vocab_size, max_length, dim
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, L) int64 in [0, vocab_size), L <= max_length; keep: (B, L) bool or None,
        with at least one True per row (a row of padding only has nothing to attend to);
        extra: (B, L, dim) or None, added to the embeddings (e.g. features of what a token stands for)."""
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} tokens is longer than max_length={self.max_length}")
        x = self.token_embedding(tokens) + self.position_embedding[:length]  # (B, L, dim)
        if extra is not None:
            x = x + extra
        for layer in self.layers:
            x = layer(x, keep)
        return self.norm(x)
