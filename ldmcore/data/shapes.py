"""The shapes world, version 1 (docs: /work/shared/SHAPES.md): an embedded, deterministic data
source whose images can be read back exactly (``ldmcore.evaluation.shapes_reader``).

A scene is a few flat-colored circles, squares and triangles on a gray background. Everything here
is numpy until ``ShapesWorld.batch`` converts a whole batch to tensors at once, which keeps
rendering 24,000 scenes to a few seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from einops import reduce

SHAPES = ("circle", "square", "triangle")
# Reserved for unseen-concept experiments; only drawn when explicitly asked for. Its shape index
# is 3, so its labels (18..23) lie outside the 18 classes of version 1.
RESERVED_SHAPES = ("star",)
ALL_SHAPES = SHAPES + RESERVED_SHAPES
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND = (200, 200, 200)
# label = 6 * shape + color
CLASS_NAMES = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)

# Object side as a fraction of the resolution, rounded to whole pixels: the spec's "10..18 px at
# 32" for single-object scenes is round(0.31*32)..round(0.56*32).
SIZE_FRACTIONS = {"single": (0.31, 0.56), "multi": (0.22, 0.44)}
MAX_OBJECTS = 3  # multi-object scenes hold 1..MAX_OBJECTS objects
LOW_RES_FACTOR = 4
DATA_KEYS = (
    "image", "class_label", "caption", "boxes", "box_labels",
    "segmentation", "mask", "low_res", "reference_image",
)

_PALETTE = np.array(list(COLORS.values()), dtype=np.uint8)  # (6, 3)


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape`` indexes ALL_SHAPES, ``color`` COLOR_NAMES; its box is the square
    [x0, x0+size) x [y0, y0+size) in pixels."""

    shape: int
    color: int
    x0: int
    y0: int
    size: int

    @property
    def label(self) -> int:
        return self.shape * len(COLORS) + self.color

    @property
    def name(self) -> str:
        return f"{COLOR_NAMES[self.color]} {ALL_SHAPES[self.shape]}"

    def box(self, resolution: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) normalized to [0, 1]; x1, y1 exclusive."""
        r = resolution
        return (self.x0 / r, self.y0 / r, (self.x0 + self.size) / r, (self.y0 + self.size) / r)

    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    resolution: int


# --------------------------------------------------------------------------------------- geometry

def _shape_name(shape: int | str) -> str:
    name = ALL_SHAPES[shape] if isinstance(shape, (int, np.integer)) else shape
    if name not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")
    return name


def _star_polygon() -> np.ndarray:
    """Vertices (u, v) of a five-pointed star, point up, as wide as its box, centred vertically."""
    outer = 0.5 / np.sin(np.deg2rad(72))  # the two side points touch u = 0 and u = 1
    inner = outer * np.sin(np.deg2rad(18)) / np.sin(np.deg2rad(126))  # regular pentagram
    angles = np.deg2rad(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    height = outer * (1 + np.cos(np.deg2rad(36)))
    cy = (1 - height) / 2 + outer
    return np.stack([0.5 + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for (ua, va), (ub, vb) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (va > v) != (vb > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            u_cross = ua + (v - va) * (ub - ua) / (vb - va)
        inside ^= crosses & (u < u_cross)
    return inside


@lru_cache(maxsize=None)
def ideal_mask(shape: int | str, width: int, height: int) -> np.ndarray:
    """Bool (height, width) pixel set of the ideal shape drawn into a width x height box.

    Geometry section of the spec with per-axis box coordinates u = (x+0.5)/width,
    v = (y+0.5)/height. Circle and triangle are tested in exact integer arithmetic, so no pixel
    centre falls on the wrong side of an edge by rounding. Cached; the array is read-only.
    """
    name = _shape_name(shape)
    w, h = int(width), int(height)
    x = np.arange(w, dtype=np.int64)[None, :]
    y = np.arange(h, dtype=np.int64)[:, None]
    dx, dy = 2 * x + 1 - w, 2 * y + 1 - h  # 2*(pixel centre - box centre), in pixels
    if name == "square":
        mask = np.ones((h, w), dtype=bool)
    elif name == "circle":  # (u-.5)^2 + (v-.5)^2 <= 1/4
        mask = dx**2 * h**2 + dy**2 * w**2 <= w**2 * h**2
    elif name == "triangle":  # |u-.5| <= v/2, apex at top centre
        mask = 2 * h * np.abs(dx) <= w * (2 * y + 1)
    else:  # star
        u, v = (x + 0.5) / w, (y + 0.5) / h
        mask = _inside_polygon(u, v, _star_polygon())
    mask = np.ascontiguousarray(np.broadcast_to(mask, (h, w)))
    mask.setflags(write=False)
    return mask


def object_mask(shape: int | str, size: int) -> np.ndarray:
    """Bool size x size pixel set of the ideal shape in its square box (cached, read-only)."""
    return ideal_mask(shape, size, size)


# ----------------------------------------------------------------------------------------- scenes

def size_range(resolution: int, kind: str) -> tuple[int, int]:
    """Inclusive range of object sides in pixels for a scene kind at a resolution."""
    if kind not in SIZE_FRACTIONS:
        raise ValueError(f"unknown scene kind {kind!r}; known: {', '.join(SIZE_FRACTIONS)}")
    lo, hi = SIZE_FRACTIONS[kind]
    return round(lo * resolution), round(hi * resolution)


def _separated(a: ShapeObject, b: ShapeObject) -> bool:
    """At least one empty pixel row or column between the two boxes."""
    return (a.x0 + a.size < b.x0 or b.x0 + b.size < a.x0
            or a.y0 + a.size < b.y0 or b.y0 + b.size < a.y0)


def reading_order(objects: Sequence[ShapeObject]) -> list[ShapeObject]:
    """Left to right by box centre x, ties by centre y (the caption's order)."""
    return sorted(objects, key=lambda o: (o.x0 * 2 + o.size, o.y0 * 2 + o.size))


def _uniform_int(u: float, n: int) -> int:
    """A uniform draw from 0..n-1, given a uniform draw u from [0, 1)."""
    return min(int(u * n), n - 1)


def sample_scene(rng: np.random.Generator, resolution: int = 32, kind: str = "single",
                 shapes: Sequence[str] = SHAPES) -> Scene:
    """A random scene: one object ("single") or 1..3 separated objects ("multi").

    Objects are returned in reading order, so the first object is the caption's first. Pass
    ``shapes=("star",)`` (or any subset of ALL_SHAPES) to draw the reserved shape.
    """
    lo, hi = size_range(resolution, kind)
    shape_ids = [ALL_SHAPES.index(_shape_name(s)) for s in shapes]
    n = 1 if kind == "single" else 1 + _uniform_int(rng.random(), MAX_OBJECTS)
    objects: list[ShapeObject] = []
    while len(objects) < n:  # rejection sampling; 3 objects of <= 0.44 R always fit quickly
        u = rng.random(5)  # one generator call per candidate: scalar calls dominate the cost
        size = lo + _uniform_int(u[0], hi - lo + 1)
        candidate = ShapeObject(
            shape=shape_ids[_uniform_int(u[1], len(shape_ids))],
            color=_uniform_int(u[2], len(COLORS)),
            x0=_uniform_int(u[3], resolution - size + 1),
            y0=_uniform_int(u[4], resolution - size + 1),
            size=size,
        )
        if all(_separated(candidate, other) for other in objects):
            objects.append(candidate)
    return Scene(tuple(reading_order(objects)), resolution)


def _paint(scene: Scene, image: np.ndarray, segmentation: np.ndarray | None = None) -> None:
    """Draw the scene's objects onto a background-filled H x W x 3 image (any strided view) and,
    if given, their 1 + label onto a zeroed segmentation. Each object touches only its box."""
    for o in scene.objects:
        inside = object_mask(o.shape, o.size)
        window = np.s_[o.y0:o.y0 + o.size, o.x0:o.x0 + o.size]
        image[window][inside] = COLORS[COLOR_NAMES[o.color]]
        if segmentation is not None:
            segmentation[window][inside] = 1 + o.label


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 R x R x 3, segmentation int64 R x R: 0 = background, 1 + label on objects)."""
    r = scene.resolution
    image = np.empty((r, r, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    segmentation = np.zeros((r, r), dtype=np.int64)
    _paint(scene, image, segmentation)
    return image, segmentation


def join_caption(names: Sequence[str]) -> str:
    """["red circle", "blue square", "green triangle"] -> "a red circle, a blue square and a green
    triangle"."""
    phrases = [f"a {name}" for name in names]
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """The objects left to right by box centre x (ties by y): "a red circle and a blue square"."""
    return join_caption([o.name for o in reading_order(scene.objects)])


def _mask_window(rng: np.random.Generator, scene: Scene) -> tuple[slice, slice]:
    """(rows, columns) of the region to generate; see ``sample_mask``."""
    r = scene.resolution
    if scene.objects and rng.random() < 0.5:
        o = scene.objects[_uniform_int(rng.random(), len(scene.objects))]
        return slice(o.y0, o.y0 + o.size), slice(o.x0, o.x0 + o.size)
    area_lo, area_hi = 0.2 * r * r, 0.6 * r * r
    u = rng.random(4)
    # width first, then a height that puts the area in range; every such width admits one
    w_lo = int(np.ceil(area_lo / r))
    width = w_lo + _uniform_int(u[0], r - w_lo + 1)
    h_lo, h_hi = int(np.ceil(area_lo / width)), min(r, int(np.floor(area_hi / width)))
    height = h_lo + _uniform_int(u[1], h_hi - h_lo + 1)
    x0, y0 = _uniform_int(u[2], r - width + 1), _uniform_int(u[3], r - height + 1)
    return slice(y0, y0 + height), slice(x0, x0 + width)


def sample_mask(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Float32 1 x R x R, 1 = the region to generate.

    With probability 1/2 (and always for a scene without objects) a random axis-aligned rectangle
    covering 20-60 % of the image, otherwise one object's box (object removal / insertion).
    """
    r = scene.resolution
    mask = np.zeros((1, r, r), dtype=np.float32)
    mask[(0, *_mask_window(rng, scene))] = 1
    return mask


def recolor(rng: np.random.Generator, scene: Scene) -> Scene:
    """The same scene with one random object given a different random color."""
    if not scene.objects:
        return scene
    u = rng.random(2)
    i = _uniform_int(u[0], len(scene.objects))
    old = scene.objects[i]
    shift = 1 + _uniform_int(u[1], len(COLORS) - 1)  # any color but the old one
    new = dataclasses.replace(old, color=(old.color + shift) % len(COLORS))
    return dataclasses.replace(scene, objects=scene.objects[:i] + (new,) + scene.objects[i + 1:])


# ---------------------------------------------------------------------------------------- dataset

def _to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0)  # 0 -> -1, 255 -> 1 exactly


def _background(n: int, resolution: int) -> np.ndarray:
    """uint8 (n, 3, R, R) filled with the background color."""
    images = np.empty((n, 3, resolution, resolution), dtype=np.uint8)
    images[:] = np.array(BACKGROUND, dtype=np.uint8)[:, None, None]
    return images


class ShapesWorld(torch.utils.data.Dataset):
    """The shapes world as a map-style dataset.

    Item i is a pure function of (seed, i): it draws from ``np.random.default_rng([seed, i])``
    the scene, then the inpainting mask, then the recolored reference scene.
    ``kind`` is "single" (class task; one object) or "multi" (1..3 objects).
    """

    provides = DATA_KEYS
    class_names = CLASS_NAMES

    def __init__(self, resolution: int = 32, kind: str = "single", size: int = 24_000,
                 seed: int = 0):
        if resolution % LOW_RES_FACTOR:
            raise ValueError(f"resolution must be a multiple of {LOW_RES_FACTOR}, got {resolution}")
        size_range(resolution, kind)  # validates kind
        self.resolution, self.kind, self.size, self.seed = resolution, kind, size, seed

    @property
    def reader(self):
        """The exact evaluator module for these images (see ldmcore.data.base.DataInfo)."""
        from ldmcore.evaluation import shapes_reader
        return shapes_reader

    def __len__(self) -> int:
        return self.size

    def _draw(self, i: int) -> tuple[Scene, tuple[slice, slice], Scene]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} items")
        rng = np.random.default_rng([self.seed, i % self.size])
        scene = sample_scene(rng, self.resolution, self.kind)
        return scene, _mask_window(rng, scene), recolor(rng, scene)

    def scene(self, i: int) -> Scene:
        """The scene of item i."""
        return self._draw(i)[0]

    def __getitem__(self, i: int) -> dict:
        """One sample; shapes as in ``batch`` without the batch dimension."""
        batch = self.batch([i])
        return {key: value[0] for key, value in batch.items()}

    def batch(self, indices) -> dict:
        """A collated batch of the given items.

        image, reference_image  float32 B x 3 x R x R in [-1, 1]
        low_res                 float32 B x 3 x R/4 x R/4, 4x4 block means of image
        class_label             int64 B (the first object's label in reading order)
        segmentation            int64 B x R x R, 0 = background, 1 + label
        mask                    float32 B x 1 x R x R, 1 = region to generate
        caption                 list of B str
        boxes, box_labels       lists of B tensors: float32 n x 4 normalized, int64 n
        """
        n, r = len(indices), self.resolution
        images, references = _background(n, r), _background(n, r)
        segmentations = np.zeros((n, r, r), dtype=np.int64)
        masks = np.zeros((n, 1, r, r), dtype=np.float32)
        captions, boxes, box_labels = [], [], []
        for b, i in enumerate(indices):
            scene, (rows, cols), reference = self._draw(int(i))
            _paint(scene, images[b].transpose(1, 2, 0), segmentations[b])
            _paint(reference, references[b].transpose(1, 2, 0))
            masks[b, 0, rows, cols] = 1
            captions.append(caption(scene))
            boxes.append(torch.tensor([o.box(r) for o in scene.objects],
                                      dtype=torch.float32).reshape(-1, 4))
            box_labels.append(torch.tensor([o.label for o in scene.objects], dtype=torch.int64))
        image = _to_unit_range(images)
        return {
            "image": image,
            "class_label": torch.stack([labels[0] for labels in box_labels]),
            "caption": captions,
            "boxes": boxes,
            "box_labels": box_labels,
            "segmentation": torch.from_numpy(segmentations),
            "mask": torch.from_numpy(masks),
            "low_res": reduce(image, "b c (h p) (w q) -> b c h w", "mean",
                              p=LOW_RES_FACTOR, q=LOW_RES_FACTOR),
            "reference_image": _to_unit_range(references),
        }


_RAGGED_KEYS = ("caption", "boxes", "box_labels")


def collate(samples: list[dict]) -> dict:
    """Collate samples of ``ShapesWorld.__getitem__`` (a DataLoader ``collate_fn``): tensors are
    stacked; caption, boxes and box_labels stay lists (boxes are ragged)."""
    return {key: [s[key] for s in samples] if key in _RAGGED_KEYS
            else torch.stack([s[key] for s in samples])
            for key in samples[0]}
