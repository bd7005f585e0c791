"""The ``image_text`` condition plugin: a reference image and a caption, together, as one sequence
of cross-attention tokens.

tau_theta has two parts. A timm image model (``image_tokens.py``) turns the reference image into
tokens, one per position of its final feature map, projected to the context width and given a
learned position embedding. The caption encoder the text plugin uses too (the core's
``ldmcore.nn.string_encoders``: a SentencePiece tokenizer fitted to the captions and a transformer
trained with the denoiser, or a frozen local Hugging Face model) turns the caption into tokens. The
output is image tokens followed by text tokens, each part with its own learned type embedding.

On the shapes world the task is recolor (SHAPES.md): ``reference_image`` is the scene with one
object recolored and the caption names the target's colors, so shape and position must come from
the image and color from the text. This plugin's config switches the data to ``shapes_multi``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ldmcore.conditioning import REGIONS, ConditionEncoder
from ldmcore.config import ConfigError
from ldmcore.hookspecs import hookimpl
from ldmcore.nn.string_encoders import LearnedStringEncoder, PretrainedStringEncoder
from ldmcore.nn.tokenizer import obtain_tokenizer

from .image_tokens import ImageTokens
from .values import IMAGE_KEY, TEXT_KEY, format_value, parse_value

NAME = "image_text"
NULLS = ("learned", "zeros")
TEXT_ENCODERS = ("learned", "pretrained")
IOU_THRESHOLD = 0.5  # a generated object keeps the reference's position when their boxes overlap this much


class ImageTextEncoder(ConditionEncoder):
    """(reference image B x 3 x H x W in [-1, 1], captions) -> crossattn (B, L_img + L_text, D).

    The image tokens carry the reference's positions, so the denoiser gets coordinate channels
    (``needs_positions``) to put each object where the reference has it.

    image        the image part (:class:`ImageTokens`); its C-wide tokens are projected to D
    text         a caption encoder of the text plugin, producing (B, L_text, D); D is the context width
    null         ``learned``: the absent image is learned null tokens, the absent text the encoding of
                 the empty caption (plus its type embedding) | ``zeros``: zeros
    image_dropout, text_dropout  training probabilities of replacing only that part by its null,
                 per sample (the conditioner's ``dropout`` replaces both at once)
    regions      each image token applies at its own cell of the image's token grid, the text tokens
                 everywhere (``token_regions``: a prior on the denoiser's cross-attention); fixed by
                 the token layout, so the null condition has the same regions
    """

    needs_positions = True

    def __init__(self, image: ImageTokens, text: ConditionEncoder, null: str = "learned",
                 image_dropout: float = 0.0, text_dropout: float = 0.0, regions: bool = False):
        super().__init__()
        text_length, width = text.outputs["crossattn"]
        self.image, self.text = image, text
        self.null_kind, self.image_dropout, self.text_dropout = null, image_dropout, text_dropout
        self.project = nn.Linear(image.width, width)
        self.image_position = nn.Parameter(0.02 * torch.randn(image.num_tokens, width))  # CNN maps carry no positions
        self.image_type = nn.Parameter(0.02 * torch.randn(width))
        self.text_type = nn.Parameter(0.02 * torch.randn(width))
        self.null_image = nn.Parameter(0.02 * torch.randn(image.num_tokens, width)) if null == "learned" else None
        self.outputs = {"crossattn": (image.num_tokens + text_length, width)}
        if regions:
            if image.grid is None:
                raise ConfigError(f"condition.{NAME}.regions=true needs image tokens on a grid; the {image.num_tokens} tokens "
                                  f"of {image.name} are not (set condition.{NAME}.regions=false)")
            self.token_regions = image.grid
            maps = torch.ones(image.num_tokens + text_length, *image.grid)
            maps[: image.num_tokens] = torch.eye(image.num_tokens).view(image.num_tokens, *image.grid)  # token k: cell k
            self.register_buffer("region_maps", maps, persistent=False)

    def _null_parts(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The absent image (B, L_img, D) and the absent text (B, L_text, D)."""
        device = self.image_type.device
        if self.null_kind == "zeros":
            length, width = self.outputs["crossattn"]
            return (torch.zeros(batch_size, self.image.num_tokens, width, device=device),
                    torch.zeros(batch_size, length - self.image.num_tokens, width, device=device))
        text = self.text.null(batch_size, (1, 1), device)["crossattn"] + self.text_type
        return self.null_image.expand(batch_size, -1, -1), text

    def forward(self, batch) -> dict[str, torch.Tensor]:
        images = torch.as_tensor(batch[IMAGE_KEY]).to(self.image_type.device, torch.float32)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"batch key {IMAGE_KEY} must be B x 3 x H x W, got {tuple(images.shape)}")
        image = self.project(self.image(images)) + self.image_position + self.image_type  # (B, L_img, D)
        text = self.text(batch)["crossattn"] + self.text_type  # (B, L_text, D)
        if self.training and (self.image_dropout > 0 or self.text_dropout > 0):
            null_image, null_text = self._null_parts(len(images))
            image = _drop(image, null_image, self.image_dropout)
            text = _drop(text, null_text, self.text_dropout)
        return self._with_regions({"crossattn": torch.cat([image, text], dim=1)})  # (B, L_img + L_text, D)

    def null(self, batch_size, latent_size, device):
        return self._with_regions({"crossattn": torch.cat(self._null_parts(batch_size), dim=1)})

    def _with_regions(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.token_regions is not None:
            out[REGIONS] = self.region_maps.expand(len(out["crossattn"]), *self.region_maps.shape)
        return out


def _drop(tokens: torch.Tensor, null: torch.Tensor, p: float) -> torch.Tensor:
    """Each sample's tokens (B, L, D) replaced by its null with probability p."""
    if p <= 0:
        return tokens
    keep = torch.rand(len(tokens), device=tokens.device) >= p  # (B,)
    return torch.where(keep[:, None, None], tokens, null)


# --- building ----------------------------------------------------------------------------------


def _probability(options, key: str) -> float:
    p = float(options[key])
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"condition.{NAME}.{key} must lie in [0, 1], got {p}")
    return p


def build_text_encoder(options, null: str, data, cache_dir: Path | None) -> ConditionEncoder:
    """The caption encoder from ``condition.image_text.text`` (the same options as ``condition.text``,
    built from the same core string encoders); ``null`` is the null kind (empty | zeros); a fitted
    tokenizer is cached under ``cache_dir``."""
    where = f"condition.{NAME}.text"
    encoder = str(options.encoder)
    max_length = int(options.max_length)
    if max_length < 3:
        raise ConfigError(f"{where}.max_length must leave room for a piece between begin and end tokens, got {max_length}")
    if encoder == "pretrained":
        if not options.pretrained or not Path(str(options.pretrained)).expanduser().is_dir():
            raise ConfigError(f"{where}.encoder=pretrained needs {where}.pretrained=PATH, a local Hugging Face folder; "
                              f"got {options.pretrained!r}")
        try:
            return PretrainedStringEncoder(str(Path(str(options.pretrained)).expanduser()), max_length, null, key=TEXT_KEY,
                                           option=where)
        except ValueError as error:
            raise ConfigError(f"{where}.pretrained: {error}") from None
    if encoder != "learned":
        raise ConfigError(f"{where}.encoder must be one of {', '.join(TEXT_ENCODERS)}, got {encoder!r}")
    if data.values is None:
        raise ConfigError(f"the learned text encoder of {NAME} fits its tokenizer to the data's captions, but the data "
                          f"source {data.name} cannot list them (DataInfo.values is None); use {where}.encoder=pretrained")
    captions = data.values(TEXT_KEY, int(options.tokenizer_captions))
    tokenizer = obtain_tokenizer(captions, int(options.vocab_size), str(options.tokenizer_type), cache_dir)
    if tokenizer.vocab_size > int(options.vocab_size):
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than {where}.vocab_size={options.vocab_size}")
    return LearnedStringEncoder(tokenizer, int(options.vocab_size), max_length, int(options.embed_dim), int(options.depth),
                                int(options.num_heads), null, key=TEXT_KEY, option=where,
                                token_embedding=bool(options.get("token_embedding", False)),
                                position_embedding=bool(options.get("position_embedding", False)))


def build_image_tokens(options, resolution: int) -> ImageTokens:
    """The image part from ``condition.image_text.image``."""
    name = options.model
    if not isinstance(name, str) or not name:
        raise ConfigError(f"condition.{NAME}.image.model must name a timm model (timm.list_models()), got {name!r}")
    kwargs = OmegaConf.to_container(options.model_kwargs, resolve=True) if options.model_kwargs else {}
    return ImageTokens(name, resolution, kwargs, options.weights, bool(options.allow_pickle), bool(options.frozen))


# --- hooks -------------------------------------------------------------------------------------


@hookimpl
def ldmcore_condition_name():
    return NAME


@hookimpl
def ldmcore_config_dir():
    return str(Path(__file__).parent / "conf")


@hookimpl
def ldmcore_batch_keys():
    return [IMAGE_KEY, TEXT_KEY]


@hookimpl
def ldmcore_build_encoder(options, data, cache_dir):
    null = str(options.null_condition)
    if null not in NULLS:
        raise ConfigError(f"condition.{NAME}.null_condition must be one of {', '.join(NULLS)}, got {null!r}")
    image_dropout, text_dropout = _probability(options, "image_dropout"), _probability(options, "text_dropout")
    text = build_text_encoder(options.text, "empty" if null == "learned" else "zeros", data, cache_dir)
    image = build_image_tokens(options.image, data.resolution)
    return ImageTextEncoder(image, text, null, image_dropout, text_dropout, bool(options.get("regions", False)))


@hookimpl
def ldmcore_parse_value(value, data, root):
    return parse_value(value, data.resolution, root)


@hookimpl
def ldmcore_format_value(batch, index):
    return format_value(batch, index)


@hookimpl
def ldmcore_draw_condition(batch):
    """The reference image, shown beside each sample in the evaluation grid (the caption is not drawn)."""
    return torch.as_tensor(batch[IMAGE_KEY]).float()  # (B, 3, H, W) in [-1, 1]


# --- faithfulness ------------------------------------------------------------------------------


def caption_colors(caption: str, class_names: Sequence[str]) -> list[str] | None:
    """The color of each object a caption names, left to right ("a red circle and a blue square" ->
    ["red", "blue"]); None when a phrase is not "a <class name>". Class names are "<color> <shape>"."""
    colors = []
    for phrase in re.split(r", | and ", caption.strip()):
        name = phrase.removeprefix("a ")
        if name not in class_names:
            return None
        colors.append(name.rsplit(" ", 1)[0])
    return colors


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def layout_kept(generated, reference, reader) -> bool:
    """Every object of the reference read back with its shape and position (box IoU >= 0.5) in
    the generated image, one to one, and nothing else there."""
    if not (reader.readable(generated) and reader.readable(reference)) or len(generated) != len(reference):
        return False
    unused = list(generated)
    for ref in reference:
        best = max(unused, key=lambda g: box_iou(g.box, ref.box))
        if best.shape != ref.shape or box_iou(best.box, ref.box) < IOU_THRESHOLD:
            return False
        unused.remove(best)
    return True


def colors_followed(generated, colors: list[str] | None, reader) -> bool:
    """The generated objects, left to right, have the caption's colors."""
    return colors is not None and reader.readable(generated) and [o.color for o in generated] == colors


def recolor_parts(images, batch, data) -> tuple[list[bool], list[bool]]:
    """Per sample: (shape and position kept from the reference image, colours followed from the caption)."""
    reader = data.reader
    generated, references = reader.read_batch(images), reader.read_batch(batch[IMAGE_KEY])
    shape, color = [], []
    for objects, reference, caption in zip(generated, references, batch[TEXT_KEY]):
        shape.append(layout_kept(objects, reference, reader))
        color.append(colors_followed(objects, caption_colors(caption, data.class_names), reader))
    return shape, color


@hookimpl
def ldmcore_sample_success(images, batch, data):
    return None if data.reader is None else [s and c for s, c in zip(*recolor_parts(images, batch, data))]


@hookimpl
def ldmcore_score(images, batch, data):
    """Recolor accuracy read back by the data's exact reader: per sample, every object has the
    reference image's shape and position (``shape_from_image``) AND, left to right, the caption's
    colors (``color_from_text``); ``recolor_accuracy`` is the share of samples with both."""
    if data.reader is None:
        return {}
    shape, color = recolor_parts(images, batch, data)
    n = max(len(shape), 1)
    return {
        "recolor_accuracy": sum(s and c for s, c in zip(shape, color)) / n,
        "shape_from_image": sum(shape) / n,
        "color_from_text": sum(color) / n,
    }
