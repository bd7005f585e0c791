"""The denoiser network εθ."""

from .unet import EmbedSequential, UNet

__all__ = ["EmbedSequential", "UNet"]
