"""The semantic_map condition: the one-hot map rescaled to the latent by strided convs and
concatenated, its null and dropout, user maps (index PNG or run-length) with errors naming the
file, mIoU read back from images, and a model trained at 32 px sampling 64 px images from 64 px maps
(from a conditions file, and in bench/convolutional_sampling.py, which scores it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_config, load_bench
from ldmcore.conditioning import Conditioner
from ldmcore.config import ConfigError
from ldmcore.data.base import DataInfo, data_info
from ldmcore.data.shapes import ShapesWorld
from ldmcore.pluginmanager import installed
from ldmcore.tasks import sample, train
from ldmcore_plugins.semantic_map.maps import write_png

LATENT = (4, 8, 8)  # f = 4 at 32 px
NO_ROOT = Path("/nonexistent-conditions-folder")  # for values with absolute paths (or none)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="multi", size=64, seed=5)


@pytest.fixture(scope="module")
def info(world):
    return data_info(world)


@pytest.fixture(scope="module")
def semantic_map():
    return installed().get("semantic_map")


def options(**changes):
    path = Path(installed().get("semantic_map").call("ldmcore_config_dir")) / "condition" / "semantic_map.yaml"
    opts = OmegaConf.load(path)
    opts.merge_with(changes)
    return opts


def encoder_of(semantic_map, info, latent_shape=LATENT, **changes):
    return semantic_map.call("ldmcore_build_encoder", options=options(**changes), data=info, latent_shape=latent_shape,
                             first_stage=None, cache_dir=NO_ROOT)


def parse(semantic_map, info, value, root=NO_ROOT):
    return semantic_map.call("ldmcore_parse_value", value=value, options=options(), data=info, root=root)


# --- tau_theta, routing, null, dropout ----------------------------------------------------------


@pytest.mark.parametrize("latent_shape", [(4, 8, 8), (2, 16, 16), (3, 32, 32)])  # f = 4, 2, 1
def test_rescaler_brings_the_map_to_the_latent_size(semantic_map, world, info, latent_shape):
    encoder = encoder_of(semantic_map, info, latent_shape)
    assert encoder.outputs == {"concat": (8,)}
    out = encoder(world.batch([0, 1, 2]))["concat"]
    assert out.shape == (3, 8, *latent_shape[1:])


def test_one_hot_width_comes_from_the_data_class_names(semantic_map):
    five = DataInfo(name="five", resolution=32, provides=("segmentation",), class_names=tuple("abcde"))
    encoder = encoder_of(semantic_map, five)
    assert encoder.rescaler[0].in_channels == 6  # background + 5 classes, nothing hard-coded
    with pytest.raises(ValueError, match="outside 0..5"):
        encoder({"segmentation": torch.full((1, 32, 32), 6)})
    with pytest.raises(ValueError, match="class names"):
        encoder_of(semantic_map, DataInfo(name="bare", resolution=32, provides=("segmentation",)))


def test_the_encoder_is_convolutional_twice_the_map_twice_the_latent(semantic_map, info):
    encoder = encoder_of(semantic_map, info)
    big = ShapesWorld(resolution=64, kind="multi", size=4, seed=1).batch([0, 1])
    assert encoder(big)["concat"].shape == (2, 8, 16, 16)
    # a map with one object: far from it the encoding is the background's
    ids = torch.zeros(1, 64, 64, dtype=torch.int64)
    empty = encoder({"segmentation": ids})["concat"]
    ids[0, :16, :16] = 5
    one = encoder({"segmentation": ids})["concat"]
    changed = (one - empty).abs().amax(dim=1)[0] > 0  # (16, 16) latent positions
    assert changed[:4, :4].all() and not changed[8:, 8:].any()


def test_conditioner_routes_it_to_concat_channels(semantic_map, world, info):
    conditioner = Conditioner({"semantic_map": encoder_of(semantic_map, info)}, {"semantic_map": 0.0})
    assert (conditioner.concat_channels, conditioner.context_dim, conditioner.vector_dim) == (8, None, None)
    routed = conditioner(world.batch([0, 1]), 2, LATENT[1:])
    assert set(routed) == {"concat"} and routed["concat"].shape == (2, 8, 8, 8)


def test_null_conditions_zeros_and_learned(semantic_map, world, info):
    zeros = encoder_of(semantic_map, info)
    assert not zeros.null(3, (8, 8), torch.device("cpu"))["concat"].any()
    learned = encoder_of(semantic_map, info, null_condition="learned")
    with torch.no_grad():
        learned.learned_null.copy_(torch.arange(8.0))
    null = learned.null(3, (8, 8), torch.device("cpu"))["concat"]
    assert null.shape == (3, 8, 8, 8) and torch.equal(null[2, :, 5, 1], torch.arange(8.0))
    assert learned.learned_null in set(learned.parameters())
    with pytest.raises(ValueError, match="null_condition"):
        encoder_of(semantic_map, info, null_condition="noise")


def test_dropout_replaces_whole_samples_by_the_null(semantic_map, world, info):
    batch = world.batch(list(range(32)))
    encoder = encoder_of(semantic_map, info)
    with torch.no_grad():
        encoded = encoder(batch)["concat"]
        for p, expect in ((0.0, "all kept"), (1.0, "all null"), (0.5, "some of each")):
            conditioner = Conditioner({"semantic_map": encoder}, {"semantic_map": p}).train()
            out = conditioner(batch, 32, (8, 8), generator=torch.Generator().manual_seed(0))["concat"]
            null = out.flatten(1).eq(0).all(1)  # (B,) samples replaced by the zero null
            kept = (out == encoded).flatten(1).all(1)
            assert (null | kept).all()
            assert {"all kept": kept.all(), "all null": null.all(), "some of each": null.any() and kept.any()}[expect]
        conditioner.eval()  # no dropout at sampling
        assert torch.equal(conditioner(batch, 32, (8, 8))["concat"], encoded)


# --- user values ------------------------------------------------------------------------------


def test_format_and_parse_round_trip_through_json(semantic_map, world, info):
    batch = world.batch(list(range(8)))
    for i in range(8):
        value = semantic_map.call("ldmcore_format_value", batch=batch, index=i, options=options(), data=info, cache_dir=NO_ROOT)
        assert value["size"] == [32, 32] and len(value["runs"]) < 200  # compact: runs, not 1024 ids
        parsed = parse(semantic_map, info, json.loads(json.dumps(value)))
        assert torch.equal(parsed["segmentation"], batch["segmentation"][i])


@pytest.mark.parametrize("mode", ["L", "P"])
def test_index_png_reads_back(semantic_map, world, info, tmp_path, mode):
    segmentation = world.batch([3])["segmentation"][0]
    path = write_png(segmentation, tmp_path / "map.png")
    if mode == "P":
        Image.open(path).convert("P").save(path)
    assert Image.open(path).mode == mode
    assert torch.equal(parse(semantic_map, info, str(path))["segmentation"], segmentation)


def test_a_relative_map_path_starts_at_the_conditions_folder(semantic_map, world, info, tmp_path, monkeypatch):
    segmentation = world.batch([4])["segmentation"][0]
    (tmp_path / "maps").mkdir()
    path = write_png(segmentation, tmp_path / "maps" / "0001.png")
    monkeypatch.chdir(tmp_path / "maps")  # the working directory plays no part
    assert torch.equal(parse(semantic_map, info, "maps/0001.png", root=tmp_path)["segmentation"], segmentation)
    assert torch.equal(parse(semantic_map, info, str(path), root=tmp_path / "maps")["segmentation"], segmentation)  # absolute
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / '0001.png'} does not exist")):
        parse(semantic_map, info, "0001.png", root=tmp_path)


def _png(path: Path, array: np.ndarray, mode: str) -> str:
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def test_bad_map_files_are_named_with_what_is_wrong(semantic_map, info, tmp_path):
    cases = [
        (str(tmp_path / "missing.png"), ["missing.png", "does not exist"]),
        (_png(tmp_path / "rgb.png", np.zeros((32, 32, 3), np.uint8), "RGB"), ["rgb.png", "mode RGB", "mode L or P"]),
        (_png(tmp_path / "small.png", np.zeros((16, 16), np.uint8), "L"), ["small.png", "16x16", "32x32"]),
        (_png(tmp_path / "ids.png", np.full((32, 32), 40, np.uint8), "L"), ["ids.png", "[40]", "0..18"]),
    ]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    cases.append((str(garbage), ["garbage.png", "cannot read"]))
    for value, fragments in cases:
        with pytest.raises(ValueError) as error:
            parse(semantic_map, info, value)
        for fragment in fragments:
            assert fragment in str(error.value), (fragment, str(error.value))


@pytest.mark.parametrize(
    "value,fragment",
    [
        ({"size": [32, 32], "runs": [[0, 1000]]}, "cover 1000 pixels"),
        ({"size": [32, 32], "runs": [[0, 1020], [19, 4]]}, "[19]"),
        ({"size": [32, 32], "runs": [[0, 1024], [1, 0]]}, "run 2 has a count below 1"),
        ({"size": [32, 32], "runs": [[0, "1024"]]}, "run 1 count"),
        ({"size": [16, 16], "runs": [[0, 256]]}, "16x16"),
        ({"size": [32, 32], "runs": [[0, 1024]], "mode": "L"}, "unknown ['mode']"),
        ({"runs": [[0, 1024]]}, "missing ['size']"),
        (3, "index PNG"),
    ],
)
def test_bad_run_length_maps_say_what_is_wrong(semantic_map, info, value, fragment):
    with pytest.raises(ValueError) as error:
        parse(semantic_map, info, value)
    assert fragment in str(error.value)


# --- drawing and score ----------------------------------------------------------------------------


def test_maps_are_drawn_one_colour_per_class(semantic_map, world, info):
    batch = world.batch(list(range(8)))
    picture = semantic_map.call("ldmcore_draw_condition", batch=batch, options=options(), data=info)
    assert picture.shape == (8, 3, 32, 32) and picture.min() >= -1 and picture.max() <= 1
    ids = batch["segmentation"]
    colours = {}
    for k in ids.unique().tolist():
        pixels = picture.permute(0, 2, 3, 1)[ids == k]  # (n, 3)
        assert (pixels == pixels[0]).all()  # one colour per class id
        colours[k] = tuple(pixels[0].tolist())
    assert colours[0] == (-1.0, -1.0, -1.0) and len(set(colours.values())) == len(colours)




def test_score_is_perfect_on_true_images_and_low_on_wrong_ones(semantic_map, world, info):
    batch = world.batch(list(range(16)))
    score = lambda images: semantic_map.call("ldmcore_score", images=images, batch=batch, options=options(), data=info)
    assert score(batch["image"]) == {"pixel_accuracy": 1.0, "miou": 1.0}
    noise = score(torch.rand(batch["image"].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["miou"] < 0.2 and noise["pixel_accuracy"] < 0.3
    # a plain background gets most pixels right but no object: why mIoU is the measure
    background = score(torch.full_like(batch["image"], 200 / 127.5 - 1))
    assert background["pixel_accuracy"] > 0.6 and background["miou"] < 0.25
    # another scene's images: objects where the map has none
    shifted = score(world.batch(list(range(16, 32)))["image"])
    assert shifted["miou"] < 0.5


def test_score_without_a_reader_is_empty(semantic_map, world):
    bare = DataInfo(name="bare", resolution=32, provides=("segmentation",), class_names=("a",))
    batch = world.batch([0])
    assert semantic_map.call("ldmcore_score", images=batch["image"], batch=batch, options=options(), data=bare) == {}


# --- end to end: train at 32 px, sample at 32 and 64 px ---------------------------------------


@pytest.fixture(scope="module")
def map_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("semantic_map_run")
    cfg = compose_config(["+experiment=tiny", "+condition=semantic_map", f"cache_dir={root / 'cache'}"])
    assert cfg.data.kind == "multi" and cfg.data.resolution == 32  # the plugin's config picks multi-object scenes
    return root, train(cfg, root / "run")


def test_training_reports_the_map_scores(map_run):
    root, metrics = map_run
    assert metrics["conditions"] == ["semantic_map"]
    assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["pixel_accuracy"] <= 1.0
    assert (root / "run" / "samples.png").is_file()


def _sample(root: Path, out: Path, lines: list[dict], *overrides: str) -> list[dict]:
    conditions = out / "conditions.jsonl"
    out.mkdir()
    conditions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = compose_config([f"checkpoint={root / 'run'}", f"conditions={conditions}", "+experiment=tiny", *overrides])
    assert sample(cfg, out) == {"images": len(lines)}
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_a_32_px_model_samples_64_px_images_from_64_px_maps(map_run, tmp_path):
    root, _ = map_run
    big = ShapesWorld(resolution=64, kind="multi", size=4, seed=2).batch([0, 1])["segmentation"]
    small = ShapesWorld(resolution=32, kind="multi", size=4, seed=2).batch([0])["segmentation"][0]
    lines = [{"semantic_map": str(write_png(big[0], tmp_path / "big0.png"))},
             {"semantic_map": str(write_png(big[1], tmp_path / "big1.png"))}]
    manifest = _sample(root, tmp_path / "x2", lines, "sample_scale=2")
    assert [{k: v for k, v in m.items() if k != "file"} for m in manifest] == lines
    for m in manifest:
        assert Image.open(tmp_path / "x2" / m["file"]).size == (64, 64)
    # at the training size a 32 px map (run-length form) gives a 32 px image
    run_length = installed().get("semantic_map").call("ldmcore_format_value", batch={"segmentation": [small]}, index=0,
                                                      options=options(), data=None, cache_dir=NO_ROOT)
    manifest = _sample(root, tmp_path / "x1", [{"semantic_map": run_length}])
    assert Image.open(tmp_path / "x1" / manifest[0]["file"]).size == (32, 32)


def test_a_conditions_file_names_maps_relative_to_its_own_folder(map_run, tmp_path, monkeypatch):
    root, _ = map_run
    job = tmp_path / "job"
    (job / "maps").mkdir(parents=True)
    maps = ShapesWorld(resolution=32, kind="multi", size=4, seed=3).batch([0, 1])["segmentation"]
    write_png(maps[0], job / "maps" / "a.png")
    write_png(maps[1], job / "maps" / "b.png")
    (job / "conditions.jsonl").write_text('{"semantic_map": "maps/a.png"}\n{"semantic_map": "maps/b.png"}\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = tmp_path / "out"
    out.mkdir()
    cfg = compose_config([f"checkpoint={root / 'run'}", "conditions=../job/conditions.jsonl", "+experiment=tiny"])
    assert sample(cfg, out) == {"images": 2}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["semantic_map"] for m in manifest] == ["maps/a.png", "maps/b.png"]  # as the user wrote them


def test_a_map_of_the_wrong_size_for_the_scale_is_refused(map_run, tmp_path):
    root, _ = map_run
    small = ShapesWorld(resolution=32, kind="multi", size=4, seed=2).batch([0])["segmentation"][0]
    path = write_png(small, tmp_path / "small.png")
    with pytest.raises(ConfigError) as error:
        _sample(root, tmp_path / "out", [{"semantic_map": str(path)}], "sample_scale=2")
    assert "small.png" in str(error.value) and "64x64" in str(error.value) and ":1" in str(error.value)
    with pytest.raises(ConfigError, match="sample_scale"):
        _sample(root, tmp_path / "zero", [{"semantic_map": str(path)}], "sample_scale=0")


def test_tiling_puts_each_scene_in_its_own_quadrant():
    tile = load_bench("convolutional_sampling").tile
    maps = torch.arange(8).view(8, 1, 1).expand(8, 2, 2)  # scene k: a 2x2 map of k
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 2, 2)
    tiled = tile({"segmentation": maps, "image": images, "caption": ["a"] * 8}, 2)
    assert set(tiled) == {"segmentation", "image"}  # nothing spatial to stitch in a caption
    assert tiled["segmentation"].shape == (2, 4, 4) and tiled["image"].shape == (2, 3, 4, 4)
    assert tiled["segmentation"][1, ::2, ::2].tolist() == [[4, 5], [6, 7]]  # row by row
    assert tiled["image"][0, 2, ::2, ::2].tolist() == [[0.0, 1.0], [2.0, 3.0]]


def test_convolutional_sampling_bench_scores_every_size(map_run, tmp_path, monkeypatch):
    root, _ = map_run
    bench = load_bench("convolutional_sampling")
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr("sys.argv", ["convolutional_sampling.py", str(root / "run"), "--samples", "2", "--out", str(out),
                                     "--images", str(tmp_path), "sampler.steps=2", f"cache_dir={root / 'cache'}"])
    bench.main()
    result = json.loads(out.read_text())
    assert result["scale"] == 2 and result["resolution"] == 32
    for kind, size in (("training_size", 32), ("tiled", 64), ("scaled", 64)):
        assert result[kind]["size"] == size and 0.0 <= result[kind]["miou"] <= 1.0
        grid = Image.open(tmp_path / f"semantic_map_x{1 if kind == 'training_size' else 2}_{kind}.png")
        assert grid.size[1] > size  # the maps and the samples, at 2x
