"""The ``masked_image`` condition (inpainting): an image and a mask of the region to generate, as
concat channels [mask at latent resolution, first-stage latent of the masked image]."""
