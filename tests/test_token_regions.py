"""Token regions: a condition says where each of its cross-attention tokens applies, and the
denoiser's cross-attention adds log(region) to the logits there (ldmcore.nn.attention)."""

from __future__ import annotations

import math

import pytest
import torch

from ldmcore.conditioning import REGIONS, ConditionEncoder, Conditioner, apply_denoiser_net
from ldmcore.denoiser import UNet
from ldmcore.nn.attention import REGION_FLOOR, Attention, region_bias
from ldmcore_plugins.layout.plugin import LayoutEncoder
from ldmcore_plugins.layout.tokens import LayoutVocabulary

from test_conditioner import Tokens


def test_region_bias_pools_to_the_feature_map_and_takes_the_log():
    regions = torch.zeros(1, 2, 4, 4)
    regions[0, 0] = 1.0  # token 0: everywhere
    regions[0, 1, 0, 0] = 0.5  # token 1: a corner sliver of the top-left 2x2 cell
    bias = region_bias(regions, 2, 2)  # (1, 1, 4 queries, 2 tokens)
    assert bias.shape == (1, 1, 4, 2)
    assert torch.equal(bias[0, 0, :, 0], torch.zeros(4))
    # max-pooled: the top-left query sees token 1's largest share inside it, the others its floor
    assert bias[0, 0, 0, 1].item() == pytest.approx(math.log(0.5))
    assert torch.allclose(bias[0, 0, 1:, 1], torch.full((3,), math.log(REGION_FLOOR)))
    # a coarser map is repeated (nearest) over a finer feature map: 4x4 queries from the 2x2 above
    up = region_bias(torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), 4, 4)  # (1, 1, 16, 1)
    assert torch.equal(up[0, 0, :, 0].view(4, 4)[:2, :2], torch.zeros(2, 2))
    assert (up[0, 0, :, 0].view(4, 4)[2:, :] < -9).all()


def test_a_token_outside_its_region_is_not_attended():
    torch.manual_seed(0)
    attention = Attention(8, num_heads=2, head_dim=4, context_dim=6)
    x, context = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    regions = torch.ones(1, 3, 2, 2)
    regions[0, 2] = 0.0  # token 2 applies nowhere
    masked = attention(x, context, region_bias(regions, 2, 2))
    without = attention(x, context[:, :2])
    assert torch.allclose(masked, without, atol=1e-3)
    assert not torch.allclose(attention(x, context), without, atol=1e-3)  # the token did matter


def test_unet_with_regions_of_ones_is_the_unet_without_them():
    torch.manual_seed(0)
    unet = UNet(4, 4, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2, context_dim=16).eval()
    for p in unet.out.parameters():  # the zero-initialized output conv would hide every difference
        torch.nn.init.normal_(p, std=0.1)
    for block in unet.modules():
        if hasattr(block, "proj_out") and isinstance(block.proj_out, torch.nn.Conv2d):
            torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    z, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 3, 16)
    plain = unet(z, t, context)
    assert torch.allclose(unet(z, t, context, context_regions=torch.ones(2, 3, 16, 16)), plain, atol=1e-5)
    half = torch.ones(2, 3, 16, 16)
    half[:, 1, :, 8:] = 0.0
    assert not torch.allclose(unet(z, t, context, context_regions=half), plain, atol=1e-4)
    with pytest.raises(ValueError, match="context_regions must be"):
        unet(z, t, context, context_regions=torch.ones(2, 4, 16, 16))  # 4 maps for 3 tokens


class Boxes(ConditionEncoder):
    """Two tokens; the second applies to the left half of the image."""

    outputs = {"crossattn": (2, 4)}
    token_regions = (4, 4)

    def forward(self, batch):
        b = len(batch["a"])
        regions = torch.ones(b, 2, 4, 4)
        regions[:, 1, :, 2:] = 0.0
        return {"crossattn": torch.ones(b, 2, 4), REGIONS: regions}


def test_conditioner_concatenates_regions_with_ones_for_tokens_without_them():
    cond = Conditioner({"boxes": Boxes(), "a": Tokens("a", 3, 4)}, {"boxes": 0.0, "a": 0.0})
    assert cond.region_size == (4, 4)
    routed = cond({"a": torch.arange(2)}, 2, (8, 8))
    assert routed["crossattn"].shape == (2, 5, 4) and routed[REGIONS].shape == (2, 5, 4, 4)
    assert torch.equal(routed[REGIONS][:, 1, :, 2:], torch.zeros(2, 4, 2))
    assert torch.equal(routed[REGIONS][:, 2:], torch.ones(2, 3, 4, 4))  # plugin "a" has no regions
    null = cond.null(2, (8, 8))
    assert torch.equal(null[REGIONS], torch.ones(2, 5, 4, 4))  # absent: no spatial prior
    unet = UNet(4, 4, model_channels=32, channel_mult=(1, 2), num_heads=2, context_dim=4)
    assert apply_denoiser_net(unet, torch.zeros(2, 4, 8, 8), torch.zeros(2), routed).shape == (2, 4, 8, 8)


def test_an_encoder_that_declares_regions_must_return_them():
    class Forgets(Boxes):
        def forward(self, batch):
            return {"crossattn": torch.ones(len(batch["a"]), 2, 4)}

    cond = Conditioner({"boxes": Forgets()}, {"boxes": 0.0})
    with pytest.raises(ValueError, match="'boxes' declares token_regions"):
        cond({"a": torch.arange(2)}, 2, (8, 8))


def test_layout_regions_follow_the_token_order():
    vocab = LayoutVocabulary(num_classes=18, bins=8, max_objects=3)
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.25, 0.375]])  # the second comes first in reading order
    maps = vocab.regions(boxes)
    assert maps.shape == (vocab.length, 8, 8)
    assert torch.equal(maps[0], torch.ones(8, 8)) and torch.equal(maps[7:], torch.zeros(3, 8, 8))  # start, pads
    first, second = maps[1], maps[4]
    assert torch.equal(maps[1], maps[2]) and torch.equal(maps[1], maps[3])  # class and both corners of one object
    assert first[:3, :2].sum() == 6 and first.sum() == 6  # [0, 0.25] x [0, 0.375]: 2 x 3 cells
    assert second[4:, 4:].sum() == 16 and second.sum() == 16
    partial = vocab.regions(torch.tensor([[0.0, 0.0, 0.1875, 0.5]]))[1]  # x1 = 1.5 cells
    assert partial[0, :2].tolist() == [1.0, 0.5]


def test_layout_encoder_returns_regions_only_when_asked():
    vocab = LayoutVocabulary(num_classes=18, bins=8, max_objects=3)
    batch = {"boxes": [torch.tensor([[0.1, 0.1, 0.5, 0.5]])], "box_labels": [torch.tensor([3])]}
    with_regions = LayoutEncoder(vocab, 16, 1, 2, regions=True)
    out, null = with_regions(batch), with_regions.null(1, (8, 8), torch.device("cpu"))
    assert out[REGIONS].shape == null[REGIONS].shape == (1, vocab.length, 8, 8)
    assert torch.equal(null[REGIONS], torch.ones(1, vocab.length, 8, 8))
    assert REGIONS not in LayoutEncoder(vocab, 16, 1, 2)(batch)
