"""The ``semantic_map`` condition plugin: a per-pixel class map, concatenated to the latent.

As the paper's semantic-synthesis model (Rombach et al. 2022, Sec. 4.3.2): tau_theta turns the
one-hot map (K = classes + background channels) into a few channels at latent resolution — here a
learned rescaler of strided convolutions, one per halving — and they join z_t as extra input
channels of the denoiser. Nothing in it depends on the image size, so a model trained at 32 px
samples at 64 px from a 64 px map (``task=sample sample_scale=2``).
Maps describe multi-object scenes: this plugin's config switches the data to ``shapes_multi``.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldmcore.conditioning import ConditionEncoder
from ldmcore.hookspecs import hookimpl

from .maps import encode_runs, parse_map

NAME = "semantic_map"
KEY = "segmentation"
NULLS = ("zeros", "learned")


class SemanticMapEncoder(ConditionEncoder):
    """Class ids (B, H, W) -> one-hot (B, K, H, W) -> strided convs -> (B, channels, H/f, W/f)."""

    def __init__(self, num_ids: int, factor: int, channels: int, hidden: int, null: str = "zeros"):
        super().__init__()
        if null not in NULLS:
            raise ValueError(f"condition.semantic_map.null_condition must be one of {', '.join(NULLS)}, got {null!r}")
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"the semantic map rescaler halves the map per stage: the latent downsampling "
                             f"factor must be a power of two, got {factor}")
        self.num_ids, self.factor = num_ids, factor
        layers: list[nn.Module] = [nn.Conv2d(num_ids, hidden, 3, padding=1)]
        for _ in range(int(math.log2(factor))):
            layers += [nn.SiLU(), nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)]  # halves H and W
        layers += [nn.SiLU(), nn.Conv2d(hidden, channels, 1)]
        self.rescaler = nn.Sequential(*layers)
        self.learned_null = nn.Parameter(torch.zeros(channels)) if null == "learned" else None
        self.outputs = {"concat": (channels,)}

    @property
    def device(self) -> torch.device:
        return self.rescaler[0].weight.device

    def forward(self, batch) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(batch[KEY], device=self.device).long()  # (B, H, W)
        if ids.dim() != 3:
            raise ValueError(f"batch key {KEY} must be B x H x W class ids, got shape {tuple(ids.shape)}")
        if ids.shape[-1] % self.factor or ids.shape[-2] % self.factor:
            raise ValueError(f"a {ids.shape[-2]}x{ids.shape[-1]} map does not divide by the latent factor {self.factor}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_ids):
            raise ValueError(f"batch key {KEY} holds class ids outside 0..{self.num_ids - 1}")
        one_hot = rearrange(F.one_hot(ids, self.num_ids).float(), "b h w k -> b k h w")  # (B, K, H, W)
        return {"concat": self.rescaler(one_hot)}  # (B, channels, H/f, W/f)

    def null(self, batch_size, latent_size, device):
        """``zeros``: zeros; ``learned``: a learned value per channel at every position."""
        if self.learned_null is None:
            return super().null(batch_size, latent_size, device)
        return {"concat": self.learned_null.view(1, -1, 1, 1).expand(batch_size, -1, *latent_size)}


def _num_ids(data) -> int:
    """Background plus the data's classes."""
    if not data.class_names:
        raise ValueError(f"the semantic_map condition needs a data source with class names; {data.name} has none")
    return 1 + len(data.class_names)


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
    _, h, w = latent_shape
    if data.resolution % h or data.resolution // h != data.resolution // w:
        raise ValueError(f"the semantic_map condition needs a square latent that divides the {data.resolution}-px images, got {h}x{w}")
    return SemanticMapEncoder(_num_ids(data), data.resolution // h, int(options.channels), int(options.hidden),
                              str(options.null_condition))


@hookimpl
def ldmcore_parse_value(value, data, root):
    """A path to an index PNG of data.resolution pixels (relative to ``root``), or the run-length form (see maps.py)."""
    return {KEY: parse_map(value, data.resolution, _num_ids(data), root)}


@hookimpl
def ldmcore_format_value(batch, index):
    """The run-length form ``{"size": [H, W], "runs": [[id, count], ...]}``."""
    return encode_runs(batch[KEY][index])


def palette(num_ids: int) -> torch.Tensor:
    """(num_ids, 3) colours in [-1, 1] for drawing maps: black background, then hues a golden ratio
    apart, so neighbouring class ids look different whatever the data's own colours."""
    hues = [(k * 0.618034) % 1.0 for k in range(num_ids - 1)]
    colours = [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb(h, 0.8, 1.0) for h in hues]
    return torch.tensor(colours) * 2 - 1


@hookimpl
def ldmcore_draw_condition(batch, data):
    """Each map in the palette's colours, B x 3 x H x W in [-1, 1]."""
    ids = torch.as_tensor(batch[KEY]).long().cpu()  # (B, H, W)
    return rearrange(palette(_num_ids(data))[ids], "b h w c -> b c h w")


@hookimpl
def ldmcore_score(images, batch, data):
    """Pixel accuracy and mIoU (over the classes present) of the images' read-back colours against
    the maps, by the data's exact reader (SHAPES.md); pooled over the batch."""
    if data.reader is None or not hasattr(data.reader, "segmentation_scores"):
        return {}
    return data.reader.segmentation_scores(images, batch[KEY])
