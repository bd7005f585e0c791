"""The conditioner routes by declared injection, applies per-condition dropout, builds nulls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldmcore.conditioning import ConditionEncoder, Conditioner, apply_denoiser_net


class Tokens(ConditionEncoder):
    def __init__(self, key, length, dim):
        super().__init__()
        self.key, self.outputs = key, {"crossattn": (length, dim)}
        self.proj = nn.Linear(1, length * dim)

    def forward(self, batch):
        x = batch[self.key].float()[:, None]
        return {"crossattn": self.proj(x).view(len(x), *self.outputs["crossattn"])}


class Spatial(ConditionEncoder):
    outputs = {"concat": (3,)}

    def forward(self, batch):
        return {"concat": batch["map"]}


class Vector(ConditionEncoder):
    outputs = {"vector": (5,)}

    def forward(self, batch):
        return {"vector": batch["vec"]}


def make_batch(b=4):
    return {"a": torch.arange(b), "b": torch.arange(b) + 10, "map": torch.ones(b, 3, 8, 8), "vec": torch.ones(b, 5)}


def test_routing_and_derived_sizes():
    cond = Conditioner({"a": Tokens("a", 2, 16), "b": Tokens("b", 3, 8), "m": Spatial(), "v": Vector()},
                       {"a": 0.0, "b": 0.0, "m": 0.0, "v": 0.0})
    assert (cond.concat_channels, cond.context_dim, cond.vector_dim) == (3, 16, 5)
    out = cond.eval()(make_batch(), 4, (8, 8))
    assert out["crossattn"].shape == (4, 5, 16)  # 2 + 3 tokens, the 8-wide ones projected to 16
    assert out["concat"].shape == (4, 3, 8, 8) and out["vector"].shape == (4, 5)


def test_absent_conditions_take_their_null():
    cond = Conditioner({"m": Spatial(), "v": Vector()}, {"m": 0.0, "v": 0.0}).eval()
    out = cond(make_batch(), 4, (8, 8), present=["v"])
    assert torch.count_nonzero(out["concat"]) == 0 and torch.all(out["vector"] == 1)
    null = cond.null(4, (8, 8))
    assert torch.count_nonzero(null["concat"]) == 0 and torch.count_nonzero(null["vector"]) == 0
    with pytest.raises(KeyError, match="not part of this model"):
        cond(make_batch(), 4, (8, 8), present=["text"])


def test_dropout_per_condition_only_in_training():
    cond = Conditioner({"m": Spatial(), "v": Vector()}, {"m": 0.5, "v": 0.0})
    g = torch.Generator().manual_seed(0)
    out = cond.train()(make_batch(1000), 1000, (8, 8), generator=g)
    dropped = (out["concat"].flatten(1).sum(1) == 0).float().mean().item()
    assert 0.44 < dropped < 0.56  # ~p, binomial std 0.016
    assert torch.all(out["vector"] == 1)  # dropout 0: never dropped
    out = cond.eval()(make_batch(1000), 1000, (8, 8))
    assert torch.all(out["concat"] == 1)


def test_declared_injection_is_checked():
    class Bad(ConditionEncoder):
        outputs = {"telepathy": (3,)}

    with pytest.raises(ValueError, match="telepathy"):
        Conditioner({"bad": Bad()}, {"bad": 0.1})
    with pytest.raises(ValueError, match="dropout"):
        Conditioner({"v": Vector()}, {"v": 1.5})


def test_concat_channels_join_the_unet_input():
    seen = {}

    def unet(x, t, context=None, y=None):
        seen.update(x=x.shape, context=context, y=y)
        return x[:, :2]

    apply_denoiser_net(unet, torch.zeros(2, 2, 4, 4), torch.zeros(2), {"concat": torch.ones(2, 3, 4, 4), "vector": torch.ones(2, 5)})
    assert seen["x"] == (2, 5, 4, 4) and seen["context"] is None and seen["y"].shape == (2, 5)


class Places(Tokens):
    needs_positions = True


def test_positions_are_needed_when_any_encoder_declares_it():
    assert not Conditioner({"a": Tokens("a", 2, 16), "m": Spatial()}, {"a": 0.0, "m": 0.0}).needs_positions
    assert Conditioner({"a": Tokens("a", 2, 16), "p": Places("b", 3, 16)}, {"a": 0.0, "p": 0.0}).needs_positions


@pytest.mark.parametrize("overrides, frequencies", [
    ([], 0),                                                      # unconditional: none
    (["+condition=class"], 0),                                    # a class token names no place
    (["+condition=layout"], 2),                                   # boxes do: the automatic choice
    (["+condition=layout", "denoiser.coordinate_frequencies=0"], 0),  # the config's number wins
    (["+condition=class", "denoiser.coordinate_frequencies=3"], 3),
])
def test_the_unet_gets_coordinate_channels_from_the_selected_conditions(overrides, frequencies):
    from conftest import compose_config

    from ldmcore.config import validate
    from ldmcore.data.shapes import ShapesWorld
    from ldmcore.system import build_system

    cfg = validate(compose_config(["+experiment=tiny", *overrides]))
    system = build_system(cfg, ShapesWorld(resolution=32, kind="multi", size=16, seed=0))
    assert system.model.unet.coordinate_frequencies == frequencies
