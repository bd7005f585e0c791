"""Reading real images into the training square: decoding with every failure named, colour
modes converted to RGB, and the one geometry (resize the shorter side, centre-crop) that images,
boxes, segmentation maps and masks all go through.

The geometry is a centred square of the source image, ``[left, left + side) x [top, top + side)``
in source pixels, mapped onto ``R x R``. A target pixel (x, y) looks at the source point
``(left + (x + 0.5) * side / R, top + (y + 0.5) * side / R)``: label maps are sampled there
(nearest, the pixel containing that point), polygons are tested there (pixel-centre rule, as in
the shapes world's geometry), and a box ``[x0, x1)`` becomes ``(x0 - left) / side`` ... clipped to
[0, 1].
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SMALL_IMAGE_POLICIES = ("skip", "upsample")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (rounding in annotations); it is clipped
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageProblem(ValueError):
    """An image cannot be used. ``reason`` is the skip reason it counts under."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


@dataclass(frozen=True)
class CenterCrop:
    """The centred square ``[left, left + side) x [top, top + side)`` of a ``width x height``
    source, mapped onto ``resolution x resolution`` pixels."""

    width: int
    height: int
    left: int
    top: int
    side: int
    resolution: int

    @classmethod
    def fit(cls, width: int, height: int, resolution: int, small_images: str = "skip") -> "CenterCrop":
        """The crop of a ``width x height`` image; an image whose shorter side is below
        ``resolution`` raises ImageProblem("small_image") unless ``small_images="upsample"``."""
        side = min(width, height)
        if side < resolution and small_images != "upsample":
            raise ImageProblem("small_image", f"{width}x{height} is smaller than the training size {resolution} "
                                              f"(data.small_images=skip; 'upsample' would enlarge it)")
        return cls(width, height, (width - side) // 2, (height - side) // 2, side, resolution)

    def pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates (xs (R,), ys (R,)) of the target pixel centres."""
        steps = (np.arange(self.resolution) + 0.5) * (self.side / self.resolution)
        return self.left + steps, self.top + steps

    def sample(self, array: np.ndarray) -> np.ndarray:
        """Nearest sampling of a source-sized H x W (x ...) array at the target pixel centres."""
        xs, ys = self.pixel_centres()
        columns = np.minimum(xs.astype(np.int64), self.width - 1)  # floor: the source pixel holding the point
        rows = np.minimum(ys.astype(np.int64), self.height - 1)
        return array[rows][:, columns]

    def box(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float] | None:
        """A source box ``[x, y, w, h]`` in pixels -> normalized ``(x0, y0, x1, y1)`` inside the
        crop, clipped to [0, 1]; None when the crop cuts it away entirely."""
        x0, x1 = ((v - self.left) / self.side for v in (x, x + w))
        y0, y1 = ((v - self.top) / self.side for v in (y, y + h))
        x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in (x0, y0, x1, y1))
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _open(source: Path | bytes) -> Image.Image:
    """Image.open on a path or bytes; an image above PIL's ``Image.MAX_IMAGE_PIXELS`` (which
    PIL only warns about up to twice the limit) is refused as a decompression bomb."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageProblem("decompression_bomb", str(error)) from None


def _decode_failure(error: Exception) -> ImageProblem:
    if isinstance(error, FileNotFoundError):
        return ImageProblem("missing_file", "the file does not exist")
    return ImageProblem("corrupt_image", f"cannot decode ({type(error).__name__}: {error})")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL colour mode -> RGB: palette and grayscale expand, alpha is composited onto white,
    16-bit values scale to 8 bits (65535 -> 255), CMYK / YCbCr convert."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageProblem("image_mode", f"mode {mode} holds values outside the 16-bit range")
        return Image.fromarray(np.rint(values / 257).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    elif mode in ("L", "1", "CMYK", "YCbCr"):
        return image.convert("RGB")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode == "RGB":
        return image
    raise ImageProblem("image_mode", f"unsupported colour mode {mode}")


def read_image(source: Path | bytes, resolution: int, small_images: str) -> tuple[np.ndarray, CenterCrop]:
    """Decode an image file (path or bytes) into uint8 R x R x 3 RGB and the crop that made it.

    Raises ImageProblem (reasons: missing_file, corrupt_image, decompression_bomb, small_image,
    image_mode). JPEGs are decoded at a reduced scale (``Image.draft``) where the crop stays at
    least R pixels, which is exact up to the JPEG's own downscaling and much faster.
    """
    try:
        image = _open(source)
        crop = CenterCrop.fit(*image.size, resolution, small_images)
        scale = resolution / crop.side
        image.draft("RGB", (math.ceil(crop.width * scale), math.ceil(crop.height * scale)))
        image.load()
    except ImageProblem:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise _decode_failure(error) from None
    rgb = to_rgb(image)
    fx, fy = rgb.width / crop.width, rgb.height / crop.height  # < 1 where draft decoded a smaller image
    box = (crop.left * fx, crop.top * fy, (crop.left + crop.side) * fx, (crop.top + crop.side) * fy)
    out = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8), crop


def read_label_map(source: Path | bytes, crop: CenterCrop, what: str, max_value: int | None = None) -> np.ndarray:
    """A single-channel PNG of integer labels (mode P, L, I;16 or I) of the image's size, sampled
    nearest onto the crop: int64 R x R. Raises ImageProblem: ``{what}_size`` (another size),
    ``{what}_class`` (a value outside 0 .. max_value, anywhere in the map), ``bad_{what}``."""
    try:
        image = _open(source)
        image.load()
    except ImageProblem:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        failure = _decode_failure(error)
        reason = "missing_file" if failure.reason == "missing_file" else f"bad_{what}"
        raise ImageProblem(reason, str(failure)) from None
    if image.size != (crop.width, crop.height):
        raise ImageProblem(f"{what}_size", f"the {what} map is {image.width}x{image.height}, "
                                           f"its image {crop.width}x{crop.height}")
    if image.mode not in ("P", "L", "1", *_SIXTEEN_BIT_MODES):
        raise ImageProblem(f"bad_{what}", f"a {what} map must be a single-channel index PNG (mode P, L or I;16), "
                                          f"got mode {image.mode}")
    labels = np.asarray(image).astype(np.int64)
    if max_value is not None and (labels.min() < 0 or labels.max() > max_value):
        unknown = np.unique(labels[(labels < 0) | (labels > max_value)])
        raise ImageProblem(f"{what}_class", f"the {what} map holds values {unknown[:10].tolist()} outside 0..{max_value} "
                                            f"(0 = background, 1 + label for the {max_value} classes)")
    return crop.sample(labels)
