"""Sharded tar files in the webdataset convention, read with the standard library's ``tarfile``.

A sample is the run of consecutive tar members sharing a key: the member's path up to the first
dot of its file name; the rest of the name is the member's extension (webdataset's
``tariterators.base_plus_ext``; torchdata's ``WebDataset`` documents the same rule). Members read,
each optional except the image:

    jpg / jpeg / png / webp   the image                       -> image, low_res, mask (random)
    txt                       the caption, UTF-8               -> caption
    json                      an object with the fields of an imagefolder metadata line:
                              text (caption, if no .txt), objects {bbox, categories}, label
                                                               -> caption, boxes, box_labels, class_label
    cls                       the class index as text          -> class_label
    seg.png / mask.png        index map / region to generate, as in the image folder
The first sample of the first shard decides which keys the source provides; a later sample
that lacks one of them is skipped and counted.

Shards are split first across processes (rank ``r`` of ``world_size`` reads shards
``r, r + world_size, ...``), then across the DataLoader workers of a process the same way, so
every shard is read by exactly one worker of one process.

Two ways to read them:
- ``TarShards``: a streaming source. As an ``IterableDataset`` it is split across processes and
  DataLoader workers (for a DataLoader); as a streaming source of ``ldmcore.data.stream`` (units =
  shards) it is what ``trainer.latents=stream`` trains on, every process reading its own shards
  in a shuffled order per epoch (``WebDataset.streamed`` builds it from the same options);
- ``WebDataset``: what ``trainer.latents=pool`` (the default) trains on. The training encodes a
  latent pool once over a finite, indexable dataset and gives each process its rows of every
  global batch, so this reads the shards once, in order, up to ``size`` samples, the same ones in
  every process, and keeps them decoded at the training resolution in memory (uint8).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ldmcore.config import ConfigError
from ldmcore.data.annotations import check_caption, check_label, check_objects, check_options, check_size
from ldmcore.data.skips import BadSample, SkipLog
from ldmcore.data.source import ALWAYS, NO_BOXES, Record, RealSource, decode, random_mask, read_segmentation, to_batch
from ldmcore.data.stream import head_items

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STREAM_MIN_ITEMS = 100  # a stream checks the skip fraction against at least this many items
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]+)$")  # (key, extension); hidden files (".x") have no key


def expand_braces(pattern: str) -> list[str]:
    """``"a-{000..002}.tar"`` -> ``["a-000.tar", "a-001.tar", "a-002.tar"]`` (several ranges
    multiply); numbers keep the width of the first bound."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    return [name for n in range(int(first), int(last) + 1)
            for name in expand_braces(pattern[:match.start()] + str(n).zfill(len(first)) + pattern[match.end():])]


def list_shards(spec, option: str = "data.shards") -> list[Path]:
    """Shard files from a folder (its ``*.tar``, sorted), a brace pattern, a file, or a list of
    these; ConfigError naming the option for anything that does not exist."""
    if not spec or isinstance(spec, bool):
        raise ConfigError(f"{option} must name tar shards: a folder, a file, a pattern like shards/{{000..009}}.tar, or a list")
    shards: list[Path] = []
    for entry in [spec] if isinstance(spec, (str, Path)) else list(spec):
        path = Path(str(entry)).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.tar"))
            if not found:
                raise ConfigError(f"{option}: the folder {str(entry)!r} holds no .tar files")
            shards += found
            continue
        for name in expand_braces(str(path)):
            if not Path(name).is_file():
                raise ConfigError(f"{option}: shard {name!r} does not exist")
            shards.append(Path(name))
    return shards


def split_shards(shards: Sequence[Path], rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> list[Path]:
    """The shards one worker of one process reads: disjoint across (rank, worker), complete."""
    return list(shards[rank::world_size][worker::num_workers])


def process_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given (rank, world_size), else torch.distributed's, else the launcher's environment
    (``RANK`` / ``WORLD_SIZE``, set by torchrun and accelerate), else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ConfigError(f"data.rank={rank} must lie in [0, data.world_size={world_size})")
    return int(rank), int(world_size)


def read_shard(shard: Path) -> Iterator[tuple[str, dict[str, bytes] | BadSample]]:
    """(``SHARD:KEY``, {extension: bytes}) of each sample of a shard, streamed in order. A shard
    that cannot be read on (not a tar, truncated, a damaged header) ends with one (``SHARD``,
    BadSample ``corrupt_shard``); the samples before the damage are kept."""
    key, members, where = None, {}, "its start"
    try:
        with open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                match = _KEY.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                if match.group(1) != key and members:
                    yield f"{shard}:{key}", members
                    members = {}
                key = match.group(1)
                members[match.group(2).lower()] = tar.extractfile(member).read()
                where = f"member {member.name}"
            damage = _damaged_end(raw, tar.offset)
            if damage:
                raise tarfile.ReadError(damage)
    except (tarfile.TarError, OSError, EOFError) as error:
        yield str(shard), BadSample("corrupt_shard", str(shard), "-", f"unreadable after {where} ({type(error).__name__}: "
                                                                      f"{error}); the rest of the shard is lost")
        return
    if members:
        yield f"{shard}:{key}", members


def _damaged_end(raw, offset: int) -> str | None:
    """Why an uncompressed tar that ``tarfile`` finished reading at ``offset`` did not really end
    there, or None. ``tarfile`` takes a truncated or damaged header after the first member for
    the end of the archive, silently; a real end is a zero block or the end of the file."""
    raw.seek(0)
    if raw.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        return None  # compressed: offsets are not file positions
    raw.seek(offset)
    block = raw.read(512)
    if block and (len(block) < 512 or any(block)):
        return f"a truncated or damaged tar header at byte {offset}"
    return None


def _json_member(name: str, members: dict[str, bytes]) -> dict:
    if "json" not in members:
        return {}
    try:
        value = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSample("bad_json", name, "json", f"not valid UTF-8 JSON ({error})") from None
    if not isinstance(value, dict):
        raise BadSample("bad_json", name, "json", f"the .json member must hold an object, got {type(value).__name__}")
    return value


def keys_of(members: dict[str, bytes]) -> tuple[str, ...]:
    """The batch keys a sample with these members yields."""
    meta = _json_member("first sample", members)
    keys = list(ALWAYS)
    if "txt" in members or "text" in meta:
        keys.append("caption")
    if "objects" in meta:
        keys += ["boxes", "box_labels"]
    if "cls" in members or "label" in meta:
        keys.append("class_label")
    if "seg.png" in members:
        keys.append("segmentation")
    return tuple(keys)


class TarShards(torch.utils.data.IterableDataset):
    """Samples of tar shards, streamed (see the module docstring): yields one sample at a time,
    keyed as ``provides`` without a batch dimension (collate with ``ldmcore.data.shapes.collate``).

    Bad samples are skipped and counted per worker; a worker raises DataError once more than
    ``max_skip_fraction`` of its samples (at least STREAM_MIN_ITEMS counted) were skipped.
    """

    reader = None
    streaming = True  # read in units (shards) by ldmcore.data.stream, never indexed

    def __init__(self, shards, resolution: int = 64, class_names: Sequence[str] = (), small_images: str = "skip",
                 max_skip_fraction: float = 0.01, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        self.class_names = check_options(resolution, small_images, max_skip_fraction, class_names, seed)
        self.resolution, self.small_images, self.seed = resolution, small_images, seed
        self.max_skip_fraction = float(max_skip_fraction)
        self.shards = list_shards(shards)
        self.rank, self.world_size = process_rank(rank, world_size)
        self.provides = self._first_sample_keys()
        # Skips of what this process reads through ``items`` (the training stream, its head).
        self.skips, self.items_read = SkipLog(f"webdataset rank {self.rank}", self.max_skip_fraction), 0
        if not self.class_names and ({"boxes", "class_label", "segmentation"} & set(self.provides)):
            raise ConfigError(f"the samples of {self.shards[0]} carry labels (objects, cls or seg.png); name the classes with "
                              f"data.class_names=[...] (index = label)")

    def _first_sample_keys(self) -> tuple[str, ...]:
        """The keys of the first sample of the first shard (skipping samples whose .json is broken)."""
        for _, members in read_shard(self.shards[0]):
            if isinstance(members, BadSample):
                raise ConfigError(f"data.shards: the first shard cannot be read: {members}")
            try:
                return keys_of(members)
            except BadSample:
                continue
        raise ConfigError(f"data.shards: the first shard {self.shards[0]} holds no readable sample")

    def my_shards(self, worker: int = 0, num_workers: int = 1) -> list[Path]:
        """The shards this process's DataLoader worker ``worker`` of ``num_workers`` reads."""
        return split_shards(self.shards, self.rank, self.world_size, worker, num_workers)

    def record(self, name: str, members: dict[str, bytes]) -> Record:
        """The sample's members -> a Record (raises BadSample for a missing or bad member)."""
        meta = _json_member(name, members)
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            raise BadSample("missing_field", name, "image", f"no image member ({', '.join(IMAGE_EXTENSIONS)}); it has {sorted(members)}")
        record = Record(name=name, image=image)
        if "caption" in self.provides:
            if "txt" in members:
                try:
                    record.caption = check_caption(members["txt"].decode("utf-8"), name, "txt")
                except UnicodeDecodeError as error:
                    raise BadSample("bad_caption", name, "txt", f"not UTF-8 ({error})") from None
            elif "text" in meta:
                record.caption = check_caption(meta["text"], name, "json.text")
            else:
                raise BadSample("missing_field", name, "txt", "no caption (.txt or json text), though the first sample has one")
        if "class_label" in self.provides:
            record.class_label = self._label(name, members, meta)
        if "boxes" in self.provides:
            objects = meta.get("objects")
            if not isinstance(objects, dict):
                raise BadSample("missing_field" if objects is None else "bad_box", name, "json.objects",
                                f"objects is {{'bbox': [...], 'categories': [...]}}, got {objects!r}")
            record.boxes, record.box_labels = check_objects(objects.get("bbox"), objects.get("categories", objects.get("category")),
                                                            self.class_names, name, "json.objects")
        if "segmentation" in self.provides:
            if "seg.png" not in members:
                raise BadSample("missing_field", name, "seg.png", "no segmentation map, though the first sample has one")
            record.segmentation = read_segmentation(members["seg.png"], f"{name}.seg.png", len(self.class_names))
        if "mask.png" in members:
            record.mask = members["mask.png"]
        return record

    def _label(self, name: str, members: dict[str, bytes], meta: dict) -> int:
        if "cls" in members:
            text = members["cls"].decode("utf-8", errors="replace").strip()
            value = int(text) if re.fullmatch(r"-?\d+", text) else text
            return check_label(value, self.class_names, name, "cls")
        if "label" in meta:
            return check_label(meta["label"], self.class_names, name, "json.label")
        raise BadSample("missing_field", name, "cls", "no class label (.cls or json label), though the first sample has one")

    def decoded(self, name: str, members: dict[str, bytes] | BadSample) -> dict:
        """One sample decoded at the training resolution (numpy; see ``ldmcore.data.source.decode``);
        raises BadSample, also the one ``read_shard`` gave for a corrupt shard."""
        if isinstance(members, BadSample):
            raise members
        return decode(self.record(name, members), self.resolution, self.small_images)

    def sample(self, name: str, members: dict[str, bytes] | BadSample) -> tuple[dict, np.ndarray]:
        """One sample decoded (see ``decoded``) and its mask: the sample's own, or a random one
        seeded by ``data.seed`` and the sample's key (the same in every read)."""
        sample = self.decoded(name, members)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return sample, sample["mask"] if "mask" in sample else random_mask(rng, self.resolution, sample.get("boxes", NO_BOXES))

    # --- the streaming source of ldmcore.data.stream: units are shards ---------------------------

    @property
    def units(self) -> int:
        return len(self.shards)

    def items(self, unit: int, skip: int = 0) -> Iterator[tuple[dict, np.ndarray] | None]:
        """Shard ``unit``'s samples in order (see ``sample``) after its first ``skip`` raw samples,
        which are passed over undecoded; a bad sample is counted in ``skips`` and given as None.
        DataError once more than ``max_skip_fraction`` of the samples read were bad."""
        for i, (name, members) in enumerate(read_shard(self.shards[unit])):
            if i < skip:
                continue
            self.items_read += 1
            try:
                yield self.sample(name, members)
            except BadSample as bad:
                self.skips.record(bad.skip)
                self.skips.check(max(self.items_read, STREAM_MIN_ITEMS))
                yield None

    def collate(self, items: list[tuple[dict, np.ndarray]]) -> dict:
        """Samples of ``items`` -> a batch keyed as ``provides`` (see ``ldmcore.data.source.to_batch``)."""
        return to_batch([sample for sample, _ in items], [mask for _, mask in items], self.provides)

    def values(self, key: str, limit: int | None = None) -> list:
        """The values of batch key ``key`` over the first ``limit`` samples in shard order (every
        sample of every shard for None), e.g. captions to fit a tokenizer."""
        items = head_items(self, limit)
        return list(self.collate(items)[key]) if items else []

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.my_shards(worker, num_workers)
        if not shards:
            log.warning("rank %d worker %d of %d gets no shard (%d shards for %d readers)",
                        self.rank, worker, num_workers, len(self.shards), self.world_size * num_workers)
        skips = SkipLog(f"webdataset rank {self.rank} worker {worker}", self.max_skip_fraction)
        seen = 0
        for shard in shards:
            for name, members in read_shard(shard):
                seen += 1
                try:
                    sample, mask = self.sample(name, members)
                except BadSample as bad:
                    skips.record(bad.skip)
                    skips.check(max(seen, STREAM_MIN_ITEMS))
                    continue
                yield {key: value[0] for key, value in to_batch([sample], [mask], self.provides).items()}
            skips.check(max(seen, STREAM_MIN_ITEMS))


class WebDataset(RealSource):
    """The training path for tar shards: the shards read once, in order, until ``size`` samples
    are decoded (None: all of them), kept at the training resolution.

    Every process reads the same samples: the training loop gives each process its rows of one
    global batch drawn by index (docs/scaling.md), so the index space must be the same everywhere.
    (``TarShards`` is the per-process split, for streaming consumers.)
    """

    @classmethod
    def streamed(cls, shards, resolution: int = 64, class_names: Sequence[str] = (), small_images: str = "skip",
                 max_skip_fraction: float = 0.01, seed: int = 0, size: int | None = None) -> TarShards:
        """The streaming form of the same options (``trainer.latents=stream``): every shard,
        nothing held in memory. ``size`` is checked but does not apply (a stream reads all)."""
        check_size(size)
        return TarShards(shards, resolution, class_names, small_images, max_skip_fraction, seed)

    def __init__(self, shards, resolution: int = 64, class_names: Sequence[str] = (), small_images: str = "skip",
                 max_skip_fraction: float = 0.01, seed: int = 0, size: int | None = 10_000):
        size = check_size(size)
        stream = TarShards(shards, resolution, class_names, small_images, max_skip_fraction, seed, rank=0, world_size=1)
        super().__init__(f"webdataset {stream.shards[0].parent}", resolution, stream.class_names,
                         small_images, max_skip_fraction, seed)
        self.provides, self.shards = stream.provides, stream.shards
        self.samples: list[dict] = []
        for shard in self.shards:
            for name, members in read_shard(shard):
                self.items_given += 1
                try:
                    sample = stream.decoded(name, members)
                except BadSample as bad:
                    self.skips.record(bad.skip)
                    continue
                if "segmentation" in sample:
                    sample["segmentation"] = sample["segmentation"].astype(np.int32)  # compact while pooled
                self.samples.append(sample)
                if size is not None and len(self.samples) >= size:
                    break
            if size is not None and len(self.samples) >= size:
                break
        self._ready()

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> dict:
        return self.samples[i]

    def values(self, key: str, limit: int | None = None) -> list:
        n = len(self) if limit is None else min(int(limit), len(self))
        if key in ("caption", "class_label"):
            return [sample[key] for sample in self.samples[:n]]
        return super().values(key, limit)
