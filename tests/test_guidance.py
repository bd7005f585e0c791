"""Classifier-free guidance: one batched forward pass, and the guidance formula."""

import pytest
import torch

from ldmcore.diffusion import cat_conditions, classifier_free_guidance, condition_only

B = 3


class CountingDenoiser:
    """A fake conditional denoiser, linear in its condition: x·(1 + σ) + mean of cond["vector"]."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, sigma, cond):
        self.batch_sizes.append(x.shape[0])
        assert sigma.shape == (x.shape[0],)
        assert cond["vector"].shape[0] == x.shape[0] == cond["crossattn"].shape[0]
        shift = cond["vector"].mean(dim=1)[:, None, None, None] + cond["crossattn"].mean(dim=(1, 2))[:, None, None, None]
        return x * (1 + sigma[:, None, None, None]) + shift


def make_cond(value):
    return {"vector": torch.full((B, 4), value), "crossattn": torch.full((B, 5, 6), value)}


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 2, 4, 4, generator=g), torch.rand(B, generator=g) + 0.5


def test_cfg_is_one_forward_of_twice_the_batch(inputs):
    x, sigma = inputs
    denoiser = CountingDenoiser()
    classifier_free_guidance(denoiser, make_cond(1.0), make_cond(0.0), scale=7.5)(x, sigma)
    assert denoiser.batch_sizes == [2 * B]


def test_cfg_formula(inputs):
    x, sigma = inputs
    denoiser = CountingDenoiser()
    cond, uncond, scale = make_cond(1.0), make_cond(-0.5), 4.0
    out = classifier_free_guidance(denoiser, cond, uncond, scale)(x, sigma)
    d_cond, d_uncond = denoiser(x, sigma, cond), denoiser(x, sigma, uncond)
    torch.testing.assert_close(out, d_uncond + scale * (d_cond - d_uncond))
    # the fake is linear in its condition: guidance acts like the condition value scaled up,
    # uncond + scale·(cond − uncond) per key: −0.5 + 4·1.5 = 5.5 on both keys
    torch.testing.assert_close(out, denoiser(x, sigma, make_cond(5.5)))


def test_cfg_scale_one_is_the_conditional_output(inputs):
    x, sigma = inputs
    denoiser = CountingDenoiser()
    out = classifier_free_guidance(denoiser, make_cond(1.0), make_cond(0.0), scale=1.0)(x, sigma)
    assert denoiser.batch_sizes == [B]
    assert torch.equal(out, denoiser(x, sigma, make_cond(1.0)))


def test_cfg_scale_zero_is_the_unconditional_output(inputs):
    x, sigma = inputs
    denoiser = CountingDenoiser()
    out = classifier_free_guidance(denoiser, make_cond(1.0), make_cond(0.0), scale=0.0)(x, sigma)
    torch.testing.assert_close(out, denoiser(x, sigma, make_cond(0.0)))


def test_condition_only(inputs):
    x, sigma = inputs
    denoiser = CountingDenoiser()
    out = condition_only(denoiser, make_cond(2.0))(x, sigma)
    assert denoiser.batch_sizes == [B]
    assert torch.equal(out, denoiser(x, sigma, make_cond(2.0)))


def test_cfg_does_not_modify_inputs(inputs):
    x, sigma = inputs
    cond, uncond = make_cond(1.0), make_cond(0.0)
    before = [t.clone() for t in (x, sigma, *cond.values(), *uncond.values())]
    classifier_free_guidance(CountingDenoiser(), cond, uncond, scale=3.0)(x, sigma)
    after = [x, sigma, *cond.values(), *uncond.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_cat_conditions():
    a = {"concat": torch.zeros(2, 1, 4, 4), "vector": torch.zeros(2, 3)}
    b = {"concat": torch.ones(2, 1, 4, 4), "vector": torch.ones(2, 3)}
    both = cat_conditions([a, b])
    assert set(both) == {"concat", "vector"}
    assert both["concat"].shape == (4, 1, 4, 4)
    assert torch.equal(both["vector"][2:], b["vector"])
    assert cat_conditions([None, None]) is None
    with pytest.raises(ValueError, match="keys differ"):
        cat_conditions([a, {"concat": b["concat"]}])
    with pytest.raises(ValueError, match="None"):
        cat_conditions([a, None])


def test_cfg_on_an_unconditional_model_passes_none(inputs):
    x, sigma = inputs
    seen = []

    def denoiser(x, sigma, cond):
        seen.append(cond)
        return x

    assert torch.equal(classifier_free_guidance(denoiser, None, None, scale=5.0)(x, sigma), x)
    assert seen == [None]
