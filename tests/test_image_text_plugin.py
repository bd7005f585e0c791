"""The image_text condition: a timm image encoder built from its name (trained or frozen, local
weights) whose tokens join the text plugin's caption tokens in one cross-attention context; its
null condition and dropout; user values; the recolor score; and a tiny run trained and sampled."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from conftest import compose_config
from ldmcore.conditioning import REGIONS, Conditioner
from ldmcore.config import ConfigError, validate
from ldmcore.data.base import data_info
from ldmcore.data.shapes import SHAPES, ShapesWorld, render
from ldmcore.pluginmanager import installed
from ldmcore.tasks import sample, train
from ldmcore_plugins.image_text.values import to_uint8, to_unit_range

LATENT = (8, 8)
NO_ROOT = Path("/nonexistent-conditions-folder")  # for values with absolute paths (or none)
IMAGE_TOKENS = 16  # test_vit at 32 px with 8-px patches: a 4 x 4 grid
TEXT_TOKENS = 24


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="multi", size=64, seed=11)


@pytest.fixture(scope="module")
def info(world):
    return data_info(world)


@pytest.fixture(scope="module")
def plugin():
    return installed().get("image_text")


def options(**changes):
    """The shipped config with a narrow text encoder; ``changes`` are dotted keys."""
    path = Path(installed().get("image_text").call("ldmcore_config_dir")) / "condition" / "image_text.yaml"
    opts = OmegaConf.load(path)
    opts.text.merge_with({"embed_dim": 32, "depth": 1, "num_heads": 2})
    for key, value in changes.items():
        OmegaConf.update(opts, key, value, merge=False)
    return opts


def build(plugin, info, cache_dir=None, **changes):
    # the plugin needs neither the latent shape nor the first stage (it has no concat output)
    return plugin.call("ldmcore_build_encoder", options=options(**changes), data=info, latent_shape=(4, *LATENT), first_stage=None,
                       cache_dir=cache_dir)


def parse(plugin, info, value, root=NO_ROOT):
    return plugin.call("ldmcore_parse_value", value=value, options=options(), data=info, root=root)


def score(plugin, info, images, batch):
    return plugin.call("ldmcore_score", images=images, batch=batch, options=options(), data=info)


# --- the encoder: output shapes and routing ----------------------------------------------------


def test_image_tokens_then_text_tokens_in_one_crossattn_output(plugin, world, info):
    encoder = build(plugin, info).eval()
    assert encoder.outputs == {"crossattn": (IMAGE_TOKENS + TEXT_TOKENS, 32)}
    batch = world.batch([0, 1, 2])
    out = encoder(batch)["crossattn"]
    assert out.shape == (3, IMAGE_TOKENS + TEXT_TOKENS, 32)
    # another reference image moves only the image tokens; another caption only the text tokens
    other_image = encoder({**batch, "reference_image": batch["reference_image"].flip(-1)})["crossattn"]
    assert not torch.allclose(other_image[:, :IMAGE_TOKENS], out[:, :IMAGE_TOKENS])
    torch.testing.assert_close(other_image[:, IMAGE_TOKENS:], out[:, IMAGE_TOKENS:])
    other_text = encoder({**batch, "caption": batch["caption"][::-1]})["crossattn"]
    torch.testing.assert_close(other_text[:, :IMAGE_TOKENS], out[:, :IMAGE_TOKENS])
    assert not torch.allclose(other_text[:, IMAGE_TOKENS:], out[:, IMAGE_TOKENS:])
    # each part carries its own learned type embedding
    with torch.no_grad():
        encoder.image_type += 1.0
        encoder.text_type -= 1.0
    shifted = encoder(batch)["crossattn"]
    torch.testing.assert_close(shifted[:, :IMAGE_TOKENS], out[:, :IMAGE_TOKENS] + 1.0)
    torch.testing.assert_close(shifted[:, IMAGE_TOKENS:], out[:, IMAGE_TOKENS:] - 1.0)


def test_the_conditioner_routes_it_to_the_context(plugin, world, info):
    conditioner = Conditioner({"image_text": build(plugin, info)}, {"image_text": 0.0})
    assert (conditioner.context_dim, conditioner.concat_channels, conditioner.vector_dim) == (32, 0, None)
    routed = conditioner(world.batch([0, 1]), 2, LATENT)
    assert set(routed) == {"crossattn", REGIONS} and routed["crossattn"].shape == (2, IMAGE_TOKENS + TEXT_TOKENS, 32)
    assert routed[REGIONS].shape == (2, IMAGE_TOKENS + TEXT_TOKENS, 4, 4)


def test_trained_jointly_every_part_gets_gradients(plugin, world, info):
    encoder = build(plugin, info)
    encoder(world.batch([0, 1, 2]))["crossattn"].square().mean().backward()
    for name in ("image.model.patch_embed.proj.weight", "project.weight", "image_position", "image_type", "text_type",
                 "text.transformer.token_embedding.weight"):
        grad = encoder.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# --- the timm model: built from its name, frozen, local weights --------------------------------


def test_the_timm_model_is_built_from_its_name(plugin, world, info):
    encoder = build(plugin, info)
    assert isinstance(encoder.image.model, timm.models.VisionTransformer)
    assert encoder.image.model.pretrained_cfg["architecture"] == "test_vit"
    # a convolutional model: its final 4 x 4 map (output stride 8) gives the tokens
    cnn = build(plugin, info, **{"image.model": "test_resnet", "image.model_kwargs": {"output_stride": 8}})
    assert isinstance(cnn.image.model, timm.models.ResNet)
    assert (cnn.image.num_tokens, cnn.image.width) == (16, cnn.image.model.num_features)
    assert cnn(world.batch([0, 1]))["crossattn"].shape == (2, 16 + TEXT_TOKENS, 32)


def test_frozen_option_freezes_the_timm_model_only(plugin, world, info):
    encoder = build(plugin, info, **{"image.frozen": True})
    assert not any(p.requires_grad for p in encoder.image.model.parameters())
    encoder.train()
    assert not encoder.image.model.training and encoder.project.training  # no dropout / batch statistics
    encoder(world.batch([0, 1]))["crossattn"].square().mean().backward()
    assert all(p.grad is None for p in encoder.image.model.parameters())
    assert encoder.project.weight.grad is not None  # the projection still learns


def test_bad_timm_options_are_named(plugin, info):
    with pytest.raises(ConfigError, match=r"condition.image_text.image.model='no_such_net' is not a timm model"):
        build(plugin, info, **{"image.model": "no_such_net"})
    with pytest.raises(ConfigError, match="condition.image_text.image.model_kwargs"):
        build(plugin, info, **{"image.model": "test_resnet"})  # img_size is a ViT's argument, not a ResNet's


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
    """A timm classifier's weights (head included), as safetensors and as a pickle."""
    torch.manual_seed(3)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    folder = tmp_path_factory.mktemp("timm_weights")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / "test_resnet.safetensors")
    torch.save(tensors, folder / "test_resnet.pth")
    return folder, tensors


def test_weights_come_from_a_local_file(plugin, info, classifier_weights):
    folder, tensors = classifier_weights
    cnn = {"image.model": "test_resnet", "image.model_kwargs": {"output_stride": 8}, "image.frozen": True}
    encoder = build(plugin, info, **cnn, **{"image.weights": str(folder / "test_resnet.safetensors")})
    loaded = encoder.image.model.state_dict()
    assert "fc.weight" not in loaded  # the classifier's head is dropped
    for key, value in loaded.items():
        assert torch.equal(value, tensors[key]), key
    with pytest.raises(ConfigError, match="condition.image_text.image.weights: .*pickled"):
        build(plugin, info, **cnn, **{"image.weights": str(folder / "test_resnet.pth")})
    allowed = build(plugin, info, **cnn, **{"image.weights": str(folder / "test_resnet.pth"), "image.allow_pickle": True})
    assert all(torch.equal(v, tensors[k]) for k, v in allowed.image.model.state_dict().items())
    with pytest.raises(ConfigError, match="condition.image_text.image.weights: .*does not exist"):
        build(plugin, info, **cnn, **{"image.weights": str(folder / "missing.safetensors")})
    with pytest.raises(ConfigError, match="condition.image_text.image.weights: .*missing"):  # another model's file
        build(plugin, info, **{"image.weights": str(folder / "test_resnet.safetensors")})


# --- null condition and dropout ----------------------------------------------------------------


def test_learned_null_is_learned_image_tokens_and_the_empty_caption(plugin, world, info):
    encoder = build(plugin, info)
    null = encoder.null(3, LATENT, torch.device("cpu"))["crossattn"]
    assert null.shape == (3, IMAGE_TOKENS + TEXT_TOKENS, 32)
    torch.testing.assert_close(null[:, :IMAGE_TOKENS], encoder.null_image.expand(3, -1, -1))
    torch.testing.assert_close(null[:, IMAGE_TOKENS:], encoder.text.encode([""] * 3) + encoder.text_type)
    assert not torch.allclose(encoder.eval()(world.batch([0, 1, 2]))["crossattn"], null)
    null.sum().backward()
    assert encoder.null_image.grad is not None  # learned (through dropout during training)


def test_zeros_null(plugin, info):
    encoder = build(plugin, info, null_condition="zeros")
    null = encoder.null(2, LATENT, torch.device("cpu"))["crossattn"]
    assert null.shape == (2, IMAGE_TOKENS + TEXT_TOKENS, 32) and not null.any()
    assert encoder.null_image is None


@pytest.mark.parametrize("part", ["image", "text"])
def test_per_part_dropout_replaces_only_that_part_and_only_in_training(plugin, world, info, part):
    encoder = build(plugin, info, **{f"{part}_dropout": 1.0})
    batch = world.batch([0, 1, 2])
    null = encoder.null(3, LATENT, torch.device("cpu"))["crossattn"]
    image, text = slice(0, IMAGE_TOKENS), slice(IMAGE_TOKENS, None)
    dropped, kept = (image, text) if part == "image" else (text, image)
    out = encoder.train()(batch)["crossattn"]
    torch.testing.assert_close(out[:, dropped], null[:, dropped])
    assert not torch.allclose(out[:, kept], null[:, kept])
    evaluated = encoder.eval()(batch)["crossattn"]
    assert not torch.allclose(evaluated[:, dropped], null[:, dropped])


def test_per_part_dropout_draws_per_sample(plugin, world, info):
    encoder = build(plugin, info, image_dropout=0.5).train()
    torch.manual_seed(0)
    out = encoder(world.batch(list(range(32))))["crossattn"][:, :IMAGE_TOKENS]
    null = encoder.null(32, LATENT, torch.device("cpu"))["crossattn"][:, :IMAGE_TOKENS]
    dropped = sum(torch.allclose(o, n) for o, n in zip(out, null))
    assert 4 <= dropped <= 28


def test_bad_null_and_dropout_options_are_named(plugin, info):
    with pytest.raises(ConfigError, match="condition.image_text.null_condition"):
        build(plugin, info, null_condition="empty")
    with pytest.raises(ConfigError, match="condition.image_text.text_dropout"):
        build(plugin, info, text_dropout=1.5)
    with pytest.raises(ConfigError, match="condition.image_text.text.encoder"):
        build(plugin, info, **{"text.encoder": "magic"})
    with pytest.raises(ConfigError, match="condition.image_text.text.pretrained"):
        build(plugin, info, **{"text.encoder": "pretrained"})


# --- user values -------------------------------------------------------------------------------


def write_png(path: Path, image: torch.Tensor) -> str:
    Image.fromarray(to_uint8(image)).save(path)
    return str(path)


def test_parse_reads_an_image_file_and_a_caption(plugin, world, info, tmp_path):
    batch = world.batch([5])
    value = {"image": write_png(tmp_path / "ref.png", batch["reference_image"][0]), "text": "a red circle"}
    parsed = parse(plugin, info, value)
    assert set(parsed) == {"reference_image", "caption"} and parsed["caption"] == "a red circle"
    assert torch.equal(parsed["reference_image"], batch["reference_image"][0])


def test_format_then_parse_gives_the_same_sample(plugin, world, info):
    batch = world.batch([0, 1, 2])
    for i in range(3):
        value = plugin.call("ldmcore_format_value", batch=batch, index=i, options=options(), data=info, cache_dir=None)
        assert value["text"] == batch["caption"][i] and value["image"].startswith("data:image/png;base64,")
        parsed = parse(plugin, info, json.loads(json.dumps(value)))
        assert torch.equal(parsed["reference_image"], batch["reference_image"][i]) and parsed["caption"] == batch["caption"][i]


@pytest.mark.parametrize("value, message", [
    ("a red circle", "an object with an image and a text"),
    ({"image": "ref.png"}, "missing text"),
    ({"image": "ref.png", "text": "a red circle", "mask": "m.png"}, "unknown mask"),
    ({"image": "ref.png", "text": ""}, "non-empty caption"),
    ({"image": "ref.png", "text": 3}, "non-empty caption"),
    ({"image": 7, "text": "a red circle"}, "path to an image file"),
    ({"image": "missing.png", "text": "a red circle"}, "missing.png' does not exist"),
    ({"image": "data:image/png;base64,not-base64!", "text": "a red circle"}, "data URI does not hold a PNG"),
])
def test_bad_values_are_refused_with_what_is_allowed(plugin, info, tmp_path, value, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "ref.png")
    with pytest.raises(ValueError, match=message):
        parse(plugin, info, value, root=tmp_path)


def test_a_relative_image_path_starts_at_the_conditions_folder(plugin, world, info, tmp_path, monkeypatch):
    reference = world.batch([2])["reference_image"][0]
    (tmp_path / "refs").mkdir()
    absolute = write_png(tmp_path / "refs" / "ref.png", reference)
    monkeypatch.chdir(tmp_path / "refs")  # the working directory plays no part
    parsed = parse(plugin, info, {"image": "refs/ref.png", "text": "a red circle"}, root=tmp_path)
    assert torch.equal(parsed["reference_image"], reference)
    assert torch.equal(parse(plugin, info, {"image": absolute, "text": "a red circle"})["reference_image"], reference)
    with pytest.raises(ValueError, match=re.escape(f"start at the conditions file's folder, {tmp_path}")):
        parse(plugin, info, {"image": "ref.png", "text": "a red circle"}, root=tmp_path)


def test_the_tokenizer_is_cached_in_the_cache_dir_the_core_hands_over(plugin, info, tmp_path):
    assert "tokenizer_cache" not in options().text  # no cache path in the model's config
    encoder = build(plugin, info, cache_dir=tmp_path)
    assert encoder.text.tokenizer.source.startswith(str(tmp_path / "tokenizers"))


def test_an_image_of_another_size_or_no_image_is_refused(plugin, info, tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"big.png' is 64x48 pixels; this model's images are 32x32"):
        parse(plugin, info, {"image": str(tmp_path / "big.png"), "text": "a red circle"})
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png' is not an image file"):
        parse(plugin, info, {"image": str(tmp_path / "notes.png"), "text": "a red circle"})


# --- the recolor score -------------------------------------------------------------------------


def test_ground_truth_scores_perfectly(plugin, world, info):
    batch = world.batch(list(range(16)))
    assert score(plugin, info, batch["image"], batch) == {"recolor_accuracy": 1.0, "shape_from_image": 1.0, "color_from_text": 1.0}


def test_the_unmodified_reference_keeps_shapes_but_misses_the_caption_colors(plugin, world, info):
    batch = world.batch(list(range(16)))
    scores = score(plugin, info, batch["reference_image"], batch)  # every reference has one object recolored
    assert scores == {"recolor_accuracy": 0.0, "shape_from_image": 1.0, "color_from_text": 0.0}


def test_another_scene_fails_the_shapes_and_a_blank_image_fails_both(plugin, world, info):
    batch = world.batch(list(range(16)))
    shifted = torch.roll(batch["image"], 1, dims=0)  # each sample gets its neighbour's scene
    assert score(plugin, info, shifted, batch)["shape_from_image"] < 0.25
    blank = torch.full_like(batch["image"], 200 / 127.5 - 1)  # background only
    assert score(plugin, info, blank, batch) == {"recolor_accuracy": 0.0, "shape_from_image": 0.0, "color_from_text": 0.0}


def test_another_shape_in_the_same_box_fails_the_shape_only(plugin, world, info):
    indices = list(range(8))
    batch = world.batch(indices)
    images = []
    for i in indices:  # the first object drawn as the next shape, same box and color
        scene = world.scene(i)
        first = dataclasses.replace(scene.objects[0], shape=(scene.objects[0].shape + 1) % len(SHAPES))
        images.append(to_unit_range(render(dataclasses.replace(scene, objects=(first, *scene.objects[1:])))[0]))
    scores = score(plugin, info, torch.stack(images), batch)
    assert scores == {"recolor_accuracy": 0.0, "shape_from_image": 0.0, "color_from_text": 1.0}


# --- config and a tiny run ---------------------------------------------------------------------


def test_config_selects_multi_object_scenes_and_sizes_the_vit_to_the_data():
    cfg = validate(compose_config(["+condition=image_text"]))
    assert cfg.data.kind == "multi"
    assert cfg.condition.image_text.image.model_kwargs.img_size == cfg.data.resolution
    assert validate(compose_config(["+condition=image_text", "data.resolution=64"])).condition.image_text.image.model_kwargs.img_size == 64


def test_config_switches_to_a_convolutional_model(world):
    cfg = validate(compose_config(["+condition=image_text", "condition.image_text.image.model=test_resnet",
                                   "~condition.image_text.image.model_kwargs",
                                   "+condition.image_text.image.model_kwargs={output_stride: 8}"]))
    encoder = installed().get("image_text").call("ldmcore_build_encoder", options=cfg.condition.image_text,
                                                 data=data_info(world), latent_shape=(4, *LATENT), first_stage=None,
                                                 cache_dir=None)
    assert isinstance(encoder.image.model, timm.models.ResNet) and encoder.outputs["crossattn"][0] == 16 + TEXT_TOKENS


def test_the_grid_shows_the_reference_image(plugin, world, info):
    batch = world.batch([0, 1])
    picture = plugin.call("ldmcore_draw_condition", batch=batch, options=options(), data=info)
    assert torch.equal(picture, batch["reference_image"])


TINY = ["+condition=image_text", "+experiment=tiny", "condition.image_text.text.embed_dim=32",
        "condition.image_text.text.depth=1", "condition.image_text.text.num_heads=2"]


@pytest.fixture(scope="module")
def image_text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_text_run")
    metrics = train(compose_config([*TINY, f"cache_dir={root / 'cache'}"]), root / "run")
    return root, metrics


def test_training_scores_recolor(image_text_run):
    root, metrics = image_text_run
    assert metrics["conditions"] == ["image_text"]
    for key in ("recolor_accuracy", "shape_from_image", "color_from_text"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (root / "run" / "samples.png").is_file()


def test_sampling_from_an_image_and_a_text(image_text_run, world, tmp_path):
    root, _ = image_text_run
    reference = write_png(tmp_path / "ref.png", world.batch([3])["reference_image"][0])
    lines = [{"image_text": {"image": reference, "text": "a red circle"}},
             {"image_text": {"image": reference, "text": "a blue square and a green triangle"}},
             {}]
    conditions = tmp_path / "conditions.jsonl"
    conditions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    out.mkdir()
    cfg = compose_config([f"checkpoint={root / 'run'}", f"conditions={conditions}", "+experiment=tiny"])
    assert sample(cfg, out) == {"images": 3}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k != "file"} for m in manifest] == lines
    assert all((out / m["file"]).is_file() for m in manifest)


# --- token regions ----------------------------------------------------------------------------


def test_each_image_token_applies_at_its_own_patch_and_text_everywhere(plugin, world, info):
    encoder = build(plugin, info).eval()
    assert encoder.token_regions == (4, 4)  # test_vit at 32 px: 4 x 4 patches
    out = encoder(world.batch([0, 1]))
    null = encoder.null(2, LATENT, torch.device("cpu"))
    assert out[REGIONS].shape == null[REGIONS].shape == (2, IMAGE_TOKENS + TEXT_TOKENS, 4, 4)
    torch.testing.assert_close(out[REGIONS], null[REGIONS])  # fixed by the token layout
    maps = out[REGIONS][0]
    assert maps[5].nonzero().tolist() == [[1, 1]]  # token 5 of the row-major grid: row 1, column 1
    assert torch.equal(maps[:IMAGE_TOKENS].sum(0), torch.ones(4, 4))  # every cell has one image token
    assert torch.equal(maps[IMAGE_TOKENS:], torch.ones(TEXT_TOKENS, 4, 4))
    assert REGIONS not in build(plugin, info, regions=False)(world.batch([0]))
