"""Sample grids as PNG, with a label beside each row; line plots of measured numbers (benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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


# Qualitative line colours (matplotlib's "tab10" RGB values).
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(lo: float, hi: float, log: bool, count: int = 5) -> list[float]:
    """About ``count`` tick values spanning [lo, hi]: powers of 2 on a log axis, else round steps."""
    if log:
        first, last = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
        stride = max(1, math.ceil((last - first) / (2 * count)))
        return [2.0 ** e for e in range(first, last + 1, stride) if lo <= 2.0 ** e <= hi] or [lo, hi]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _label(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def line_plot(series: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, title: str, x_label: str,
              y_label: str, log_x: bool = False, x_range: tuple[float, float] | None = None,
              y_range: tuple[float, float] | None = None, reference: tuple[str, float] | None = None,
              size: tuple[int, int] = (640, 400)) -> Path:
    """One panel: a polyline with dots per series ({label: [(x, y), ...]}), numeric x (log2 scale
    with ``log_x``), a legend under the panel, and an optional dashed horizontal ``reference``
    line (label, y). x_range / y_range: fixed (lo, hi), default the data's range with a margin."""
    points = [p for line in series.values() for p in line]
    if not points:
        raise ValueError(f"nothing to plot in {path}: every series is empty")
    xs = [math.log2(x) if log_x else x for x, _ in points]
    ys = [y for _, y in points] + ([reference[1]] if reference else [])
    if x_range is not None:
        x_lo, x_hi = (math.log2(v) for v in x_range) if log_x else x_range
    else:
        x_pad = (max(xs) - min(xs)) * 0.05 or 1.0
        x_lo, x_hi = min(xs) - x_pad, max(xs) + x_pad
    if y_range is None:
        y_pad = (max(ys) - min(ys)) * 0.1 or 1.0
        y_range = (min(ys) - y_pad, max(ys) + y_pad)
    y_lo, y_hi = y_range
    font = ImageFont.load_default()
    legend_height = 16 * (len(series) + (1 if reference else 0)) + 8
    width, height = size
    left, top, right, bottom = 58, 36, width - 16, height - 44 - legend_height  # the panel's box
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def x_pixel(x: float) -> float:
        return left + (right - left) * ((math.log2(x) if log_x else x) - x_lo) / (x_hi - x_lo)

    def y_pixel(y: float) -> float:
        return bottom - (bottom - top) * (y - y_lo) / (y_hi - y_lo)

    draw.text((left, 4), title, fill=(0, 0, 0), font=font)
    draw.text((left + 4, top - 14), y_label, fill=(90, 90, 90), font=font)
    for y in _ticks(y_lo, y_hi, log=False, count=8):
        draw.line([(left, y_pixel(y)), (right, y_pixel(y))], fill=(228, 228, 228))
        draw.text((4, y_pixel(y) - 6), _label(y), fill=(90, 90, 90), font=font)
    distinct = sorted({x for x, _ in points})  # few x values (step counts, factors): label exactly those
    span = (2.0 ** x_lo, 2.0 ** x_hi) if log_x else (x_lo, x_hi)
    last = -math.inf
    for x in distinct if len(distinct) <= 8 else _ticks(*span, log=log_x):
        if x_pixel(x) - last < 24:  # no label over its neighbour's (NFE 50 and 51)
            continue
        last = x_pixel(x)
        draw.line([(last, bottom), (last, bottom + 4)], fill=(0, 0, 0))
        draw.text((last - 3 * len(_label(x)), bottom + 6), _label(x), fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, bottom + 22), x_label + (" (log scale)" if log_x else ""), fill=(0, 0, 0), font=font)
    legend_top = bottom + 40
    if reference:
        for px in range(left, right, 12):  # dashed
            draw.line([(px, y_pixel(reference[1])), (min(px + 6, right), y_pixel(reference[1]))], fill=(0, 0, 0))
        draw.line([(left, legend_top + 7), (left + 14, legend_top + 7)], fill=(0, 0, 0))
        draw.text((left + 22, legend_top), reference[0], fill=(0, 0, 0), font=font)
        legend_top += 16
    for k, (label, line) in enumerate(series.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        pixels = [(x_pixel(x), y_pixel(y)) for x, y in sorted(line)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        y = legend_top + 16 * k
        draw.rectangle([left, y + 2, left + 14, y + 12], fill=colour)
        draw.text((left + 22, y), label, fill=(0, 0, 0), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return Path(path)
