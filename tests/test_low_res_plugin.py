"""The low_res condition: the low-res image at latent size (concat) with noise augmentation whose
level is a vector condition, null and dropout, user images (PNG or inline) with errors naming the
file, PSNR against the original and against bicubic upsampling, and 4x super-resolution models
trained at 32 px (from 8 px) and 64 px (from 16 px)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_config
from ldmcore.conditioning import Conditioner
from ldmcore.data.base import data_info
from ldmcore.data.shapes import ShapesWorld
from ldmcore.pluginmanager import installed
from ldmcore.tasks import sample, train

NO_ROOT = Path("/nonexistent-conditions-folder")  # for values with absolute paths (or none)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="multi", size=64, seed=11)


@pytest.fixture(scope="module")
def info(world):
    return data_info(world)


@pytest.fixture(scope="module")
def low_res():
    return installed().get("low_res")


def options(**changes):
    path = Path(installed().get("low_res").call("ldmcore_config_dir")) / "condition" / "low_res.yaml"
    opts = OmegaConf.load(path)
    opts.merge_with(changes)
    return opts


def encoder_of(low_res, info, latent_shape=(4, 8, 8), **changes):
    return low_res.call("ldmcore_build_encoder", options=options(**changes), data=info, latent_shape=latent_shape,
                        first_stage=None, cache_dir=None)


def parse(low_res, info, value, root=NO_ROOT):
    return low_res.call("ldmcore_parse_value", value=value, options=options(), data=info, root=root)


# --- tau_theta: concat at latent size, noise level as a vector -----------------------------------


@pytest.mark.parametrize("resolution,latent_side", [(32, 8), (32, 16), (64, 16), (64, 32)])  # f = 4 or 2
def test_low_res_reaches_the_latent_size_and_the_level_a_vector(low_res, resolution, latent_side):
    world = ShapesWorld(resolution=resolution, kind="multi", size=4, seed=0)
    encoder = encoder_of(low_res, data_info(world), (4, latent_side, latent_side))
    assert encoder.outputs == {"concat": (8,), "vector": (64,)}
    batch = world.batch([0, 1, 2])
    assert batch["low_res"].shape[-1] == resolution // 4
    out = encoder(batch)
    assert out["concat"].shape == (3, 8, latent_side, latent_side) and out["vector"].shape == (3, 64)


def test_twice_the_low_res_input_gives_twice_the_latent(low_res, info):
    encoder = encoder_of(low_res, info)  # built for 32 px images: 8 px in, 8x8 latent
    big = ShapesWorld(resolution=64, kind="multi", size=4, seed=0).batch([0])
    assert encoder(big)["concat"].shape == (1, 8, 16, 16)


def test_conditioner_routes_one_encoder_to_concat_and_vector(low_res, world, info):
    conditioner = Conditioner({"low_res": encoder_of(low_res, info)}, {"low_res": 0.0})
    assert (conditioner.concat_channels, conditioner.context_dim, conditioner.vector_dim) == (8, None, 64)
    routed = conditioner(world.batch([0, 1]), 2, (8, 8))
    assert set(routed) == {"concat", "vector"}


def test_noise_augmentation_random_in_training_fixed_at_sampling(low_res, world, info):
    batch = world.batch(list(range(64)))
    encoder = encoder_of(low_res, info, max_noise_level=0.3, sample_noise_level=0.05)
    low = batch["low_res"]
    noisy, level = encoder.augment(low)  # training mode: a random level per sample
    assert level.shape == (64,) and 0 <= level.min() and level.max() <= 0.3 and level.std() > 0.05
    residual_std = (noisy - low).flatten(1).std(1)  # (B,) follows each sample's level
    assert torch.corrcoef(torch.stack([residual_std, level]))[0, 1] > 0.95
    first, second = encoder(batch), encoder(batch)
    assert not torch.equal(first["concat"], second["concat"]) and not torch.equal(first["vector"], second["vector"])
    encoder.eval()  # sampling: the fixed level, the same noise every time
    noisy, level = encoder.augment(low)
    assert torch.all(level == 0.05)
    torch.testing.assert_close((noisy - low).std(), torch.tensor(0.05), atol=0.005, rtol=0)
    first, second = encoder(batch), encoder(batch)
    assert torch.equal(first["concat"], second["concat"]) and torch.equal(first["vector"], second["vector"])
    # the vector tells levels apart
    clean = encoder_of(low_res, info, max_noise_level=0.3, sample_noise_level=0.0)
    clean.load_state_dict(encoder.state_dict())
    clean.eval()
    assert not torch.allclose(clean(batch)["vector"], first["vector"])


def test_without_noise_training_and_sampling_encode_alike(low_res, world, info):
    encoder = encoder_of(low_res, info, max_noise_level=0.0, sample_noise_level=0.0)
    batch = world.batch([0, 1, 2])
    trained = encoder(batch)
    encoder.eval()
    torch.testing.assert_close(encoder(batch), trained)


def test_bad_options_name_the_option(low_res, info):
    with pytest.raises(ValueError, match="sample_noise_level <= max_noise_level"):
        encoder_of(low_res, info, max_noise_level=0.1, sample_noise_level=0.2)
    with pytest.raises(ValueError, match="condition.low_res.upsample"):
        encoder_of(low_res, info, upsample="lanczos")
    with pytest.raises(ValueError, match="condition.low_res.factor=5"):
        encoder_of(low_res, info, factor=5)


def test_null_and_dropout(low_res, world, info):
    encoder = encoder_of(low_res, info, max_noise_level=0.0, sample_noise_level=0.0)  # deterministic
    null = encoder.null(4, (8, 8), torch.device("cpu"))
    assert null["concat"].shape == (4, 8, 8, 8) and null["vector"].shape == (4, 64)
    assert not null["concat"].any() and not null["vector"].any()
    batch = world.batch(list(range(32)))
    with torch.no_grad():
        encoded = encoder(batch)
        conditioner = Conditioner({"low_res": encoder}, {"low_res": 0.5}).train()
        out = conditioner(batch, 32, (8, 8), generator=torch.Generator().manual_seed(1))
    dropped = out["vector"].eq(0).all(1)  # (B,)
    assert dropped.any() and not dropped.all()
    # both outputs of a sample are dropped together
    assert torch.equal(out["concat"].flatten(1).eq(0).all(1), dropped)
    assert torch.equal(out["concat"][~dropped], encoded["concat"][~dropped])


# --- user values ------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64])
def test_format_and_parse_round_trip_exactly(low_res, resolution):
    world = ShapesWorld(resolution=resolution, kind="multi", size=8, seed=4)
    info, batch = data_info(world), world.batch(list(range(4)))
    for i in range(4):
        value = low_res.call("ldmcore_format_value", batch=batch, index=i, options=options(), data=info, cache_dir=None)
        parsed = parse(low_res, info, json.loads(json.dumps(value)))
        assert torch.equal(parsed["low_res"], batch["low_res"][i])


def test_png_reads_as_pixels_in_unit_range(low_res, info, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "low.png")
    parsed = parse(low_res, info, str(tmp_path / "low.png"))["low_res"]
    assert parsed.shape == (3, 8, 8)
    torch.testing.assert_close(parsed, torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)


def test_a_relative_png_path_starts_at_the_conditions_folder(low_res, info, tmp_path, monkeypatch):
    (tmp_path / "inputs").mkdir()
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "inputs" / "low.png")
    monkeypatch.chdir(tmp_path / "inputs")  # the working directory plays no part
    assert parse(low_res, info, "inputs/low.png", root=tmp_path)["low_res"].eq(1.0).all()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'low.png'} does not exist")):
        parse(low_res, info, "low.png", root=tmp_path)


def test_bad_low_res_values_say_what_is_wrong(low_res, info, tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "deep.png")  # 16-bit grayscale
    (tmp_path / "garbage.png").write_bytes(b"no image here")
    cases = [
        (str(tmp_path / "missing.png"), ["missing.png", "does not exist"]),
        (str(tmp_path / "big.png"), ["big.png", "16x16", "8x8"]),
        (str(tmp_path / "deep.png"), ["deep.png", "mode I"]),
        (str(tmp_path / "garbage.png"), ["garbage.png", "cannot read"]),
        (np.zeros((3, 4, 4)).tolist(), ["3 x 8 x 8", "(3, 4, 4)"]),
        ((np.ones((3, 8, 8)) * 2).tolist(), ["outside [-1, 1]"]),
        ([[["a"] * 8] * 8] * 3, ["nested list"]),
        ({"image": "low.png"}, ["path to an RGB PNG"]),
    ]
    for value, fragments in cases:
        with pytest.raises(ValueError) as error:
            parse(low_res, info, value)
        for fragment in fragments:
            assert fragment in str(error.value), (fragment, str(error.value))


# --- drawing and score ------------------------------------------------------------------------


def test_low_res_is_drawn_at_the_image_size(low_res, world, info):
    batch = world.batch([0, 1])
    picture = low_res.call("ldmcore_draw_condition", batch=batch, options=options(), data=info)
    assert picture.shape == (2, 3, 32, 32)
    assert torch.equal(picture[:, :, ::4, ::4], batch["low_res"])


def test_psnr_of_the_original_is_high_and_of_wrong_images_low(low_res, world, info):
    batch = world.batch(list(range(16)))
    score = lambda images: low_res.call("ldmcore_score", images=images, batch=batch, options=options(), data=info)
    truth = score(batch["image"])
    assert truth["psnr_db"] == 100.0 and truth["beats_bicubic"] == 1.0
    assert 15 < truth["psnr_bicubic_db"] < 35  # block means upsampled: blurred edges
    assert truth["psnr_gain_db"] == pytest.approx(100.0 - truth["psnr_bicubic_db"])
    bicubic = F.interpolate(batch["low_res"], scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    same = score(bicubic)  # bicubic itself gains nothing
    assert same["psnr_gain_db"] == pytest.approx(0.0, abs=1e-9) and same["beats_bicubic"] == 0.0
    noise = score(torch.rand(batch["image"].shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["psnr_db"] < 10 and noise["psnr_gain_db"] < -10 and noise["beats_bicubic"] == 0.0
    assert low_res.call("ldmcore_score", images=batch["image"], batch={"low_res": batch["low_res"]},
                        options=options(), data=info) == {}  # no original: nothing to compare with


# --- end to end: 32 px from 8 px, 64 px from 16 px --------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64])
def test_super_resolution_trains_and_samples_from_a_png(low_res, resolution, tmp_path):
    root = tmp_path
    cfg = compose_config(["+experiment=tiny", "+condition=low_res", f"cache_dir={root / 'cache'}",
                          f"data.resolution={resolution}", "data.kind=multi"])
    metrics = train(cfg, root / "run")
    assert metrics["conditions"] == ["low_res"]
    assert np.isfinite([metrics["psnr_db"], metrics["psnr_bicubic_db"], metrics["psnr_gain_db"]]).all()
    assert 0.0 <= metrics["beats_bicubic"] <= 1.0
    side = resolution // 4
    low = ShapesWorld(resolution=resolution, kind="multi", size=4, seed=3).batch([0])["low_res"][0]
    Image.fromarray(((low + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(root / "low.png")
    lines = [{"low_res": "low.png"}, {"low_res": low.tolist()}]  # a path relative to the conditions file
    (root / "conditions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = root / "out"
    out.mkdir()
    cfg = compose_config([f"checkpoint={root / 'run'}", f"conditions={root / 'conditions.jsonl'}", "+experiment=tiny"])
    assert sample(cfg, out) == {"images": 2}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k != "file"} for m in manifest] == lines
    for m in manifest:
        assert Image.open(out / m["file"]).size == (resolution, resolution) == (4 * side, 4 * side)
