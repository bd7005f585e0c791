"""Data-parallel training (docs/scaling.md): two processes under torchrun (gloo, CPU) train the same
model as one process on the same global batch; one run folder, written by rank 0 only; exact
resume; gradient accumulation and bf16 as config switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ldmcore.training.loop as loop
from conftest import compose_config
from ldmcore.config import ConfigError
from ldmcore.tasks import train
from ldmcore.training.distributed import Context
from ldmcore.training.loop import shard_rows

# A tiny class-conditioned run (condition dropout draws random numbers too), a checkpoint and a
# periodic grid at step 2, and every step logged.
OVERRIDES = ["+experiment=tiny", "+condition=class", "sampler.steps=1", "trainer.steps=4", "trainer.log_every=1",
             "trainer.keep_checkpoints=5"]
ATOL = 1e-5


def torchrun(args: list[str], cwd, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m ldmcore.run ARGS`` with this interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "ldmcore.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def tensors(run, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def state(run, step: int = 4) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:07d}" / "state.json").read_text())


def curve(run) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def assert_close_weights(a: dict, b: dict, prefixes=("model.", "ema.", "guide.", "optimizer.")) -> None:
    keys = [k for k in a if k.startswith(prefixes)]
    assert keys and all(k in b for k in keys)
    for key in keys:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0, msg=key)


def files(run) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != "run.log"}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the whole global batch of 8."""
    cache = tmp_path_factory.mktemp("cache_single")
    run = tmp_path_factory.mktemp("single")
    train(compose_config([*OVERRIDES, f"cache_dir={cache}"]), run)
    return run


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two processes under torchrun, each with 4 of the 8 samples; Hydra picks the folder with a
    microsecond timestamp, so two ranks choosing their own folders would make two."""
    work, cache = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("cache_two")
    done = torchrun([*OVERRIDES, f"cache_dir={cache}", "hydra.run.dir=outputs/${now:%H-%M-%S-%f}"], work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, cache, done


def test_two_processes_equal_one_process_on_the_same_global_batch(single, two):
    work, _, _ = two
    (run,) = (work / "outputs").iterdir()
    a, b = tensors(single), tensors(run)
    assert_close_weights(a, b)  # denoiser, EMA, autoguidance snapshot, AdamW moments
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model."))  # really two computations
    for step in (2, 4):
        assert_close_weights(tensors(single, step), tensors(run, step))
    for x, y in zip(curve(single), curve(run), strict=True):  # the global mean loss and grad norm are logged
        assert x[0] == y[0] and x[3] == y[3]
        assert x[1:3] == pytest.approx(y[1:3], rel=1e-5)
    assert state(run)["world_size"] == 2 and "rng.torch.rank1" in b  # each rank's dropout RNG is kept


def test_one_run_folder_and_only_rank_0_writes(single, two):
    work, cache, done = two
    assert [p.name for p in work.iterdir()] == ["outputs"]
    (run,) = (work / "outputs").iterdir()  # one folder, although the ranks' clocks differ in microseconds
    assert done.stdout.splitlines()[-1] == str(run) and done.stdout.count(str(run)) == 1  # printed by rank 0 only
    assert files(run) == files(single) | {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    assert {"samples.png", "samples/step_0000002.png", "metrics.json", "first_stage.json"} <= files(run)
    assert len(list((cache / "first_stage").iterdir())) == 1  # cached once, by rank 0
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


def test_two_processes_resume_exactly(two, tmp_path):
    work, cache, _ = two
    (run,) = (work / "outputs").iterdir()
    done = torchrun([*OVERRIDES, f"cache_dir={cache}", f"checkpoint={run / 'checkpoints' / 'step_0000002'}",
                     f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    straight, resumed = tensors(run), tensors(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bit for bit, both ranks' RNGs included
    assert curve(tmp_path / "resumed") == curve(run)[2:]


def test_one_process_resumes_a_two_process_checkpoint(single, two, tmp_path):
    """The data stream does not depend on the number of processes: one process continues a run
    of two and ends where the one-process run ended."""
    work, cache, _ = two
    (run,) = (work / "outputs").iterdir()
    train(compose_config([*OVERRIDES, f"cache_dir={cache}", f"checkpoint={run / 'checkpoints' / 'step_0000002'}"]), tmp_path)
    assert_close_weights(tensors(single), tensors(tmp_path))


HELPERS = """
import json, sys, torch, torch.distributed as dist
from torch import nn
from ldmcore.training import distributed
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
ctx = distributed.current()
out = {"ctx": [ctx.rank, ctx.world_size, ctx.is_main]}
def fails():
    raise ValueError("disk on fire")
try:
    distributed.on_main(fails, ctx)
except Exception as error:
    out["error"] = f"{type(error).__name__}: {error}"
out["value"] = distributed.on_main(lambda: {"from": rank}, ctx)
torch.manual_seed(rank)
module = nn.Linear(3, 2)
distributed.broadcast_module(module, ctx)
out["weight"] = module.weight.tolist()
distributed.check_in_sync({"linear": module}, ctx)
if rank == 1:
    with torch.no_grad():
        module.bias.add_(1e-6)
try:
    distributed.check_in_sync({"linear": module}, ctx)
except RuntimeError as error:
    out["sync"] = str(error)
print(json.dumps(out))
dist.destroy_process_group()
"""


def test_rank_0_only_work_hands_its_result_or_its_error_to_every_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", HELPERS, str(rank), str(tmp_path / "store")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.splitlines()[-1]))
    zero, one = outs
    assert zero["ctx"] == [0, 2, True] and one["ctx"] == [1, 2, False]
    assert zero["error"] == "ValueError: disk on fire"  # rank 0 raises its own error ...
    assert one["error"] == "PeerFailed: rank 0 failed: ValueError: disk on fire"  # ... and rank 1 learns it, no hang
    assert zero["value"] == one["value"] == {"from": 0}
    assert zero["weight"] == one["weight"]  # rank 0's weights everywhere
    assert "['linear']" in zero["sync"] and zero["sync"] == one["sync"]  # a diverged rank is caught on every rank


def test_shards_are_disjoint_and_cover_the_global_batch():
    rows = [[r for part in shard_rows(12, 2, Context(rank, 3)) for r in range(12)[part]] for rank in range(3)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [len(range(12)[p]) for p in shard_rows(12, 2, Context(1, 3))] == [2, 2]
    with pytest.raises(ConfigError, match=r"trainer.batch_size=8 .* processes \(3\) times trainer.grad_accumulation \(1\)"):
        shard_rows(8, 1, Context(0, 3))


@pytest.fixture
def forward_spy(monkeypatch):
    """Records the batch size and output dtype of every denoiser forward in training."""
    seen = []
    real = loop.apply_denoiser_net

    def spy(unet, z, t, cond):
        out = real(unet, z, t, cond)
        seen.append((len(t), out.dtype))
        return out

    monkeypatch.setattr(loop, "apply_denoiser_net", spy)
    return seen


def test_gradient_accumulation_equals_the_big_batch(single, tmp_path, one_thread, forward_spy):
    train(compose_config([*OVERRIDES, f"cache_dir={tmp_path / 'cache'}", "trainer.grad_accumulation=2"]), tmp_path)
    assert forward_spy == [(4, torch.float32)] * 8  # 4 updates of 2 micro-batches of 4
    assert_close_weights(tensors(single), tensors(tmp_path))


def test_bf16_trains_with_finite_losses(tmp_path, one_thread, forward_spy):
    train(compose_config([*OVERRIDES, f"cache_dir={tmp_path / 'cache'}", "trainer.precision=bf16", "trainer.steps=3",
                          "trainer.sample_every=0"]), tmp_path)
    assert forward_spy and all(dtype == torch.bfloat16 for _, dtype in forward_spy)  # autocast was on
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 3 and all(isinstance(v, float) and v == v for v in losses)  # finite (JSON has no NaN: None)
    assert all(w.isfinite().all() for k, w in tensors(tmp_path, 3).items() if k.startswith("model."))


@pytest.mark.parametrize("override, message", [
    ("trainer.grad_accumulation=3", "trainer.grad_accumulation=3 must be >= 1 and divide trainer.batch_size=8"),
    ("trainer.grad_accumulation=0", "trainer.grad_accumulation=0 must be >= 1"),
    ("trainer.precision=fp16", "trainer.precision='fp16' is not allowed; choose one of: fp32, bf16"),
    ("trainer.device=tpu", "trainer.device='tpu' is not allowed; choose one of: cpu, cuda"),
])
def test_bad_scaling_options_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(compose_config([*OVERRIDES, f"cache_dir={tmp_path}", override]), tmp_path)
