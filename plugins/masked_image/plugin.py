"""The ``masked_image`` condition plugin (inpainting).

tau_theta has no weights of its own: it concatenates to z_t, as Stable Diffusion's inpainting
models do, [the mask brought to latent resolution (1 channel), the first-stage latent of the
masked image image * (1 - mask), scaled by the first stage's scale_factor (C channels)]. The run's
first stage is held, frozen, through ``FrozenReference``: it is not part of the denoiser's weights,
and it is read at call time, so the encoder sees the weights and scale_factor set after it was built.

The region outside the mask is preserved twice: the model learns to reproduce it from the latent,
and ``ldmcore_finalize`` (``composite: true``) pastes the known pixels back after decoding.
Masks need scenes with something to inpaint: this plugin's config switches the data to ``shapes_multi``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldmcore.conditioning import ConditionEncoder, FrozenReference
from ldmcore.hookspecs import hookimpl

from . import values

NAME = "masked_image"
KEYS = ("image", "mask")
NULLS = ("full_mask", "zeros")
PSNR_CAP_DB = 100.0  # identical pixels have infinite PSNR; each sample's PSNR is capped before averaging
MOSTLY_INSIDE = 0.5  # a read-back object belongs to the mask when more than this share of its box is masked
SHOWN_MASK = -1.0  # the masked region's value in grid pictures: black, a color the shapes world never draws


class MaskedImageEncoder(ConditionEncoder):
    """image (B, 3, H, W) in [-1, 1], mask (B, 1, H, W), 1 = generate -> concat (B, 1 + C, H/f, W/f)."""

    def __init__(self, first_stage: nn.Module, null: str = "full_mask"):
        super().__init__()
        if null not in NULLS:
            raise ValueError(f"condition.masked_image.null_condition must be one of {', '.join(NULLS)}, got {null!r}")
        self.first_stage = FrozenReference(first_stage)
        self.null_kind = null
        self.outputs = {"concat": (1 + first_stage.latent_channels,)}
        # No weights, but a place: this empty buffer moves with the denoiser (.to(device)), so outputs
        # land where the denoiser runs, wherever the first stage lives. Not saved (non-persistent).
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    @torch.no_grad()
    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The concat channels (B, 1 + C, h, w), computed on the first stage's device, returned on the denoiser's."""
        first_stage = self.first_stage()
        device = first_stage.scale_factor.device
        image, mask = image.to(device, torch.float32), mask.to(device, torch.float32)
        # The posterior mean: a condition is a deterministic function of its input.
        latent = first_stage.encode(image * (1 - mask)).mode() * first_stage.scale_factor  # (B, C, h, w)
        # Area interpolation keeps the share of each latent cell that is to be generated.
        small_mask = F.interpolate(mask, size=latent.shape[-2:], mode="area")  # (B, 1, h, w)
        return torch.cat([small_mask, latent.float()], dim=1).to(self.anchor.device)  # (B, 1 + C, h, w)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        image, mask = torch.as_tensor(batch["image"]), torch.as_tensor(batch["mask"])
        if mask.shape[0] != image.shape[0] or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"batch key mask must be B x 1 x H x W beside image {tuple(image.shape)}; got {tuple(mask.shape)}")
        return {"concat": self.encode(image, mask)}

    def null(self, batch_size, latent_size, device):
        """``full_mask``: the encoding of an image masked everywhere (nothing known), which is what a
        user's all-white mask gives, so "absent" and "nothing to keep" mean one thing to the model;
        ``zeros``: zeros. On the denoiser's device, as ``forward``'s output."""
        if self.null_kind == "zeros":
            return super().null(batch_size, latent_size, self.anchor.device)
        f = self.first_stage().downsample_factor
        size = (latent_size[0] * f, latent_size[1] * f)
        nothing_known = self.encode(torch.zeros(1, 3, *size), torch.ones(1, 1, *size))  # (1, 1 + C, h, w)
        return {"concat": nothing_known.expand(batch_size, -1, -1, -1)}


def _composite(options) -> bool:
    composite = options.composite
    if not isinstance(composite, bool):
        raise ValueError(f"condition.masked_image.composite must be true or false, got {composite!r}")
    return composite


@hookimpl
def ldmcore_condition_name():
    return NAME


@hookimpl
def ldmcore_config_dir():
    return str(Path(__file__).parent / "conf")


@hookimpl
def ldmcore_batch_keys():
    return list(KEYS)


@hookimpl
def ldmcore_build_encoder(options, first_stage):
    _composite(options)  # a bad option stops the run at start-up, not at the first grid
    return MaskedImageEncoder(first_stage, str(options.null_condition))


@hookimpl
def ldmcore_parse_value(value, data, root):
    return values.parse_value(value, data.resolution, root)


@hookimpl
def ldmcore_format_value(batch, index, cache_dir):
    """``{"image": path, "mask": path}``: the sample's PNGs, written under ``<cache_dir>/masked_image``."""
    return values.format_value(batch["image"][index], batch["mask"][index], values.value_folder(cache_dir))


@hookimpl
def ldmcore_finalize(images, batch, options):
    """Paste the known pixels back: mask * generated + (1 - mask) * image (``composite: true``)."""
    if not _composite(options):
        return images
    original, mask = torch.as_tensor(batch["image"]).to(images), torch.as_tensor(batch["mask"]).to(images)
    if original.shape != images.shape or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masked_image: the given image {tuple(original.shape)} and mask {tuple(mask.shape)} "
                         f"do not match the generated images {tuple(images.shape)}")
    return mask * images + (1 - mask) * original


@hookimpl
def ldmcore_draw_condition(batch):
    """The masked image: known pixels as given, the region to generate in black."""
    original, mask = torch.as_tensor(batch["image"]), torch.as_tensor(batch["mask"]).to(torch.float32)
    return (1 - mask) * original + mask * SHOWN_MASK


def psnr_outside(image: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR in dB (peak-to-peak 2 for [-1, 1]) over the pixels kept (mask <= 0.5), capped at
    PSNR_CAP_DB; NaN when the mask covers everything."""
    keep = (mask <= 0.5).expand_as(image)  # (3, H, W)
    if not keep.any():
        return math.nan
    mse = float((image.double() - original.double())[keep].square().mean())
    return PSNR_CAP_DB if mse == 0 else min(10 * math.log10(4.0 / mse), PSNR_CAP_DB)


def objects_in_mask(objects, mask: torch.Tensor) -> list:
    """The read-back objects whose pixel box lies mostly inside the mask (1 x H x W)."""
    inside = []
    for o in objects:
        x0, y0, x1, y1 = o.box
        if float((mask[0, y0:y1, x0:x1] > 0.5).float().mean()) > MOSTLY_INSIDE:
            inside.append(o)
    return inside


@hookimpl
def ldmcore_score(images, batch, data):
    """psnr_outside_mask_db: mean PSNR of the kept region against the original (each sample capped
    at PSNR_CAP_DB). With the data's exact reader, over the objects lying mostly inside the mask:
    masked_objects_valid, the share of images whose such objects all read back valid (an image with
    none counts as valid: an object removed); masked_object_validity, the share of such objects,
    counted one by one, that read back valid (an empty mask adds nothing to it, so it cannot be won by
    generating nothing); masked_object_rate, the share of images with at least one such object, beside
    masked_object_rate_original, the same share in the original images (a model generating fewer
    objects than the data holds is removing them)."""
    images = images.detach().cpu()
    original, mask = torch.as_tensor(batch["image"]).cpu(), torch.as_tensor(batch["mask"]).cpu()
    psnrs = [p for p in (psnr_outside(i, o, m) for i, o, m in zip(images, original, mask)) if not math.isnan(p)]
    scores = {"psnr_outside_mask_db": sum(psnrs) / len(psnrs)} if psnrs else {}
    if data.reader is not None:
        inside = [objects_in_mask(objects, m) for objects, m in zip(data.reader.read_batch(images), mask)]
        known = [objects_in_mask(objects, m) for objects, m in zip(data.reader.read_batch(original), mask)]
        read = [o for objs in inside for o in objs]
        images_n = max(len(inside), 1)
        scores["masked_objects_valid"] = sum(all(o.valid for o in objs) for objs in inside) / images_n
        if read:
            scores["masked_object_validity"] = sum(o.valid for o in read) / len(read)
        scores["masked_object_rate"] = sum(bool(objs) for objs in inside) / images_n
        scores["masked_object_rate_original"] = sum(bool(objs) for objs in known) / images_n
    return scores
