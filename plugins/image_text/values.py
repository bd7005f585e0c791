"""User values of the image_text condition: ``{"image": "ref.png", "text": "a red circle"}``.

``image`` is a path to an image file (a relative one starts at the conditions file's folder) or a
``data:image/png;base64,`` URI, of the data's resolution; ``text`` a non-empty caption. ``format_value`` writes the image as
a PNG data URI, so that a formatted value is self-contained and parses back to the same pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_KEY, TEXT_KEY = "reference_image", "caption"  # the batch keys
FIELDS = ("image", "text")  # the user value's fields
DATA_URI = "data:image/png;base64,"
EXAMPLE = '{"image": "ref.png", "text": "a red circle and a blue square"}'


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float32 3 x H x W in [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float 3 x H x W in [-1, 1] -> uint8 H x W x 3 (the inverse of ``to_unit_range`` on its values)."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def _open(source: str, root: Path) -> tuple[Image.Image, str]:
    """The image a path (relative to ``root``) or a data URI names, and how to name it in messages."""
    if source.startswith(DATA_URI):
        try:
            return Image.open(io.BytesIO(base64.b64decode(source[len(DATA_URI):], validate=True))), "the data URI"
        except (binascii.Error, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"image_text.image: the data URI does not hold a PNG image ({error})") from None
    path = Path(root) / Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"image_text.image: the file {str(path)!r} does not exist (relative paths start at the "
                         f"conditions file's folder, {root})")
    try:
        return Image.open(path), repr(str(path))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image_text.image: {str(path)!r} is not an image file PIL can read ({error})") from None


def read_image(source, resolution: int, root: Path) -> torch.Tensor:
    """The reference image as float32 3 x R x R in [-1, 1]; refused unless it is R x R pixels."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"image_text.image must be a path to an image file or a {DATA_URI}... URI, got {source!r}")
    image, where = _open(source, root)
    with image:
        if image.size != (resolution, resolution):
            raise ValueError(f"image_text.image: {where} is {image.size[0]}x{image.size[1]} pixels; this model's "
                             f"images are {resolution}x{resolution}, and the reference must be the same size")
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (R, R, 3)
    return to_unit_range(pixels)


def parse_value(value, resolution: int, root: Path) -> dict:
    """A user value -> the batch keys of one sample (reference_image 3 x R x R, caption str); a
    relative image path starts at ``root``."""
    if not isinstance(value, Mapping):
        raise ValueError(f"an image_text condition is an object with an image and a text, e.g. {EXAMPLE}; got {value!r}")
    missing = [f for f in FIELDS if f not in value]
    unknown = sorted(set(value) - set(FIELDS))
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else [])
        raise ValueError(f"an image_text condition has exactly the fields image and text ({'; '.join(problems)}), e.g. {EXAMPLE}")
    text = value["text"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"image_text.text must be a non-empty caption string, e.g. \"a red circle\"; got {text!r}")
    return {IMAGE_KEY: read_image(value["image"], resolution, root), TEXT_KEY: text}


def format_value(batch: Mapping, index: int) -> dict:
    """Sample ``index`` of ``batch`` as a user value, its image a PNG data URI."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(torch.as_tensor(batch[IMAGE_KEY][index]))).save(buffer, format="PNG")
    return {"image": DATA_URI + base64.b64encode(buffer.getvalue()).decode("ascii"), "text": str(batch[TEXT_KEY][index])}
