"""The shapes world, version 1, against its specification (SHAPES.md)."""

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from ldmcore.data.shapes import (
    BACKGROUND, CLASS_NAMES, COLORS, SHAPES, ShapeObject, Scene, ShapesWorld, caption, collate,
    ideal_mask, object_mask, recolor, render, sample_mask, sample_scene, size_range,
)

RNG = np.random.default_rng


def scenes(n, resolution=32, kind="single", seed=0):
    rng = RNG(seed)
    return [sample_scene(rng, resolution, kind) for _ in range(n)]


# ------------------------------------------------------------------------------------- vocabulary

def test_vocabulary_and_class_labels():
    assert SHAPES == ("circle", "square", "triangle")
    assert list(COLORS) == ["red", "green", "blue", "yellow", "magenta", "cyan"]
    assert COLORS["yellow"] == (255, 255, 0) and BACKGROUND == (200, 200, 200)
    assert len(CLASS_NAMES) == 18
    assert CLASS_NAMES.index("red circle") == 0 and CLASS_NAMES.index("blue square") == 8
    assert ShapeObject(shape=1, color=2, x0=0, y0=0, size=5).label == 8
    assert ShapeObject(shape=1, color=2, x0=0, y0=0, size=5).name == "blue square"
    for label, name in enumerate(CLASS_NAMES):
        o = ShapeObject(shape=label // 6, color=label % 6, x0=0, y0=0, size=5)
        assert o.label == label and o.name == name


def test_box_is_normalized_and_exclusive():
    assert ShapeObject(0, 0, x0=4, y0=8, size=12).box(32) == (4 / 32, 8 / 32, 16 / 32, 20 / 32)


# --------------------------------------------------------------------------------------- geometry

def spec_mask(shape, size):
    """The Geometry section evaluated in exact rationals."""
    mask = np.zeros((size, size), dtype=bool)
    for y in range(size):
        for x in range(size):
            u, v = Fraction(2 * x + 1, 2 * size), Fraction(2 * y + 1, 2 * size)
            mask[y, x] = {
                "square": 0 <= u < 1 and 0 <= v < 1,
                "circle": (u - Fraction(1, 2)) ** 2 + (v - Fraction(1, 2)) ** 2 <= Fraction(1, 4),
                "triangle": abs(u - Fraction(1, 2)) <= v / 2,
            }[shape]
    return mask


@pytest.mark.parametrize("shape", SHAPES)
def test_masks_equal_the_spec_geometry(shape):
    for size in range(1, 25):
        np.testing.assert_array_equal(object_mask(shape, size), spec_mask(shape, size))


def test_geometry_spot_checks():
    assert object_mask("square", 4).sum() == 16
    assert object_mask(1, 4).sum() == 16  # shapes by index too
    circle = object_mask("circle", 7)
    assert circle.sum() == 37 and circle[3].all() and not circle[0, 0]
    for size in (7, 10, 18):
        c = object_mask("circle", size)
        assert (c == c[::-1]).all() and (c == c[:, ::-1]).all() and (c == c.T).all()
    odd = object_mask("triangle", 9)  # apex: the one pixel whose centre is at u = 0.5
    assert odd[0].tolist() == [False] * 4 + [True] + [False] * 4
    assert odd[-1].all() and (odd == odd[:, ::-1]).all()
    even = object_mask("triangle", 10)  # no pixel centre within |u - .5| <= 0.025: empty top row
    assert not even[0].any() and even[1].sum() == 2 and even[-1].all()


def test_ideal_mask_uses_per_axis_box_coordinates():
    m = ideal_mask("circle", 12, 8)
    assert m.shape == (8, 12) and m[4].all() and m[:, 6].all()
    assert not ideal_mask("triangle", 9, 6)[0, 0] and ideal_mask("triangle", 9, 6)[-1].all()
    with pytest.raises(ValueError):
        object_mask("hexagon", 5)
    with pytest.raises(ValueError):  # cached masks are shared: read-only
        object_mask("square", 3)[0, 0] = False


def test_star_is_reserved():
    star = object_mask("star", 21)
    assert star.any() and (star == star[:, ::-1]).all()
    assert all(not (star == object_mask(s, 21)).all() for s in SHAPES)
    assert all(o.shape < 3 for sc in scenes(300, kind="multi") for o in sc.objects)
    drawn = sample_scene(RNG(0), 32, "single", shapes=("star",))
    assert drawn.objects[0].shape == 3 and drawn.objects[0].name.endswith(" star")


# ----------------------------------------------------------------------------------------- scenes

@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_sizes_and_placement(resolution, kind):
    lo, hi = size_range(resolution, kind)
    fractions = {"single": (0.31, 0.56), "multi": (0.22, 0.44)}[kind]
    assert (lo, hi) == tuple(round(f * resolution) for f in fractions)
    all_scenes = scenes(1500, resolution, kind, seed=resolution)
    sizes = [o.size for sc in all_scenes for o in sc.objects]
    assert set(sizes) == set(range(lo, hi + 1))  # uniform over the whole range
    for sc in all_scenes:
        assert sc.resolution == resolution
        for o in sc.objects:
            assert 0 <= o.x0 and o.x0 + o.size <= resolution
            assert 0 <= o.y0 and o.y0 + o.size <= resolution
    counts = {len(sc.objects) for sc in all_scenes}
    assert counts == ({1} if kind == "single" else {1, 2, 3})


def test_single_object_sizes_at_32_are_10_to_18():
    assert size_range(32, "single") == (10, 18)


def test_multi_object_boxes_are_separated_by_a_pixel():
    for sc in scenes(1500, kind="multi", seed=1):
        for a, b in itertools.combinations(sc.objects, 2):
            empty_columns = max(b.x0 - (a.x0 + a.size), a.x0 - (b.x0 + b.size))
            empty_rows = max(b.y0 - (a.y0 + a.size), a.y0 - (b.y0 + b.size))
            assert max(empty_columns, empty_rows) >= 1


def test_render_paints_exact_colors_and_segmentation():
    sc = Scene((ShapeObject(2, 4, 3, 5, 9), ShapeObject(0, 1, 20, 20, 10)), 32)
    image, seg = render(sc)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert seg.dtype == np.int64 and seg.shape == (32, 32)
    assert (seg[5:14, 3:12] == 1 + 16).sum() == object_mask("triangle", 9).sum()
    assert (image[seg == 17] == COLORS["magenta"]).all()
    assert (image[seg == 2] == COLORS["green"]).all()
    assert (image[seg == 0] == BACKGROUND).all()
    assert (seg > 0).sum() == object_mask("triangle", 9).sum() + object_mask("circle", 10).sum()


def test_caption_examples():
    red_circle = ShapeObject(0, 0, 1, 1, 8)
    blue_square = ShapeObject(1, 2, 12, 1, 8)
    green_triangle = ShapeObject(2, 1, 23, 1, 8)
    assert caption(Scene((red_circle,), 32)) == "a red circle"
    assert caption(Scene((blue_square, red_circle), 32)) == "a red circle and a blue square"
    assert (caption(Scene((green_triangle, red_circle, blue_square), 32))
            == "a red circle, a blue square and a green triangle")
    # same box centre x: the upper one first
    upper, lower = ShapeObject(0, 0, 5, 0, 8), ShapeObject(1, 0, 4, 12, 10)
    assert caption(Scene((lower, upper), 32)) == "a red circle and a red square"


def test_scenes_come_in_reading_order():
    for sc in scenes(300, kind="multi", seed=2):
        assert list(sc.objects) == sorted(
            sc.objects, key=lambda o: (o.x0 + o.size / 2, o.y0 + o.size / 2))


def test_sample_mask_is_a_large_rectangle_or_an_object_box():
    kinds = set()
    for k, sc in enumerate(scenes(600, kind="multi", seed=3)):
        mask = sample_mask(RNG(k), sc)
        assert mask.dtype == np.float32 and mask.shape == (1, 32, 32)
        ys, xs = np.nonzero(mask[0])
        assert set(np.unique(mask)) == {0.0, 1.0}
        assert mask[0, ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # a rectangle
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        is_box = any(box == (o.x0, o.y0, o.x0 + o.size, o.y0 + o.size) for o in sc.objects)
        kinds.add(is_box)
        assert is_box or 0.2 <= mask.mean() <= 0.6
    assert kinds == {True, False}


def test_recolor_changes_one_color_only():
    for k, sc in enumerate(scenes(200, kind="multi", seed=4)):
        ref = recolor(RNG(k), sc)
        changed = [(a, b) for a, b in zip(sc.objects, ref.objects) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert (a.shape, a.x0, a.y0, a.size) == (b.shape, b.x0, b.y0, b.size) and a.color != b.color


# ---------------------------------------------------------------------------------------- dataset

EXPECTED = {  # key: (dtype, per-sample shape at R = 32, or None for ragged / str)
    "image": (torch.float32, (3, 32, 32)),
    "reference_image": (torch.float32, (3, 32, 32)),
    "low_res": (torch.float32, (3, 8, 8)),
    "class_label": (torch.int64, ()),
    "segmentation": (torch.int64, (32, 32)),
    "mask": (torch.float32, (1, 32, 32)),
}


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_items_have_every_key_with_documented_shapes(kind):
    world = ShapesWorld(kind=kind, size=100)
    assert len(world) == 100 and world.resolution == 32 and world.class_names == CLASS_NAMES
    for i in range(0, 100, 7):
        item = world[i]
        assert set(item) == set(world.provides)
        for key, (dtype, shape) in EXPECTED.items():
            assert item[key].dtype == dtype and tuple(item[key].shape) == shape, key
        for key in ("image", "reference_image", "low_res"):
            assert item[key].min() >= -1 and item[key].max() <= 1
        n = item["boxes"].shape[0]
        assert item["boxes"].dtype == torch.float32 and item["boxes"].shape == (n, 4)
        assert item["box_labels"].dtype == torch.int64 and item["box_labels"].shape == (n,)
        assert n == 1 if kind == "single" else 1 <= n <= 3
        assert ((item["boxes"] >= 0) & (item["boxes"] <= 1)).all()
        assert item["class_label"] == item["box_labels"][0]
        assert isinstance(item["caption"], str) and item["caption"].startswith("a ")
        classes = {0, *(1 + item["box_labels"]).tolist()}
        assert set(item["segmentation"].unique().tolist()) == classes


def test_item_matches_its_scene():
    world = ShapesWorld(kind="multi", size=50, seed=7)
    for i in range(50):
        sc, item = world.scene(i), world[i]
        image, seg = render(sc)
        expected = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)
        assert torch.equal(item["segmentation"], torch.from_numpy(seg))
        assert item["caption"] == caption(sc)
        assert torch.equal(item["box_labels"], torch.tensor([o.label for o in sc.objects]))


def test_low_res_is_the_4x4_block_mean():
    batch = ShapesWorld(kind="multi", size=20).batch(range(20))
    image = batch["image"].numpy()
    expected = image.reshape(20, 3, 8, 4, 8, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(batch["low_res"].numpy(), expected, atol=1e-6)


def test_reference_image_is_the_scene_with_one_object_recolored():
    world = ShapesWorld(kind="multi", size=40, seed=5)
    batch = world.batch(range(40))
    for b in range(40):
        differs = (batch["image"][b] != batch["reference_image"][b]).any(0).numpy()
        pixels = []  # each object's pixels
        for o in world.scene(b).objects:
            pixels.append(np.zeros((32, 32), dtype=bool))
            pixels[-1][o.y0:o.y0 + o.size, o.x0:o.x0 + o.size] = object_mask(o.shape, o.size)
        assert sum((differs == p).all() for p in pixels) == 1  # all of one object, nothing else


def assert_items_equal(x, y):
    assert set(x) == set(y)
    for key in x:
        assert (x[key] == y[key]) if key == "caption" else torch.equal(x[key], y[key]), key


def test_determinism():
    a, b = ShapesWorld(kind="multi", seed=3), ShapesWorld(kind="multi", seed=3)
    for i in (0, 5, 23_999):
        assert_items_equal(a[i], b[i])
    assert_items_equal(a[-1], a[23_999])
    # item i does not depend on which other items are drawn, or in which order
    batch = a.batch([9, 2, 5])
    assert_items_equal({key: value[2] for key, value in batch.items()}, a[5])
    other = ShapesWorld(kind="multi", seed=4)
    assert not torch.equal(a.batch(range(20))["image"], other.batch(range(20))["image"])


def test_out_of_range_index_raises():
    world = ShapesWorld(size=10)
    with pytest.raises(IndexError):
        world[10]
    with pytest.raises(ValueError):
        ShapesWorld(kind="crowd")


def test_collate_matches_batch_and_works_in_a_dataloader():
    world = ShapesWorld(kind="multi", size=12)
    loader = torch.utils.data.DataLoader(world, batch_size=6, collate_fn=collate)
    collated = next(iter(loader))
    batch = world.batch(range(6))
    assert set(collated) == set(batch)
    for key, value in batch.items():
        if key in ("caption",):
            assert collated[key] == value
        elif key in ("boxes", "box_labels"):
            assert all(torch.equal(p, q) for p, q in zip(collated[key], value))
        else:
            assert torch.equal(collated[key], value), key


def test_64_pixel_world():
    item = ShapesWorld(resolution=64, kind="multi", size=5)[0]
    assert item["image"].shape == (3, 64, 64) and item["low_res"].shape == (3, 16, 16)
    assert item["mask"].shape == (1, 64, 64) and item["segmentation"].shape == (64, 64)


def test_reader_is_exposed_for_data_info():
    from ldmcore.data.base import data_info
    info = data_info(ShapesWorld())
    assert info.resolution == 32 and "caption" in info.provides and len(info.class_names) == 18
    assert hasattr(info.reader, "read_objects")
