"""Pretrained weights in and out of ldmcore: diffusers model folders and CompVis / Stable
Diffusion single files, read safely (see docs/interop.md).

    unet = load_unet("stable-diffusion-v1-5")                 # a diffusers pipeline folder
    vae = load_autoencoder("v1-5-pruned-emaonly.safetensors")  # a single file
    noise = load_noise_process("stable-diffusion-v1-5")       # its schedule and prediction type
    save_unet(unet, "exported/unet")                          # back to a diffusers folder
"""

from .diffusers_io import save_autoencoder, save_unet
from .loading import load_autoencoder, load_noise_process, load_unet
from .safe_pickle import PickleRefused, UnsafePickle, convert, read_tensors
from .schedulers import diffusers_sigmas

__all__ = [
    "PickleRefused",
    "UnsafePickle",
    "convert",
    "diffusers_sigmas",
    "load_autoencoder",
    "load_noise_process",
    "load_unet",
    "read_tensors",
    "save_autoencoder",
    "save_unet",
]
