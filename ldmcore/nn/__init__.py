"""Network building blocks shared by the first stage (autoencoder) and the denoiser."""

from .attention import (
    GEGLU,
    Attention,
    BasicTransformerBlock,
    FeedForward,
    SpatialSelfAttention,
    SpatialTransformer,
    reuse_context,
)
from .blocks import Downsample, ResBlock, Upsample, normalization, timestep_embedding, zero_module

__all__ = [
    "GEGLU",
    "Attention",
    "BasicTransformerBlock",
    "Downsample",
    "FeedForward",
    "ResBlock",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "Upsample",
    "normalization",
    "reuse_context",
    "timestep_embedding",
    "zero_module",
]
