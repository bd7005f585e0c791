"""Small real-data sets built in a test's temporary folder: an image folder with metadata.jsonl,
COCO annotation files, webdataset shards, and image files in unusual formats."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, GRAY = (255, 0, 0), (0, 255, 0), (128, 128, 128)
CLASSES = ["green thing", "red thing"]  # sorted, as a folder without data.class_names names them
COLORS = [GREEN, RED]


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), from uint16 H x W x 3."""
    height, width, _ = array.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def scene(width: int, height: int, box: tuple[int, int, int, int], color=RED) -> np.ndarray:
    """uint8 height x width x 3: gray, with a filled rectangle at box [x, y, w, h]."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = GRAY
    x, y, w, h = box
    image[y:y + h, x:x + w] = color
    return image


def label_map(width: int, height: int, box: tuple[int, int, int, int], value: int) -> np.ndarray:
    seg = np.zeros((height, width), dtype=np.uint8)
    x, y, w, h = box
    seg[y:y + h, x:x + w] = value
    return seg


def imagefolder(root: Path, n: int = 8, width: int = 48, height: int = 40, segmentation: bool = True,
                extra: dict | None = None) -> Path:
    """``n`` images, each a green (even i) or red (odd i) rectangle on gray, with caption, one
    object, a class label and an index-PNG map. ``extra`` maps a line index to fields that
    replace that line's (e.g. a bad caption)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        box = (8 + i % 4, 6 + i % 3, 16, 12)
        label = i % 2
        Image.fromarray(scene(width, height, box, COLORS[label])).save(root / f"{i:03d}.png")
        line = {"file_name": f"{i:03d}.png", "text": f"a {CLASSES[label]} number {i}",
                "objects": {"bbox": [list(box)], "categories": [CLASSES[label]]}, "label": CLASSES[label]}
        if segmentation:
            Image.fromarray(label_map(width, height, box, 1 + label)).save(root / f"{i:03d}.seg.png")
            line["segmentation"] = f"{i:03d}.seg.png"
        line.update((extra or {}).get(i, {}))
        lines.append(line)
    write_metadata(root, lines)
    return root


def write_metadata(root: Path, lines: list) -> None:
    (root / "metadata.jsonl").write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def coco(root: Path, images: list[dict], annotations: list[dict], captions: list[dict] | None = None,
         categories: list[dict] | None = None) -> tuple[Path, Path, Path]:
    """(image folder, captions file, instances file). ``images`` entries carry an ``array``
    (uint8 H x W x 3) beside the COCO fields; it is written as the image file."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for entry in images:
        entry = dict(entry)
        array = entry.pop("array")
        Image.fromarray(array).save(folder / entry["file_name"])
        entries.append(entry)
    categories = categories or [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    instances, caption_file = root / "instances.json", root / "captions.json"
    instances.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    caption_file.write_text(json.dumps({"images": entries, "annotations": captions or []}))
    return folder, caption_file, instances


def tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shards(root: Path, n_shards: int, per_shard: int, size: int = 36) -> list[Path]:
    """Shards of samples ``k`` = 0, 1, ...: a PNG (value k), ``sample k`` as .txt, one object in .json."""
    root.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s in range(n_shards):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(per_shard):
                tar_member(tar, f"s{k:05d}.png", png_bytes(np.full((size, size, 3), k % 256, dtype=np.uint8)))
                tar_member(tar, f"s{k:05d}.txt", f"sample {k}".encode())
                tar_member(tar, f"s{k:05d}.json", json.dumps({"objects": {"bbox": [[2, 2, 10, 10]], "categories": [0]}}).encode())
                k += 1
        paths.append(path)
    return paths


def required_options(option: str, root: Path) -> list[str]:
    """Overrides giving ``data=<option>`` the files it needs, built small under ``root``
    (no overrides for a source that needs none)."""
    if option == "imagefolder":
        return [f"data.path={imagefolder(root / 'folder', n=2)}"]
    if option == "coco":
        folder, captions, _ = coco(root, [{"id": 1, "file_name": "a.png", "width": 8, "height": 8,
                                           "array": np.zeros((8, 8, 3), dtype=np.uint8)}], [],
                                   [{"id": 1, "image_id": 1, "caption": "a picture"}])
        return [f"data.images={folder}", f"data.captions={captions}"]
    if option == "webdataset":
        return [f"data.shards={shards(root / 'shards', 1, 2)[0]}", f"data.class_names=[{CLASSES[0]!r}]", "data.resolution=32"]
    return []
