"""The masked_image (inpainting) condition: its concat channels from the run's first stage (held,
never owned), null and dropout, user values as PNG files, compositing, scores, and a tiny run."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from conftest import compose_config, load_bench
from ldmcore.autoencoder import KLAutoencoder
from ldmcore.conditioning import Conditioner
from ldmcore.config import validate
from ldmcore.data.base import data_info
from ldmcore.data.shapes import BACKGROUND, ShapesWorld
from ldmcore.pluginmanager import installed
from ldmcore.system import build, build_system
from ldmcore import tasks
from ldmcore.tasks import sample, train
from ldmcore.training.checkpoint import load_checkpoint
from ldmcore.training.ema import EMA
from ldmcore_plugins.masked_image.plugin import objects_in_mask

LATENT = (8, 8)  # 32 px at f = 4
NO_ROOT = Path("/nonexistent-conditions-folder")  # for values with absolute paths


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="multi", size=64, seed=7)


@pytest.fixture(scope="module")
def info(world):
    return data_info(world)


@pytest.fixture(scope="module")
def masked():
    return installed().get("masked_image")


@pytest.fixture(scope="module")
def batch(world):
    return world.batch(list(range(8)))


def options(**changes):
    path = Path(installed().get("masked_image").call("ldmcore_config_dir")) / "condition" / "masked_image.yaml"
    opts = OmegaConf.load(path)
    opts.merge_with(changes)
    return opts


def first_stage(seed: int = 0, scale_factor: float = 1.0) -> KLAutoencoder:
    torch.manual_seed(seed)
    return KLAutoencoder(base_channels=8, channel_mult=(1, 2, 2), latent_channels=3, scale_factor=scale_factor).eval()


def build_encoder(masked, info, stage, **changes):
    return masked.call("ldmcore_build_encoder", options=options(**changes), data=info, latent_shape=(3, *LATENT),
                       first_stage=stage, cache_dir=None)


def expected_concat(stage, image, mask):
    latent = stage.encode(image * (1 - mask)).mean * stage.scale_factor
    return torch.cat([F.avg_pool2d(mask, stage.downsample_factor), latent], dim=1)


# --- encoder, routing, the first stage it holds --------------------------------------------------


def test_concat_is_the_mask_at_latent_size_then_the_latent_of_the_masked_image(masked, info, batch):
    stage = first_stage(scale_factor=0.7)
    encoder = build_encoder(masked, info, stage)
    assert encoder.outputs == {"concat": (1 + 3,)}
    out = encoder(batch)["concat"]
    assert out.shape == (8, 4, *LATENT)
    with torch.no_grad():
        assert torch.allclose(out, expected_concat(stage, batch["image"], batch["mask"]), atol=1e-6)
    # the pixels under the mask do not reach the condition
    changed = {**batch, "image": torch.where(batch["mask"] > 0, torch.rand_like(batch["image"]), batch["image"])}
    assert torch.allclose(encoder(changed)["concat"], out, atol=1e-6)


def test_a_run_routes_the_concat_channels_into_the_unet(tmp_path):
    cfg = validate(compose_config(["+condition=masked_image", "+experiment=tiny", f"cache_dir={tmp_path}"]))
    assert cfg.data.kind == "multi"  # the plugin's config switches to multi-object scenes
    system = build_system(cfg, build("data", cfg.data))
    c = system.first_stage.latent_channels
    assert system.model.conditioner.concat_channels == 1 + c
    assert system.model.unet.in_channels == c + 1 + c


def test_the_first_stage_is_held_not_owned(masked, info, batch):
    stage = first_stage()
    encoder = build_encoder(masked, info, stage)
    conditioner = Conditioner({"masked_image": encoder}, {"masked_image": 0.0})
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    assert not {id(p) for p in stage.parameters()} & {id(p) for p in conditioner.parameters()}
    assert conditioner.state_dict() == {}
    # no gradient reaches it, even where the caller asks for gradients
    stage.requires_grad_(True)
    assert not encoder(batch)["concat"].requires_grad
    # the EMA copy shares it rather than copying it
    ema = EMA(conditioner, 0.99)
    assert ema.shadow.encoders["masked_image"].first_stage() is stage
    assert copy.deepcopy(encoder).first_stage() is stage
    # moving the denoiser moves where the condition lands, not the first stage
    conditioner.to("meta")
    assert conditioner(batch, 8, LATENT)["concat"].device.type == "meta"
    assert conditioner.null(8, LATENT)["concat"].device.type == "meta"
    assert next(stage.parameters()).device.type == "cpu"


def test_the_denoiser_checkpoint_holds_no_first_stage_weights(tmp_path):
    cfg = validate(compose_config(["+condition=masked_image", "+experiment=tiny", f"cache_dir={tmp_path}"]))
    system = build_system(cfg, build("data", cfg.data))
    first_stage_keys = set(system.first_stage.state_dict())
    model_keys = set(system.model.state_dict())
    assert not any(k.startswith("conditioner.") for k in model_keys)
    assert not {k.split(".", 1)[-1] for k in model_keys} & first_stage_keys
    n_model = sum(p.numel() for p in system.model.parameters())
    assert n_model == sum(p.numel() for p in system.model.unet.parameters())


def test_the_encoder_sees_first_stage_weights_set_after_it_was_built(masked, info, batch):
    stage = first_stage(seed=0)
    encoder = build_encoder(masked, info, stage)
    before = encoder(batch)["concat"]
    stage.load_state_dict(first_stage(seed=1).state_dict())  # e.g. trained, cached or loaded from a checkpoint
    stage.scale_factor = 0.25
    after = encoder(batch)["concat"]
    assert not torch.allclose(before, after)
    with torch.no_grad():
        assert torch.allclose(after, expected_concat(stage, batch["image"], batch["mask"]), atol=1e-6)


# --- null condition and dropout ------------------------------------------------------------------


def test_full_mask_null_is_the_encoding_of_an_image_with_nothing_known(masked, info, batch):
    encoder = build_encoder(masked, info, first_stage())
    null = encoder.null(8, LATENT, torch.device("cpu"))["concat"]
    nothing_known = {"image": batch["image"], "mask": torch.ones_like(batch["mask"])}
    # batch 1 (the null) and batch 8 take different conv kernels on some CPUs: fp32 noise ~1e-4
    assert torch.allclose(null, encoder(nothing_known)["concat"], rtol=1e-4, atol=1e-4)
    assert torch.equal(null[:, 0], torch.ones(8, *LATENT))
    bigger = encoder.null(2, (12, 16), torch.device("cpu"))["concat"]  # convolutional sampling: any latent size
    assert bigger.shape == (2, 4, 12, 16)


def test_zeros_null_and_a_bad_null_option(masked, info):
    encoder = build_encoder(masked, info, first_stage(), null_condition="zeros")
    assert torch.equal(encoder.null(3, LATENT, torch.device("cpu"))["concat"], torch.zeros(3, 4, *LATENT))
    with pytest.raises(ValueError, match="condition.masked_image.null_condition"):
        build_encoder(masked, info, first_stage(), null_condition="gray")
    with pytest.raises(ValueError, match="condition.masked_image.composite"):
        build_encoder(masked, info, first_stage(), composite="yes")


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_dropout_replaces_samples_by_the_null_condition(masked, info, batch, p):
    encoder = build_encoder(masked, info, first_stage())
    conditioner = Conditioner({"masked_image": encoder}, {"masked_image": p}).train()
    out = conditioner(batch, 8, LATENT, generator=torch.Generator().manual_seed(0))["concat"]
    null, real = encoder.null(8, LATENT, torch.device("cpu"))["concat"], encoder(batch)["concat"]
    dropped = [torch.allclose(o, n) for o, n in zip(out, null)]
    kept = [torch.allclose(o, r) for o, r in zip(out, real)]
    assert all(d != k for d, k in zip(dropped, kept))  # each sample is one or the other
    if p == 0.0:
        assert not any(dropped)
    elif p == 1.0:
        assert all(dropped)
    else:
        assert any(dropped) and any(kept)
    assert torch.allclose(conditioner.eval()(batch, 8, LATENT)["concat"], real)  # no dropout when sampling


# --- user values ---------------------------------------------------------------------------------


def test_format_then_parse_gives_back_the_batch_keys(masked, info, batch, tmp_path):
    opts = options()
    assert "value_dir" not in opts  # where files are written is the run's cache_dir, no part of the model's config
    for i in range(4):
        value = masked.call("ldmcore_format_value", batch=batch, index=i, options=opts, data=info, cache_dir=tmp_path)
        assert json.loads(json.dumps(value)) == value and set(value) == {"image", "mask"}
        assert Path(value["image"]).parent == tmp_path / "masked_image"
        parsed = masked.call("ldmcore_parse_value", value=value, options=opts, data=info, root=NO_ROOT)
        assert torch.equal(parsed["image"], batch["image"][i]) and torch.equal(parsed["mask"], batch["mask"][i])
        again = masked.call("ldmcore_format_value", batch=batch, index=i, options=opts, data=info, cache_dir=tmp_path)
        assert again == value  # named by content: the same sample names the same files
    mask_png = np.asarray(Image.open(value["mask"]))
    assert set(np.unique(mask_png)) <= {0, 255} and np.array_equal(mask_png == 255, batch["mask"][3, 0].numpy() > 0)


def _png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def user_files(tmp_path):
    image = _png(tmp_path / "a.png", np.full((32, 32, 3), 200, np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:30] = 255
    return tmp_path, image, _png(tmp_path / "m.png", mask)


def test_user_png_files_are_read(masked, info, user_files):
    _, image, mask = user_files
    parsed = masked.call("ldmcore_parse_value", value={"image": image, "mask": mask}, options=options(), data=info, root=NO_ROOT)
    assert parsed["image"].shape == (3, 32, 32) and torch.allclose(parsed["image"], torch.full((3, 32, 32), 200 / 127.5 - 1))
    assert parsed["mask"].shape == (1, 32, 32) and parsed["mask"].sum() == 12 * 26 and parsed["mask"][0, 8, 4] == 1


def test_relative_paths_start_at_the_conditions_folder(masked, info, user_files, monkeypatch):
    folder, image, mask = user_files
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder / "sub")  # the working directory plays no part
    relative = masked.call("ldmcore_parse_value", value={"image": "a.png", "mask": "m.png"}, options=options(), data=info,
                           root=folder)
    absolute = masked.call("ldmcore_parse_value", value={"image": image, "mask": mask}, options=options(), data=info,
                           root=folder / "sub")
    assert all(torch.equal(relative[k], absolute[k]) for k in ("image", "mask"))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'sub' / 'a.png'} does not exist")):
        masked.call("ldmcore_parse_value", value={"image": "a.png", "mask": "m.png"}, options=options(), data=info,
                    root=folder / "sub")


@pytest.mark.parametrize("case, message", [
    ("not_a_dict", r'"image": "picture.png", "mask": "mask.png"'),
    ("missing_key", r'"image": "picture.png", "mask": "mask.png"'),
    ("missing_file", r"mask file .*nowhere.png does not exist"),
    ("wrong_size", r"image file .*small.png is 16x16 pixels; this model takes 32x32"),
    ("not_binary", r"mask file .*gray.png is not black and white: 1 pixels"),
    ("colored_mask", r"mask file .*red.png is not black and white"),
    ("not_an_image", r"image file .*text.png cannot be read as an image"),
])
def test_bad_user_values_are_refused_naming_the_file(masked, info, user_files, case, message):
    folder, image, mask = user_files
    gray = np.zeros((32, 32), np.uint8)
    gray[3, 3] = 128
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    (folder / "text.png").write_text("not a picture")
    value = {
        "not_a_dict": "a.png",
        "missing_key": {"image": image},
        "missing_file": {"image": image, "mask": str(folder / "nowhere.png")},
        "wrong_size": {"image": _png(folder / "small.png", np.zeros((16, 16, 3), np.uint8)), "mask": mask},
        "not_binary": {"image": image, "mask": _png(folder / "gray.png", gray)},
        "colored_mask": {"image": image, "mask": _png(folder / "red.png", red)},
        "not_an_image": {"image": str(folder / "text.png"), "mask": mask},
    }[case]
    with pytest.raises(ValueError, match=message):
        masked.call("ldmcore_parse_value", value=value, options=options(), data=info, root=NO_ROOT)


# --- compositing, pictures, scores ---------------------------------------------------------------


def test_compositing_keeps_the_known_region_exactly(masked, info, batch):
    generated = torch.rand_like(batch["image"]) * 2 - 1
    kept = generated.clone()
    out = masked.call("ldmcore_finalize", images=generated, batch=batch, options=options(), data=info)
    keep, make = (batch["mask"] == 0).expand_as(out), (batch["mask"] == 1).expand_as(out)
    assert torch.equal(out[keep], batch["image"][keep]) and torch.equal(out[make], generated[make])
    assert torch.equal(generated, kept)  # the caller's tensor is not changed
    off = masked.call("ldmcore_finalize", images=generated, batch=batch, options=options(composite=False), data=info)
    assert off is generated


def test_the_grid_picture_is_the_masked_image(masked, info, batch):
    picture = masked.call("ldmcore_draw_condition", batch=batch, options=options(), data=info)
    mask = batch["mask"].expand_as(picture) > 0
    assert torch.equal(picture[~mask], batch["image"][~mask]) and picture[mask].eq(-1).all()


def test_ground_truth_scores_perfectly_and_damage_is_measured(masked, info, world):
    batch = world.batch(list(range(32)))
    truth = masked.call("ldmcore_score", images=batch["image"], batch=batch, options=options(), data=info)
    assert truth["psnr_outside_mask_db"] == 100.0 and truth["masked_objects_valid"] == 1.0
    assert truth["masked_object_validity"] == 1.0
    assert 0.0 < truth["masked_object_rate"] == truth["masked_object_rate_original"] <= 1.0
    # noise outside the mask: a finite PSNR of the right size (std 0.1 on a peak-to-peak of 2 -> 26 dB)
    noisy = batch["image"] + 0.1 * torch.randn(batch["image"].shape, generator=torch.Generator().manual_seed(0)) * (1 - batch["mask"])
    scores = masked.call("ldmcore_score", images=noisy, batch=batch, options=options(), data=info)
    assert abs(scores["psnr_outside_mask_db"] - 10 * math.log10(4 / 0.01)) < 0.5
    # a ragged blob where an object was asked for inside the mask is not a valid object
    blobbed = batch["image"].clone()
    with_object = [i for i in range(32) if objects_in_mask(info.reader.read_objects(batch["image"][i]), batch["mask"][i])]
    assert with_object
    for i in with_object:
        blobbed[i] = torch.where(batch["mask"][i] > 0, torch.rand(3, 32, 32).round() * 2 - 1, blobbed[i])
    scores = masked.call("ldmcore_score", images=blobbed, batch=batch, options=options(), data=info)
    assert scores["masked_objects_valid"] <= 1 - len(with_object) / 32 + 1e-9
    assert scores["masked_object_validity"] < 1.0
    assert scores["psnr_outside_mask_db"] == 100.0  # only the masked region changed
    # an emptied mask is an object removed: valid image by image, but fewer objects than the data's,
    # and no object to judge one by one
    gray = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    emptied = torch.where(batch["mask"] > 0, gray.expand_as(batch["image"]), batch["image"])
    scores = masked.call("ldmcore_score", images=emptied, batch=batch, options=options(), data=info)
    assert scores["masked_objects_valid"] == 1.0 and scores["masked_object_rate"] == 0.0
    assert scores["masked_object_rate_original"] == truth["masked_object_rate"]
    assert "masked_object_validity" not in scores


# --- a tiny run: train, then inpaint from a conditions file --------------------------------------


class _Stop(Exception):
    pass


def test_training_conditions_on_the_trained_first_stage(tmp_path, monkeypatch):
    """Stage 2 starts with the encoder holding the run's first stage, its trained weights and scale_factor."""
    seen = {}

    def stop_before_stage_two(system, dataset, pool, *args, **kwargs):
        seen.update(system=system, pool=pool)
        raise _Stop

    monkeypatch.setattr(tasks, "train_denoiser", stop_before_stage_two)
    with pytest.raises(_Stop):
        train(compose_config(["+condition=masked_image", "+experiment=tiny", f"cache_dir={tmp_path / 'cache'}"]), tmp_path / "run")
    system, pool = seen["system"], seen["pool"]
    held = system.model.conditioner.encoders["masked_image"].first_stage()
    assert held is system.first_stage
    assert float(held.scale_factor) == pytest.approx(pool.scale_factor) and pool.scale_factor != 1.0
    [cached] = (tmp_path / "cache" / "first_stage").glob("*/model.safetensors")
    trained = load_file(str(cached))
    assert all(torch.equal(v, trained[f"first_stage.{k}"]) for k, v in held.state_dict().items() if k != "scale_factor")


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked_run")
    overrides = ["+condition=masked_image", "+experiment=tiny", f"cache_dir={root / 'cache'}"]
    metrics = train(compose_config(overrides), root / "run")
    return root, metrics


def test_training_scores_the_inpainting(masked_run):
    root, metrics = masked_run
    assert metrics["conditions"] == ["masked_image"]
    assert metrics["psnr_outside_mask_db"] == 100.0  # compositing on: the known region is pasted back
    assert 0.0 <= metrics["masked_objects_valid"] <= 1.0
    grid = Image.open(root / "run" / "samples.png")
    assert grid.width > 2 * 2 * 64  # the masked image beside each of the 2 columns of samples (64 px tiles)
    tensors, _, _, _ = load_checkpoint(root / "run")
    assert not any(k.startswith(("model.conditioner", "ema.conditioner")) for k in tensors)


def test_sampling_inpaints_user_files_and_keeps_the_known_region(masked_run, world, tmp_path):
    root, _ = masked_run
    batch = world.batch([0, 1])
    info = data_info(world)
    values = [installed().get("masked_image").call("ldmcore_format_value", batch=batch, index=i, options=options(), data=info,
                                                   cache_dir=tmp_path) for i in range(2)]
    conditions = tmp_path / "conditions.jsonl"
    conditions.write_text("".join(json.dumps({"masked_image": v}) + "\n" for v in values) + "{}\n")
    out = tmp_path / "out"
    out.mkdir()
    assert sample(compose_config([f"checkpoint={root / 'run'}", f"conditions={conditions}", "+experiment=tiny"]), out) == {"images": 3}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m.get("masked_image") for m in manifest] == [*values, None]
    for i in range(2):
        made = np.asarray(Image.open(out / manifest[i]["file"]))
        given = np.asarray(Image.open(values[i]["image"]))
        keep = np.asarray(Image.open(values[i]["mask"])) == 0
        assert np.array_equal(made[keep], given[keep])


def test_compositing_bench_scores_the_model_with_and_without_pasting_and_the_first_stage_bound(masked_run, tmp_path, monkeypatch):
    root, _ = masked_run
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr("sys.argv", ["masked_image_compositing.py", str(root / "run"), "--samples", "4", "--scales", "3",
                                     "--out", str(out), "sampler.steps=2", f"cache_dir={root / 'cache'}"])
    load_bench("masked_image_compositing").main()
    row = json.loads(out.read_text())
    assert row["samples"] == 4 and row["steps"] == 2
    assert row["scale_3/composite_on"]["psnr_outside_mask_db"] == 100.0  # pasted back: exact
    for name in ("scale_3/composite_off", "condition_absent", "first_stage_reconstruction"):
        assert 0.0 < row[name]["psnr_outside_mask_db"] < 100.0, name  # what the networks make themselves
