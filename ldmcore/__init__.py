"""ldmcore: latent diffusion models in which every conditioning domain is a plugin."""

__version__ = "0.1.0"
