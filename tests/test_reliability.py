"""Reliability (docs/reliability.md): exact resume, atomic checkpoints under SIGKILL and a full
disk, a graceful stop on SIGTERM / SIGINT, and the non-finite loss policy."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import ldmcore.training.checkpoint as ckpt
from conftest import compose_config
from ldmcore.diffusion.process import NoiseProcess
from ldmcore.tasks import train
from ldmcore.training.checkpoint import CheckpointError, load_checkpoint, save_run_checkpoint
from ldmcore.training.divergence import DivergedLossError, DivergenceWatch
from ldmcore.training.loop import NonFiniteLossError
from ldmcore.training.signals import stop_on_signals


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One first-stage cache for the module: the tiny autoencoder is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """Four steps in one go (a grid at step 2 included), the reference for the resumed runs."""
    overrides = ["+experiment=tiny", "+condition=class", f"cache_dir={cache}", "sampler.steps=1", "trainer.log_every=1",
                 "trainer.keep_checkpoints=5"]
    run = tmp_path_factory.mktemp("straight")
    train(compose_config(overrides), run)
    return run, overrides


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def curve(records):
    """The deterministic part of metrics.jsonl (not timings)."""
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["skipped"]) for r in records]


def assert_same_checkpoint(a, b):
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:  # model, EMA, optimizer, first stage, both RNG states
        assert torch.equal(ta[key], tb[key]), key
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    sa.pop("elapsed"), sb.pop("elapsed")
    assert sa == sb  # step, EMA update count, skip count, optimizer groups, scale factor


# --- resume --------------------------------------------------------------------------------------


def test_resume_into_a_new_folder_continues_the_run_exactly(straight, tmp_path):
    run, overrides = straight
    half = run / "checkpoints" / "step_0000002"
    metrics = train(compose_config([*overrides, f"checkpoint={half}"]), tmp_path / "resumed")
    assert_same_checkpoint(run / "checkpoints" / "step_0000004", tmp_path / "resumed" / "checkpoints" / "step_0000004")
    before, after = read_jsonl(run / "metrics.jsonl"), read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in after] == [3, 4]  # the new folder's log continues from the resumed step
    assert curve(before) == curve([r for r in before if r["step"] <= 2] + after)
    assert metrics["resumed_from"] == str(half)


def test_resume_in_place_continues_one_metrics_log(straight, tmp_path):
    run, overrides = straight
    # A copy of the run as if it had been killed after logging step 4 but before its checkpoint,
    # with the last log line torn by the kill.
    cut = tmp_path / "run"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000004")
    (cut / "checkpoints" / "latest").write_text("step_0000002")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    train(compose_config([*overrides, f"checkpoint={cut}"]), cut)  # checkpoint= the run folder itself
    assert_same_checkpoint(run / "checkpoints" / "step_0000004", cut / "checkpoints" / "step_0000004")
    assert curve(read_jsonl(cut / "metrics.jsonl")) == curve(read_jsonl(run / "metrics.jsonl"))  # steps 1-4, once each


def test_resume_past_the_configured_steps_is_refused(straight, tmp_path):
    run, overrides = straight
    with pytest.raises(ValueError, match="trainer.steps=3 is below the checkpoint's step 4"):
        train(compose_config([*overrides, f"checkpoint={run}", "trainer.steps=3"]), tmp_path)


# --- atomic writes -----------------------------------------------------------------------------

STUCK_SAVER = """
import sys, time, torch
import ldmcore.training.checkpoint as ckpt
root = sys.argv[1]
ckpt.save_run_checkpoint(root, 1, {"w": torch.arange(4096.0)}, {"step": 1}, None, keep=1)
real = ckpt.save_file
def half_written(tensors, path):
    real(tensors, path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    print("writing", flush=True)
    time.sleep(600)
ckpt.save_file = half_written
ckpt.save_run_checkpoint(root, 2, {"w": torch.zeros(4096)}, {"step": 2}, None, keep=1)
"""


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    saver = subprocess.Popen([sys.executable, "-c", STUCK_SAVER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline().strip() == "writing"
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait(timeout=60)
    assert [p.name for p in root.glob(".tmp-step_0000002-*")]  # the half-written checkpoint is there ...
    assert not (root / "step_0000002").exists()  # ... never under its final name
    tensors, state, _, folder = load_checkpoint(tmp_path)
    assert folder.name == "step_0000001" and state["step"] == 1 and torch.equal(tensors["w"], torch.arange(4096.0))
    save_run_checkpoint(root, 2, {"w": torch.zeros(4096)}, {"step": 2}, None, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]  # the dead process's temporary is cleared


def test_a_checkpoint_being_replaced_when_killed_is_put_back(tmp_path):
    root = tmp_path / "checkpoints"
    save_run_checkpoint(root, 3, {"w": torch.ones(3)}, {"step": 3}, None, keep=2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.replace(root / "step_0000003", root / f".old-step_0000003-{int(dead.stdout)}")  # killed between the two renames
    with pytest.raises(CheckpointError, match="names step_0000003"):
        load_checkpoint(tmp_path)
    save_run_checkpoint(root, 4, {"w": torch.zeros(3)}, {"step": 4}, None, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003", "step_0000004"]
    assert torch.equal(load_checkpoint(root / "step_0000003")[0]["w"], torch.ones(3))


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"),
     SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")],
    ids=["OSError", "SafetensorError"],
)
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    root = tmp_path / "checkpoints"
    save_run_checkpoint(root, 1, {"w": torch.ones(8)}, {"step": 1}, None, keep=1)

    def disk_full(tensors, path):
        open(path, "wb").write(b"partial")
        raise error

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(CheckpointError) as info:
        save_run_checkpoint(root, 2, {"w": torch.zeros(8)}, {"step": 2}, None, keep=1)
    message = str(info.value)
    assert "the disk is full" in message and str(root / "step_0000002") in message
    assert f"previous checkpoint {root / 'step_0000001'} is intact" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]  # temporary folder removed
    assert load_checkpoint(root)[1]["step"] == 1


def test_full_disk_stops_training_and_nothing_is_lost(tmp_path, cache, monkeypatch):
    real = ckpt.save_file

    def full_at_step_2(tensors, path):
        if "step_0000002" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", full_at_step_2)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="step_0000002: the disk is full"):
        train(tiny_run(cache, "trainer.steps=2"), run)
    assert load_checkpoint(run)[1]["step"] == 1
    assert not list((run / "checkpoints").glob(".*"))


# --- signals -----------------------------------------------------------------------------------


def test_signal_sets_a_flag_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)  # would be KeyboardInterrupt outside the block
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.name == "SIGINT"  # the first one is kept, repeats ignored
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_ends_the_run_with_a_checkpoint_that_resumes(tmp_path, cache):
    run = tmp_path / "run"
    args = ["+experiment=tiny", f"cache_dir={cache}", "sampler.steps=1", "trainer.log_every=1", "trainer.sample_every=0"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ldmcore.run", *args, "trainer.steps=100000",
                                 "trainer.checkpoint_every=0", f"hydra.run.dir={run}"],
                                cwd=tmp_path, stdout=out, stderr=err)
        try:
            while proc.poll() is None and not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
                time.sleep(0.1)
            assert proc.poll() is None, (tmp_path / "err").read_text()[-2000:]
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=300)
        finally:
            proc.kill()
            proc.wait()
    assert code == 0, (tmp_path / "err").read_text()[-2000:]
    assert (tmp_path / "out").read_text().splitlines()[-1] == str(run)
    summary = json.loads((run / "metrics.json").read_text())
    step = summary["step"]
    assert summary["stopped_by"] == "SIGTERM" and 0 < step < 100000
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == step  # the step reached is logged ...
    _, state, _, folder = load_checkpoint(run)
    assert state["step"] == step and folder.name == f"step_{step:07d}"  # ... and checkpointed
    assert not (run / "samples.png").exists()  # no final grid on the way out
    resumed = train(compose_config([*args, f"checkpoint={run}", f"trainer.steps={step + 2}"]), tmp_path / "resumed")
    assert resumed["resumed_from"] == str(folder)
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [step + 1, step + 2]


# --- non-finite losses -------------------------------------------------------------------------


def tiny_run(cache, *extra):
    """A tiny run checkpointing every step, no periodic grid."""
    return compose_config(["+experiment=tiny", f"cache_dir={cache}", "sampler.steps=1", "trainer.sample_every=0",
                           "trainer.log_every=1", "trainer.checkpoint_every=1", *extra])


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at(*calls): the denoiser loss is NaN on those (1-based) training steps."""

    def install(*calls):
        real, seen = NoiseProcess.training_loss, []

        def training_loss(self, *args, **kwargs):
            seen.append(1)
            loss = real(self, *args, **kwargs)
            return loss * float("nan") if len(seen) in calls else loss

        monkeypatch.setattr(NoiseProcess, "training_loss", training_loss)

    return install


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, cache, nan_at):
    nan_at(2)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_run(cache, "trainer.steps=2"), run)
    message = str(info.value)
    assert "loss is not finite at step 2" in message and str(run / "checkpoints" / "step_0000001") in message
    tensors, state, _, folder = load_checkpoint(run)
    assert folder.name == "step_0000001" and state["step"] == 1
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_nonfinite_steps_are_skipped_and_counted_until_too_many(tmp_path, cache, nan_at):
    nan_at(2, 4)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*2 steps skipped, more than trainer.max_skipped_steps=1"):
        train(tiny_run(cache, "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=1"), run)
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["skipped"] for r in log] == [0, 1, 1] and log[1]["loss"] is None and log[2]["loss"] is not None
    tensors, state, _, folder = load_checkpoint(run)
    assert folder.name == "step_0000003" and state["skipped_steps"] == 1
    assert state["ema_updates"] == 2  # the skipped step touched neither the weights nor the EMA
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


# --- a finite loss that jumps and stays up -----------------------------------------------------


def test_divergence_watch_reports_a_jump_that_stays_not_noise():
    watch = DivergenceWatch(factor=3, window=2, patience=2)
    losses = [1.0, 0.5, 0.2, 0.1, 0.1, 0.1, 0.3, 0.5, 0.1, 0.1]  # a decreasing loss, then one window of 0.4
    assert [watch.update(step, loss) for step, loss in enumerate(losses, 1)] == [None] * len(losses)  # one window: noise
    assert [watch.update(step, loss) for step, loss in enumerate([0.5, 0.5, float("nan"), 0.4], 11)] == [None] * 4
    message = watch.update(15, 0.6)  # the second window in a row above 3 x 0.1 (the NaN is not counted)
    assert message and "3 x its lowest (0.1, steps to 6) since step 11, now 0.5 at step 15" in message
    assert watch.update(16, 0.6) is None and watch.update(17, 0.6) is None  # reported once per episode
    with pytest.raises(ValueError, match="trainer.divergence_factor must be > 1"):
        DivergenceWatch(factor=1, window=25, patience=4)


@pytest.fixture
def loss_jumps_at(monkeypatch):
    """loss_jumps_at(call): the denoiser loss is 100 times larger from that (1-based) training step on."""

    def install(call):
        real, seen = NoiseProcess.training_loss, []

        def training_loss(self, *args, **kwargs):
            seen.append(1)
            loss = real(self, *args, **kwargs)
            return loss * 100 if len(seen) >= call else loss

        monkeypatch.setattr(NoiseProcess, "training_loss", training_loss)

    return install


WATCH_EVERY_STEP = ["trainer.divergence_window=1", "trainer.divergence_patience=2", "trainer.steps=6"]


def test_a_loss_that_jumps_and_stays_stops_the_run_naming_the_step(tmp_path, cache, loss_jumps_at):
    loss_jumps_at(3)
    run = tmp_path / "run"
    with pytest.raises(DivergedLossError, match=r"since step 3, now .* at step 4; training stopped .*"
                                                 r"the last checkpoint is .*step_0000003"):
        train(tiny_run(cache, *WATCH_EVERY_STEP), run)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]  # stopped at step 4, before its record


def test_a_loss_that_jumps_is_only_logged_with_on_divergence_warn(tmp_path, cache, loss_jumps_at, caplog):
    loss_jumps_at(3)
    run = tmp_path / "run"
    train(tiny_run(cache, *WATCH_EVERY_STEP, "trainer.on_divergence=warn"), run)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    warned = [r.message for r in caplog.records if "diverged" in r.message]
    assert len(warned) == 1 and "at step 4; training goes on" in warned[0]
