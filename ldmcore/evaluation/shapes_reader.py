"""The exact evaluator of the shapes world, version 1: read an image back into objects, and the
faithfulness scores built on it (SHAPES.md, "Reading an image back").

Images are accepted in two forms: a uint8 numpy array H x W x 3 in 0..255 (what ``render`` makes),
or anything else — a torch tensor or float array — as 3 x H x W in [-1, 1] (what models make).
Leading batch dimensions are allowed where a function says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ldmcore.data.shapes import (
    BACKGROUND, COLOR_NAMES, COLORS, SHAPES, ideal_mask, join_caption, size_range,
)

PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # (7, 3); 0 = background
MIN_COLOR_SHARE = 0.75  # the majority color must cover this share of a component
MAX_ASPECT = 1.5  # of a component's bounding box
MIN_SHAPE_IOU = 0.75  # with the best ideal shape drawn into the bounding box


@dataclass(frozen=True)
class ReadObject:
    """One connected component read back.

    shape, color  names, or None where the component fails that test
    box           pixel bounding box (x0, y0, x1, y1), x1 and y1 exclusive
    area          pixels in the component
    iou           IoU of the component with its best ideal shape (0 when the box is too elongated)
    valid         color and shape both read
    """

    shape: str | None
    color: str | None
    box: tuple[int, int, int, int]
    area: int
    iou: float
    valid: bool

    @property
    def label(self) -> int | None:
        if not self.valid:
            return None
        return SHAPES.index(self.shape) * len(COLORS) + COLOR_NAMES.index(self.color)

    @property
    def name(self) -> str | None:
        return f"{self.color} {self.shape}" if self.valid else None


@lru_cache(maxsize=None)
def min_area(resolution: int) -> int:
    """Components smaller than this are specks, not objects, and are dropped.

    A quarter of the smallest object version 1 can draw (a triangle of side round(0.22 R): 25 px
    at R = 32, 98 px at R = 64, so 6 and 24): no real object comes near it, while stray pixels
    and specks of a generated image are ignored rather than counted as failed objects.
    """
    side = size_range(resolution, "multi")[0]
    return min(int(ideal_mask(shape, side, side).sum()) for shape in SHAPES) // 4


# ---------------------------------------------------------------------------------------- reading

def _rgb255(images) -> np.ndarray:
    """float32 (..., H, W, 3) in 0..255 from either accepted image form."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return images.astype(np.float32)
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    return torch.movedim(x, -3, -1).add(1.0).mul(127.5).numpy()


def palette_map(images) -> np.ndarray:
    """Index of the nearest palette color (0 = background, 1 + color index) per pixel, as int64
    (..., H, W); leading batch dimensions allowed."""
    rgb = _rgb255(images)
    # argmin |p - c|^2 = argmin (|c|^2 - 2 p.c): one matrix product instead of a 7-way difference
    scores = (PALETTE**2).sum(1) - 2 * rgb @ PALETTE.T  # (..., H, W, 7)
    return scores.argmin(-1)


def _runs(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in row-major order: (row, start, end), end exclusive."""
    h, w = foreground.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = foreground
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends


def _components(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components by union-find over runs (runs of adjacent rows that share a column
    touch). Returns the runs (row, start, end) and each run's component id (0..k-1)."""
    rows, starts, ends = _runs(foreground)
    parent = list(range(len(rows)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    first = np.searchsorted(rows, np.arange(foreground.shape[0] + 1)).tolist()  # first run of row
    s, e = starts.tolist(), ends.tolist()
    for r in range(foreground.shape[0] - 1):
        i, i_end, j, j_end = first[r], first[r + 1], first[r + 1], first[r + 2]
        while i < i_end and j < j_end:  # merge-walk two sorted lists of intervals
            if s[i] < e[j] and s[j] < e[i]:
                parent[find(i)] = find(j)
            if e[i] < e[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(a) for a in range(len(parent))], dtype=np.int64)
    _, component = np.unique(roots, return_inverse=True)
    return rows, starts, ends, component.reshape(-1)


def _best_shape(inside: np.ndarray, area: int) -> tuple[str, float]:
    """The ideal shape, drawn into the component's bounding box, with the highest IoU."""
    h, w = inside.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        ideal = ideal_mask(shape, w, h)
        intersection = int(np.count_nonzero(ideal & inside))
        iou = intersection / (int(np.count_nonzero(ideal)) + area - intersection)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def _read_palette_map(colors: np.ndarray) -> list[ReadObject]:
    h, w = colors.shape
    rows, starts, ends, component = _components(colors != 0)
    if len(rows) == 0:
        return []
    lengths = ends - starts
    areas = np.bincount(component, weights=lengths).astype(np.int64)
    labels = np.full(h * w, -1, dtype=np.int64)  # component id per pixel, -1 on background
    labels[np.flatnonzero(colors != 0)] = np.repeat(component, lengths)
    labels = labels.reshape(h, w)

    objects = []
    for c in np.flatnonzero(areas >= min_area(min(h, w))):
        runs = component == c
        x0, x1 = int(starts[runs].min()), int(ends[runs].max())
        y0, y1 = int(rows[runs].min()), int(rows[runs].max()) + 1
        inside = labels[y0:y1, x0:x1] == c
        area = int(areas[c])

        counts = np.bincount(colors[y0:y1, x0:x1][inside], minlength=len(PALETTE))
        majority = int(counts.argmax())
        color = COLOR_NAMES[majority - 1] if counts[majority] >= MIN_COLOR_SHARE * area else None

        bw, bh = x1 - x0, y1 - y0
        shape, iou = None, 0.0
        if max(bw, bh) <= MAX_ASPECT * min(bw, bh):
            best, iou = _best_shape(inside, area)
            shape = best if iou >= MIN_SHAPE_IOU else None

        objects.append(ReadObject(shape, color, (x0, y0, x1, y1), area, float(iou),
                                  valid=shape is not None and color is not None))
    objects.sort(key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))  # centre x, then y
    return objects


def read_objects(image) -> list[ReadObject]:
    """The objects in one image (uint8 H x W x 3, or 3 x H x W in [-1, 1]), left to right by box
    centre x, ties by centre y. Only the three shapes of version 1 are candidates: the reserved
    star never reads as valid (its thin points do not survive rasterizing into a bounding box)."""
    return _read_palette_map(palette_map(image))


def read_batch(images) -> list[list[ReadObject]]:
    """``read_objects`` for each image of a B x 3 x H x W batch in [-1, 1]."""
    return [_read_palette_map(colors) for colors in palette_map(images)]


# ----------------------------------------------------------------------------------------- scores

def readable(objects: Sequence[ReadObject]) -> bool:
    """At least one component, and every component is a valid object."""
    return len(objects) > 0 and all(o.valid for o in objects)


def class_correct(objects: Sequence[ReadObject], label: int) -> bool:
    """Exactly one component, valid, with the given class label."""
    return len(objects) == 1 and objects[0].valid and objects[0].label == int(label)


def caption_correct(objects: Sequence[ReadObject], caption: str) -> bool:
    """All components valid, and read left to right they reproduce the caption exactly."""
    return readable(objects) and join_caption([o.name for o in objects]) == caption


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def box_recall(objects: Sequence[ReadObject], boxes, labels, resolution: int,
               iou_threshold: float = 0.5, match_labels: bool = True) -> float:
    """Share of target boxes (n x 4, normalized [x0, y0, x1, y1]) matched one-to-one by a valid
    read object of the same label (any label when ``match_labels`` is false) with box IoU >=
    iou_threshold; greedy by IoU. 1.0 when n = 0."""
    targets = [[float(v) * resolution for v in box] for box in np.asarray(boxes).reshape(-1, 4)]
    target_labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    if not targets:
        return 1.0
    pairs = sorted(
        ((box_iou(o.box, t), k, t_index)
         for k, o in enumerate(objects) if o.valid
         for t_index, (t, lab) in enumerate(zip(targets, target_labels)) if o.label == lab or not match_labels),
        reverse=True,
    )
    used_objects, matched = set(), set()
    for iou, k, t_index in pairs:
        if iou < iou_threshold:
            break
        if k not in used_objects and t_index not in matched:
            used_objects.add(k)
            matched.add(t_index)
    return len(matched) / len(targets)


def segmentation_scores(image, segmentation) -> dict[str, float]:
    """Pixel accuracy and mIoU of the image's palette map against a target segmentation
    (0 = background, 1 + label), compared by color: label l has color l % 6, so both maps are
    reduced to 7 classes (background + 6 colors). mIoU averages over the classes present in
    either map. Batches (B x 3 x H x W with B x H x W) are pooled over all pixels."""
    predicted = palette_map(image)
    target = np.asarray(torch.as_tensor(segmentation).cpu()).astype(np.int64)
    target = np.where(target > 0, (target - 1) % len(COLORS) + 1, 0)
    if predicted.shape != target.shape:
        raise ValueError(f"image map {predicted.shape} and segmentation {target.shape} differ")
    n = len(PALETTE)
    confusion = np.bincount(target.reshape(-1) * n + predicted.reshape(-1),
                            minlength=n * n).reshape(n, n)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return {
        "pixel_accuracy": float(intersection.sum() / confusion.sum()),
        "miou": float((intersection[present] / union[present]).mean()),
    }


def psnr(a, b, mask=None) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2), over all elements, or only where
    ``mask`` (broadcastable to the images, e.g. 1 x H x W) is > 0.5. Identical pixels give
    ``math.inf`` (callers averaging over samples should cap or count them); an empty mask gives
    ``math.nan``."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    squared = (a - b).square()
    if mask is not None:
        keep = torch.broadcast_to(torch.as_tensor(mask) > 0.5, squared.shape)
        squared = squared[keep]
    if squared.numel() == 0:
        return math.nan
    mse = float(squared.mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
