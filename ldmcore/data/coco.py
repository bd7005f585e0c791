"""COCO: images with the annotation files of the COCO API (``captions_*.json``,
``instances_*.json``; cocodataset.org "Data format").

An item is one image of the instances file (else of the captions file):
    caption       the image's first caption (lowest annotation id); the other captions are unused,
                  because ``batch(i)`` must return the same item every time it is asked
    boxes         ``bbox`` [x, y, width, height] in pixels of every non-crowd object
    box_labels    index of its ``category_id`` among the categories sorted by id (class_names)
    segmentation  0 = background, 1 + label, painted from the objects' ``segmentation`` (crowd
                  regions included), largest object first so that small ones stay visible;
                  polygons by the pixel-centre rule, RLE decoded here (both formats, below)

RLE, as the COCO API defines it (``pycocotools/mask.py``, ``common/maskApi.c``): ``counts`` are
the lengths of alternating runs of 0 and 1, starting with 0, over the mask flattened in column-major
order (down each column first); ``size`` is [height, width]. Uncompressed RLE gives ``counts`` as a
list of integers; compressed RLE as a string where each count is written in 5-bit groups, least
significant first, one character per group (character = group + 48; bit 0x20 = more groups follow;
bit 0x10 of the last group = negative), and every count after the second is stored as the
difference to the count two places before it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ldmcore.config import ConfigError
from ldmcore.data.annotations import check_box, check_caption, check_options, check_size, existing_path
from ldmcore.data.images import BOX_TOLERANCE, CenterCrop
from ldmcore.data.skips import BadSample
from ldmcore.data.source import ALWAYS, Record, RealSource


# --- RLE and polygons ----------------------------------------------------------------------------


def rle_counts_from_string(text: str) -> list[int]:
    """Decode the compressed RLE string of the COCO API into run lengths (ValueError if broken)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("the RLE string ends inside a count")
            group = ord(text[p]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"character {text[p]!r} at {p} is outside the RLE alphabet (ASCII 48-111)")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            p += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_runs(counts: Sequence[int] | str, height: int, width: int) -> np.ndarray:
    """COCO RLE counts (uncompressed list or compressed string) -> checked run lengths (int64)."""
    runs = rle_counts_from_string(counts) if isinstance(counts, str) else list(counts)
    if any(not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 0 for c in runs):
        raise ValueError("RLE counts must be non-negative integers")
    if sum(runs) != height * width:
        raise ValueError(f"RLE counts sum to {sum(runs)}, not height x width = {height}x{width} = {height * width}")
    return np.asarray(runs, dtype=np.int64)


def runs_to_mask(runs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Checked run lengths -> bool mask (height, width)."""
    values = np.repeat(np.arange(len(runs)) % 2 == 1, runs)  # runs alternate 0, 1, 0, ...
    return values.reshape(width, height).T  # column-major


def rle_decode(counts: Sequence[int] | str, height: int, width: int) -> np.ndarray:
    """COCO RLE (uncompressed list or compressed string) -> bool mask (height, width)."""
    return runs_to_mask(rle_runs(counts, height, width), height, width)


def polygon_region(polygon: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bool (len(ys), len(xs)): the grid points (xs[j], ys[i]) inside the polygon (k x 2), by the
    even-odd rule. Only points within the polygon's bounding box are tested."""
    inside = np.zeros((len(ys), len(xs)), dtype=bool)
    columns = np.flatnonzero((xs >= polygon[:, 0].min()) & (xs <= polygon[:, 0].max()))
    rows = np.flatnonzero((ys >= polygon[:, 1].min()) & (ys <= polygon[:, 1].max()))
    if not len(columns) or not len(rows):
        return inside
    px, py = xs[columns][None, :], ys[rows][:, None]
    hit = np.zeros((len(rows), len(columns)), dtype=bool)
    for (xa, ya), (xb, yb) in zip(polygon, np.roll(polygon, -1, axis=0)):
        if ya == yb:
            continue  # a horizontal edge never crosses the ray
        crosses = (ya > py) != (yb > py)
        x_cross = xa + (py - ya) * (xb - xa) / (yb - ya)
        hit ^= crosses & (px < x_cross)
    inside[np.ix_(rows, columns)] = hit
    return inside


class Region:
    """One object's segmentation, checked when the annotations are read and drawn per crop."""

    def __init__(self, segmentation, height: int, width: int, file: str):
        self.polygons: list[np.ndarray] = []
        self.runs: np.ndarray | None = None  # RLE run lengths; decoded only when drawn (a mask each would not fit in memory)
        self.height, self.width = height, width
        where = "annotations.segmentation"
        if isinstance(segmentation, list):
            for polygon in segmentation:
                ok = isinstance(polygon, list) and len(polygon) % 2 == 0 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in polygon)
                if not ok:
                    raise BadSample("bad_segmentation", file, where, "a polygon is a flat list [x1, y1, x2, y2, ...] of finite numbers")
                if len(polygon) >= 6:  # fewer than 3 points enclose no pixel centre
                    self.polygons.append(np.asarray(polygon, dtype=np.float64).reshape(-1, 2))
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            if list(segmentation["size"]) != [height, width]:
                raise BadSample("segmentation_size", file, where,
                                f"RLE size {segmentation['size']} differs from the image's [height, width] = [{height}, {width}]")
            try:
                self.runs = rle_runs(segmentation["counts"], height, width)
            except (ValueError, TypeError) as error:
                raise BadSample("bad_segmentation", file, where, f"RLE cannot be decoded: {error}") from None
        else:
            raise BadSample("bad_segmentation", file, where, "a segmentation is a list of polygons or an RLE {counts, size}")

    def draw(self, crop: CenterCrop) -> np.ndarray:
        """Bool R x R: the target pixels whose centres lie in the region."""
        if self.runs is not None:
            return crop.sample(runs_to_mask(self.runs, self.height, self.width))
        xs, ys = crop.pixel_centres()
        region = np.zeros((crop.resolution, crop.resolution), dtype=bool)
        for polygon in self.polygons:
            region |= polygon_region(polygon, xs, ys)
        return region


def paint(regions: list[tuple[float, Region, int]]):
    """The renderer of an image's semantic map from (area, region, label) of its objects."""
    ordered = sorted(regions, key=lambda item: -item[0])  # largest first, small objects on top

    def render(crop: CenterCrop) -> np.ndarray:
        segmentation = np.zeros((crop.resolution, crop.resolution), dtype=np.int64)
        for _, region, label in ordered:
            segmentation[region.draw(crop)] = 1 + label
        return segmentation

    return render


# --- the data source -----------------------------------------------------------------------------


def _load(path, option: str, needs: tuple[str, ...]) -> dict:
    file = existing_path(path, option, "a COCO annotation file (JSON)", "file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{option}={str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(key), list) for key in needs):
        raise ConfigError(f"{option}={str(path)!r} is not a COCO annotation file: it needs the lists {', '.join(needs)}")
    return data


class Coco(RealSource):
    """COCO images (folder ``images``) with ``captions`` and / or ``instances`` annotation files;
    with ``size``, only the first ``size`` images of the file."""

    def __init__(self, images: str, captions: str | None = None, instances: str | None = None, resolution: int = 64,
                 small_images: str = "skip", max_skip_fraction: float = 0.01, seed: int = 0, size: int | None = None):
        check_options(resolution, small_images, max_skip_fraction, (), seed)
        size = check_size(size)
        folder = existing_path(images, "data.images", "the COCO image folder, e.g. train2017", "dir")
        if not captions and not instances:
            raise ConfigError("data.captions or data.instances must name a COCO annotation file "
                              "(captions_*.json, instances_*.json)")
        caption_data = _load(captions, "data.captions", ("images", "annotations")) if captions else None
        instance_data = _load(instances, "data.instances", ("images", "annotations", "categories")) if instances else None
        super().__init__(f"coco {folder}", resolution, (), small_images, max_skip_fraction, seed)
        source_file = str(instances if instances else captions)
        categories = sorted(instance_data["categories"], key=lambda c: c["id"]) if instance_data else []
        self.class_names = tuple(str(c["name"]) for c in categories)
        label_of = {c["id"]: i for i, c in enumerate(categories)}
        self.provides = ALWAYS + (("caption",) if caption_data else ()) + (
            ("boxes", "box_labels", "segmentation") if instance_data else ())

        first_caption = _first_captions(caption_data) if caption_data else {}
        objects: dict = {}
        for annotation in (instance_data or {}).get("annotations", []):
            objects.setdefault(annotation.get("image_id"), []).append(annotation)
        for entry in (instance_data or caption_data)["images"][:size]:
            self.items_given += 1
            try:
                self.records.append(self._record(folder, source_file, entry, first_caption, objects, label_of,
                                                 caption_data is not None, instance_data is not None))
            except BadSample as bad:
                self.skips.record(bad.skip)
        self._ready()

    def _record(self, folder: Path, source_file: str, entry, first_caption: dict, objects: dict, label_of: dict,
                with_captions: bool, with_instances: bool) -> Record:
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "id" not in entry:
            raise BadSample("bad_json", source_file, "images", f"an image entry needs id and file_name, got {entry!r}")
        image_id, path = entry["id"], folder / entry["file_name"]
        where = f"{source_file} (image id {image_id})"
        if not path.is_file():
            raise BadSample("missing_file", str(path), "file_name", f"named by {where}, does not exist")
        width, height = entry.get("width"), entry.get("height")
        if not all(isinstance(v, int) and v > 0 for v in (width, height)):
            raise BadSample("bad_json", where, "width/height",
                            f"an image entry needs positive integer width and height, got {width!r}, {height!r}")
        record = Record(name=str(path), image=path, size=(width, height))
        if with_captions:
            if image_id not in first_caption:
                raise BadSample("missing_field", where, "caption", "the captions file has no caption for this image")
            record.caption = check_caption(first_caption[image_id], where, "caption")
        if with_instances:
            record.boxes, record.box_labels, regions = [], [], []
            for annotation in objects.get(image_id, []):
                category = annotation.get("category_id")
                if category not in label_of:
                    raise BadSample("unknown_label", where, "category_id", f"category id {category!r} is not among the file's categories")
                x, y, w, h = check_box(annotation.get("bbox"), where, "bbox")
                t = BOX_TOLERANCE
                if x < -t or y < -t or x + w > width + t or y + h > height + t:
                    raise BadSample("box_out_of_range", where, "bbox",
                                    f"box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] reaches outside the {width}x{height} image")
                if not annotation.get("iscrowd"):
                    record.boxes.append((x, y, w, h))
                    record.box_labels.append(label_of[category])
                if annotation.get("segmentation"):
                    regions.append((w * h, Region(annotation["segmentation"], height, width, where), label_of[category]))
            record.segmentation = paint(regions)
        return record


def _first_captions(data: dict) -> dict:
    """image id -> the caption of its lowest annotation id."""
    first: dict = {}
    for annotation in data["annotations"]:
        if not isinstance(annotation, dict):
            continue
        key = annotation.get("image_id")
        if key not in first or annotation.get("id", 0) < first[key][0]:
            first[key] = (annotation.get("id", 0), annotation.get("caption"))
    return {key: caption for key, (_, caption) in first.items()}
