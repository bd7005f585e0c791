"""The exact evaluator reads version-1 images back and rejects what is not a shape."""

import math

import numpy as np
import pytest
import torch

from ldmcore.data.shapes import (
    COLORS, SHAPES, Scene, ShapeObject, ShapesWorld, object_mask, recolor, render, size_range,
)
from ldmcore.evaluation.shapes_reader import (
    box_recall, caption_correct, class_correct, min_area, palette_map, psnr, read_batch,
    read_objects, readable, segmentation_scores,
)


def pixel_box(o: ShapeObject) -> tuple[int, int, int, int]:
    """Bounding box of the pixels an object really covers: its box, except that an even-sized
    triangle has no pixel centre near its apex and starts one row lower."""
    ys, xs = np.nonzero(object_mask(o.shape, o.size))
    return (o.x0 + xs.min(), o.y0 + ys.min(), o.x0 + xs.max() + 1, o.y0 + ys.max() + 1)


def assert_reads_back(world, images, indices):
    """Every object of every scene read back with its shape, color and box, and nothing else."""
    for read, i in zip(read_batch(images), indices):
        scene = world.scene(i)
        assert [(o.shape, o.color, o.box) for o in read] == [
            (SHAPES[o.shape], list(COLORS)[o.color], pixel_box(o)) for o in scene.objects], i
        assert all(o.valid for o in read)


@pytest.mark.parametrize("resolution, kind, n", [
    (32, "single", 3000), (32, "multi", 3000), (64, "single", 500), (64, "multi", 500),
])
def test_reads_back_every_object_of_real_renders(resolution, kind, n):
    world = ShapesWorld(resolution=resolution, kind=kind, size=n, seed=11)
    for start in range(0, n, 500):
        indices = range(start, min(n, start + 500))
        batch = world.batch(indices)
        assert_reads_back(world, batch["image"], indices)
        for read, b in zip(read_batch(batch["image"]), range(len(indices))):
            assert caption_correct(read, batch["caption"][b])
            assert box_recall(read, batch["boxes"][b], batch["box_labels"][b], resolution) == 1.0
            if kind == "single":
                assert class_correct(read, batch["class_label"][b])


def test_reads_uint8_renders_and_float_tensors_alike():
    world = ShapesWorld(kind="multi", size=50, seed=1)
    batch = world.batch(range(50))
    for i in range(50):
        image, _ = render(world.scene(i))
        assert read_objects(image) == read_objects(batch["image"][i])
    uint8_batch = np.stack([render(world.scene(i))[0] for i in range(50)])
    assert read_batch(uint8_batch) == read_batch(batch["image"])


def test_even_triangles_read_with_their_pixel_box():
    image, _ = render(Scene((ShapeObject(2, 0, 4, 4, 10),), 32))
    (o,) = read_objects(image)
    assert (o.shape, o.color, o.box, o.valid) == ("triangle", "red", (4, 5, 14, 14), True)
    assert 0.75 <= o.iou < 1


def test_survives_small_noise():
    world = ShapesWorld(kind="multi", size=500, seed=2)
    images = world.batch(range(500))["image"]
    noisy = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * (
        2 * 10 / 255)  # std 10 on the 0..255 scale
    assert_reads_back(world, noisy.clamp(-1, 1), range(500))


# ------------------------------------------------------------------------------------- rejections

def paint(mask: np.ndarray, color=(255, 0, 0)) -> np.ndarray:
    image = np.full((*mask.shape, 3), 200, dtype=np.uint8)
    image[mask] = color
    return image


def test_blank_image_has_no_objects():
    assert read_objects(np.full((32, 32, 3), 200, dtype=np.uint8)) == []
    assert not readable([])


def test_rejects_shapes_that_are_not_shapes():
    yy, xx = np.mgrid[:32, :32]
    dx, dy = abs(xx - 15.5), abs(yy - 15.5)
    plus = ((dx < 2) & (dy < 8)) | ((dy < 2) & (dx < 8))
    ring = (np.hypot(xx - 15.5, yy - 15.5) <= 8) & (np.hypot(xx - 15.5, yy - 15.5) > 5)
    walk = np.zeros((32, 32), dtype=bool)  # a ragged blob: a random walk, thickened
    rng, y, x = np.random.default_rng(0), 16, 16
    for _ in range(120):
        dy, dx = [(0, 1), (0, -1), (1, 0), (-1, 0)][rng.integers(4)]
        y, x = np.clip(y + dy, 4, 27), np.clip(x + dx, 4, 27)
        walk[y - 1:y + 1, x - 1:x + 1] = True
    bar = np.zeros((32, 32), dtype=bool)
    bar[10:16, 4:28] = True  # aspect 4: not a box a shape can have
    for blob in (plus, ring, walk, bar):
        objects = read_objects(paint(blob))
        assert objects and not any(o.valid for o in objects) and not readable(objects)
        assert all(o.color == "red" and o.shape is None for o in objects)


def test_rejects_mixed_colors_and_noise():
    image, _ = render(Scene((ShapeObject(1, 0, 4, 4, 12),), 32))
    image[4:10, 4:16] = COLORS["blue"]  # half the square blue: no color covers 75 %
    (o,) = read_objects(image)
    assert o.color is None and o.shape == "square" and not o.valid
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert not any(o.valid for o in read_objects(noise))
    noise_batch = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert not any(o.valid for objects in read_batch(noise_batch) for o in objects)


def test_drops_specks_below_min_area():
    for resolution in (32, 64):
        side = size_range(resolution, "multi")[0]
        smallest = min(object_mask(s, side).sum() for s in SHAPES)
        assert 1 <= min_area(resolution) <= smallest / 4
    speck = np.zeros((32, 32), dtype=bool)
    speck[3:5, 3:5] = True  # 4 px < min_area(32) = 6
    assert read_objects(paint(speck)) == []


# ----------------------------------------------------------------------------------------- scores

def two_object_scene():
    return Scene((ShapeObject(0, 0, 2, 2, 10), ShapeObject(1, 2, 18, 12, 12)), 32)


def test_class_and_caption_scores():
    single = Scene((ShapeObject(1, 2, 8, 8, 12),), 32)  # "blue square" = 8
    objects = read_objects(render(single)[0])
    assert readable(objects) and class_correct(objects, 8) and not class_correct(objects, 2)
    assert caption_correct(objects, "a blue square")
    assert not caption_correct(objects, "a red square")
    wrong = read_objects(render(recolor(np.random.default_rng(0), single))[0])
    assert readable(wrong) and not class_correct(wrong, 8)

    both = read_objects(render(two_object_scene())[0])
    assert caption_correct(both, "a red circle and a blue square")
    assert not caption_correct(both, "a blue square and a red circle")
    assert not class_correct(both, 0)  # two objects is not the single requested one


def test_box_recall():
    scene = two_object_scene()
    boxes = torch.tensor([o.box(32) for o in scene.objects])
    labels = torch.tensor([o.label for o in scene.objects])
    objects = read_objects(render(scene)[0])
    assert box_recall(objects, boxes, labels, 32) == 1.0
    assert box_recall(objects, boxes, torch.tensor([0, 9]), 32) == 0.5  # second label wrong
    assert box_recall(objects, boxes + 0.3, labels, 32) == 0.0  # boxes elsewhere
    assert box_recall(objects[:1], boxes, labels, 32) == 0.5  # one object missing
    assert box_recall([], boxes[:0], labels[:0], 32) == 1.0  # nothing to recall


def test_segmentation_scores():
    scene = two_object_scene()
    image, seg = render(scene)
    assert segmentation_scores(image, seg) == {"pixel_accuracy": 1.0, "miou": 1.0}
    world = ShapesWorld(kind="multi", size=8)
    batch = world.batch(range(8))  # batched and float images
    assert segmentation_scores(batch["image"], batch["segmentation"]) == {
        "pixel_accuracy": 1.0, "miou": 1.0}

    recolored = ShapeObject(0, 1, 2, 2, 10)  # red circle -> green circle
    other, _ = render(Scene((recolored, scene.objects[1]), 32))
    scores = segmentation_scores(other, seg)
    circle = object_mask("circle", 10).sum()
    assert scores["pixel_accuracy"] == pytest.approx(1 - circle / 1024)
    assert scores["miou"] == pytest.approx((1 + 1 + 0 + 0) / 4)  # background, blue, red, green

    blank = np.full((32, 32, 3), 200, dtype=np.uint8)
    assert segmentation_scores(blank, seg)["pixel_accuracy"] == pytest.approx((seg == 0).mean())


def test_palette_map():
    image, seg = render(two_object_scene())
    colors = palette_map(image)
    assert colors.shape == (32, 32)
    assert (colors == np.where(seg > 0, (seg - 1) % 6 + 1, 0)).all()


def test_psnr():
    a = torch.zeros(3, 8, 8)
    assert psnr(a, a) == math.inf  # identical: infinite, not capped
    assert psnr(a, a + 0.2) == pytest.approx(20.0)  # peak-to-peak 2: 10 log10(4 / 0.04)
    b = a.clone()
    b[:, :4] = 1.0
    inside = torch.zeros(1, 8, 8)
    inside[:, :4] = 1
    assert psnr(a, b, mask=1 - inside) == math.inf  # differences only inside the mask
    assert psnr(a, b, mask=inside) == pytest.approx(10 * math.log10(4.0))
    assert math.isnan(psnr(a, b, mask=torch.zeros(1, 8, 8)))
