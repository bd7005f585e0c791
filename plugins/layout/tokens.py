"""Layouts as token sequences, after the paper's layout-to-image model (Rombach et al. 2022,
Sec. 4.3.1 and App. E.2): each object becomes three tokens — its class, its top-left corner and
its bottom-right corner on a quantized grid — and the sequence is padded to a fixed length.

Token ids, for ``K`` classes and ``bins`` cells per axis:
    0 .. K-1                    class of an object
    K + y_bin * bins + x_bin    a corner in grid cell (x_bin, y_bin)
    K + bins²                   pad (no object)
    K + bins² + 1               start (always present, so no sequence is all padding)
A sequence is ``[start, (class, top-left, bottom-right) × objects, pad ...]`` of length
``1 + 3 * max_objects``, objects in reading order (box centre x, then y).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EXAMPLE = '[{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}]'


class LayoutVocabulary:
    def __init__(self, num_classes: int, bins: int, max_objects: int):
        if bins < 1 or max_objects < 1:
            raise ValueError(f"condition.layout needs bins >= 1 and max_objects >= 1, got bins={bins}, max_objects={max_objects}")
        self.num_classes, self.bins, self.max_objects = num_classes, bins, max_objects
        self.pad = num_classes + bins * bins
        self.start = self.pad + 1
        self.size = self.start + 1
        self.length = 1 + 3 * max_objects

    def corner(self, x: float, y: float, bottom_right: bool) -> int:
        """The grid cell holding a top-left corner (floor), or the last cell a box covers before
        its exclusive bottom-right corner (ceil − 1)."""
        def cell(v: float) -> int:
            c = math.ceil(v * self.bins) - 1 if bottom_right else math.floor(v * self.bins)
            return min(max(c, 0), self.bins - 1)

        return self.num_classes + cell(y) * self.bins + cell(x)

    def encode(self, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """boxes (n, 4) normalized [x0, y0, x1, y1], labels (n,) -> tokens (length,) int64."""
        if len(boxes) > self.max_objects:
            raise ValueError(f"a layout of {len(boxes)} objects exceeds condition.layout.max_objects={self.max_objects}")
        if len(labels) != len(boxes):
            raise ValueError(f"a layout has {len(boxes)} boxes but {len(labels)} labels")
        tokens = [self.start]
        for i in self.order(boxes):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            label = int(labels[i])
            if not 0 <= label < self.num_classes:
                raise ValueError(f"a layout label {label} lies outside [0, {self.num_classes})")
            tokens += [label, self.corner(x0, y0, False), self.corner(x1, y1, True)]
        tokens += [self.pad] * (self.length - len(tokens))
        return torch.tensor(tokens, dtype=torch.int64)

    @staticmethod
    def order(boxes: torch.Tensor) -> list[int]:
        """The objects' order in the sequence: reading order, by box centre x, then y."""
        return sorted(range(len(boxes)), key=lambda i: (float(boxes[i][0] + boxes[i][2]), float(boxes[i][1] + boxes[i][3])))

    def regions(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (n, 4) normalized -> where each token of ``encode``'s sequence applies, (length,
        bins, bins) in [0, 1]: an object's three tokens cover its box (the share of each grid cell
        inside it), the start token the whole image, pad tokens nowhere (so that inside a box the
        attention is shared by the object's three tokens and the start token only)."""
        maps = torch.zeros(self.length, self.bins, self.bins)
        maps[0] = 1.0
        edges = torch.arange(self.bins + 1, dtype=torch.float32) / self.bins  # cell borders, 0 .. 1

        def cover(lo: float, hi: float) -> torch.Tensor:  # (bins,) share of each cell inside [lo, hi]
            return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))) * self.bins).clamp(0, 1)

        for slot, i in enumerate(self.order(boxes)):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            maps[1 + 3 * slot: 4 + 3 * slot] = cover(y0, y1)[:, None] * cover(x0, x1)[None, :]
        return maps

    def regions_batch(self, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample boxes (lists, or stacked tensors) -> token regions (B, length, bins, bins)."""
        return torch.stack([self.regions(torch.as_tensor(b).reshape(-1, 4)) for b in boxes])

    def corner_features(self, frequencies: int) -> torch.Tensor:
        """(size, 4·frequencies) sinusoidal features of each corner token's cell centre (x, y) at
        frequencies 2^k·π, k < frequencies (Fourier features, Tancik et al. 2020); zero rows for
        class, pad and start tokens. Neighbouring cells get similar features, so the encoder need not
        learn the grid's geometry from scratch for each of the bins² corner tokens."""
        table = torch.zeros(self.size, 4 * frequencies)
        if frequencies == 0:
            return table
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins  # (bins,)
        omega = math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float64)  # (F,)
        y, x = torch.meshgrid(centres, centres, indexing="ij")  # (bins, bins): cell (y_bin, x_bin)
        angles = torch.stack([x.flatten(), y.flatten()], dim=1)[:, :, None] * omega  # (bins², 2, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)  # (bins², 4F)
        table[self.num_classes: self.num_classes + self.bins**2] = features.float()
        return table

    def encode_batch(self, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample boxes / labels (lists, or stacked tensors) -> tokens (B, length)."""
        if len(boxes) != len(labels):
            raise ValueError(f"batch keys boxes and box_labels hold {len(boxes)} and {len(labels)} samples")
        return torch.stack([self.encode(torch.as_tensor(b).reshape(-1, 4), torch.as_tensor(l).reshape(-1))
                            for b, l in zip(boxes, labels)])


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}={value} lies outside [0, 1] (boxes are normalized to the image side)")
    return float(value)


UNLABELLED = -1  # the label of an object given without one (a model with condition.layout.labels=false)


def parse_layout(value, class_names: Sequence[str], max_objects: int,
                 labels_required: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's layout ``[{"label": NAME or index, "box": [x0, y0, x1, y1]}, ...]`` -> (boxes
    (n, 4) float32, labels (n,) int64), in the order given. Any flaw raises ValueError naming the
    object (1-based) and the field. With ``labels_required`` false (an unlabelled-layout model)
    an object may leave out its label: it is then ``UNLABELLED``."""
    if not isinstance(value, list):
        raise ValueError(f"a layout is a JSON list of objects like {EXAMPLE}; got {value!r}")
    if len(value) > max_objects:
        raise ValueError(f"a layout holds at most condition.layout.max_objects={max_objects} objects, got {len(value)}")
    boxes, labels = [], []
    for number, obj in enumerate(value, start=1):
        where = f"layout object {number}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where} must be an object like {EXAMPLE[1:-1]}; got {obj!r}")
        extra = set(obj) - {"label", "box"}
        if extra or ("label" not in obj and labels_required) or "box" not in obj:
            fields = "exactly the fields label and box" if labels_required else "a box and at most a label"
            raise ValueError(f"{where} must have {fields}; it has {sorted(obj)}")
        label = obj.get("label")
        if "label" not in obj:
            labels.append(UNLABELLED)
        elif isinstance(label, str) and label in class_names:
            labels.append(class_names.index(label))
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(class_names):
            labels.append(label)
        else:
            raise ValueError(f"{where}: label {label!r} is unknown; known labels (or their index): {', '.join(class_names)}")
        box = obj["box"]
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError(f"{where}: box must be a list [x0, y0, x1, y1] of 4 numbers in [0, 1], got {box!r}")
        x0, y0, x1, y1 = (_number(v, f"{where}: box {name}") for v, name in zip(box, ("x0", "y0", "x1", "y1")))
        if not x0 < x1:
            raise ValueError(f"{where}: box x0={x0} must be less than x1={x1}")
        if not y0 < y1:
            raise ValueError(f"{where}: box y0={y0} must be less than y1={y1}")
        boxes.append([x0, y0, x1, y1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)


def _short(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (0.1, not 0.10000000149011612)."""
    f32 = torch.tensor(v, dtype=torch.float32)
    for digits in range(1, 10):
        r = round(float(v), digits)
        if torch.tensor(r, dtype=torch.float32) == f32:
            return r
    return float(v)


def format_layout(boxes, labels, class_names: Sequence[str]) -> list[dict]:
    boxes, labels = torch.as_tensor(boxes).reshape(-1, 4), torch.as_tensor(labels).reshape(-1)
    return [({} if int(l) == UNLABELLED else {"label": class_names[int(l)]}) | {"box": [_short(float(v)) for v in b]}
            for b, l in zip(boxes, labels)]
