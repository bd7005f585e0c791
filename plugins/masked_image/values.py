"""User values of the ``masked_image`` condition: ``{"image": "picture.png", "mask": "mask.png"}``.

The picture is an RGB PNG of the model's resolution; the mask a PNG of the same size, white where
the image is to be generated and black where it is kept. A relative path starts at the conditions
file's folder (``root``), an absolute one stays as it is. ``format_value`` writes a sample's image
and mask as PNGs named by their content (absolute paths), so formatting the same sample twice names
the same files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

KEYS = ("image", "mask")
EXAMPLE = '{"image": "picture.png", "mask": "mask.png"} (mask: white = generate, black = keep)'


def _open(path_text, key: str, root: Path) -> Image.Image:
    if not isinstance(path_text, str) or not path_text.strip():
        raise ValueError(f"masked_image {key!r} must be a PNG file path; got {path_text!r}")
    path = Path(root) / Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"masked_image {key} file {path} does not exist")
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"masked_image {key} file {path} cannot be read as an image ({error})") from None


def _check_size(picture: Image.Image, key: str, path: str, resolution: int) -> None:
    if picture.size != (resolution, resolution):
        w, h = picture.size
        raise ValueError(f"masked_image {key} file {path} is {w}x{h} pixels; this model takes {resolution}x{resolution}")


def read_image(path: str, resolution: int, root: Path) -> torch.Tensor:
    """float32 3 x R x R in [-1, 1], converted exactly as the shapes world converts uint8 pixels."""
    picture = _open(path, "image", root)
    _check_size(picture, "image", path, resolution)
    pixels = np.asarray(picture.convert("RGB")).transpose(2, 0, 1).copy()  # (3, R, R) uint8
    return torch.from_numpy(pixels).float().div_(127.5).sub_(1.0)


def read_mask(path: str, resolution: int, root: Path) -> torch.Tensor:
    """float32 1 x R x R of 0 (keep, black) and 1 (generate, white); any other gray level is refused."""
    picture = _open(path, "mask", root)
    _check_size(picture, "mask", path, resolution)
    gray = np.asarray(picture.convert("L"))  # (R, R); a colored pixel becomes a gray level in between
    other = (gray != 0) & (gray != 255)
    if other.any():
        seen = ", ".join(str(v) for v in np.unique(gray[other])[:5])
        raise ValueError(f"masked_image mask file {path} is not black and white: {int(other.sum())} pixels are "
                         f"neither 0 nor 255 (e.g. {seen}); white marks the region to generate, black the region kept")
    return torch.from_numpy(gray == 255).float()[None]


def parse_value(value, resolution: int, root: Path) -> dict[str, torch.Tensor]:
    """``{"image": path, "mask": path}`` (relative to ``root``) -> batch keys of one sample: image
    (3 x R x R), mask (1 x R x R)."""
    if not isinstance(value, Mapping) or set(value) != set(KEYS):
        raise ValueError(f"a masked_image condition is {EXAMPLE}; got {value!r}")
    return {"image": read_image(value["image"], resolution, root), "mask": read_mask(value["mask"], resolution, root)}


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """3 x H x W in [-1, 1] -> H x W x 3 uint8 (the inverse of ``read_image`` on uint8 images)."""
    pixels = (image.detach().float().cpu().clamp(-1, 1) + 1).mul(127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def _write_png(array: np.ndarray, folder: Path, kind: str) -> str:
    """Write ``array`` as ``<folder>/<kind>_<digest>.png`` (atomically, once) and return the path."""
    digest = hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()[:16]
    path = folder / f"{kind}_{digest}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    return str(path)


def value_folder(cache_dir: Path | None) -> Path:
    """Where ``format_value`` writes: ``<cache_dir>/masked_image``, or under the system temporary folder."""
    base = Path(cache_dir).expanduser() if cache_dir else Path(tempfile.gettempdir())
    return base.absolute() / "masked_image"


def format_value(image: torch.Tensor, mask: torch.Tensor, folder: Path) -> dict[str, str]:
    """One sample's image (3 x H x W) and mask (1 x H x W) -> ``{"image": path, "mask": path}``."""
    mask_pixels = (mask.detach().cpu()[0] > 0.5).numpy().astype(np.uint8) * 255  # (H, W): white = generate
    return {"image": _write_png(_to_uint8(image), folder, "image"), "mask": _write_png(mask_pixels, folder, "mask")}
