"""The layout condition: boxes as (class, top-left, bottom-right) tokens, validation of user
layouts naming the object and field, the encoder, and box recall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from ldmcore.config import validate
from ldmcore.data.base import data_info
from ldmcore.data.shapes import ShapesWorld
from ldmcore.pluginmanager import installed
from ldmcore_plugins.layout.tokens import LayoutVocabulary

LATENT = (8, 8)


# layout reads neither the latent's shape, the first stage nor a cache: the hookspec's arguments as None
NO_CONTEXT = {"latent_shape": None, "first_stage": None, "cache_dir": None}


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="multi", size=64, seed=7)


@pytest.fixture(scope="module")
def info(world):
    return data_info(world)


@pytest.fixture(scope="module")
def layout():
    return installed().get("layout")


def options(**changes):
    path = Path(installed().get("layout").call("ldmcore_config_dir")) / "condition" / "layout.yaml"
    opts = OmegaConf.load(path)
    opts.merge_with({"embed_dim": 32, "depth": 1, "num_heads": 2, **changes})
    return opts


def parse(layout, info, value, **changes):
    return layout.call("ldmcore_parse_value", value=value, options=options(**changes), data=info, root=None)


def test_tokens_of_one_object():
    vocab = LayoutVocabulary(num_classes=18, bins=16, max_objects=3)
    assert (vocab.pad, vocab.start, vocab.size, vocab.length) == (18 + 256, 18 + 257, 18 + 258, 10)
    tokens = vocab.encode(torch.tensor([[0.1, 0.1, 0.4, 0.4]]), torch.tensor([8]))
    # class 8; top-left cell floor(1.6) = 1; bottom-right: last covered cell ceil(6.4) - 1 = 6
    assert tokens.tolist() == [vocab.start, 8, 18 + 1 * 16 + 1, 18 + 6 * 16 + 6] + [vocab.pad] * 6
    full = vocab.encode(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0]))
    assert full[2:4].tolist() == [18, 18 + 255]  # corners at the image corners stay on the grid


def test_corner_features_encode_position_smoothly():
    vocab = LayoutVocabulary(num_classes=18, bins=16, max_objects=3)
    table = vocab.corner_features(4)  # (size, 16)
    assert table.shape == (vocab.size, 16)
    assert table[:18].abs().sum() == 0 and table[vocab.pad:].abs().sum() == 0  # classes, pad, start: no features
    cell = lambda x, y: table[18 + y * 16 + x]
    near, far = (cell(5, 5) - cell(6, 5)).norm(), (cell(5, 5) - cell(13, 12)).norm()
    assert near < far / 2
    assert len({tuple(row.tolist()) for row in table[18:18 + 256]}) == 256  # every cell distinct


def test_corner_features_change_the_encoding(layout, world, info):
    batch = world.batch([0, 1])
    torch.manual_seed(0)
    plain = layout.call("ldmcore_build_encoder", options=options(corner_frequencies=0), data=info, **NO_CONTEXT)
    torch.manual_seed(0)
    fourier = layout.call("ldmcore_build_encoder", options=options(corner_frequencies=4), data=info, **NO_CONTEXT)
    assert fourier.corner_projection is not None and plain.corner_projection is None
    assert "corner_table" not in fourier.state_dict()  # rebuilt from the vocabulary, not saved
    assert not torch.allclose(plain(batch)["crossattn"], fourier(batch)["crossattn"])


def test_class_embedding_names_the_class_in_every_token_of_its_object(layout, info):
    box = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.6, 0.5, 0.9, 0.8]])
    batch = {"boxes": [box, box], "box_labels": [torch.tensor([2, 5]), torch.tensor([7, 5])]}  # first object's label differs
    torch.manual_seed(0)
    encoder = layout.call("ldmcore_build_encoder", options=options(class_embedding=True), data=info, **NO_CONTEXT)
    assert encoder.class_embedding is not None and "class_embedding.weight" in encoder.state_dict()
    tokens = encoder.vocabulary.encode_batch(batch["boxes"], batch["box_labels"])
    added = encoder.object_classes(tokens)  # (2, 10, D)
    table = encoder.class_embedding.weight
    for slot in (1, 2, 3):  # the first object's class, top-left and bottom-right tokens
        assert torch.equal(added[0, slot], table[2]) and torch.equal(added[1, slot], table[7])
    for slot in (4, 5, 6):  # the second object's, the same label in both
        assert torch.equal(added[0, slot], table[5])
    assert not added[:, 0].any() and not added[:, 7:].any()  # start and padding get none
    out = encoder(batch)["crossattn"]
    assert not torch.allclose(out[0, 2], out[1, 2])  # a corner token now differs with its object's label
    plain = layout.call("ldmcore_build_encoder", options=options(class_embedding=False), data=info, **NO_CONTEXT)
    assert plain.class_embedding is None and plain(batch)["crossattn"].shape == out.shape


def test_tokens_follow_reading_order_whatever_the_given_order():
    vocab = LayoutVocabulary(num_classes=18, bins=16, max_objects=3)
    boxes = torch.tensor([[0.6, 0.1, 0.9, 0.4], [0.1, 0.5, 0.4, 0.8]])
    labels = torch.tensor([3, 5])
    assert torch.equal(vocab.encode(boxes, labels), vocab.encode(boxes.flip(0), labels.flip(0)))
    assert vocab.encode(boxes, labels)[1] == 5  # the left object first


@pytest.mark.parametrize(
    "value,fragments",
    [
        ({"label": "red circle"}, ["JSON list"]),
        ([{"label": "red circle", "box": [0.1, 0.1, 1.5, 0.4]}], ["layout object 1", "x1", "[0, 1]"]),
        ([{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}, {"label": "blue square", "box": [0.5, 0.2, 0.5, 0.6]}],
         ["layout object 2", "x0", "x1"]),
        ([{"label": "red circle", "box": [0.1, 0.6, 0.4, 0.4]}], ["layout object 1", "y0", "y1"]),
        ([{"label": "purple hexagon", "box": [0.1, 0.1, 0.4, 0.4]}], ["layout object 1", "purple hexagon", "red circle"]),
        ([{"label": "red circle", "box": [0.1, 0.1, 0.4]}], ["layout object 1", "box", "4 numbers"]),
        ([{"label": "red circle", "box": [0.1, "0.1", 0.4, 0.4]}], ["layout object 1", "y0"]),
        ([{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4], "color": "red"}], ["layout object 1", "color"]),
        ([{"box": [0.1, 0.1, 0.4, 0.4]}], ["layout object 1", "label"]),
        (["red circle"], ["layout object 1"]),
        ([{"label": "red circle", "box": [0.1, 0.1, 0.2, 0.2]}] * 4, ["max_objects=3"]),
    ],
)
def test_bad_layouts_name_the_object_and_field(layout, info, value, fragments):
    with pytest.raises(ValueError) as error:
        parse(layout, info, value)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_parse_and_format_are_inverse_with_short_numbers(layout, info):
    value = [{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}, {"label": 8, "box": [0.5, 0.55, 0.9, 0.95]}]
    parsed = parse(layout, info, value)
    assert parsed["boxes"].shape == (2, 4) and parsed["box_labels"].tolist() == [0, 8]
    formatted = layout.call("ldmcore_format_value", batch={k: [v] for k, v in parsed.items()}, index=0, options=options(), data=info, cache_dir=None)
    assert json.dumps(formatted) == json.dumps([{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]},
                                                {"label": "blue square", "box": [0.5, 0.55, 0.9, 0.95]}])
    assert parse(layout, info, [])["boxes"].shape == (0, 4)  # an empty layout: a plain background


def test_encoder_tokens_null_and_limits(layout, world, info):
    encoder = layout.call("ldmcore_build_encoder", options=options(), data=info, **NO_CONTEXT)
    assert encoder.outputs == {"crossattn": (10, 32)}
    batch = world.batch([0, 1, 2, 3])
    out = encoder(batch)["crossattn"]
    assert out.shape == (4, 10, 32)
    null = encoder.null(4, LATENT, torch.device("cpu"))["crossattn"]
    empty = encoder({"boxes": [torch.zeros(0, 4)], "box_labels": [torch.zeros(0, dtype=torch.int64)]})["crossattn"]
    torch.testing.assert_close(null, empty.expand(4, -1, -1))
    # a batch of equally many objects per sample may arrive stacked (B, n, 4) from a conditions file
    stacked = {"boxes": torch.stack([batch["boxes"][0]] * 2), "box_labels": torch.stack([batch["box_labels"][0]] * 2)}
    torch.testing.assert_close(encoder(stacked)["crossattn"][1], out[0])
    too_many = {"boxes": [torch.rand(4, 4)], "box_labels": [torch.zeros(4, dtype=torch.int64)]}
    with pytest.raises(ValueError, match="max_objects"):
        encoder(too_many)
    zeros = layout.call("ldmcore_build_encoder", options=options(null_condition="zeros"), data=info, **NO_CONTEXT)
    assert not zeros.null(2, LATENT, torch.device("cpu"))["crossattn"].any()


def test_box_recall_of_true_and_of_moved_boxes(layout, world, info):
    batch = world.batch(list(range(8)))
    score = layout.call("ldmcore_score", images=batch["image"], batch=batch, options=options(), data=info)
    assert score == {"box_recall": 1.0, "box_placement": 1.0}
    moved = {**batch, "boxes": [(b + 0.5) % 1.0 for b in batch["boxes"]]}
    assert layout.call("ldmcore_score", images=batch["image"], batch=moved, options=options(), data=info)["box_recall"] < 0.5
    # other labels, same boxes: not recalled, but placed
    relabelled = {**batch, "box_labels": [(l + 1) % len(info.class_names) for l in batch["box_labels"]]}
    score = layout.call("ldmcore_score", images=batch["image"], batch=relabelled, options=options(), data=info)
    assert score == {"box_recall": 0.0, "box_placement": 1.0}


def test_unlabelled_layouts_say_where_not_what(layout, info):
    box = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.6, 0.5, 0.9, 0.8]])
    batch = {"boxes": [box, box], "box_labels": [torch.tensor([2, 5]), torch.tensor([7, 1])]}
    encoder = layout.call("ldmcore_build_encoder", options=options(labels=False), data=info, **NO_CONTEXT)
    assert encoder.vocabulary.num_classes == 1 and encoder.class_embedding.num_embeddings == 1
    out = encoder(batch)["crossattn"]
    torch.testing.assert_close(out[0], out[1])  # the labels are not read
    labelled = layout.call("ldmcore_build_encoder", options=options(labels=True), data=info, **NO_CONTEXT)
    assert labelled.vocabulary.num_classes == len(info.class_names)
    # a conditions file may leave out the label (or give one, kept for scoring) ...
    parsed = parse(layout, info, [{"box": [0.1, 0.1, 0.4, 0.4]}, {"label": "blue square", "box": [0.5, 0.5, 0.9, 0.9]}],
                   labels=False)
    assert parsed["box_labels"].tolist() == [-1, 8]
    formatted = layout.call("ldmcore_format_value", batch={k: [v] for k, v in parsed.items()}, index=0,
                            options=options(labels=False), data=info, cache_dir=None)
    assert formatted == [{"box": [0.1, 0.1, 0.4, 0.4]}, {"label": "blue square", "box": [0.5, 0.5, 0.9, 0.9]}]
    assert torch.isfinite(encoder({k: [v] for k, v in parsed.items()})["crossattn"]).all()
    # ... which a labelled model still requires, naming the field
    with pytest.raises(ValueError, match="layout object 1 must have exactly the fields label and box"):
        parse(layout, info, [{"box": [0.1, 0.1, 0.4, 0.4]}])


def test_layout_selects_multi_object_scenes():
    cfg = validate(compose_config(["+condition=layout", "+experiment=tiny"]))
    assert cfg.data.kind == "multi" and cfg.data.size == 256
