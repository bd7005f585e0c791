"""The ``low_res`` condition plugin: super-resolution from a low-resolution image.

As the paper's super-resolution model (Rombach et al. 2022, Sec. 4.4): the low-resolution image,
brought to the latent's size (resampled, then one learned conv), is concatenated to z_t. With
noise augmentation as in cascaded diffusion (Ho et al. 2021) and Stable Diffusion's x4 upscaler:
during training each sample's low-res input gets Gaussian noise of a random std in
[0, max_noise_level], and that level enters the timestep embedding as a ``vector`` condition, so
at sampling a small fixed level (``sample_noise_level``) hides the gap between the training inputs
and a user's. The low-res image is ``1 / factor`` of ``data.resolution`` (4: 32 px from 8 px,
64 px from 16 px); resampling scales by a ratio, so ``sample_scale=2`` works too.

User values: a path to an RGB PNG of the low-res size (a relative path starts at the conditions
file's folder), or the image inline as a nested list 3 x r x r of numbers in [-1, 1] — what
``ldmcore_format_value`` writes, exactly (a batch holds the pixels, not the file they came from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ldmcore.conditioning import ConditionEncoder
from ldmcore.hookspecs import hookimpl
from ldmcore.nn.blocks import timestep_embedding

NAME = "low_res"
KEY = "low_res"
UPSAMPLING = ("bicubic", "bilinear", "nearest")
READABLE_MODES = ("RGB", "RGBA", "L", "P")
LEVEL_TO_TIME = 1000.0  # a noise std of 1 embeds like timestep 1000: spreads [0, max] over the frequencies
MAX_PSNR_DB = 100.0  # identical images count as 100 dB rather than infinity, so means stay finite
SAMPLING_NOISE_SEED = 0  # the noise added at sampling is the same for every run: samples are reproducible


class LowResEncoder(ConditionEncoder):
    """low_res (B, 3, r, r) -> noise augmentation -> {concat (B, channels, r·s, r·s), vector (B, embed_dim)}
    where s = factor / latent_factor brings r = R / factor to the latent side R / latent_factor."""

    def __init__(self, scale: float, channels: int, embed_dim: int, upsample: str, max_noise_level: float,
                 sample_noise_level: float):
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ValueError(f"condition.low_res.upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
        if not 0.0 <= sample_noise_level <= max_noise_level:
            raise ValueError(f"condition.low_res needs 0 <= sample_noise_level <= max_noise_level (the model never "
                             f"sees a level above the maximum), got {sample_noise_level} and {max_noise_level}")
        self.scale, self.upsample = scale, upsample
        self.max_noise_level, self.sample_noise_level = max_noise_level, sample_noise_level
        self.embed_dim = embed_dim
        self.project = nn.Conv2d(3, channels, 3, padding=1)
        self.level_embed = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.outputs = {"concat": (channels,), "vector": (embed_dim,)}

    def augment(self, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy low-res (B, 3, r, r), noise std per sample (B,)): random levels in training, the
        fixed sampling level (with fixed noise) otherwise."""
        b, device = low.shape[0], low.device
        if self.training:
            level = torch.rand(b, device=device) * self.max_noise_level
            noise = torch.randn_like(low)
        else:
            level = torch.full((b,), self.sample_noise_level, device=device)
            noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(SAMPLING_NOISE_SEED)).to(device)
        return low + level.view(-1, 1, 1, 1) * noise, level

    def forward(self, batch) -> dict[str, torch.Tensor]:
        low = torch.as_tensor(batch[KEY], device=self.project.weight.device).float()  # (B, 3, r, r)
        if low.dim() != 4 or low.shape[1] != 3:
            raise ValueError(f"batch key {KEY} must be B x 3 x r x r, got shape {tuple(low.shape)}")
        noisy, level = self.augment(low)
        if self.scale != 1:
            corners = None if self.upsample == "nearest" else False
            noisy = F.interpolate(noisy, scale_factor=self.scale, mode=self.upsample, align_corners=corners)  # (B, 3, h, w)
        vector = self.level_embed(timestep_embedding(level * LEVEL_TO_TIME, self.embed_dim))  # (B, D)
        return {"concat": self.project(noisy), "vector": vector}


def _low_res_side(options, data) -> int:
    factor = int(options.factor)
    if factor < 1 or data.resolution % factor:
        raise ValueError(f"condition.low_res.factor={factor} must divide the data's resolution {data.resolution}")
    return data.resolution // factor


def _read_png(path: Path, side: int) -> torch.Tensor:
    if not path.is_file():
        raise ValueError(f"low-res image {path} does not exist")
    try:
        with Image.open(path) as image:
            if image.mode not in READABLE_MODES:
                raise ValueError(f"low-res image {path} has mode {image.mode}; allowed: {', '.join(READABLE_MODES)} (8 bits)")
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in 0..255
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read low-res image {path}: {error}") from None
    if rgb.shape[:2] != (side, side):
        raise ValueError(f"low-res image {path} is {rgb.shape[1]}x{rgb.shape[0]} pixels; this model needs "
                         f"{side}x{side} (the data's resolution / condition.low_res.factor)")
    return torch.from_numpy(rgb).permute(2, 0, 1).div(127.5).sub(1.0)  # (3, r, r) in [-1, 1]


def _read_inline(value: list, side: int) -> torch.Tensor:
    try:
        pixels = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"an inline low-res image is a nested list 3 x {side} x {side} of numbers in [-1, 1]") from None
    if tuple(pixels.shape) != (3, side, side):
        raise ValueError(f"an inline low-res image must be 3 x {side} x {side}, got {tuple(pixels.shape)}")
    if not torch.isfinite(pixels).all() or pixels.abs().max() > 1:
        raise ValueError("an inline low-res image holds values outside [-1, 1]")
    return pixels


def psnr_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (peak-to-peak 2, images in [-1, 1]) of each image of (B, 3, H, W), capped at MAX_PSNR_DB."""
    mse = (images.double() - references.double()).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(4.0 / mse.clamp_min(4.0 * 10 ** (-MAX_PSNR_DB / 10)))


@hookimpl
def ldmcore_condition_name():
    return NAME


@hookimpl
def ldmcore_config_dir():
    return str(Path(__file__).parent / "conf")


@hookimpl
def ldmcore_batch_keys():
    return [KEY]


@hookimpl
def ldmcore_build_encoder(options, data, latent_shape):
    side, latent_side = _low_res_side(options, data), latent_shape[1]
    return LowResEncoder(latent_side / side, int(options.channels), int(options.embed_dim), str(options.upsample),
                         float(options.max_noise_level), float(options.sample_noise_level))


@hookimpl
def ldmcore_parse_value(value, options, data, root):
    """A path to an RGB PNG of data.resolution / factor pixels (relative to ``root``), or the inline nested list."""
    side = _low_res_side(options, data)
    if isinstance(value, str):
        return {KEY: _read_png(Path(root) / Path(value).expanduser(), side)}
    if isinstance(value, list):
        return {KEY: _read_inline(value, side)}
    raise ValueError(f"a low-res image is a path to an RGB PNG of {side}x{side} pixels or a nested list "
                     f"3 x {side} x {side} of numbers in [-1, 1]; got {value!r:.80}")


@hookimpl
def ldmcore_format_value(batch, index):
    """The inline form: the low-res pixels as a nested list 3 x r x r (exact float32 values)."""
    return torch.as_tensor(batch[KEY][index]).float().cpu().tolist()


@hookimpl
def ldmcore_draw_condition(batch, options):
    """The low-res inputs enlarged ``factor`` times (nearest, so their pixels show), B x 3 x H x W."""
    low = torch.as_tensor(batch[KEY]).float().cpu()
    return F.interpolate(low, scale_factor=int(options.factor), mode="nearest")


@hookimpl
def ldmcore_score(images, batch):
    """PSNR of the images against the original high-resolution ones, PSNR of bicubic upsampling of
    the low-res inputs against the same originals, the mean gain, and the share of images that beat
    bicubic. Per image, then averaged; needs the batch's ``image`` (absent: no scores)."""
    if "image" not in batch:
        return {}
    original = torch.as_tensor(batch["image"]).float().cpu()  # (B, 3, H, W)
    low = torch.as_tensor(batch[KEY]).float().cpu()
    bicubic = F.interpolate(low, size=original.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    generated = psnr_per_image(torch.as_tensor(images).float().cpu(), original)
    baseline = psnr_per_image(bicubic, original)
    return {
        "psnr_db": float(generated.mean()),
        "psnr_bicubic_db": float(baseline.mean()),
        "psnr_gain_db": float((generated - baseline).mean()),
        "beats_bicubic": float((generated > baseline).float().mean()),
    }
