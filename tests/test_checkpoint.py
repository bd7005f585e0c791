"""Checkpoints are safetensors folders, written atomically, refused when pickled or mismatched; a resumed
run must be the checkpoint's model (option by option, newer options at their defaults, loading flags aside)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_config
from ldmcore.config import validate
from ldmcore.model_config import check_same_model, checkpoint_run_config
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


# --- is it the same model? (resuming, task=train checkpoint=...) ------------------------------


def saved_config(*overrides: str):
    """A checkpoint's config.yaml as training writes it: the validated run config, resolved."""
    return OmegaConf.create(OmegaConf.to_yaml(validate(compose_config(list(overrides))), resolve=True))


def test_a_checkpoint_written_before_newer_options_is_the_same_model():
    current = validate(compose_config(["+condition=[class,layout]"]))
    saved = saved_config("+condition=[class,layout]")
    del saved.autoencoder["allow_pickle"], saved.autoencoder["scale_factor"]  # schema options added since
    del saved.noise["min_snr_gamma"]
    del saved.condition.layout["corner_frequencies"]  # a plugin option added since: its config file's default
    del saved.data["seed"]  # a constructor argument the config left out: the constructor's default
    check_same_model(saved, current, "RUN")
    rebuilt = checkpoint_run_config(current, saved)  # task=sample / eval rebuild the checkpoint's model so
    assert rebuilt.autoencoder.allow_pickle is False and rebuilt.condition.layout.corner_frequencies == 4
    given = validate(compose_config(["+condition=[class,layout]", "autoencoder.scale_factor=0.18215",
                                     "condition.layout.corner_frequencies=0"]))
    with pytest.raises(CheckpointError) as error:  # a value other than the default those checkpoints had
        check_same_model(saved, given, "RUN")
    assert "autoencoder.scale_factor: checkpoint None, config 0.18215" in str(error.value)
    assert "condition.layout.corner_frequencies: checkpoint 4, config 0" in str(error.value)


def test_a_checkpoint_from_before_a_plugin_option_gets_the_value_it_was_trained_with():
    """layout's `regions` and `class_embedding` default to true, but a checkpoint written before they
    existed was trained without them: the plugin's legacy_defaults say so, and it is rebuilt as trained."""
    current = validate(compose_config(["+condition=layout"]))
    assert current.condition.layout.regions and current.condition.layout.class_embedding
    saved = saved_config("+condition=layout")
    del saved.condition.layout["regions"], saved.condition.layout["class_embedding"], saved.condition.layout["legacy_defaults"]
    rebuilt = checkpoint_run_config(current, saved)
    assert rebuilt.condition.layout.regions is False and rebuilt.condition.layout.class_embedding is False
    with pytest.raises(CheckpointError, match="condition.layout.regions: checkpoint False, config True"):
        check_same_model(saved, current, "RUN")  # resuming it with regions would train another model
    kept = saved_config("+condition=layout")  # a checkpoint that has the options keeps its values
    assert checkpoint_run_config(current, kept).condition.layout.regions is True


def test_legacy_defaults_reach_nested_options():
    current = validate(compose_config(["+condition=image_text"]))
    assert current.condition.image_text.text.token_embedding is True
    saved = saved_config("+condition=image_text")
    del saved.condition.image_text.text["token_embedding"]  # image_text's caption encoder before the option
    rebuilt = checkpoint_run_config(current, saved)
    assert rebuilt.condition.image_text.text.token_embedding is False
    assert rebuilt.condition.image_text.regions is True  # present in the checkpoint: kept


def test_a_checkpoint_from_before_coordinate_channels_resumes_where_none_are_derived():
    saved = saved_config("+condition=class")
    del saved.denoiser["coordinate_frequencies"]  # written before the option existed: built with none
    check_same_model(saved, validate(compose_config(["+condition=class"])), "RUN")  # null derives 0 for a class token


def test_loading_flags_and_options_since_removed_are_not_compared():
    saved = saved_config("+condition=image_text")
    saved.condition.image_text.text.tokenizer_cache = "/the/cache/dir/of/then"  # options this version no longer has
    saved.autoencoder.retired_option = 1
    current = validate(compose_config(["+condition=image_text", "autoencoder.allow_pickle=true",
                                       "condition.image_text.image.allow_pickle=true"]))
    check_same_model(saved, current, "RUN")
    assert "retired_option" not in checkpoint_run_config(current, saved).autoencoder


def test_another_model_is_refused_naming_each_differing_option_with_both_values():
    saved = saved_config("+condition=class", "noise.prediction=eps")
    current = validate(compose_config(["+condition=[class,text]", "denoiser.model_channels=16", "noise.prediction=v"]))
    with pytest.raises(CheckpointError) as error:
        check_same_model(saved, current, "RUN")
    message = str(error.value)
    assert message.startswith("RUN was trained with another configuration: ")
    for difference in ("denoiser.model_channels: checkpoint 64, config 16", "noise.prediction: checkpoint 'eps', config 'v'",
                       "data.kind: checkpoint 'single', config 'multi'", "condition.text: checkpoint (absent), config {"):
        assert difference in message
    assert "num_res_blocks" not in message  # the differing options, not whole sections
