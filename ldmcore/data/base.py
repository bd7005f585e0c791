"""What the rest of the system knows about a data source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

POOL_CHUNK = 256  # items per batch when a source has no fast ``values``


@dataclass(frozen=True)
class DataInfo:
    """Facts about a data source that plugins and evaluation need.

    resolution   image side in pixels (square images)
    provides     the batch keys the source yields
    class_names  names of the object classes, index = class label (may be empty)
    reader       an exact reader of generated images (e.g. the shapes-world evaluator module),
                 or None when the data has none; plugins score faithfulness with it
    values       ``values(key, limit=None) -> list``: the values of one batch key over the first
                 ``limit`` items of the source (all items by default), e.g. to fit a tokenizer
                 to the data before training; None when the source cannot enumerate its items
    """

    name: str
    resolution: int
    provides: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    reader: Any = field(default=None, compare=False)
    values: Callable[..., list] | None = field(default=None, compare=False)


def pool_values(dataset, key: str, limit: int | None = None) -> list:
    """The values of batch key ``key`` for items ``0 .. limit-1`` of ``dataset`` (all by default).

    Uses the source's own ``values(key, limit)`` where it has one (it may skip work the batch
    does, such as drawing images); otherwise reads ``dataset.batch`` in chunks.
    """
    if key not in dataset.provides:
        raise KeyError(f"the data source {type(dataset).__name__} does not provide {key!r} (it provides {', '.join(dataset.provides)})")
    if hasattr(dataset, "values"):
        return list(dataset.values(key, limit))
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    out: list = []
    for start in range(0, n, POOL_CHUNK):
        out.extend(dataset.batch(list(range(start, min(start + POOL_CHUNK, n))))[key])
    return out


def data_info(dataset) -> DataInfo:
    """Describe a dataset object by the attributes a data source exposes."""
    enumerable = hasattr(dataset, "batch") and hasattr(dataset, "__len__")
    return DataInfo(
        name=type(dataset).__name__,
        resolution=int(dataset.resolution),
        provides=tuple(dataset.provides),
        class_names=tuple(getattr(dataset, "class_names", ())),
        reader=getattr(dataset, "reader", None),
        # A stream lists the values of its first items only where it says so (TarShards.values).
        values=partial(pool_values, dataset) if enumerable else getattr(dataset, "values", None),
    )


def skipped_items(dataset) -> int:
    """How many items the data source skipped so far (0 for a source that never skips)."""
    skips = getattr(dataset, "skips", None)
    return skips.total if skips is not None else 0


def skip_summary(dataset) -> dict | None:
    """The source's skips for a run's metrics (total, per reason, examples); None for a source
    that never skips (see ldmcore.data.skips)."""
    skips = getattr(dataset, "skips", None)
    return skips.summary() if skips is not None else None
