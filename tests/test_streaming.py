"""Training on a stream (``trainer.latents=stream``, docs/data.md "Streaming"): each process reads
its own shards in a per-epoch order fixed by the seed, the first stage and the denoiser train
without a finite dataset, and a resumed run reads on exactly where the checkpoint stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load_file

import real_data
from conftest import compose_config
from ldmcore.config import ConfigError, validate
from ldmcore.data.skips import DataError
from ldmcore.data.stream import RankStream, StreamPosition, data_config, epoch_units, head
from ldmcore.data.webdataset import TarShards, WebDataset
from ldmcore.system import build
from ldmcore.tasks import train
from ldmcore.training.loop import DenoisingLoss
from ldmcore.training.streaming import StreamReader, estimate_scale_factor

SHARDS, PER_SHARD = 3, 5  # 15 good samples an epoch (+1 bad one): 4 steps of 8 cross two epoch ends


def bad_shards(root, n_shards: int = SHARDS, per_shard: int = PER_SHARD):
    """``real_data.shards`` (captions ``sample k``) with one bad sample (no image) ending shard 1."""
    paths = real_data.shards(root, n_shards, per_shard)
    with tarfile.open(paths[1], "a") as tar:
        real_data.tar_member(tar, "z.txt", b"no image")
    return paths


def captions_of(paths) -> dict[int, list[str]]:
    """The good captions of each shard, in order."""
    source = TarShards([str(p) for p in paths], resolution=32, class_names=["thing"], max_skip_fraction=1.0)
    return {unit: [item[0]["caption"] for item in source.items(unit) if item is not None] for unit in range(source.units)}


def stream_overrides(shards, cache) -> list[str]:
    return ["+experiment=tiny", f"cache_dir={cache}", "data=webdataset", f"data.shards={shards}", "data.class_names=[thing]",
            "data.resolution=32", "data.max_skip_fraction=0.5", "trainer.latents=stream", "sampler.steps=1",
            "trainer.log_every=1", "trainer.keep_checkpoints=5", "trainer.sample_every=0"]


# --- the stream: order, split, position --------------------------------------------------------


def test_each_epoch_splits_the_units_disjointly_in_an_order_fixed_by_seed_and_epoch():
    for epoch in range(3):
        parts = [epoch_units(7, seed=0, epoch=epoch, rank=r, world_size=3) for r in range(3)]
        assert sorted(u for part in parts for u in part) == list(range(7))  # disjoint and complete
        assert [len(p) for p in parts] == [3, 2, 2]
        assert parts == [epoch_units(7, 0, epoch, r, 3) for r in range(3)]  # a function of (seed, epoch) alone
    orders = {tuple(epoch_units(7, seed, epoch)) for seed in (0, 1) for epoch in range(3)}
    assert len(orders) == 6  # another epoch or seed, another order


def test_a_stream_reopened_at_its_position_reads_on_with_the_same_samples(tmp_path):
    paths = bad_shards(tmp_path)
    source = TarShards(str(tmp_path), resolution=32, class_names=["thing"], max_skip_fraction=1.0)
    straight = RankStream(source, seed=3)
    first = [straight.next_batch(4)["caption"] for _ in range(3)]
    position = StreamPosition(**straight.position.as_dict())
    rest = [straight.next_batch(4)["caption"] for _ in range(3)]  # crosses the end of epoch 0 at sample 15
    resumed = RankStream(source, seed=3, position=position)
    assert [resumed.next_batch(4)["caption"] for _ in range(3)] == rest
    assert resumed.position == straight.position and straight.position.epoch == 1 and straight.position.samples == 24
    per_shard = captions_of(paths)
    expected = [c for epoch in (0, 1) for unit in epoch_units(SHARDS, 3, epoch) for c in per_shard[unit]]
    assert [c for batch in first + rest for c in batch] == expected[:24]  # whole shards in the epoch's order, bad one skipped
    assert source.skips.counts["missing_field"] >= 1


def test_two_ranks_read_disjoint_shards_that_together_are_all(tmp_path):
    real_data.shards(tmp_path, n_shards=4, per_shard=3)
    source = TarShards(str(tmp_path), resolution=32, class_names=["thing"])
    seen = [RankStream(source, seed=0, rank=r, world_size=2).next_batch(6)["caption"] for r in range(2)]
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == sorted(f"sample {k}" for k in range(12))
    with pytest.raises(ConfigError, match="4 unit.*for 5 processes"):
        RankStream(source, seed=0, rank=0, world_size=5)


class Numbers:
    """A finite, indexable source whose items are their own indices."""

    provides = ("index",)

    def __len__(self) -> int:
        return 10

    def batch(self, indices) -> dict:
        return {"index": torch.tensor(list(indices))}


def test_an_indexable_source_streams_its_items_shuffled_per_epoch():
    ranks = [RankStream(Numbers(), seed=0, rank=r, world_size=2) for r in range(2)]
    epoch0 = [r.next_batch(5)["index"].tolist() for r in ranks]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(10)) and epoch0[0] != sorted(epoch0[0])
    epoch1 = [r.next_batch(5)["index"].tolist() for r in ranks]
    assert sorted(epoch1[0] + epoch1[1]) == list(range(10)) and epoch1 != epoch0
    assert head(Numbers(), 3)["index"].tolist() == [0, 1, 2]  # the head is in the source's own order


def test_a_stream_of_nothing_usable_stops_instead_of_spinning(tmp_path):
    real_data.shards(tmp_path, n_shards=1, per_shard=1)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        real_data.tar_member(tar, "z.txt", b"no image")
    source = TarShards([str(tmp_path / "shard-000.tar"), str(tmp_path / "bad.tar")], resolution=32, class_names=["thing"],
                       max_skip_fraction=1.0)
    with pytest.raises(DataError, match="rank 1: epoch 0 .* no usable sample"):
        RankStream(source, seed=0, rank=1, world_size=2).next_batch(1)


# --- configuration ---------------------------------------------------------------------------------


def test_webdataset_with_stream_latents_builds_the_streaming_source(tmp_path):
    real_data.shards(tmp_path, n_shards=2, per_shard=2)
    base = compose_config(["data=webdataset", f"data.shards={tmp_path}", "data.class_names=[thing]", "data.resolution=32"])
    assert isinstance(build("data", data_config(base.data, "pool")), WebDataset)
    streamed = build("data", data_config(base.data, "stream"))
    assert isinstance(streamed, TarShards) and streamed.units == 2 and not hasattr(streamed, "samples")  # nothing held
    shapes = compose_config([]).data
    assert data_config(shapes, "stream") is shapes  # a source without a streaming form is streamed by index


@pytest.mark.parametrize("override, message", [
    ("trainer.latents=disk", "trainer.latents='disk' is not allowed; choose one of: pool, stream"),
    ("trainer.scale_batches=oops", "trainer.scale_batches"),
])
def test_bad_streaming_options_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(compose_config([override]))


def test_the_scale_factor_comes_from_the_first_batches(tmp_path):
    real_data.shards(tmp_path, n_shards=2, per_shard=4)
    source = TarShards(str(tmp_path), resolution=32, class_names=["thing"])
    identity = build("autoencoder.model", compose_config(["autoencoder=identity"]).autoencoder.model)
    images = head(source, 6)["image"]
    assert estimate_scale_factor(identity, source, 3, 2, seed=0) == pytest.approx(1 / float(images.double().std()), rel=1e-6)
    with pytest.raises(ConfigError, match="trainer.scale_batches must be >= 1"):
        estimate_scale_factor(identity, source, 0, 2, seed=0)


# --- training end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Four stream-mode steps on tar shards, the batches the objective and the encoder saw recorded."""
    root = tmp_path_factory.mktemp("stream")
    paths = bad_shards(root / "shards")
    overrides = stream_overrides(root / "shards", root / "cache")
    seen = {"objective": [], "encoded": []}
    real_forward, real_latents = DenoisingLoss.forward, StreamReader.latents

    def forward(self, batch, z0, t, noise, keep):
        seen["objective"].append((list(batch["caption"]), batch["image"].clone()))
        return real_forward(self, batch, z0, t, noise, keep)

    def latents(self, images, posterior_noise):
        seen["encoded"].append(images.clone())
        return real_latents(self, images, posterior_noise)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DenoisingLoss, "forward", forward)
        patch.setattr(StreamReader, "latents", latents)
        metrics = train(compose_config(overrides), root / "run")
    return root, paths, overrides, metrics, seen


def checkpoint(run, step: int):
    folder = run / "checkpoints" / f"step_{step:07d}"
    return load_file(str(folder / "model.safetensors")), json.loads((folder / "state.json").read_text())


def curve(run) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_a_stream_run_trains_on_its_shards_in_order_and_records_where_it_is(straight):
    root, paths, _, metrics, seen = straight
    run = root / "run"
    assert (run / "samples.png").is_file() and (run / "first_stage.json").is_file() and metrics["data_skips"]["skipped"] >= 1
    per_shard = captions_of(paths)
    expected = [c for epoch in range(3) for unit in epoch_units(SHARDS, 0, epoch) for c in per_shard[unit]]
    steps = seen["objective"]
    assert [c for captions, _ in steps for c in captions] == expected[:32]  # 4 steps of 8, over two epoch ends
    # the conditioner's batch is the one whose images were encoded into the step's latents
    assert len(seen["encoded"]) == 4 and all(torch.equal(a, b) for (_, a), b in zip(steps, seen["encoded"]))
    _, state = checkpoint(run, 4)
    assert state["latents"] == "stream" and state["stream"] == [{"epoch": 2, "units_done": 0, "items_read": 2, "samples": 32}]
    assert state["scale_factor"] > 0 and json.loads((run / "first_stage.json").read_text())["reused"] is False


def test_a_resumed_stream_run_is_bit_identical(straight, tmp_path):
    root, _, overrides, _, _ = straight
    run = root / "run"
    train(compose_config([*overrides, f"checkpoint={run / 'checkpoints' / 'step_0000002'}"]), tmp_path / "resumed")
    (a, sa), (b, sb) = checkpoint(run, 4), checkpoint(tmp_path / "resumed", 4)
    assert a.keys() == b.keys()
    for key in a:  # denoiser, EMA, AdamW moments, first stage, generator states
        assert torch.equal(a[key], b[key]), key
    sa.pop("elapsed"), sb.pop("elapsed")
    assert sa == sb  # the stream position and the scale factor included
    assert curve(tmp_path / "resumed") == curve(run)[2:]


def test_a_resume_keeps_the_recorded_scale_factor_and_its_mode(straight, tmp_path):
    root, _, overrides, _, _ = straight
    half = tmp_path / "half"
    shutil.copytree(root / "run" / "checkpoints" / "step_0000002", half)
    state = json.loads((half / "state.json").read_text())
    (half / "state.json").write_text(json.dumps({**state, "scale_factor": 0.5}))
    train(compose_config([*overrides, f"checkpoint={half}", "trainer.steps=3"]), tmp_path / "resumed")
    assert checkpoint(tmp_path / "resumed", 3)[1]["scale_factor"] == 0.5  # not estimated anew
    with pytest.raises(ConfigError, match="trainer.latents=stream; resume it with the same"):
        train(compose_config([*overrides, f"checkpoint={half}", "trainer.latents=pool"]), tmp_path / "pool")


def test_the_stream_trained_first_stage_is_cached_apart_from_the_pool_one(straight):
    root, *_ = straight
    cached = list((root / "cache" / "first_stage").iterdir())
    assert len(cached) == 1
    from ldmcore.training.first_stage import cache_key

    cfg = validate(compose_config(stream_overrides(root / "shards", root / "cache")))
    assert cached[0].name == cache_key(cfg, streamed=True) != cache_key(cfg)


def test_the_default_shapes_world_trains_in_stream_mode_by_index(tmp_path, tiny, one_thread):
    train(compose_config([*tiny, "trainer.latents=stream", "sampler.steps=1", "trainer.sample_every=0"]), tmp_path)
    _, state = checkpoint(tmp_path, 4)
    # every item is a unit: 31 read to the end, the 32nd's one item read
    assert state["stream"] == [{"epoch": 0, "units_done": 31, "items_read": 1, "samples": 32}]


# --- two processes ---------------------------------------------------------------------------------

RECORD_READS = """
import json, sys
from hydra import compose, initialize_config_module
from ldmcore import hydra_search
from ldmcore.data import stream
from ldmcore.tasks import train
from ldmcore.training import distributed

ctx = distributed.init_from_env()
opened = []


class Recorded:
    '''The denoiser stream's source, noting every shard it opens.'''

    def __init__(self, source):
        self.source, self.units = source, source.units

    def items(self, unit, skip=0):
        opened.append(self.source.shards[unit].name)
        return self.source.items(unit, skip)

    def collate(self, items):
        return self.source.collate(items)


real_init = stream.RankStream.__init__


def init(self, source, seed, rank=0, world_size=1, position=None):
    real_init(self, source, seed, rank, world_size, position)
    if world_size == 2:  # the denoiser's stream (the first stage reads as one process of one)
        self.source = Recorded(self.source)


stream.RankStream.__init__ = init
hydra_search.register()
with initialize_config_module("ldmcore.conf", version_base=None):
    cfg = compose("config", overrides=json.loads(sys.argv[2]))
train(cfg, sys.argv[1])
with open(f"{sys.argv[1]}.reads{ctx.rank}.json", "w") as out:
    json.dump(opened, out)
distributed.shutdown()
"""


def test_two_processes_read_disjoint_shards(tmp_path):
    real_data.shards(tmp_path / "shards", n_shards=4, per_shard=4)
    script = tmp_path / "record_reads.py"
    script.write_text(RECORD_READS)
    # 4 steps of 4 samples, 2 per rank: each rank reads its 2 shards of epoch 0 (8 samples)
    overrides = [*stream_overrides(tmp_path / "shards", tmp_path / "cache"), "trainer.batch_size=4", "trainer.grid_columns=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                           str(tmp_path / "run"), json.dumps(overrides)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reads = [json.loads((tmp_path / f"run.reads{r}.json").read_text()) for r in range(2)]
    assert set(reads[0]).isdisjoint(reads[1]) and len(reads[0]) == len(reads[1]) == 2
    assert sorted(reads[0] + reads[1]) == [f"shard-{s:03d}.tar" for s in range(4)]
    assert reads == [[f"shard-{u:03d}.tar" for u in epoch_units(4, 0, 0, r, 2)] for r in range(2)]
    _, state = checkpoint(tmp_path / "run", 4)
    assert state["world_size"] == 2 and [p["samples"] for p in state["stream"]] == [8, 8]  # B / W = 2 per rank and step
