"""The plugin contract, run over every installed condition plugin, and the plugin manager's rules."""

from __future__ import annotations

import itertools
import json
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldmcore.autoencoder import KLAutoencoder
from ldmcore.conditioning import INJECTIONS, ConditionEncoder
from ldmcore.data.base import data_info
from ldmcore.data.shapes import ShapesWorld
from ldmcore.hookspecs import hookimpl
from ldmcore.pluginmanager import PluginError, PluginRegistry, installed
from ldmcore.tasks import read_conditions

CONDITIONS = installed().names()
LATENT = (8, 8)
NO_ROOT = Path("/nonexistent-conditions-folder")  # formatted values name absolute paths (if any): no folder is read


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="single", size=64, seed=3)


def options_of(condition):
    path = Path(condition.call("ldmcore_config_dir")) / "condition" / f"{condition.name}.yaml"
    return path, OmegaConf.load(path)


def test_builtin_plugins_arrive_through_the_entry_point_group():
    assert "class" in CONDITIONS
    assert all("entry point" in installed().get(n).source for n in CONDITIONS)


@pytest.mark.parametrize("name", CONDITIONS)
def test_contract(name, world):
    condition = installed().get(name)
    info = data_info(world)
    # its own Hydra config, under the package condition.NAME, with a dropout
    path, options = options_of(condition)
    assert path.read_text().splitlines()[0].strip() == f"# @package condition.{name}"
    assert 0.0 <= options.dropout <= 1.0
    # batch keys it reads are among the shapes world's
    keys = condition.call("ldmcore_batch_keys", options=options)
    assert keys and set(keys) <= set(info.provides)
    # the encoder declares its injections and produces exactly those shapes, for data and for null
    first_stage = KLAutoencoder(base_channels=8, channel_mult=(1, 2, 2), latent_channels=4)  # f=4: 32 px -> LATENT
    encoder = condition.call("ldmcore_build_encoder", options=options, data=info, latent_shape=(4, *LATENT),
                             first_stage=first_stage, cache_dir=None)
    assert isinstance(encoder, ConditionEncoder) and set(encoder.outputs) <= set(INJECTIONS)
    batch = world.batch(list(range(6)))
    out, null = encoder(batch), encoder.null(6, LATENT, torch.device("cpu"))
    for injection, shape in encoder.outputs.items():
        expected = (6, *shape, *LATENT) if injection == "concat" else (6, *shape)
        assert tuple(out[injection].shape) == expected
        assert tuple(null[injection].shape) == expected
        assert not torch.allclose(out[injection], null[injection])
    # user values: format(batch) -> parse -> the same batch keys, and JSON-serializable
    for i in range(6):
        value = condition.call("ldmcore_format_value", batch=batch, index=i, options=options, data=info, cache_dir=None)
        json.dumps(value)
        parsed = condition.call("ldmcore_parse_value", value=value, options=options, data=info, root=NO_ROOT)
        if set(parsed) - set(batch):  # the plugin's own keys (e.g. a palette derived from the labels):
            one = {key: [v] for key, v in parsed.items()}  # they format back and encode as sample i does
            assert condition.call("ldmcore_format_value", batch=one, index=0, options=options, data=info, cache_dir=None) == value
            for injection, encoded in encoder(one).items():
                assert torch.allclose(encoded[0], out[injection][i], atol=1e-5)  # a batch of 1 vs 6: rounding
            continue
        for key, v in parsed.items():
            expected = batch[key][i]
            if isinstance(expected, str):  # e.g. a caption: batch keys may hold python values
                assert v == expected
            else:
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(expected))
    # scoring ground-truth images of their own conditions is perfect
    if condition.implements("ldmcore_score"):
        scores = condition.call("ldmcore_score", images=batch["image"], batch=batch, options=options, data=info)
        ratios = {k: v for k, v in scores.items() if not k.endswith("_db")}  # decibels (PSNR) are not ratios
        assert ratios and all(0.0 <= v <= 1.0 for v in ratios.values())
        assert max(ratios.values()) == 1.0
    if condition.implements("ldmcore_sample_success"):  # every ground-truth image follows its own condition
        assert condition.call("ldmcore_sample_success", images=batch["image"], batch=batch, options=options, data=info) == [True] * 6


@pytest.mark.parametrize("name", CONDITIONS)
def test_unreadable_user_value_is_refused_with_what_is_allowed(name, world):
    condition = installed().get(name)
    _, options = options_of(condition)
    with pytest.raises(ValueError):
        condition.call("ldmcore_parse_value", value={"certainly": ["not", "valid"]}, options=options, data=data_info(world),
                       root=NO_ROOT)


def test_class_plugin_names_the_known_classes(world):
    condition = installed().get("class")
    _, options = options_of(condition)
    with pytest.raises(ValueError) as info:
        condition.call("ldmcore_parse_value", value="purple hexagon", options=options, data=data_info(world), root=NO_ROOT)
    assert "purple hexagon" in str(info.value) and "red circle" in str(info.value)


_made = itertools.count()


def _minimal_plugin(name="probe", **extra):
    module = types.ModuleType(f"probe_plugin_{next(_made)}")
    hooks = {
        "ldmcore_condition_name": lambda: name,
        "ldmcore_config_dir": lambda: "/nonexistent",
        "ldmcore_batch_keys": lambda: ["image"],
        "ldmcore_build_encoder": lambda options, data: None,
        "ldmcore_parse_value": lambda value: {},
        "ldmcore_format_value": lambda batch, index: None,
        **extra,
    }
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(module, hook_name, hookimpl(fn))
    return module


def test_manager_rejects_an_unknown_hook():
    registry = PluginRegistry(load_entry_points=False)
    with pytest.raises(PluginError, match="ldmcore_no_such_hook"):
        registry.register(_minimal_plugin(ldmcore_no_such_hook=lambda: 1))
    assert registry.names() == []


def test_manager_rejects_missing_required_hooks_and_duplicates():
    registry = PluginRegistry(load_entry_points=False)
    incomplete = _minimal_plugin()
    del incomplete.ldmcore_build_encoder
    with pytest.raises(PluginError, match="ldmcore_build_encoder"):
        registry.register(incomplete)
    registry.register(_minimal_plugin())
    with pytest.raises(PluginError, match="two plugins"):
        registry.register(_minimal_plugin())


def test_hooks_are_called_for_one_plugin_only():
    registry = PluginRegistry(load_entry_points=False)
    a, b = registry.register(_minimal_plugin("a")), registry.register(_minimal_plugin("b"))
    assert (a.name, b.name) == ("a", "b")
    assert a.call("ldmcore_condition_name") == "a" and b.call("ldmcore_condition_name") == "b"


def test_unknown_condition_lists_installed_ones():
    with pytest.raises(KeyError, match="class"):
        installed().get("telepathy")


def test_a_conditions_file_hands_each_value_its_own_folder_as_root(tmp_path, monkeypatch):
    """Paths in a conditions file are relative to that file (``root`` of ldmcore_parse_value), not to
    the working directory."""
    seen = []

    def parse(value, root):
        seen.append(root)
        return {"image": (root / value).read_text()}

    probe = PluginRegistry(load_entry_points=False).register(_minimal_plugin(ldmcore_parse_value=parse))
    folder = tmp_path / "job"
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "a.txt").write_text("beside the conditions file")
    (folder / "conditions.jsonl").write_text('{"probe": "inputs/a.txt"}\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    system = types.SimpleNamespace(conditions={"probe": probe}, condition_options={"probe": {}}, data=None)
    [(line, parsed)] = read_conditions(Path("../job/conditions.jsonl"), system)
    assert line == {"probe": "inputs/a.txt"} and parsed == {"image": "beside the conditions file"}
    assert seen[0].is_absolute() and seen[0].resolve() == folder.resolve()
