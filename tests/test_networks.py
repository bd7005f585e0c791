"""Shapes and invariants of the denoiser's networks: building blocks, attention, and the UNet, with
its inference fast paths and coordinate channels. The KL autoencoder and its losses are tested in
test_autoencoder_networks.py. Tiny configs only; the whole file runs in seconds on a CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldmcore.denoiser import UNet
from ldmcore.nn import (
    Attention,
    BasicTransformerBlock,
    Downsample,
    ResBlock,
    SpatialSelfAttention,
    SpatialTransformer,
    Upsample,
    normalization,
    reuse_context,
    timestep_embedding,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialized layers stop hiding dependencies."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


# ---------------------------------------------------------------------------------------- blocks


def test_normalization_uses_32_groups_or_the_largest_divisor_below():
    assert normalization(64).num_groups == 32
    assert normalization(24).num_groups == 24
    assert normalization(48).num_groups == 24
    assert normalization(40).num_groups == 20
    assert normalization(7).num_groups == 7
    assert normalization(64, num_groups=8).num_groups == 8
    assert normalization(64, eps=1e-6).eps == 1e-6


def test_timestep_embedding_accepts_float_and_integer_timesteps():
    t = torch.tensor([0.0, 0.5, 999.25])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    # cos first, then sin; the first frequency is 1.
    assert torch.allclose(emb[:, 0], torch.cos(t)) and torch.allclose(emb[:, 8], torch.sin(t))
    assert torch.allclose(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    # continuous t: nearby timesteps give nearby but distinct embeddings
    assert not torch.equal(timestep_embedding(torch.tensor([10.0]), 16), timestep_embedding(torch.tensor([10.5]), 16))
    assert torch.allclose(timestep_embedding(torch.tensor([3]), 16), timestep_embedding(torch.tensor([3.0]), 16))
    assert timestep_embedding(torch.tensor(7.0), 15).shape == (1, 15)  # scalar t, odd dim


@pytest.mark.parametrize("out_channels", [None, 48])
@pytest.mark.parametrize("emb_channels", [None, 32])
def test_resblock_shapes(out_channels, emb_channels):
    block = ResBlock(16, out_channels, emb_channels)
    x = torch.randn(2, 16, 8, 6)
    emb = torch.randn(2, 32) if emb_channels else None
    assert block(x, emb).shape == (2, out_channels or 16, 8, 6)
    assert isinstance(block.skip_connection, torch.nn.Conv2d) == (out_channels is not None)


def test_resblock_is_identity_at_init_and_uses_the_embedding_after_training():
    block = ResBlock(16, emb_channels=8)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 8)), x)  # zero-initialized out conv
    perturb_(block)
    assert not torch.allclose(block(x, torch.zeros(2, 8)), block(x, torch.ones(2, 8)))
    with pytest.raises(ValueError, match="embedding"):
        block(x)


def test_down_and_upsample_shapes():
    x = torch.randn(2, 8, 16, 12)
    assert Downsample(8)(x).shape == (2, 8, 8, 6)
    assert Downsample(8, 16)(x).shape == (2, 16, 8, 6)
    assert Downsample(8, asymmetric_padding=True)(x).shape == (2, 8, 8, 6)
    assert Upsample(8)(x).shape == (2, 8, 32, 24)
    assert Upsample(8, 4)(x).shape == (2, 4, 32, 24)


# ------------------------------------------------------------------------------------- attention


def naive_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    context = x if context is None else context
    heads = attn.num_heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, h, N, L)
    out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], heads * d)
    return attn.to_out(out)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_sdpa_attention_equals_naive_softmax_attention(context_dim):
    attn = Attention(query_dim=16, num_heads=4, head_dim=8, context_dim=context_dim)
    x = torch.randn(3, 10, 16)
    context = torch.randn(3, 5, context_dim) if context_dim else None
    out = attn(x, context)
    assert out.shape == (3, 10, 16)
    torch.testing.assert_close(out, naive_attention(attn, x, context), rtol=1e-5, atol=1e-5)


def test_transformer_block_with_and_without_cross_attention():
    x = torch.randn(2, 9, 16)
    with_cross = BasicTransformerBlock(16, num_heads=2, head_dim=8, context_dim=7)
    assert with_cross(x, torch.randn(2, 3, 7)).shape == x.shape
    self_only = BasicTransformerBlock(16, num_heads=2, head_dim=8)
    assert self_only.attn2 is None and self_only(x).shape == x.shape
    assert with_cross.ff.net[0].proj.out_features == 2 * 4 * 16  # GEGLU, 4× inner width
    with pytest.raises(ValueError):
        with_cross(x)
    with pytest.raises(ValueError):
        self_only(x, torch.randn(2, 3, 7))


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_shapes_and_zero_init(use_linear):
    st = SpatialTransformer(32, num_heads=4, head_dim=8, depth=2, context_dim=6, use_linear=use_linear)
    x, context = torch.randn(2, 32, 4, 5), torch.randn(2, 3, 6)
    assert torch.equal(st(x, context), x)  # proj_out is zero-initialized: the block starts as identity
    perturb_(st)
    out = st(x, context)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert isinstance(st.proj_in, torch.nn.Linear if use_linear else torch.nn.Conv2d)
    assert len(st.transformer_blocks) == 2


def test_spatial_self_attention_shape():
    x = torch.randn(2, 16, 4, 4)
    assert SpatialSelfAttention(16)(x).shape == x.shape


# -------------------------------------------------------------------------------------- denoiser


def tiny_unet(**kwargs) -> UNet:
    config = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=4)
    return UNet(**{**config, **kwargs})


@pytest.mark.parametrize("size", [8, 12])
@pytest.mark.parametrize(
    "kwargs,extra",
    [
        ({}, {}),
        ({"context_dim": 24}, {"context": (2, 3, 24)}),
        ({"vector_dim": 10}, {"y": (2, 10)}),
        ({"in_channels": 7, "context_dim": 24, "vector_dim": 10, "use_linear_proj": True, "head_dim": 16},
         {"context": (2, 1, 24), "y": (2, 10)}),
    ],
)
def test_unet_shapes(kwargs, extra, size):
    unet = tiny_unet(**kwargs)
    x = torch.randn(2, unet.in_channels, size, size)
    out = unet(x, torch.tensor([1.5, 900.0]), **{k: torch.randn(shape) for k, shape in extra.items()})
    assert out.shape == (2, 4, size, size)


def test_unet_three_levels_and_attention_everywhere():
    unet = tiny_unet(channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(1, 2, 4), transformer_depth=(1, 1, 2))
    assert unet(torch.randn(1, 4, 8, 8), torch.tensor([10])).shape == (1, 4, 8, 8)
    assert len(unet.middle_block[1].transformer_blocks) == 2


def test_unet_output_is_zero_at_init_and_then_depends_on_context_and_y():
    unet = tiny_unet(context_dim=16, vector_dim=5)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0])
    context, y = torch.randn(2, 2, 16), torch.randn(2, 5)
    assert torch.count_nonzero(unet(x, t, context, y)) == 0
    perturb_(unet)
    out = unet(x, t, context, y)
    assert out.abs().sum() > 0
    assert not torch.allclose(out, unet(x, t, torch.randn(2, 2, 16), y))
    assert not torch.allclose(out, unet(x, t, context, torch.randn(2, 5)))
    assert not torch.allclose(out, unet(x, t + 1.0, context, y))
    # a scalar timestep is broadcast over the batch
    torch.testing.assert_close(unet(x, torch.tensor(3.0), context, y), unet(x, torch.tensor([3.0, 3.0]), context, y))


def test_unet_rejects_missing_or_unexpected_conditions_and_bad_sizes():
    with pytest.raises(ValueError, match="context"):
        tiny_unet(context_dim=16)(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="context"):
        tiny_unet()(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 1, 16))
    with pytest.raises(ValueError, match="y="):
        tiny_unet(vector_dim=3)(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible"):
        tiny_unet()(torch.randn(1, 4, 7, 8), torch.tensor([1]))


def test_unet_follows_the_stable_diffusion_module_layout():
    # SD 1.x layout (channel_mult 1,2,4,4, two ResBlocks per level, attention at 4,2,1) at a tiny
    # width: the state dict has SD's 686 keys, with its names.
    unet = UNet(4, 4, model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(4, 2, 1), num_heads=8, context_dim=64)
    keys = set(unet.state_dict())
    assert len(keys) == 686
    for key in [
        "time_embed.0.weight", "time_embed.2.weight", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "input_blocks.1.1.transformer_blocks.0.norm3.weight", "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight", "middle_block.1.proj_out.weight",
        "middle_block.2.out_layers.3.weight", "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight", "output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight",
        "out.0.weight", "out.2.weight",
    ]:
        assert key in keys, key
    assert not any(k.endswith("attn1.to_q.bias") for k in keys)  # q/k/v projections have no bias
    assert unet.middle_block[1].norm.eps == 1e-6 and unet.middle_block[0].in_layers[0].eps == 1e-5


def test_unet_trains_one_step():
    unet = tiny_unet(context_dim=8)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 1, 8)
    loss = F.mse_loss(unet(x, torch.rand(2) * 999, context), torch.randn_like(x))
    loss.backward()
    assert unet.out[2].weight.grad.abs().sum() > 0  # the zero output conv gets gradient


# ------------------------------------------------------------------- fast paths (same numbers)


def test_inference_fast_paths_equal_the_autograd_path_and_leave_inputs_alone():
    # Without autograd the blocks write into their own intermediates; the result must not change
    # and neither x nor the context may be touched.
    unet = perturb_(tiny_unet(context_dim=8, use_linear_proj=True))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 3, 8)
    x_copy, context_copy = x.clone(), context.clone()
    with_grad = unet(x, t, context)
    assert with_grad.requires_grad
    with torch.inference_mode():
        fast = unet(x, t, context)
    torch.testing.assert_close(fast, with_grad.detach(), rtol=0, atol=1e-6)
    assert torch.equal(x, x_copy) and torch.equal(context, context_copy)


@pytest.mark.parametrize("use_linear", [False, True])
def test_channels_last_input_gives_the_same_output_in_its_own_layout(use_linear):
    unet = perturb_(tiny_unet(context_dim=8, use_linear_proj=use_linear))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 3, 8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(unet(x_cl, t, context), unet(x, t, context), rtol=1e-5, atol=1e-5)
    st = perturb_(SpatialTransformer(32, num_heads=4, head_dim=8, context_dim=8, use_linear=use_linear))
    h = torch.randn(2, 32, 4, 5)
    out = st(h.contiguous(memory_format=torch.channels_last), context)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, st(h, context), rtol=1e-5, atol=1e-5)


def test_reuse_context_projects_each_context_once_with_equal_outputs():
    unet = perturb_(tiny_unet(context_dim=8))
    cross = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert cross and all(m.context_cache is None for m in cross)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = [unet(x, t, context), unet(x + 0.5, t, context), unet(x, t, context + 1)]
        with reuse_context(unet):
            got = [unet(x, t, context)]
            assert all(len(m.context_cache) == 1 for m in cross)
            got.append(unet(x + 0.5, t, context))  # same context: its keys and values come from the cache
            assert all(len(m.context_cache) == 1 for m in cross)
            context.add_(1)  # changed in place: its version moves on, so it is projected anew
            got.append(unet(x, t, context))
            assert all(len(m.context_cache) == 2 for m in cross)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(m.context_cache is None for m in cross)  # dropped when the block closes


def test_reuse_context_does_not_cache_under_autograd():
    unet = perturb_(tiny_unet(context_dim=8))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 3, 8, requires_grad=True)
    with reuse_context(unet):
        unet(x, t, context).sum().backward()
        unet(x, t, context).sum().backward()  # no graph shared between the two passes
        assert all(not m.context_cache for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    assert context.grad is not None



def test_coordinate_channels_are_fourier_features_of_the_position_and_keep_the_default_layout():
    plain, with_xy = tiny_unet(), tiny_unet(coordinate_frequencies=2)
    assert plain.input_blocks[0][0].in_channels == 4 and with_xy.input_blocks[0][0].in_channels == 4 + 8
    assert set(plain.state_dict()) == set(with_xy.state_dict())  # only conv_in's width differs
    x = torch.randn(2, 4, 8, 12)
    features = with_xy.coordinates(x)  # (B, 8, h, w): sin k=0,1 then cos k=0,1 of x, then of y
    assert features.shape == (2, 8, 8, 12)
    u = (torch.arange(12) + 0.5) / 12 * 2 - 1
    v = (torch.arange(8) + 0.5) / 8 * 2 - 1
    torch.testing.assert_close(features[0, 0], torch.sin(math.pi * u).expand(8, 12))
    torch.testing.assert_close(features[1, 3], torch.cos(2 * math.pi * u).expand(8, 12))
    torch.testing.assert_close(features[0, 6], torch.cos(math.pi * v)[:, None].expand(8, 12))
    # every position gets its own code (the first frequency's sin and cos already tell them apart)
    codes = features[0].flatten(1).T  # (h*w, 8)
    assert torch.cdist(codes, codes).add(torch.eye(96) * 10).min() > 0.1
    perturb_(with_xy)
    assert with_xy(x, torch.tensor([5.0, 5.0])).shape == (2, 4, 8, 12)
    with pytest.raises(ValueError, match="coordinate_frequencies"):
        tiny_unet(coordinate_frequencies=-1)


def test_a_unet_with_coordinate_channels_is_not_exported_to_diffusers(tmp_path):
    from ldmcore.interop import save_unet

    with pytest.raises(ValueError, match="coordinate"):
        save_unet(tiny_unet(coordinate_frequencies=1, context_dim=16), tmp_path / "unet")
