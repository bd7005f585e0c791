"""Reading a data source as a stream (``trainer.latents=stream``, docs/data.md "Streaming"): each
process reads its own part of the data, epoch after epoch, and can say exactly where it is, so a
resumed run reads on from there.

A *streaming source* (``streaming = True``; ``ldmcore.data.webdataset.TarShards``) is read in
units (its shards) and items (the samples of a unit):

    units                      the number of units
    items(unit, skip) -> it    the unit's items in order, after skipping its first ``skip``
                               raw items without decoding them; a bad item is counted by the
                               source and given as None (it still takes its place in the order)
    collate(items) -> batch    the batch dict of the good items (docs/data.md lists the keys)

A finite, indexable source (``batch(indices)`` and ``len``) is read through ``IndexStream``: every
item is a unit of its own, so an epoch is a shuffled order of the items.

Epoch ``e`` reads the units in the order ``permutation(units)`` seeded by (seed, e); rank r of W
reads every W-th of them, from the r-th on: the ranks' parts are disjoint, and together they are
the whole data. A position (epoch, units done, items read of the next unit) names exactly what a
rank has consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ldmcore.config import ConfigError
from ldmcore.data.skips import DataError


def streams(source) -> bool:
    """Whether ``source`` is a streaming source (read in units, never indexed)."""
    return bool(getattr(source, "streaming", False))


class IndexStream:
    """A finite, indexable data source read as a stream: unit i is item i alone."""

    streaming = True

    def __init__(self, dataset):
        if not (hasattr(dataset, "batch") and hasattr(dataset, "__len__")):
            raise ConfigError(f"the data source {type(dataset).__name__} neither streams (streaming = True) nor can be "
                              f"indexed (batch(indices) and len()); trainer.latents=stream cannot read it")
        self.dataset = dataset
        self.units = len(dataset)

    def items(self, unit: int, skip: int = 0) -> Iterator[int]:
        if skip == 0:
            yield unit

    def collate(self, items: list[int]) -> dict:
        return self.dataset.batch(items)  # a bad item is replaced by the source itself


def as_stream(source):
    """``source`` if it streams, else its ``IndexStream``."""
    return source if streams(source) else IndexStream(source)


def epoch_units(units: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The units rank ``rank`` of ``world_size`` reads in epoch ``epoch``, in reading order: every
    world_size-th unit of a permutation drawn from (seed, epoch) alone."""
    order = np.random.default_rng([seed, epoch]).permutation(units)
    return [int(u) for u in order[rank::world_size]]


@dataclass
class StreamPosition:
    """What one rank has consumed: ``units_done`` units of epoch ``epoch``'s order (``epoch_units``)
    and the first ``items_read`` raw items (bad ones included) of the next; ``samples`` good
    samples in all, for the record."""

    epoch: int = 0
    units_done: int = 0
    items_read: int = 0
    samples: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "StreamPosition":
        try:
            return cls(**{key: int(data[key]) for key in ("epoch", "units_done", "items_read", "samples")})
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: a stream position has epoch, units_done, items_read and samples; got {data!r}") from None

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RankStream:
    """One rank's batches of a source, read on from ``position`` (a fresh start by default).

    ``next_batch(n)`` reads exactly the items it returns (nothing ahead), so ``position`` after it
    is what was consumed; a stream opened at that position continues with the same items.
    """

    def __init__(self, source, seed: int, rank: int = 0, world_size: int = 1, position: StreamPosition | None = None):
        self.source = as_stream(source)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = position or StreamPosition()
        if self.source.units < world_size:
            raise ConfigError(f"the data has {self.source.units} unit(s) (shards) for {world_size} processes: "
                              f"trainer.latents=stream needs at least one per process; write more, smaller shards")
        self._order: tuple[int, list[int]] | None = None  # (epoch, its units for this rank)
        self._items: Iterator | None = None  # the unit being read
        self._good_this_epoch = position is not None  # a resumed epoch had good items before (it was read from)

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_units(self.source.units, self.seed, epoch, self.rank, self.world_size))
        return self._order[1]

    def _next_item(self):
        """The next raw item (None for a bad one), moving on to the next unit and epoch as needed."""
        at = self.position
        while True:
            if self._items is None:
                units = self.order(at.epoch)
                if at.units_done == len(units):
                    if not self._good_this_epoch:
                        raise DataError(f"rank {self.rank}: epoch {at.epoch} of the data stream gave no usable sample "
                                        f"from its {len(units)} unit(s)")
                    at.epoch, at.units_done, at.items_read, self._good_this_epoch = at.epoch + 1, 0, 0, False
                    continue
                self._items = self.source.items(units[at.units_done], at.items_read)
            try:
                item = next(self._items)
            except StopIteration:
                self._items = None
                at.units_done, at.items_read = at.units_done + 1, 0
                continue
            at.items_read += 1
            return item

    def next_batch(self, n: int) -> dict:
        """The next ``n`` good items as one batch."""
        items = []
        while len(items) < n:
            item = self._next_item()
            if item is not None:
                items.append(item)
                self._good_this_epoch = True
        self.position.samples += n
        return self.source.collate(items)


def head_items(source, n: int | None) -> list:
    """The first ``n`` good items of ``source`` in its own order (unit 0, 1, ...): the same on
    every process and in every run; fewer if the source has fewer (all of them for None)."""
    stream = as_stream(source)
    items: list = []
    for unit in range(stream.units):
        for item in stream.items(unit, 0):
            if item is not None:
                items.append(item)
            if len(items) == n:
                return items
    return items


def head(source, n: int) -> dict:
    """The first ``n`` good samples of ``source`` as one batch (see ``head_items``)."""
    items = head_items(source, n)
    if not items:
        raise DataError(f"the data source {type(source).__name__} has no usable sample")
    return as_stream(source).collate(items)


def data_config(node: DictConfig, latents: str) -> DictConfig:
    """The data section to build: ``node`` itself, or for ``trainer.latents=stream`` the streaming
    form of a source that declares one (a ``streamed`` class method taking the same options, e.g.
    ``WebDataset.streamed`` -> ``TarShards``), so that nothing is read into memory."""
    if latents != "stream" or "_target_" not in node:
        return node
    try:
        source = get_class(node._target_)
    except (ImportError, ValueError):  # not a class we can find: the build reports it, naming the section
        return node
    if streams(source) or not hasattr(source, "streamed"):
        return node
    streamed = OmegaConf.create(OmegaConf.to_container(node))
    streamed._target_ = f"{node._target_}.streamed"
    return streamed
