"""Semantic maps as users give them and as manifests write them.

A map is an H x W grid of class ids: 0 = background, ``1 + label`` for the data's class ``label``
(the ``segmentation`` batch key). Two user-facing forms:

    "maps/0001.png"                                  an index PNG (mode L or P), pixel value = class id;
                                                     a relative path starts at the conditions file's folder
    {"size": [H, W], "runs": [[id, count], ...]}     run-length form, row-major: ``count`` pixels of
                                                     class ``id``, then the next run

``format_map`` writes the run-length form (a batch holds the map, not the file it came from), and
``parse_map`` reads both, so any formatted value reads back to the same map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

INDEX_MODES = ("L", "P")
RUN_KEYS = ("size", "runs")
FORMS = ('a path to an index PNG (mode L or P, pixel value = class id) or '
         '{"size": [H, W], "runs": [[class id, count], ...]}')


def _check_ids(ids: np.ndarray, num_ids: int, where: str) -> None:
    bad = np.unique(ids[(ids < 0) | (ids >= num_ids)])
    if bad.size:
        raise ValueError(f"{where} holds class ids {bad.tolist()[:10]} outside 0..{num_ids - 1} "
                         f"(0 = background, 1 + label of the data's {num_ids - 1} classes)")


def _check_size(height: int, width: int, resolution: int, where: str) -> None:
    if (height, width) != (resolution, resolution):
        raise ValueError(f"{where} is {width}x{height} pixels; this model needs {resolution}x{resolution} maps")


def read_png(path: Path, resolution: int, num_ids: int) -> torch.Tensor:
    """An index PNG -> int64 (H, W) class ids; every flaw is named with the file."""
    if not path.is_file():
        raise ValueError(f"semantic map {path} does not exist")
    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
            ids = np.asarray(image, dtype=np.int64) if mode in INDEX_MODES else None
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read semantic map {path}: {error}") from None
    if ids is None:
        raise ValueError(f"semantic map {path} has mode {mode}; it must be an index PNG (mode L or P) "
                         f"whose pixel values are class ids")
    _check_size(height, width, resolution, f"semantic map {path}")
    _check_ids(ids, num_ids, f"semantic map {path}")
    return torch.from_numpy(ids)


def write_png(segmentation: torch.Tensor, path: Path) -> Path:
    """Write an (H, W) map of class ids < 256 as a mode-L PNG that ``read_png`` reads back."""
    ids = torch.as_tensor(segmentation).cpu().numpy()
    if ids.ndim != 2 or ids.min() < 0 or ids.max() > 255:
        raise ValueError(f"a map PNG holds an H x W grid of class ids 0..255, got shape {ids.shape}")
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)
    return Path(path)


def _whole_number(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be a whole number, got {value!r}")
    return value


def decode_runs(value: dict, resolution: int, num_ids: int) -> torch.Tensor:
    """The run-length form -> int64 (H, W) class ids."""
    unknown = sorted(set(value) - set(RUN_KEYS))
    missing = [k for k in RUN_KEYS if k not in value]
    if unknown or missing:
        raise ValueError(f"a run-length semantic map has exactly the keys {list(RUN_KEYS)}; "
                         f"{'unknown ' + str(unknown) if unknown else 'missing ' + str(missing)}")
    size = value["size"]
    if not isinstance(size, list) or len(size) != 2:
        raise ValueError(f"semantic map size must be [H, W], got {size!r}")
    height, width = (_whole_number(v, "semantic map size") for v in size)
    _check_size(height, width, resolution, "semantic map (run-length)")
    runs = value["runs"]
    if not isinstance(runs, list) or not all(isinstance(r, list) and len(r) == 2 for r in runs):
        raise ValueError("semantic map runs must be a list of [class id, count] pairs")
    ids = np.array([_whole_number(r[0], f"semantic map run {i + 1} class id") for i, r in enumerate(runs)], dtype=np.int64)
    counts = np.array([_whole_number(r[1], f"semantic map run {i + 1} count") for i, r in enumerate(runs)], dtype=np.int64)
    if (counts < 1).any():
        raise ValueError(f"semantic map run {int(np.argmax(counts < 1)) + 1} has a count below 1")
    if counts.sum() != height * width:
        raise ValueError(f"semantic map runs cover {int(counts.sum())} pixels; size {height}x{width} needs {height * width}")
    _check_ids(ids, num_ids, "semantic map (run-length)")
    return torch.from_numpy(np.repeat(ids, counts).reshape(height, width))


def encode_runs(segmentation: torch.Tensor) -> dict:
    """int (H, W) class ids -> the run-length form (plain ints, JSON-ready)."""
    ids = torch.as_tensor(segmentation).cpu().numpy().astype(np.int64)
    flat = ids.reshape(-1)
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    counts = np.diff(np.append(starts, flat.size))
    return {"size": list(ids.shape), "runs": [[int(flat[s]), int(n)] for s, n in zip(starts, counts)]}


def parse_map(value, resolution: int, num_ids: int, root: Path) -> torch.Tensor:
    """A user's map in either form -> int64 (resolution, resolution) class ids; a relative PNG path
    starts at ``root`` (the conditions file's folder), an absolute one stays as it is."""
    if isinstance(value, str):
        return read_png(Path(root) / Path(value).expanduser(), resolution, num_ids)
    if isinstance(value, dict):
        return decode_runs(value, resolution, num_ids)
    raise ValueError(f"a semantic map is {FORMS}; got {value!r:.80}")
