"""What the rest of the system knows about a data source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataInfo:
    """Facts about a data source that plugins and evaluation need.

    resolution   image side in pixels (square images)
    provides     the batch keys the source yields
    class_names  names of the object classes, index = class label (may be empty)
    reader       an exact reader of generated images (e.g. the shapes-world evaluator module),
                 or None when the data has none; plugins score faithfulness with it
    """

    name: str
    resolution: int
    provides: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    reader: Any = field(default=None, compare=False)


def data_info(dataset) -> DataInfo:
    """Describe a dataset object by the attributes a data source exposes."""
    return DataInfo(
        name=type(dataset).__name__,
        resolution=int(dataset.resolution),
        provides=tuple(dataset.provides),
        class_names=tuple(getattr(dataset, "class_names", ())),
        reader=getattr(dataset, "reader", None),
    )
