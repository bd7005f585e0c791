"""Bad items of real data: skipped, counted per reason, named in the log, and never silently
too many (docs/reliability.md, "Real data: bad items").

A data source raises :class:`BadSample` where one item cannot be used (a corrupt image, a box
outside its image, ...). The source records it in its :class:`SkipLog`, uses another item in its
place and goes on; once more than ``data.max_skip_fraction`` of the items were skipped, the log
raises :class:`DataError`, so a broken dataset stops the run instead of training on what is left.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOGGED_PER_REASON = 20  # skips of one reason logged one by one; further ones are only counted
EXAMPLES_PER_REASON = 3  # skips of one reason quoted in summaries and in DataError
OPTION = "data.max_skip_fraction"


class DataError(ValueError):
    """The data cannot be trained on: too many items were skipped, or none is usable."""


@dataclass(frozen=True)
class Skip:
    """One skipped item. ``file`` is the file at fault (or ``FILE:LINE``, ``SHARD:MEMBER``),
    ``field`` the metadata field or member that is bad, ``reason`` a short id counted per run
    (e.g. ``corrupt_image``), ``detail`` what exactly is wrong."""

    reason: str
    file: str
    field: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file} (field {self.field}): {self.detail}"


class BadSample(Exception):
    """An item that cannot be used; the source skips it and counts it."""

    def __init__(self, reason: str, file: str, field: str, detail: str):
        self.skip = Skip(reason, str(file), field, detail)
        super().__init__(str(self.skip))


class SkipLog:
    """Skips of one data source: counted per reason, the first ones of each reason logged.

    ``check(items)`` raises :class:`DataError` once more than ``max_fraction * items`` items
    were skipped; ``items`` is the number of items the source was given (metadata lines, images
    of a COCO file, samples read from shards).
    """

    def __init__(self, source: str, max_fraction: float):
        self.source, self.max_fraction = source, float(max_fraction)
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[Skip]] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        examples = self.examples.setdefault(skip.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(skip)
        n = self.counts[skip.reason]
        if n <= LOGGED_PER_REASON:
            log.warning("%s: skipped %s [%s]", self.source, skip, skip.reason)
        if n == LOGGED_PER_REASON:
            log.warning("%s: further %s skips are counted but not logged one by one", self.source, skip.reason)

    def check(self, items: int) -> None:
        """Raise DataError when more than ``max_fraction`` of ``items`` were skipped."""
        if self.total > self.max_fraction * items:
            share = self.total / max(items, 1)
            raise DataError(f"{self.source}: {self.total} of {items} items were skipped ({share:.1%}), more than "
                            f"{OPTION}={self.max_fraction}: {self.describe()}. Fix the data, or raise {OPTION} on purpose.")

    def describe(self) -> str:
        """``reason N (e.g. FILE (field F): detail; ...)`` for every reason, most frequent first."""
        parts = []
        for reason, n in self.counts.most_common():
            parts.append(f"{reason} {n} (e.g. {'; '.join(str(s) for s in self.examples[reason])})")
        return ", ".join(parts)

    def summary(self) -> dict:
        """What a run writes to its metrics: the total, the count per reason, a few examples."""
        return {
            "skipped": self.total,
            "by_reason": dict(self.counts.most_common()),
            "examples": {reason: [str(s) for s in skips] for reason, skips in self.examples.items()},
        }
