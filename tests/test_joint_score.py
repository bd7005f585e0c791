"""``joint_accuracy``: the share of samples that follow every scored condition at once, from each
plugin's per-sample ``ldmcore_sample_success``."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from ldmcore.data.base import data_info
from ldmcore.data.shapes import ShapesWorld
from ldmcore.pluginmanager import installed
from ldmcore.tasks import score


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(resolution=32, kind="multi", size=64, seed=3)


def system_of(world, names):
    registry = installed()
    conditions = {name: registry.get(name) for name in names}
    return SimpleNamespace(data=data_info(world), conditions=conditions,
                           condition_options={name: c.default_options() for name, c in conditions.items()})


def test_joint_accuracy_counts_samples_that_follow_both_conditions(world):
    system = system_of(world, ["text", "layout"])
    batch = world.batch(list(range(8)))
    assert score(system, batch["image"], batch)["joint_accuracy"] == 1.0
    # Samples 0-3 get boxes moved away from their objects, samples 2-5 a caption naming other objects:
    # only 6 and 7 follow both.
    broken = {**batch, "boxes": [(b + 0.5) % 1.0 if i < 4 else b for i, b in enumerate(batch["boxes"])],
              "caption": [("a purple circle" if 2 <= i < 6 else c) for i, c in enumerate(batch["caption"])]}
    layout_ok = system.conditions["layout"].call("ldmcore_sample_success", images=batch["image"], batch=broken,
                                                 options=None, data=system.data)
    text_ok = system.conditions["text"].call("ldmcore_sample_success", images=batch["image"], batch=broken,
                                             options=None, data=system.data)
    assert layout_ok == [False] * 4 + [True] * 4 and text_ok == [True, True] + [False] * 4 + [True, True]
    scores = score(system, batch["image"], broken)
    assert scores["joint_accuracy"] == 2 / 8
    assert scores["joint_accuracy"] < min(scores["caption_accuracy"], scores["box_recall"])


def test_one_condition_reports_no_joint_accuracy(world):
    batch = world.batch(list(range(4)))
    assert "joint_accuracy" not in score(system_of(world, ["layout"]), batch["image"], batch)


def test_a_plugin_giving_the_wrong_number_of_successes_is_named(world):
    system = system_of(world, ["text", "layout"])
    wrong = SimpleNamespace(implements=lambda hook: hook == "ldmcore_sample_success", call=lambda hook, **kw: [True])
    system.conditions["layout"] = wrong
    batch = world.batch(list(range(4)))
    with pytest.raises(ValueError, match="'layout'.*1 values for 4 images"):
        score(system, batch["image"], batch)


def test_plugins_that_cannot_judge_are_left_out(world):
    system = system_of(world, ["text", "layout"])
    batch = world.batch(list(range(4)))
    unreadable = dataclasses.replace(system.data, reader=None)
    assert system.conditions["text"].call("ldmcore_sample_success", images=batch["image"], batch=batch, options=None,
                                          data=unreadable) is None
    system.data = unreadable
    assert score(system, batch["image"], batch) == {}  # no reader: no scores, and no joint accuracy
