"""Guidance with one scale per condition: the independent (composable diffusion) and nested
(InstructPix2Pix) formulas against a fake linear denoiser, one batched forward per step, the
reduction to classifier-free guidance, the sampler config, and the conditioning each term uses."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from ldmcore.conditioning import ConditionEncoder, Conditioner
from ldmcore.config import ConfigError, validate
from ldmcore.diffusion import classifier_free_guidance
from ldmcore.diffusion.guidance import guidance_terms, multi_condition_guidance
from ldmcore.sampling import guidance_plan, guided_model

B = 3


class LinearDenoiser:
    """D(x, σ, c) = x·(1 + σ) + W·c: linear in the condition, counting its forward passes."""

    def __init__(self):
        self.batch_sizes = []
        self.weight = torch.arange(1.0, 5.0)  # (4,)

    def __call__(self, x, sigma, cond):
        self.batch_sizes.append(x.shape[0])
        assert sigma.shape == (x.shape[0],) and cond["vector"].shape[0] == x.shape[0]
        return x * (1 + sigma[:, None, None, None]) + (cond["vector"] @ self.weight)[:, None, None, None]


def cond(*values):
    """A conditioning whose vector holds a per-condition value in each of its first slots."""
    v = torch.zeros(B, 4)
    for i, value in enumerate(values):
        v[:, i] = value
    return {"vector": v}


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 2, 4, 4, generator=g), torch.rand(B, generator=g) + 0.5


def test_terms_of_each_mode():
    assert guidance_terms(["a", "b", "c"], "independent") == [("a", ("a",)), ("b", ("b",)), ("c", ("c",))]
    assert guidance_terms(["a", "b", "c"], "nested") == [("a", ("a",)), ("b", ("a", "b")), ("c", ("a", "b", "c"))]
    with pytest.raises(ValueError, match="sideways"):
        guidance_terms(["a"], "sideways")


def test_independent_formula(inputs):
    x, sigma = inputs
    d = LinearDenoiser()
    conds = {"a": cond(1.0), "b": cond(0, 2.0), "c": cond(0, 0, -1.0)}
    uncond, scales = cond(), {"a": 3.0, "b": 1.5, "c": -0.5}
    out = multi_condition_guidance(d, conds, uncond, scales, "independent")(x, sigma)
    expected = d(x, sigma, uncond) + sum(s * (d(x, sigma, conds[n]) - d(x, sigma, uncond)) for n, s in scales.items())
    torch.testing.assert_close(out, expected)
    # linear in the condition: the same as one pass with the combined condition
    torch.testing.assert_close(out, d(x, sigma, cond(3.0, 3.0, 0.5)))


def test_nested_formula(inputs):
    x, sigma = inputs
    d = LinearDenoiser()
    conds = {"a": cond(1.0), "b": cond(1.0, 2.0), "c": cond(1.0, 2.0, -1.0)}  # c1, c1c2, c1c2c3
    uncond, scales = cond(), {"a": 2.0, "b": 4.0, "c": 0.5}
    out = multi_condition_guidance(d, conds, uncond, scales, "nested")(x, sigma)
    e0, e1, e2, e3 = (d(x, sigma, c) for c in (uncond, conds["a"], conds["b"], conds["c"]))
    torch.testing.assert_close(out, e0 + 2.0 * (e1 - e0) + 4.0 * (e2 - e1) + 0.5 * (e3 - e2))
    torch.testing.assert_close(out, d(x, sigma, cond(2.0, 8.0, -0.5)))


def test_nested_with_equal_scales_is_cfg_on_all_conditions(inputs):
    x, sigma = inputs
    conds = {"a": cond(1.0), "b": cond(1.0, 2.0)}
    out = multi_condition_guidance(LinearDenoiser(), conds, cond(), {"a": 5.0, "b": 5.0}, "nested")(x, sigma)
    torch.testing.assert_close(out, classifier_free_guidance(LinearDenoiser(), conds["b"], cond(), 5.0)(x, sigma))


@pytest.mark.parametrize("mode", ["independent", "nested"])
def test_every_evaluation_of_a_step_is_one_forward(inputs, mode):
    x, sigma = inputs
    d = LinearDenoiser()
    model = multi_condition_guidance(d, {"a": cond(1.0), "b": cond(0, 1.0), "c": cond(0, 0, 1.0)}, cond(),
                                     {"a": 2.0, "b": 3.0, "c": 4.0}, mode)
    model(x, sigma)
    model(x, sigma)
    assert d.batch_sizes == [4 * B, 4 * B]


def test_max_batch_splits_the_forward_with_the_same_result(inputs):
    x, sigma = inputs
    conds, scales = {"a": cond(1.0), "b": cond(0, 2.0)}, {"a": 2.0, "b": 3.0}
    whole = multi_condition_guidance(LinearDenoiser(), conds, cond(), scales)(x, sigma)
    d = LinearDenoiser()
    split = multi_condition_guidance(d, conds, cond(), scales, max_batch=4)(x, sigma)
    assert d.batch_sizes == [4, 4, 1]
    torch.testing.assert_close(split, whole)


def test_independent_zero_scale_skips_its_evaluation(inputs):
    x, sigma = inputs
    d = LinearDenoiser()
    out = multi_condition_guidance(d, {"a": cond(1.0), "b": cond(0, 2.0)}, cond(), {"a": 3.0, "b": 0.0})(x, sigma)
    assert d.batch_sizes == [2 * B]
    torch.testing.assert_close(out, d(x, sigma, cond(3.0)))


@pytest.mark.parametrize("mode", ["independent", "nested"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 4.0])
def test_one_condition_is_exactly_classifier_free_guidance(inputs, mode, scale):
    x, sigma = inputs
    d_multi, d_cfg = LinearDenoiser(), LinearDenoiser()
    out = multi_condition_guidance(d_multi, {"a": cond(1.5)}, cond(-0.5), {"a": scale}, mode)(x, sigma)
    reference = classifier_free_guidance(d_cfg, cond(1.5), cond(-0.5), scale)(x, sigma)
    assert torch.equal(out, reference) and d_multi.batch_sizes == d_cfg.batch_sizes


def test_scales_must_match_the_conditions(inputs):
    with pytest.raises(ValueError, match="'z'"):
        multi_condition_guidance(LinearDenoiser(), {"a": cond(1.0)}, cond(), {"a": 1.0, "z": 2.0})
    with pytest.raises(ValueError, match="without a scale: \\['b'\\]"):
        multi_condition_guidance(LinearDenoiser(), {"a": cond(1.0), "b": cond(1.0)}, cond(), {"a": 1.0})


def test_guidance_does_not_modify_inputs(inputs):
    x, sigma = inputs
    conds, uncond = {"a": cond(1.0), "b": cond(1.0, 2.0)}, cond()
    before = [t.clone() for t in (x, sigma, uncond["vector"], *(c["vector"] for c in conds.values()))]
    multi_condition_guidance(LinearDenoiser(), conds, uncond, {"a": 2.0, "b": 3.0}, "nested")(x, sigma)
    after = [x, sigma, uncond["vector"], *(c["vector"] for c in conds.values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# --- the sampler config and the conditioning of each term --------------------------------------


def sampler_cfg(**changes):
    base = {"guidance_scale": 3.0, "guidance_scales": {}, "guidance": "independent", "guidance_order": [], "max_batch": None}
    return OmegaConf.create({**base, **changes})


def test_plan_orders_and_scales_the_present_conditions():
    model = ["a", "b", "c"]
    assert guidance_plan(sampler_cfg(guidance_scales={"b": 7.0}), model, ["c", "b"]) == (["b", "c"], {"b": 7.0, "c": 3.0})
    nested = sampler_cfg(guidance="nested", guidance_order=["c", "a"])
    assert guidance_plan(nested, model, ["a", "b", "c"])[0] == ["c", "a", "b"]
    assert guidance_plan(nested, model, ["b", "a"])[0] == ["a", "b"]
    with pytest.raises(ConfigError, match="'z'.*a, b, c"):
        guidance_plan(sampler_cfg(guidance_scales={"z": 2.0}), model, ["a"])


class ValueEncoder(ConditionEncoder):
    """A condition whose vector is its batch key's value in one slot (zeros when absent)."""

    def __init__(self, key, slot):
        super().__init__()
        self.key, self.slot = key, slot
        self.outputs = {"vector": (2,)}

    def forward(self, batch):
        v = torch.zeros(len(batch[self.key]), 2)
        v[:, self.slot] = torch.as_tensor(batch[self.key], dtype=torch.float32)
        return {"vector": v}


@pytest.mark.parametrize("mode", ["independent", "nested"])
def test_guided_model_measures_each_scale_with_its_subset(inputs, mode):
    x, sigma = inputs
    conditioner = Conditioner({"a": ValueEncoder("ka", 0), "b": ValueEncoder("kb", 1)}, {"a": 0.1, "b": 0.1}).eval()
    batch = {"ka": torch.full((B,), 2.0), "kb": torch.full((B,), -1.0)}
    d = LinearDenoiser()
    d.weight = torch.tensor([1.0, 10.0, 100.0, 1000.0])  # the vector is (a, b) of the two plugins, 4 slots
    model = guided_model(d, conditioner, batch, B, (4, 4), sampler_cfg(guidance=mode, guidance_scales={"a": 3.0, "b": 5.0}),
                         ["a", "b"])
    out = model(x, sigma)
    assert d.batch_sizes == [3 * B]
    # a at scale 3, b at scale 5, in either mode for a denoiser linear in the condition
    combined = {"vector": torch.tensor([[6.0, 0.0, 0.0, -5.0]]).expand(B, 4)}
    torch.testing.assert_close(out, d(x, sigma, combined))


def test_guided_model_without_guidance_is_one_conditional_pass(inputs):
    x, sigma = inputs
    conditioner = Conditioner({"a": ValueEncoder("ka", 0), "b": ValueEncoder("kb", 1)}, {"a": 0.1, "b": 0.1}).eval()
    batch = {"ka": torch.full((B,), 2.0), "kb": torch.full((B,), -1.0)}
    d = LinearDenoiser()
    guided_model(d, conditioner, batch, B, (4, 4), sampler_cfg(guidance_scale=1.0), ["a", "b"])(x, sigma)
    guided_model(d, conditioner, {}, B, (4, 4), sampler_cfg(), [])(x, sigma)
    assert d.batch_sizes == [B, B]


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["+sampler.guidance_scales.telepathy=2"], "telepathy"),
        (["sampler.guidance_order=[class,telepathy]"], "telepathy"),
        (["sampler.guidance_order=[class,class]"], "more than once"),
        (["sampler.guidance=sideways"], "sampler.guidance"),
        (["sampler.max_batch=0"], "sampler.max_batch"),
    ],
)
def test_bad_guidance_options_are_named(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(["+condition=class", *overrides]))
    assert fragment in str(error.value)


def test_guidance_options_compose_for_several_conditions():
    cfg = validate(compose_config(["+condition=[text,layout]", "++sampler.guidance_scales.text=5", "sampler.guidance=nested",
                                   "sampler.guidance_order=[layout,text]"]))
    assert cfg.sampler.guidance_scales == {"text": 5.0} and list(cfg.sampler.guidance_order) == ["layout", "text"]
    # sampling a checkpoint takes its conditions from the checkpoint: checked once merged with it
    validate(compose_config(["task=sample", "checkpoint=/some/run", "+sampler.guidance_scales.text=5"]))
