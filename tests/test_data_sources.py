"""Real data sources (image folder, COCO, webdataset shards), built small in tmp_path: the batch
keys of the shapes world, the one geometry of images / boxes / maps, RLE and polygons, the shard
split, and a tiny training run on an image folder."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import real_data
from conftest import compose_config
from ldmcore.config import ConfigError
from ldmcore.data.base import data_info
from ldmcore.data.coco import Coco, polygon_region, rle_counts_from_string, rle_decode
from ldmcore.data.images import CenterCrop
from ldmcore.data.imagefolder import ImageFolder
from ldmcore.data.shapes import collate
from ldmcore.data.webdataset import TarShards, WebDataset, expand_braces, split_shards
from ldmcore.system import build, build_system
from ldmcore.tasks import train


# --- the keys of the shapes world ------------------------------------------------------------


def assert_shapes_world_keys(batch: dict, n: int, r: int, num_classes: int) -> None:
    image = batch["image"]
    assert image.shape == (n, 3, r, r) and image.dtype == torch.float32 and -1 <= image.min() and image.max() <= 1
    assert batch["low_res"].shape == (n, 3, r // 4, r // 4)
    assert torch.allclose(batch["low_res"][:, :, 0, 0], image[:, :, :4, :4].mean((2, 3)))
    mask = batch["mask"]
    assert mask.shape == (n, 1, r, r) and set(mask.unique().tolist()) <= {0.0, 1.0} and (mask.flatten(1).sum(1) > 0).all()
    assert len(batch["caption"]) == n and all(isinstance(c, str) and c for c in batch["caption"])
    for boxes, labels in zip(batch["boxes"], batch["box_labels"]):
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4) and labels.dtype == torch.int64
        assert ((0 <= boxes) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((0 <= labels) & (labels < num_classes)).all()
    seg = batch["segmentation"]
    assert seg.shape == (n, r, r) and seg.dtype == torch.int64 and 0 <= seg.min() and seg.max() <= num_classes
    assert batch["class_label"].shape == (n,) and batch["class_label"].dtype == torch.int64


def test_imagefolder_yields_the_keys_of_the_shapes_world(tmp_path):
    data = ImageFolder(str(real_data.imagefolder(tmp_path / "folder")), resolution=32)
    assert len(data) == 8 and data.class_names == tuple(real_data.CLASSES)  # string labels, sorted
    batch = data.batch([0, 1, 2, 7])
    assert_shapes_world_keys(batch, 4, 32, 2)
    assert batch["caption"][1] == "a red thing number 1" and batch["class_label"].tolist() == [0, 1, 0, 1]
    info = data_info(data)
    assert info.resolution == 32 and info.reader is None and info.class_names == tuple(real_data.CLASSES)
    assert set(info.provides) == {"image", "low_res", "mask", "caption", "boxes", "box_labels", "class_label", "segmentation"}
    assert info.values("caption", 2) == ["a green thing number 0", "a red thing number 1"]
    assert torch.equal(data.batch([3])["image"], data.batch([3])["image"]) and torch.equal(data[3]["mask"], data[3]["mask"])


def test_a_condition_reading_a_key_the_folder_lacks_is_refused_at_start_up(tmp_path):
    folder = real_data.imagefolder(tmp_path / "folder", n=2)
    real_data.write_metadata(folder, [{"file_name": "000.png"}, {"file_name": "001.png"}])  # images only
    cfg = compose_config(["+condition=text", "data=imagefolder", f"data.path={folder}", "data.resolution=32"])
    data = build("data", cfg.data)
    assert data.provides == ("image", "low_res", "mask")
    with pytest.raises(ConfigError, match=r"reads batch keys \['caption'\] that the data source ImageFolder does not provide"):
        build_system(cfg, data)


@pytest.mark.parametrize("source", ["imagefolder", "coco", "webdataset"])
def test_a_required_path_option_is_named(source):
    with pytest.raises(ConfigError, match=r"data\.(path|images|shards) is required"):
        build("data", compose_config([f"data={source}"]).data)


@pytest.mark.parametrize("override, message", [
    ("data.path=/nowhere/at/all", r"data.path='/nowhere/at/all': no such folder"),
    ("data.resolution=30", r"data.resolution must be a positive integer multiple of 4, got 30"),
    ("data.small_images=crop", r"data.small_images='crop' is not allowed; choose one of: skip, upsample"),
])
def test_a_bad_data_option_is_named(tmp_path, override, message):
    folder = real_data.imagefolder(tmp_path / "folder", n=1)
    with pytest.raises(ConfigError, match=message):
        build("data", compose_config(["data=imagefolder", f"data.path={folder}", override]).data)


# --- one geometry for images, boxes and maps ---------------------------------------------------------


@pytest.mark.parametrize("width, height", [(80, 40), (40, 80), (40, 40)])
def test_boxes_follow_the_resize_and_centre_crop(tmp_path, width, height):
    side = 40  # the crop: the centred 40 x 40 square, at R = 16 a scale of 1 / 2.5
    left, top = (width - side) // 2, (height - side) // 2
    boxes, expected = [(left + 10, top + 6, 20, 24)], [[10 / side, 6 / side, 30 / side, 30 / side]]
    if left:  # half cut away by the crop's left edge, and one entirely in the cropped-away part
        boxes += [(left - 10, top + 4, 14, 8), (0, 0, 4, 4)]
        expected.append([0.0, 4 / side, 4 / side, 12 / side])
    if top:  # the same at the top edge
        boxes += [(left + 4, top - 10, 8, 14), (0, 0, 4, 4)]
        expected.append([4 / side, 0.0, 12 / side, 4 / side])
    Image.fromarray(real_data.scene(width, height, boxes[0], real_data.RED)).save(tmp_path / "a.png")
    objects = {"bbox": [list(b) for b in boxes], "categories": [0] * len(boxes)}
    real_data.write_metadata(tmp_path, [{"file_name": "a.png", "objects": objects}])
    batch = ImageFolder(str(tmp_path), resolution=16, class_names=["thing"]).batch([0])
    assert torch.allclose(batch["boxes"][0], torch.tensor(expected), atol=1e-6)
    assert batch["box_labels"][0].tolist() == [0] * len(expected)
    # The picture moved with its box: red at the box's centre pixel, gray far from it.
    pixels = ((batch["image"][0] + 1) * 127.5).round()
    assert torch.equal(pixels[:, 7, 8], torch.tensor([255.0, 0.0, 0.0]))  # centre (0.5, 0.45) of the box
    assert torch.equal(pixels[:, 15, 15], torch.tensor([128.0, 128.0, 128.0]))


def test_segmentation_maps_are_sampled_with_the_image(tmp_path):
    width, height = 64, 32  # crop: x in [16, 48), scale 1/2 at R=16
    seg = np.zeros((height, width), dtype=np.uint8)
    seg[4:12, 20:28] = 1
    seg[20:32, 40:64] = 2  # partly cropped away
    seg[0:32, 0:16] = 2  # entirely cropped away
    Image.fromarray(real_data.scene(width, height, (0, 0, 1, 1))).save(tmp_path / "a.png")
    Image.fromarray(seg).save(tmp_path / "a.seg.png")
    real_data.write_metadata(tmp_path, [{"file_name": "a.png", "segmentation": "a.seg.png"}])
    data = ImageFolder(str(tmp_path), resolution=16, class_names=["a", "b"])
    expected = np.zeros((16, 16), dtype=np.int64)
    expected[2:6, 2:6] = 1
    expected[10:16, 12:16] = 2
    assert np.array_equal(data.batch([0])["segmentation"][0].numpy(), expected)


def test_centre_crop_samples_label_maps_at_pixel_centres():
    crop = CenterCrop.fit(6, 4, 4)  # the square x in [1, 5), one to one
    xs, ys = crop.pixel_centres()
    assert xs.tolist() == [1.5, 2.5, 3.5, 4.5] and ys.tolist() == [0.5, 1.5, 2.5, 3.5]
    grid = np.arange(24).reshape(4, 6)
    assert np.array_equal(crop.sample(grid), grid[:, 1:5])
    assert crop.box(0, 0, 2, 2) == (0.0, 0.0, 0.25, 0.5) and crop.box(0, 0, 1, 2) is None


# --- COCO: RLE and polygons -------------------------------------------------------------------


def rle_string(counts: list[int]) -> str:
    """The COCO API's compressed RLE writer (maskApi.c rleToString), as its comment describes:
    5-bit groups, least significant first, +48, 0x20 = more, deltas to the count two before."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = x & 0x1F
            x >>= 5
            more = x != -1 if group & 0x10 else x != 0
            out.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(out)


def test_rle_decodes_the_coco_api_examples():
    # pycocotools/mask.py: M = [0 0 1 1 1 0 1] has counts [2 3 1 1]; compressed by hand: "231N"
    # (the fourth count is stored as 1 - 3 = -2: group 30 = 'N', its sign bit set).
    assert rle_counts_from_string("231N") == [2, 3, 1, 1]
    assert rle_decode("231N", 7, 1).ravel().tolist() == [0, 0, 1, 1, 1, 0, 1]
    assert rle_counts_from_string("T3") == [100]  # 100 = 4 + 3 * 32: two groups, the first with 0x20
    # Column-major: [[1, 0, 0], [1, 1, 0]] runs down the columns: 1 1 | 0 1 | 0 0 -> counts [0, 2, 1, 1, 2].
    assert rle_decode([0, 2, 1, 1, 2], 2, 3).astype(int).tolist() == [[1, 0, 0], [1, 1, 0]]


def test_rle_round_trips_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.random()
        flat = mask.T.ravel().astype(int)  # column-major
        change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))  # runs start with zeros
        counts = np.diff(np.concatenate([[0], change])).tolist()
        assert np.array_equal(rle_decode(counts, h, w), mask)
        assert np.array_equal(rle_decode(rle_string(counts), h, w), mask)


def test_polygons_cover_the_pixels_whose_centres_they_contain():
    xs = ys = np.arange(6) + 0.5
    square = polygon_region(np.array([[1, 1], [3, 1], [3, 3], [1, 3]], dtype=float), xs, ys)
    expected = np.zeros((6, 6), dtype=bool)
    expected[1:3, 1:3] = True
    assert np.array_equal(square, expected)
    # A right triangle (0,0)-(6,0)-(0,6): centres with x + y < 6, i.e. column + row <= 4.
    triangle = polygon_region(np.array([[0, 0], [6, 0], [0, 6]], dtype=float), xs, ys)
    assert np.array_equal(triangle, np.add.outer(np.arange(6), np.arange(6)) <= 4)


def test_coco_source_reads_captions_boxes_and_paints_maps(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2], "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]], "iscrowd": 0},
        # a crowd region of the lower-right 4x4 (compressed RLE): painted, but not a box
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [4, 4, 4, 4], "iscrowd": 1,
         "segmentation": {"counts": rle_string([36, 4, 4, 4, 4, 4, 4, 4]), "size": [8, 8]}},
        # a large uncompressed-RLE object under the small square: painted first
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 0,
         "segmentation": {"counts": [0, 4, 4, 4, 4, 4, 4, 4, 36], "size": [8, 8]}},
    ]
    captions = [{"id": 9, "image_id": 1, "caption": "the second caption"}, {"id": 4, "image_id": 1, "caption": "the first caption"}]
    folder, caption_file, instances = real_data.coco(
        tmp_path, [{"id": 1, "file_name": "a.png", "width": 8, "height": 8, "array": image}], annotations, captions)
    data = Coco(str(folder), str(caption_file), str(instances), resolution=8)
    assert data.class_names == ("cat", "dog")  # sorted by category id: 3, 7
    batch = data.batch([0])
    assert batch["caption"] == ["the first caption"]
    assert torch.allclose(batch["boxes"][0], torch.tensor([[1 / 8, 1 / 8, 3 / 8, 3 / 8], [0, 0, 0.5, 0.5]]))
    assert batch["box_labels"][0].tolist() == [1, 0]
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[:4, :4] = 1  # cat (uncompressed RLE), the largest, painted first
    expected[1:3, 1:3] = 2  # dog (polygon) on top
    expected[4:, 4:] = 1  # cat crowd region (compressed RLE)
    assert np.array_equal(batch["segmentation"][0].numpy(), expected)
    assert_shapes_world_keys({**batch, "class_label": torch.zeros(1, dtype=torch.int64)}, 1, 8, 2)


# --- webdataset shards ------------------------------------------------------------------------


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{0..1}/{8..9}") == ["0/8", "0/9", "1/8", "1/9"]


def test_shards_split_disjoint_and_complete_over_two_ranks_and_two_workers(tmp_path):
    real_data.shards(tmp_path, n_shards=5, per_shard=3)
    seen = []
    for rank in range(2):
        stream = TarShards(f"{tmp_path}/shard-{{000..004}}.tar", resolution=32, class_names=["thing"], rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate)
        seen.append([caption for batch in loader for caption in batch["caption"]])
    everything = [f"sample {k}" for k in range(15)]
    assert sorted(seen[0] + seen[1], key=everything.index) == everything  # every sample exactly once
    assert set(seen[0]).isdisjoint(seen[1]) and seen[0] and seen[1]
    shard_names = [f"s{i}" for i in range(5)]
    parts = [split_shards(shard_names, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert parts == [["s0", "s4"], ["s2"], ["s1"], ["s3"]]


def test_streamed_samples_have_the_keys_and_a_stable_mask(tmp_path):
    real_data.shards(tmp_path, n_shards=1, per_shard=4, size=40)
    stream = TarShards(str(tmp_path), resolution=32, class_names=["thing"], rank=0, world_size=1)
    first, second = list(stream), list(stream)
    batch = collate(first)
    assert_shapes_world_keys({**batch, "segmentation": torch.zeros(4, 32, 32, dtype=torch.int64),
                              "class_label": torch.zeros(4, dtype=torch.int64)}, 4, 32, 1)
    assert torch.allclose(batch["boxes"][0], torch.tensor([[2 / 40, 2 / 40, 12 / 40, 12 / 40]]))  # a square: no crop
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(first, second))  # a sample's mask is a function of its key
    info = data_info(stream)
    assert info.provides == stream.provides
    assert info.values("caption", 2) == ["sample 0", "sample 1"]  # a stream lists its first items (a tokenizer's captions)


def test_training_pool_is_the_same_in_every_process(tmp_path, monkeypatch):
    real_data.shards(tmp_path, n_shards=3, per_shard=4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    pools = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        pools.append(WebDataset(str(tmp_path), resolution=32, class_names=["thing"], size=10))
    assert [len(p) for p in pools] == [10, 10] and pools[0].values("caption") == pools[1].values("caption")
    assert pools[0].values("caption")[-1] == "sample 9" and torch.equal(pools[0].batch([9])["image"], pools[1].batch([9])["image"])


def test_webdataset_reads_cls_members_and_label_maps(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        seg = real_data.label_map(8, 8, (0, 0, 4, 8), 2)
        real_data.tar_member(tar, "x/0.jpg", _jpeg(np.zeros((8, 8, 3), dtype=np.uint8)))
        real_data.tar_member(tar, "x/0.cls", b"1")
        real_data.tar_member(tar, "x/0.seg.png", real_data.png_bytes(seg))
    data = WebDataset(str(tmp_path / "a.tar"), resolution=8, class_names=["a", "b"])
    batch = data.batch([0])
    assert batch["class_label"].tolist() == [1] and np.array_equal(batch["segmentation"][0].numpy(), seg.astype(np.int64))


def _jpeg(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


# --- a tiny training run on an image folder ----------------------------------------------------


def test_tiny_training_run_on_an_image_folder_counts_its_skips(tmp_path, one_thread):
    folder = real_data.imagefolder(tmp_path / "folder", n=16, segmentation=False)
    (folder / "005.png").write_bytes(b"not an image")  # found while reading: skipped, counted
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[9] = json.dumps({**json.loads(lines[9]), "text": ""})  # found at start-up: skipped, counted
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cfg = compose_config(["+experiment=tiny", "~data.size", "data=imagefolder", f"data.path={folder}", "data.resolution=32",
                          "data.max_skip_fraction=0.2", "+condition=[class,layout]", f"cache_dir={tmp_path / 'cache'}",
                          "sampler.steps=1"])
    run = tmp_path / "run"
    metrics = train(cfg, run)
    assert (run / "samples.png").is_file() and metrics["conditions"] == ["class", "layout"]
    assert metrics["data_skips"]["skipped"] == 2
    assert metrics["data_skips"]["by_reason"] == {"bad_caption": 1, "corrupt_image": 1}
    assert "005.png (field image)" in metrics["data_skips"]["examples"]["corrupt_image"][0]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["data_skipped"] == 2 and log[-1]["step"] == 4
