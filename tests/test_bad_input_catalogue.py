"""The catalogue of bad input (docs/reliability.md, "Real data: bad items"): each row is one bad
input and what must become of it. Three tables:

- SKIPPED: an item of a real data source that cannot be used. It is skipped and counted under
  its reason, named by file and field, replaced by a good item; nothing stops (the skip fraction
  is lifted to 1 here; its own rows are in ERRORS).
- CONVERTED: an image in an unusual format, converted to RGB with the values asserted.
- ERRORS: input refused at start-up with an error naming the option, file or field.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import real_data
from conftest import compose_config
from ldmcore.config import ConfigError, validate
from ldmcore.data.coco import Coco
from ldmcore.data.imagefolder import ImageFolder
from ldmcore.data.shapes import ShapesWorld
from ldmcore.data.skips import DataError
from ldmcore.data.webdataset import WebDataset
from ldmcore.system import build, build_system
from ldmcore.model_config import check_same_model
from ldmcore.tasks import read_conditions
from ldmcore.training.checkpoint import CheckpointError, load_module_state, module_tensors, resolve_checkpoint

N = 4  # items of each small data set; item 0 is the bad one


# --- building bad items -----------------------------------------------------------------------------


def encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt)
    return buffer.getvalue()


def halved(data: bytes) -> bytes:
    return data[:len(data) // 2]


def edit_line(folder: Path, i: int, drop: tuple[str, ...] = (), **fields) -> None:
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    lines[i].update(fields)
    for field in drop:
        lines[i].pop(field)
    real_data.write_metadata(folder, lines)


def folder_item(change: Callable[[Path, pytest.MonkeyPatch], None], **options):
    """An image folder of N items whose item 0 is changed by ``change``."""

    def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        folder = real_data.imagefolder(tmp_path / "folder", n=N)
        change(folder, monkeypatch)
        return ImageFolder(str(folder), resolution=32, max_skip_fraction=1.0, **options)

    return make


def line(drop: tuple[str, ...] = (), **fields):
    return folder_item(lambda folder, _: edit_line(folder, 0, drop, **fields))


def objects(*boxes, categories=None):
    """Item 0's objects: the given boxes, each of the first class unless ``categories`` says."""
    return line(objects={"bbox": list(boxes), "categories": categories or [real_data.CLASSES[0]] * len(boxes)})


def raw_line(text: str):
    def change(folder: Path, _) -> None:
        rest = (folder / "metadata.jsonl").read_text().splitlines()[1:]
        real_data.write_metadata(folder, [text, *rest])

    return folder_item(change)


def file(name: str, content: Callable[[Path], bytes], **fields):
    """Item 0 gets the file ``name`` (written with ``content(folder)``) and the given fields."""

    def change(folder: Path, _) -> None:
        (folder / name).write_bytes(content(folder))
        edit_line(folder, 0, **fields)

    return folder_item(change)


def masks(folder: Path, _) -> None:
    """Every item gets a mask file of its image's size, except item 0's: 10 x 10."""
    for i in range(N):
        shape = (10, 10) if i == 0 else (40, 48)
        (folder / f"{i:03d}.mask.png").write_bytes(encoded(np.ones(shape, np.uint8), "PNG"))
        edit_line(folder, i, mask=f"{i:03d}.mask.png")


def bomb(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the other items are 48 x 40 = 1920 pixels
    Image.new("RGB", (100, 100)).save(folder / "000.png")


def coco_item(image_size=(8, 8), category=7, segmentation=None, caption="a dog"):
    """A COCO set of N 8x8 images; image 0 has the given size on disk, category, RLE / polygon."""

    def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        images, annotations, captions = [], [], []
        for i in range(N):
            w, h = image_size if i == 0 else (8, 8)
            images.append({"id": i, "file_name": f"{i}.png", "width": 8, "height": 8, "array": np.zeros((h, w, 3), np.uint8)})
            annotations.append({"id": i, "image_id": i, "category_id": category if i == 0 else 7, "bbox": [1, 1, 4, 4],
                                "iscrowd": 0, "segmentation": (segmentation if i == 0 and segmentation else [[1, 1, 5, 1, 5, 5]])})
            if caption is not None or i:
                captions.append({"id": i, "image_id": i, "caption": caption if i == 0 else "a cat"})
        folder, caption_file, instances = real_data.coco(tmp_path, images, annotations, captions)
        return Coco(str(folder), str(caption_file), str(instances), resolution=8, max_skip_fraction=1.0)

    return make


def shard_item(members: dict[str, bytes] | None = None, truncate: bool = False):
    """A shard of N samples; sample 0's members replaced by ``members``, or the shard cut short
    inside its last sample."""

    def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        path = real_data.shards(tmp_path / "shards", n_shards=1, per_shard=N)[0]
        if members is not None:
            with tarfile.open(path) as tar:
                kept = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.startswith("s00000.")]
            with tarfile.open(path, "w") as tar:
                for name, data in [*((f"s00000.{ext}", data) for ext, data in members.items()), *kept]:
                    real_data.tar_member(tar, name, data)
        if truncate:
            with tarfile.open(path) as tar:
                last_image = [m for m in tar.getmembers() if m.name.endswith(".png")][-1]
            path.write_bytes(path.read_bytes()[:last_image.offset_data + last_image.size // 2])
        return WebDataset(str(path), resolution=32, class_names=["thing"], max_skip_fraction=1.0)

    return make


RGB_PNG = real_data.png_bytes(np.zeros((36, 36, 3), np.uint8))
OBJECTS = json.dumps({"objects": {"bbox": [[2, 2, 10, 10]], "categories": [0]}}).encode()


# --- table 1: skipped and counted ------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    id: str
    make: Callable  # (tmp_path, monkeypatch) -> a data source holding one bad item
    reason: str  # the reason it is counted under
    named: str  # what the skip names (file, field)


SKIPPED = [
    Skipped("not-an-image", file("000.png", lambda f: b"GIF89a, but not really"), "corrupt_image", "000.png (field image)"),
    Skipped("truncated-png", file("000.png", lambda f: halved((f / "000.png").read_bytes())), "corrupt_image", "000.png (field image)"),
    Skipped("truncated-jpeg", file("000.jpg", lambda f: encoded(real_data.scene(48, 40, (0, 0, 9, 9)), "JPEG")[:300], file_name="000.jpg"),
            "corrupt_image", "000.jpg (field image)"),
    Skipped("decompression-bomb", folder_item(bomb), "decompression_bomb", "000.png (field image): Image size (10000 pixels)"),
    Skipped("float-image", file("000.tif", lambda f: encoded(np.ones((40, 48), np.float32), "TIFF"), file_name="000.tif"),
            "image_mode", "unsupported colour mode F"),
    Skipped("smaller-than-training-size", file("000.png", lambda f: encoded(np.zeros((20, 24, 3), np.uint8), "PNG")),
            "small_image", "24x20 is smaller than the training size 32"),
    Skipped("missing-file", line(file_name="nope.png"), "missing_file", "nope.png (field file_name)"),
    Skipped("malformed-json", raw_line('{"file_name": "000.png", '), "bad_json", "metadata.jsonl:1"),
    Skipped("line-not-an-object", raw_line('["000.png"]'), "bad_json", "metadata.jsonl:1"),
    Skipped("no-file-name", line(drop=("file_name",)), "missing_field", "metadata.jsonl:1 (field file_name)"),
    Skipped("field-missing-on-one-line", line(drop=("text",)), "missing_field", "metadata.jsonl:1 (field text)"),
    Skipped("empty-caption", line(text="   "), "bad_caption", "(field text): the caption is empty"),
    Skipped("number-caption", line(text=42), "bad_caption", "(field text): a caption must be a string, got int 42"),
    Skipped("null-caption", line(text=None), "bad_caption", "got NoneType None"),
    Skipped("box-out-of-range", objects([40, 30, 20, 20]), "box_out_of_range",
            "(field objects.bbox[0]): box [x=40, y=30, w=20, h=20] reaches outside the 48x40 image"),
    Skipped("inverted-box", objects([20, 10, -5, 8]), "inverted_box",
            "(field objects.bbox[0]): box [20, 10, -5, 8] has width -5"),
    Skipped("box-of-three-numbers", objects([1, 2, 3]), "bad_box", "(field objects.bbox[0])"),
    Skipped("box-not-numbers", objects([1, 2, "wide", 4]), "bad_box", "four finite numbers"),
    Skipped("boxes-and-categories-differ", objects([1, 2, 3, 4], [5, 6, 7, 8], categories=[real_data.CLASSES[0]]), "bad_box",
            "2 boxes but 1 categories"),
    Skipped("unknown-label-name", folder_item(lambda f, _: edit_line(f, 0, objects={"bbox": [[1, 2, 3, 4]], "categories": ["blue thing"]}),
                                              class_names=real_data.CLASSES),
            "unknown_label", "(field objects.categories[0]): label 'blue thing' is not one of the 2 classes"),
    Skipped("unknown-label-index", folder_item(lambda f, _: edit_line(f, 0, label=7), class_names=real_data.CLASSES),
            "unknown_label", "(field label): label 7 is not one of the 2 classes"),
    Skipped("segmentation-wrong-size", file("000.seg.png", lambda f: encoded(np.zeros((10, 10), np.uint8), "PNG")),
            "segmentation_size", "000.seg.png (field segmentation): the segmentation map is 10x10, its image 48x40"),
    Skipped("segmentation-unknown-class", file("000.seg.png", lambda f: encoded(np.full((40, 48), 9, np.uint8), "PNG")),
            "segmentation_class", "holds values [9] outside 0..2"),
    Skipped("segmentation-not-an-index-map", file("000.seg.png", lambda f: encoded(np.zeros((40, 48, 3), np.uint8), "PNG")),
            "bad_segmentation", "single-channel index PNG"),
    Skipped("segmentation-file-missing", line(segmentation="nope.seg.png"), "missing_file", "nope.seg.png (field segmentation)"),
    Skipped("mask-wrong-size", folder_item(masks), "mask_size", "000.mask.png (field mask): the mask map is 10x10, its image 48x40"),
    Skipped("coco-rle-of-another-size", coco_item(segmentation={"counts": [0, 16], "size": [4, 4]}), "segmentation_size",
            "RLE size [4, 4] differs from the image's [height, width] = [8, 8]"),
    Skipped("coco-rle-counts-wrong", coco_item(segmentation={"counts": [3, 4], "size": [8, 8]}), "bad_segmentation",
            "RLE counts sum to 7, not height x width = 8x8 = 64"),
    Skipped("coco-rle-string-broken", coco_item(segmentation={"counts": "0~0", "size": [8, 8]}), "bad_segmentation",
            "outside the RLE alphabet"),
    Skipped("coco-image-not-its-annotated-size", coco_item(image_size=(10, 8)), "image_size", "the file is 10x8, the annotations say 8x8"),
    Skipped("coco-unknown-category", coco_item(category=99), "unknown_label", "category id 99 is not among the file's categories"),
    Skipped("coco-image-without-caption", coco_item(caption=None), "missing_field", "(field caption)"),
    Skipped("shard-truncated", shard_item(truncate=True), "corrupt_shard", "shard-000.tar (field -): unreadable after"),
    Skipped("shard-sample-without-image", shard_item({"txt": b"no picture", "json": OBJECTS}), "missing_field", "s00000 (field image)"),
    Skipped("shard-caption-not-utf8", shard_item({"png": RGB_PNG, "txt": b"\xff\xfe caption", "json": OBJECTS}), "bad_caption",
            "s00000 (field txt): not UTF-8"),
    Skipped("shard-json-broken", shard_item({"png": RGB_PNG, "txt": b"ok", "json": b"{objects"}), "bad_json", "s00000 (field json)"),
]


@pytest.mark.parametrize("row", SKIPPED, ids=[row.id for row in SKIPPED])
def test_skipped_and_counted(row: Skipped, tmp_path, monkeypatch, caplog):
    source = row.make(tmp_path, monkeypatch)
    batch = source.batch(range(len(source)))  # reading every item meets the bad one; nothing stops
    assert dict(source.skips.counts) == {row.reason: 1}
    assert row.named in source.skips.describe()
    assert row.named in caplog.text  # logged with file and field
    assert len(batch["image"]) == len(source) >= N - 1
    assert torch.isfinite(batch["image"]).all()


# --- table 2: converted ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    id: str
    image: Callable[[], bytes]  # the image file's bytes (48 x 40, one colour)
    rgb: tuple[int, int, int]  # the colour the training sees
    options: tuple = ()


def palette(transparent: bool) -> bytes:
    image = Image.new("P", (48, 40), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **({"transparency": 1} if transparent else {}))
    return buffer.getvalue()


def solid(mode: str, value, fmt: str = "PNG", size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value).save(buffer, fmt)
    return buffer.getvalue()


CONVERTED = [
    Converted("palette", lambda: palette(False), (10, 200, 30)),
    Converted("palette-with-transparency", lambda: palette(True), (255, 255, 255)),  # onto white
    Converted("grayscale", lambda: solid("L", 77), (77, 77, 77)),
    Converted("one-bit", lambda: solid("1", 1), (255, 255, 255)),
    Converted("rgba-half-transparent", lambda: solid("RGBA", (255, 0, 0, 128)), (255, 127, 127)),  # 128/255 red over white
    Converted("grayscale-with-alpha", lambda: solid("LA", (0, 0)), (255, 255, 255)),
    Converted("16-bit-grayscale", lambda: encoded(np.full((40, 48), 257 * 100, np.uint16), "PNG"), (100, 100, 100)),
    Converted("16-bit-grayscale-white", lambda: encoded(np.full((40, 48), 65535, np.uint16), "PNG"), (255, 255, 255)),
    Converted("16-bit-rgb", lambda: real_data.png16_rgb(np.tile(np.array([65535, 257 * 100, 0], np.uint16), (40, 48, 1))), (255, 100, 0)),
    Converted("cmyk", lambda: solid("CMYK", (0, 255, 0, 0), "TIFF"), (255, 0, 255)),
    Converted("small-image-upsampled", lambda: solid("RGB", (1, 2, 3), size=(12, 10)), (1, 2, 3), (("small_images", "upsample"),)),
]


@pytest.mark.parametrize("row", CONVERTED, ids=[row.id for row in CONVERTED])
def test_converted_to_rgb(row: Converted, tmp_path):
    (tmp_path / "a.img").write_bytes(row.image())
    real_data.write_metadata(tmp_path, [{"file_name": "a.img"}])
    source = ImageFolder(str(tmp_path), resolution=32, **dict(row.options))
    pixels = ((source.batch([0])["image"][0] + 1) * 127.5).round()  # 3 x 32 x 32 in 0..255
    assert source.skips.total == 0
    assert (pixels == torch.tensor(row.rgb, dtype=torch.float32)[:, None, None]).all(), pixels[:, 0, 0]


# --- table 3: refused at start-up ------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    id: str
    act: Callable  # (tmp_path, system) -> raises
    error: type
    message: str  # regex the message must match


def folder_source(*overrides: str, change: Callable[[Path], None] = lambda folder: None):
    def act(tmp_path: Path, system):
        folder = real_data.imagefolder(tmp_path / "folder", n=N)
        change(folder)
        build("data", compose_config(["data=imagefolder", f"data.path={folder}", *overrides]).data)

    return act


def every_line(**fields):
    return lambda folder: [edit_line(folder, i, **fields) for i in range(N)]


def conditions_file(text: str):
    def act(tmp_path: Path, system):
        path = tmp_path / "conditions.jsonl"
        path.write_text(text)
        read_conditions(path, system)

    return act


def other_model_tensors(tmp_path: Path, system):
    other = build_system(validate(compose_config(["+condition=class", "+experiment=tiny", "denoiser.model_channels=16"])),
                         ShapesWorld(size=8))
    load_module_state(system.model, module_tensors(other.model, "model"), "model", source="other/model.safetensors")


def broken_shards(tmp_path: Path, system):
    bad = tmp_path / "bad"
    for i in range(2):
        (bad / str(i)).mkdir(parents=True)
        real_data.shards(bad / str(i), 1, 2)  # two good samples ...
        with tarfile.open(bad / str(i) / "shard-000.tar", "a") as tar:  # ... then one without an image, twice
            real_data.tar_member(tar, "z.txt", b"lost")
    WebDataset([str(bad / "0"), str(bad / "1")], resolution=32, class_names=["thing"], max_skip_fraction=0.25)


def too_many_bad_images(tmp_path: Path, system):
    folder = real_data.imagefolder(tmp_path / "folder", n=N)
    (folder / "002.png").write_bytes(b"broken")
    (folder / "003.png").write_bytes(b"broken")
    source = ImageFolder(str(folder), resolution=32, max_skip_fraction=0.3)  # the metadata is fine: no error yet
    source.batch(range(N))


REFUSED = [
    Refused("data-path-not-given", lambda tmp, s: build("data", compose_config(["data=imagefolder"]).data),
            ConfigError, r"data\.path is required"),
    Refused("data-path-does-not-exist", lambda tmp, s: build("data", compose_config(["data=imagefolder", f"data.path={tmp}/x"]).data),
            ConfigError, r"data\.path='.*/x': no such folder"),
    Refused("folder-without-metadata", lambda tmp, s: ImageFolder(str(tmp)), ConfigError, r"holds no metadata\.jsonl"),
    Refused("integer-labels-without-class-names", folder_source(change=every_line(label=1)), ConfigError,
            r"gives classes by index; name them with data\.class_names"),
    Refused("segmentation-without-class-names", folder_source(change=lambda f: real_data.write_metadata(
        f, [{"file_name": f"{i:03d}.png", "segmentation": f"{i:03d}.seg.png"} for i in range(N)])), ConfigError, r"data\.class_names"),
    Refused("data-option-of-the-wrong-type", folder_source("data.resolution=abc"), ConfigError, r"data\.resolution must be"),
    Refused("skip-fraction-out-of-range", folder_source("data.max_skip_fraction=2"), ConfigError, r"data\.max_skip_fraction must be"),
    Refused("trainer-option-of-the-wrong-type", lambda tmp, s: validate(compose_config(["trainer.steps=abc"])), ConfigError,
            r"trainer\.steps"),
    Refused("coco-instances-not-json",
            lambda tmp, s: (tmp / "i.json").write_text("{images: [") and Coco(str(tmp), instances=str(tmp / "i.json")),
            ConfigError, r"data\.instances='.*i\.json' is not valid JSON"),
    Refused("coco-without-annotations", lambda tmp, s: Coco(str(tmp)), ConfigError, r"data\.captions or data\.instances must name"),
    Refused("shard-pattern-names-a-missing-shard", lambda tmp, s: WebDataset(f"{tmp}/shard-{{000..002}}.tar"), ConfigError,
            r"data\.shards: shard '.*shard-000\.tar' does not exist"),
    Refused("shard-labels-without-class-names", lambda tmp, s: WebDataset(str(real_data.shards(tmp, 1, 1)[0])), ConfigError,
            r"carry labels .* data\.class_names"),
    Refused("too-many-bad-lines", folder_source("data.max_skip_fraction=0.3", change=lambda f: [edit_line(f, i, text="") for i in (0, 1)]),
            DataError, r"2 of 4 items were skipped \(50\.0%\), more than data\.max_skip_fraction=0\.3: bad_caption 2"),
    Refused("too-many-bad-images-while-reading", too_many_bad_images, DataError,
            r"2 of 4 items were skipped .* corrupt_image 2 \(e\.g\. .*002\.png \(field image\)"),
    Refused("too-many-bad-shard-samples", broken_shards, DataError, r"2 of 6 items were skipped .* missing_field 2"),
    Refused("no-usable-item", folder_source("data.max_skip_fraction=1", change=every_line(text="")), DataError, r"no usable item"),
    Refused("conditions-unknown-plugin", conditions_file('{"telepathy": "a red circle"}\n'), ConfigError,
            r"conditions\.jsonl:1: unknown condition\(s\) \['telepathy'\]; this model has \['class'\]"),
    Refused("conditions-malformed-json", conditions_file('{"class": "red circle"}\n{"class": \n'), ConfigError,
            r"conditions\.jsonl:2: not valid JSON"),
    Refused("conditions-not-an-object", conditions_file('["class", "red circle"]\n'), ConfigError,
            r"conditions\.jsonl:1: each line must be a JSON object"),
    Refused("conditions-unknown-value", conditions_file('{"class": "purple hexagon"}\n'), ConfigError,
            r"conditions\.jsonl:1: condition 'class': .*purple hexagon"),
    Refused("checkpoint-that-does-not-fit", other_model_tensors, CheckpointError, r"mis-shaped"),
    Refused("resume-from-another-configuration",
            lambda tmp, s: check_same_model(compose_config(["+condition=class"]),
                                            compose_config(["+condition=class", "denoiser.model_channels=16"]), "RUN"),
            CheckpointError, r"RUN was trained with another configuration: denoiser\.model_channels: checkpoint 64, config 16"),
    Refused("pickled-checkpoint", lambda tmp, s: (tmp / "m.ckpt").write_bytes(b"\x80\x04") and resolve_checkpoint(tmp / "m.ckpt"),
            CheckpointError, r"m\.ckpt"),
]


@pytest.fixture(scope="module")
def class_system():
    """A tiny class-conditional model (weights as initialized) to read conditions files against."""
    return build_system(validate(compose_config(["+condition=class", "+experiment=tiny"])), ShapesWorld(size=8))


@pytest.mark.parametrize("row", REFUSED, ids=[row.id for row in REFUSED])
def test_refused_with_a_named_error(row: Refused, tmp_path, class_system):
    with pytest.raises(row.error, match=row.message):
        row.act(tmp_path, class_system)


def test_the_catalogue_covers_the_list():
    assert len(SKIPPED) + len(CONVERTED) + len(REFUSED) >= 25
    for rows in (SKIPPED, CONVERTED, REFUSED):
        assert len({row.id for row in rows}) == len(rows)  # one row per input
