"""The map-style base of the real data sources (image folder, COCO, tar shards): items decoded on
demand into the batch keys of the shapes world, bad items skipped, counted and replaced.

A bad item is replaced by the next good one (cyclically), always the same one, so that
``batch([i])`` returns the same data every time it is asked: the training's latent pool, encoded
once from ``batch``, and the conditions drawn by later ``batch`` calls stay in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import reduce

from ldmcore.data.annotations import LOW_RES_FACTOR, check_inside
from ldmcore.data.images import CenterCrop, ImageProblem, read_image, read_label_map
from ldmcore.data.skips import BadSample, DataError, SkipLog

# Keys every real source yields: the image, its 4x reduction and a region to inpaint.
ALWAYS = ("image", "low_res", "mask")
MASK_AREA = (0.2, 0.6)  # a random inpainting rectangle covers 20-60 % of the image (as in the shapes world)


@dataclass
class Record:
    """One item before decoding. Boxes are source pixels ``[x, y, w, h]``, already checked.

    segmentation  ``render(crop) -> int64 R x R`` (0 = background, 1 + label), raising BadSample
    size          (width, height) that the annotations were made for, checked against the file
    """

    name: str
    image: Path | bytes
    caption: str | None = None
    boxes: list[tuple[float, float, float, float]] | None = None
    box_labels: list[int] | None = None
    class_label: int | None = None
    segmentation: Callable[[CenterCrop], np.ndarray] | None = None
    mask: Path | bytes | None = None
    size: tuple[int, int] | None = None


def decode(record: Record, resolution: int, small_images: str) -> dict:
    """A record -> one sample of numpy arrays at the training resolution (raises BadSample):
    image uint8 R x R x 3, boxes float32 n x 4 normalized (boxes the crop cuts away are
    dropped), box_labels int64 n, segmentation int64 R x R, mask float32 1 x R x R, and the
    record's caption / class_label as they are."""
    try:
        image, crop = read_image(record.image, resolution, small_images)
    except ImageProblem as problem:
        raise BadSample(problem.reason, record.name, "image", str(problem)) from None
    if record.size is not None and record.size != (crop.width, crop.height):
        raise BadSample("image_size", record.name, "image", f"the file is {crop.width}x{crop.height}, "
                                                           f"the annotations say {record.size[0]}x{record.size[1]}")
    sample: dict = {"image": image}
    if record.caption is not None:
        sample["caption"] = record.caption
    if record.class_label is not None:
        sample["class_label"] = record.class_label
    if record.boxes is not None:
        check_inside(record.boxes, crop.width, crop.height, record.name)
        kept = [(crop.box(*b), label) for b, label in zip(record.boxes, record.box_labels)]
        kept = [(b, label) for b, label in kept if b is not None]
        sample["boxes"] = np.array([b for b, _ in kept], dtype=np.float32).reshape(-1, 4)
        sample["box_labels"] = np.array([label for _, label in kept], dtype=np.int64)
    if record.segmentation is not None:
        sample["segmentation"] = record.segmentation(crop)
    if record.mask is not None:
        try:
            sample["mask"] = (read_label_map(record.mask, crop, "mask") > 0).astype(np.float32)[None]
        except ImageProblem as problem:
            raise BadSample(problem.reason, str(record.mask), "mask", str(problem)) from None
    return sample


def random_mask(rng: np.random.Generator, resolution: int, boxes: np.ndarray) -> np.ndarray:
    """Float32 1 x R x R, 1 = the region to generate: with probability 1/2 (when the item has
    boxes) one object's box, otherwise a random rectangle covering 20-60 % of the image."""
    r = resolution
    mask = np.zeros((1, r, r), dtype=np.float32)
    if len(boxes) and rng.random() < 0.5:
        x0, y0, x1, y1 = boxes[rng.integers(len(boxes))]
        mask[0, math.floor(y0 * r):math.ceil(y1 * r), math.floor(x0 * r):math.ceil(x1 * r)] = 1
        return mask
    low, high = MASK_AREA[0] * r * r, MASK_AREA[1] * r * r
    width = int(rng.integers(math.ceil(low / r), r + 1))
    height = int(rng.integers(math.ceil(low / width), min(r, math.floor(high / width)) + 1))
    x0, y0 = int(rng.integers(r - width + 1)), int(rng.integers(r - height + 1))
    mask[0, y0:y0 + height, x0:x0 + width] = 1
    return mask


def read_segmentation(source: Path | bytes, name: str, num_classes: int) -> Callable[[CenterCrop], np.ndarray]:
    """The renderer of an index-PNG segmentation map: values 0 (background) .. num_classes
    (1 + label); a map of another size or with other values is a BadSample."""

    def render(crop: CenterCrop) -> np.ndarray:
        try:
            return read_label_map(source, crop, "segmentation", max_value=num_classes)
        except ImageProblem as problem:
            raise BadSample(problem.reason, name, "segmentation", str(problem)) from None

    return render


NO_BOXES = np.zeros((0, 4), dtype=np.float32)


def to_batch(samples: list[dict], masks: list[np.ndarray], provides: Sequence[str]) -> dict:
    """Decoded samples (see ``decode``) and their masks -> a batch keyed as ``provides``:

    image         float32 B x 3 x R x R in [-1, 1]
    low_res       float32 B x 3 x R/4 x R/4, 4x4 block means of image
    mask          float32 B x 1 x R x R, 1 = region to generate
    caption       list of B str
    boxes         list of B float32 n x 4, normalized [x0, y0, x1, y1]; box_labels list of B int64 n
    segmentation  int64 B x R x R, 0 = background, 1 + label
    class_label   int64 B
    """
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2)
    image = images.float().div_(127.5).sub_(1.0)  # 0 -> -1, 255 -> 1
    out: dict = {"image": image,
                 "low_res": reduce(image, "b c (h p) (w q) -> b c h w", "mean", p=LOW_RES_FACTOR, q=LOW_RES_FACTOR),
                 "mask": torch.from_numpy(np.stack(masks))}
    if "caption" in provides:
        out["caption"] = [s["caption"] for s in samples]
    if "boxes" in provides:
        out["boxes"] = [torch.from_numpy(s["boxes"]) for s in samples]
        out["box_labels"] = [torch.from_numpy(s["box_labels"]) for s in samples]
    if "segmentation" in provides:
        out["segmentation"] = torch.from_numpy(np.stack([s["segmentation"] for s in samples])).long()
    if "class_label" in provides:
        out["class_label"] = torch.tensor([s["class_label"] for s in samples], dtype=torch.int64)
    return out


class RealSource(torch.utils.data.Dataset):
    """A finite real data source over decoded-on-demand items.

    Subclasses fill ``records`` (or override ``_decode``), ``provides`` and ``class_names``;
    they record the items they dropped while reading their annotations in ``skips`` and count
    every item they were given in ``items_given``.
    """

    reader = None  # no exact evaluator for real images

    def __init__(self, name: str, resolution: int, class_names: Sequence[str], small_images: str,
                 max_skip_fraction: float, seed: int):
        self.resolution, self.class_names = resolution, tuple(class_names)
        self.small_images, self.seed = small_images, seed
        self.skips = SkipLog(name, max_skip_fraction)
        self.records: list[Record] = []
        self.provides: tuple[str, ...] = ALWAYS
        self.items_given = 0
        self._bad: set[int] = set()

    def _ready(self) -> None:
        """End of a subclass's constructor: enforce the skip fraction on what reading dropped."""
        self.skips.check(self.items_given)
        if len(self) == 0:
            raise DataError(f"{self.skips.source}: no usable item ({self.items_given} given"
                            f"{'; ' + self.skips.describe() if self.skips.total else ''})")

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, i: int) -> dict:
        return decode(self.records[i], self.resolution, self.small_images)

    def sample(self, i: int) -> dict:
        """Item i decoded, or, if it is bad (skipped and counted the first time), the next good
        item after it; DataError once the skips pass ``data.max_skip_fraction``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        j = i % n
        for _ in range(n):
            if j not in self._bad:
                try:
                    return self._decode(j)
                except BadSample as bad:
                    self._bad.add(j)
                    self.skips.record(bad.skip)
                    self.skips.check(self.items_given)
            j = (j + 1) % n
        raise DataError(f"{self.skips.source}: none of its {n} items can be read: {self.skips.describe()}")

    def __getitem__(self, i: int) -> dict:
        """One sample; shapes as in ``batch`` without the batch dimension."""
        return {key: value[0] for key, value in self.batch([i]).items()}

    def batch(self, indices) -> dict:
        """A collated batch of the given items (see ``to_batch``); a bad item is replaced."""
        indices = [int(i) for i in indices]
        samples = [self.sample(i) for i in indices]
        masks = [s["mask"] if "mask" in s else
                 random_mask(np.random.default_rng([self.seed, i % len(self)]), self.resolution, s.get("boxes", NO_BOXES))
                 for i, s in zip(indices, samples)]
        return to_batch(samples, masks, self.provides)

    def values(self, key: str, limit: int | None = None) -> list:
        """The values of ``key`` over the first ``limit`` items. Captions and class labels come
        from the annotations without decoding an image (a bad item's still counts: they only
        fit tokenizers and the like); other keys are decoded."""
        n = len(self) if limit is None else min(int(limit), len(self))
        if key in ("caption", "class_label") and self.records:
            return [getattr(record, key) for record in self.records[:n]]
        return [value for start in range(0, n, 256) for value in self.batch(range(start, min(start + 256, n)))[key]]
