"""A folder of images described by ``metadata.jsonl``: the convention of Hugging Face
``imagefolder`` (datasets docs, "Create an image dataset": one JSON object per line with
``file_name`` relative to the folder, ``text`` for a caption, ``objects`` with ``bbox`` and
``categories`` for detection; boxes are ``[x, y, width, height]`` in pixels, the COCO format, as
the Hugging Face AutoTrain object-detection docs state).

Fields read, each optional except ``file_name``, each turning into batch keys when any line has it:

    file_name      the image                                      -> image, low_res, mask (random)
    text           a non-empty caption                             -> caption
    objects        {"bbox": [[x, y, w, h], ...], "categories": [label, ...]} ("category" also read)
                                                                   -> boxes, box_labels
    label          the image's class                               -> class_label
    segmentation   an index PNG of the image's size: 0 = background, 1 + label
                                                                   -> segmentation
    mask           a PNG of the image's size, non-zero = the region to generate  -> mask

A label is an index into ``data.class_names`` or a class name. Without ``data.class_names`` the
classes are the names used in the metadata, sorted. Lines that break a rule are skipped and
counted (docs/reliability.md); so are images that cannot be decoded when they are first read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ldmcore.config import ConfigError
from ldmcore.data.annotations import check_caption, check_label, check_objects, check_options, check_size, existing_path
from ldmcore.data.skips import BadSample
from ldmcore.data.source import ALWAYS, Record, RealSource, read_segmentation

METADATA = "metadata.jsonl"
KEYS_OF_FIELD = {"text": ("caption",), "objects": ("boxes", "box_labels"), "label": ("class_label",),
                 "segmentation": ("segmentation",), "mask": ()}


class ImageFolder(RealSource):
    """Images of ``path`` listed in ``path/metadata.jsonl`` (see the module docstring); with
    ``size``, only the first ``size`` lines."""

    def __init__(self, path: str, resolution: int = 64, class_names: Sequence[str] = (), small_images: str = "skip",
                 max_skip_fraction: float = 0.01, seed: int = 0, size: int | None = None):
        names = check_options(resolution, small_images, max_skip_fraction, class_names, seed)
        self.size = check_size(size)
        folder = existing_path(path, "data.path", f"a folder holding {METADATA} and the images", "dir")
        metadata = folder / METADATA
        if not metadata.is_file():
            raise ConfigError(f"data.path={str(path)!r} holds no {METADATA} (one JSON object per image: file_name, text, objects ...)")
        super().__init__(f"imagefolder {folder}", resolution, names, small_images, max_skip_fraction, seed)
        lines = self._read_lines(metadata)
        fields = {field for _, line in lines for field in line if field in KEYS_OF_FIELD}
        self.class_names = names or _names_from_metadata(lines, fields, metadata)
        self.provides = ALWAYS + tuple(key for field in KEYS_OF_FIELD if field in fields for key in KEYS_OF_FIELD[field])
        for where, line in lines:
            try:
                self.records.append(self._record(folder, where, line, fields))
            except BadSample as bad:
                self.skips.record(bad.skip)
        self._ready()

    def _read_lines(self, metadata: Path) -> list[tuple[str, dict]]:
        """(``FILE:LINE``, object) of every line that is a JSON object; others are skipped."""
        lines = []
        for number, text in enumerate(metadata.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not text.strip():
                continue
            if self.size is not None and self.items_given >= self.size:
                break
            self.items_given += 1
            where = f"{metadata}:{number}"
            try:
                line = json.loads(text)
            except json.JSONDecodeError as error:
                self.skips.record(BadSample("bad_json", where, "-", f"not valid JSON ({error.msg})").skip)
                continue
            if not isinstance(line, dict):
                self.skips.record(BadSample("bad_json", where, "-", f"a line must be a JSON object, got {type(line).__name__}").skip)
                continue
            lines.append((where, line))
        return lines

    def _record(self, folder: Path, where: str, line: dict, fields: set[str]) -> Record:
        if "file_name" not in line:
            raise BadSample("missing_field", where, "file_name", "every line needs a file_name")
        absent = sorted(fields - line.keys())
        if absent:
            raise BadSample("missing_field", where, absent[0], f"no {absent[0]!r} on this line, though other lines have one")
        image = _file(folder, line["file_name"], where, "file_name")
        record = Record(name=str(image), image=image)
        if "text" in fields:
            record.caption = check_caption(line["text"], where, "text")
        if "label" in fields:
            record.class_label = check_label(line["label"], self.class_names, where, "label")
        if "objects" in fields:
            objects = line["objects"]
            if not isinstance(objects, dict):
                raise BadSample("bad_box", where, "objects", f"objects is {{'bbox': [...], 'categories': [...]}}, got {objects!r}")
            categories = objects.get("categories", objects.get("category"))
            record.boxes, record.box_labels = check_objects(objects.get("bbox"), categories, self.class_names, where)
        if "segmentation" in fields:
            png = _file(folder, line["segmentation"], where, "segmentation")
            record.segmentation = read_segmentation(png, str(png), len(self.class_names))
        if "mask" in fields:
            record.mask = _file(folder, line["mask"], where, "mask")
        return record


def _file(folder: Path, name, where: str, field: str) -> Path:
    """``folder / name`` for a file that exists."""
    if not isinstance(name, str) or not name:
        raise BadSample("missing_field", where, field, f"{field} must be a file name, got {name!r}")
    path = folder / name
    if not path.is_file():
        raise BadSample("missing_file", str(path), field, f"named by {where}, does not exist")
    return path


def _names_from_metadata(lines: list[tuple[str, dict]], fields: set[str], metadata: Path) -> tuple[str, ...]:
    """Without data.class_names: the class names the metadata uses, sorted. Integer labels or
    segmentation maps need data.class_names (a start-up error says so)."""
    used: set[str] = set()
    for _, line in lines:
        objects = line.get("objects")
        categories = objects.get("categories", objects.get("category")) if isinstance(objects, dict) else None
        for value in [line.get("label"), *(categories if isinstance(categories, list) else [])]:
            if isinstance(value, int) and not isinstance(value, bool):
                raise ConfigError(f"{metadata} gives classes by index; name them with data.class_names=[...] (index = label)")
            if isinstance(value, str) and value:
                used.add(value)
    if "segmentation" in fields and not used:
        raise ConfigError(f"{metadata} names segmentation maps; name their classes with data.class_names=[...] "
                          f"(map value 1 + index = that class, 0 = background)")
    return tuple(sorted(used))
