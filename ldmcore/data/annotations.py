"""Checking the annotations of one real item (caption, boxes with labels, class label) before any
image is decoded, and the options every real data source shares. A bad annotation raises
:class:`BadSample` naming the file and field; a bad option raises ``ConfigError`` naming it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldmcore.config import ConfigError
from ldmcore.data.images import BOX_TOLERANCE, SMALL_IMAGE_POLICIES
from ldmcore.data.skips import BadSample

LOW_RES_FACTOR = 4  # the low_res key is the image reduced 4x (as in the shapes world)


# --- options -----------------------------------------------------------------------------------


def existing_path(value: Any, option: str, what: str, kind: str = "any") -> Path:
    """``value`` as a Path that exists (``kind`` "file", "dir" or "any"), else ConfigError naming
    the option and what it should hold."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{option} must be set to {what}, got {value!r}")
    path = Path(value).expanduser()
    exists = {"file": path.is_file, "dir": path.is_dir, "any": path.exists}[kind]()
    if not exists:
        raise ConfigError(f"{option}={str(value)!r}: no such {'folder' if kind == 'dir' else 'file'} ({what})")
    return path


def check_options(resolution: Any, small_images: Any, max_skip_fraction: Any, class_names: Any, seed: Any) -> tuple[str, ...]:
    """Validate the options every real source has; returns the class names as a tuple."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < LOW_RES_FACTOR or resolution % LOW_RES_FACTOR:
        raise ConfigError(f"data.resolution must be a positive integer multiple of {LOW_RES_FACTOR}, got {resolution!r}")
    if small_images not in SMALL_IMAGE_POLICIES:
        raise ConfigError(f"data.small_images={small_images!r} is not allowed; choose one of: {', '.join(SMALL_IMAGE_POLICIES)}")
    if isinstance(max_skip_fraction, bool) or not isinstance(max_skip_fraction, (int, float)) or not 0 <= max_skip_fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction must be a number in [0, 1], got {max_skip_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"data.seed must be an integer, got {seed!r}")
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not all(isinstance(n, str) and n for n in class_names):
        raise ConfigError(f"data.class_names must be a list of non-empty strings, got {class_names!r}")
    if len(set(class_names)) != len(class_names):
        raise ConfigError(f"data.class_names lists a name twice: {list(class_names)}")
    return tuple(class_names)


def check_size(size: Any) -> int | None:
    """``data.size``: the number of items a source uses (the first ones), or None for all."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"data.size must be a positive integer or null (every item), got {size!r}")
    return size


# --- annotations ---------------------------------------------------------------------------------


def check_caption(value: Any, file: str, field: str = "text") -> str:
    """A caption must be a non-empty string."""
    if not isinstance(value, str):
        raise BadSample("bad_caption", file, field, f"a caption must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise BadSample("bad_caption", file, field, "the caption is empty")
    return value


def check_label(value: Any, class_names: Sequence[str], file: str, field: str) -> int:
    """A class given by index or by name -> its index in ``class_names``."""
    if isinstance(value, str):
        if value in class_names:
            return class_names.index(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(class_names):
            return value
    else:
        raise BadSample("unknown_label", file, field, f"a label is a class index or name, got {value!r}")
    shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
    raise BadSample("unknown_label", file, field, f"label {value!r} is not one of the {len(class_names)} classes (data.class_names: {shown})")


def check_box(value: Any, file: str, field: str) -> tuple[float, float, float, float]:
    """A box ``[x, y, width, height]`` in pixels (the COCO / Hugging Face convention) of finite
    numbers with a positive width and height."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise BadSample("bad_box", file, field, f"a box is [x, y, width, height] in pixels, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise BadSample("bad_box", file, field, f"a box holds four finite numbers, got {value!r}")
    x, y, w, h = (float(v) for v in value)
    if w <= 0 or h <= 0:
        raise BadSample("inverted_box", file, field, f"box {list(value)} has width {w:g} and height {h:g}; both must be "
                                                     f"positive ([x, y, width, height], not [x0, y0, x1, y1])")
    return x, y, w, h


def check_objects(boxes: Any, labels: Any, class_names: Sequence[str], file: str,
                  field: str = "objects") -> tuple[list[tuple[float, float, float, float]], list[int]]:
    """Parallel lists of boxes and labels -> (checked boxes, label indices)."""
    if not isinstance(boxes, list) or not isinstance(labels, list):
        raise BadSample("bad_box", file, field, f"{field} needs a list 'bbox' and a list 'categories', got {boxes!r} and {labels!r}")
    if len(boxes) != len(labels):
        raise BadSample("bad_box", file, field, f"{len(boxes)} boxes but {len(labels)} categories")
    checked = [check_box(b, file, f"{field}.bbox[{i}]") for i, b in enumerate(boxes)]
    return checked, [check_label(c, class_names, file, f"{field}.categories[{i}]") for i, c in enumerate(labels)]


def check_inside(boxes: Sequence[tuple[float, float, float, float]], width: int, height: int, file: str,
                 field: str = "objects") -> None:
    """Every box lies inside the ``width x height`` image, up to BOX_TOLERANCE pixels."""
    t = BOX_TOLERANCE
    for i, (x, y, w, h) in enumerate(boxes):
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            raise BadSample("box_out_of_range", file, f"{field}.bbox[{i}]",
                            f"box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] reaches outside the {width}x{height} image")
