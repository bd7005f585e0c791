"""Sample grids as PNG, with a label beside each row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x 3 x H x W in [-1, 1] -> B x H x W x 3 uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_image(image: torch.Tensor, path: Path) -> None:
    Image.fromarray(to_uint8(image[None])[0]).save(path)


def save_grid(images: torch.Tensor, path: Path, columns: int, row_labels: list[str] | None = None, scale: int = 2, pad: int = 2) -> Path:
    """Write ``images`` row-major in a grid of ``columns``, upscaled ``scale`` times (nearest)."""
    arrays = to_uint8(images)
    n, h, w, _ = arrays.shape
    rows = -(-n // columns)
    h, w = h * scale, w * scale
    label_width = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    canvas = Image.new("RGB", (label_width + columns * (w + pad) + pad, rows * (h + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, array in enumerate(arrays):
        r, c = divmod(i, columns)
        tile = Image.fromarray(array).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (label_width + pad + c * (w + pad), pad + r * (h + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text((4, pad + r * (h + pad) + h // 2 - 5), label, fill=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return Path(path)
