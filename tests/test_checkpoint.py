"""Checkpoints are safetensors folders, written atomically, refused when pickled or mismatched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldmcore.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_module_state,
    module_tensors,
    resolve_checkpoint,
    save_run_checkpoint,
)
from ldmcore.training.optim import load_optimizer_tensors, optimizer_tensors


def test_run_checkpoints_latest_and_pruning(tmp_path):
    model = nn.Linear(3, 2)
    for step in (10, 20, 30):
        save_run_checkpoint(tmp_path / "checkpoints", step, module_tensors(model, "model"), {"step": step}, None, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_0000020", "step_0000030"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    tensors, state, config, folder = load_checkpoint(tmp_path)  # a run folder resolves to its latest
    assert state["step"] == 30 and folder.name == "step_0000030" and config is None
    assert torch.equal(tensors["model.weight"], model.weight)


def test_pickled_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match="pickled"):
        resolve_checkpoint(path)


def test_missing_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_mismatched_weights_list_keys_and_load_nothing():
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    target = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_module_state(target, module_tensors(source, "model"), "model")
    message = str(info.value)
    assert "missing: model.2.*" in message.replace("model.2.weight", "model.2.*") or "2.weight" in message
    assert "mis-shaped" in message and "0.weight" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_optimizer_state_round_trips():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    tensors, groups = optimizer_tensors(opt)
    other = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.5)
    load_optimizer_tensors(other, tensors, groups)
    assert other.param_groups[0]["lr"] == 0.1
    for a, b in zip(opt.state.values(), other.state.values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
