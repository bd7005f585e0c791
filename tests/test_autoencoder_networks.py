"""Shapes and invariants of the KL autoencoder (its layouts, scale factor and diagonal Gaussian
posterior) and of its losses: reconstruction with edge weights, hinge and adversarial losses, the
adaptive weight, and the patch discriminator. Tiny configs only; the whole file runs in seconds on a
CPU. (Each test starts from torch.manual_seed(0): conftest's autouse fixture.)"""

from __future__ import annotations

import pytest
import torch

from ldmcore.autoencoder import (
    DiagonalGaussian,
    KLAutoencoder,
    PatchDiscriminator,
    adaptive_weight,
    edge_weight_map,
    generator_adversarial_loss,
    hinge_d_loss,
    reconstruction_loss,
)
from ldmcore.nn import ResBlock, SpatialSelfAttention


# ----------------------------------------------------------------------------------- autoencoder


@pytest.mark.parametrize("channel_mult,f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
def test_autoencoder_shapes_for_each_downsample_factor(channel_mult, f):
    ae = KLAutoencoder(base_channels=8, channel_mult=channel_mult, latent_channels=3, num_groups=8)
    assert ae.downsample_factor == f and ae.latent_channels == 3
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = ae.encode(x)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == posterior.std.shape == (2, 3, 16 // f, 16 // f)
    kl = posterior.kl()
    assert kl.shape == (2,) and bool((kl >= 0).all())
    assert ae.decode(posterior.sample()).shape == x.shape
    recon, post = ae(x, sample=False)
    assert recon.shape == x.shape
    torch.testing.assert_close(recon, ae.decode(post.mode()))


def test_autoencoder_widths_and_mid_attention():
    ae = KLAutoencoder(base_channels=8, channel_mult=(1, 2, 4), mid_attention=True, num_groups=8)
    assert ae.encoder.conv_in.out_channels == 8 and ae.encoder.conv_out.in_channels == 32
    assert ae.decoder.conv_in.out_channels == 32 and ae.decoder.conv_out.out_channels == 3
    assert any(isinstance(m, SpatialSelfAttention) for m in ae.modules())
    assert ae.last_layer is ae.decoder.conv_out.weight
    with pytest.raises(ValueError, match="divisible"):
        ae.encode(torch.randn(1, 3, 10, 10))


def test_autoencoder_reference_layout_options():
    # The options that hold Stable Diffusion's VAE layout, at a tiny width.
    ae = KLAutoencoder(base_channels=8, channel_mult=(1, 2, 4, 4), encoder_res_blocks=2, decoder_res_blocks=3,
                       mid_attention=True, mid_res_blocks=2, quant_conv=True, asymmetric_downsample=True, num_groups=8)
    assert [type(m).__name__ for m in ae.encoder.mid] == ["ResBlock", "SpatialSelfAttention", "ResBlock"]
    assert sum(isinstance(m, ResBlock) for m in ae.decoder.up) == 12
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    recon, posterior = ae(x)
    assert posterior.mean.shape == (1, 4, 2, 2) and recon.shape == x.shape
    assert {"quant_conv.weight", "post_quant_conv.weight"} <= set(ae.state_dict())


def test_scale_factor_is_a_saved_buffer_that_can_be_set_like_a_float():
    ae = KLAutoencoder(base_channels=8, channel_mult=(1, 2), num_groups=8, scale_factor=0.5)
    assert float(ae.scale_factor) == 0.5
    ae.scale_factor = 0.25
    assert ae.state_dict()["scale_factor"].item() == 0.25
    other = KLAutoencoder(base_channels=8, channel_mult=(1, 2), num_groups=8)
    other.load_state_dict(ae.state_dict())
    assert float(other.scale_factor) == 0.25


def test_diagonal_gaussian_kl_sampling_and_clamping():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    standard = DiagonalGaussian(mean, logvar)
    torch.testing.assert_close(standard.kl(), torch.zeros(2))  # KL(N(0, I) ‖ N(0, I)) = 0
    shifted = DiagonalGaussian(mean + 1.0, logvar)
    torch.testing.assert_close(shifted.kl(), torch.full((2,), 0.5 * 36))  # ½·‖μ‖² over 36 entries
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(shifted.sample(g1), shifted.sample(g2))
    assert torch.equal(shifted.mode(), mean + 1.0)
    clamped = DiagonalGaussian.from_moments(torch.cat([mean, torch.full_like(logvar, 100.0)], dim=1))
    assert clamped.logvar.max().item() == 20.0 and torch.isfinite(clamped.kl()).all()


# -------------------------------------------------------------------------------------- losses


def square_image() -> torch.Tensor:
    x = -torch.ones(1, 3, 16, 16)
    x[..., 4:12, 4:12] = 1.0
    return x


def test_reconstruction_loss_is_zero_on_identical_images_and_positive_otherwise():
    x = square_image()
    assert reconstruction_loss(x, x.clone()).item() == 0.0
    assert reconstruction_loss(x, x + 0.1).item() > 0.0


def test_edge_weight_map_is_higher_on_edges():
    x = square_image()
    w = edge_weight_map(x, strength=4.0)
    assert w.shape == (1, 1, 16, 16)
    assert w[0, 0, 0, 0].item() == 1.0 and w[0, 0, 8, 8].item() == 1.0  # flat background / inside
    assert w[0, 0, 8, 4].item() > 3.0 and w[0, 0, 8, 3].item() > 3.0  # both sides of a side
    assert w.max().item() == pytest.approx(5.0) and w[0, 0, 4, 4].item() == pytest.approx(5.0)  # corners: maximum
    assert torch.equal(edge_weight_map(torch.zeros(1, 3, 8, 8)), torch.ones(1, 1, 8, 8))
    # a one-pixel-wide line (a triangle's tip) is marked on the line itself
    line = -torch.ones(1, 3, 8, 8)
    line[..., :, 4] = 1.0
    assert edge_weight_map(line)[0, 0, 2, 4].item() == pytest.approx(5.0)
    assert edge_weight_map(line, strength=2.0)[0, 0, 2, 4].item() == pytest.approx(3.0)
    # an error on an edge costs more than the same error in a flat region
    on_edge, flat = x.clone(), x.clone()
    on_edge[..., 8, 4] += 0.5
    flat[..., 8, 8] += 0.5
    assert reconstruction_loss(x, on_edge) > reconstruction_loss(x, flat)


def test_hinge_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.ones(4) * 3, -torch.ones(4) * 3).item() == 0.0
    assert generator_adversarial_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0) / 3)


def test_adaptive_weight_is_finite_and_positive():
    ae = KLAutoencoder(base_channels=8, channel_mult=(1, 2), num_groups=8)
    disc = PatchDiscriminator(base_channels=8, n_layers=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, _ = ae(x)
    nll = reconstruction_loss(x, recon)
    g_loss = generator_adversarial_loss(disc(recon))
    weight = adaptive_weight(nll, g_loss, ae.last_layer)
    assert torch.isfinite(weight) and 0 < weight.item() <= 1e4 and not weight.requires_grad
    (nll + weight * g_loss).backward()  # the graphs were kept for the caller


@pytest.mark.parametrize("n_layers,norm,size", [(3, "batch", 2), (2, "group", 6), (1, "none", 14)])
def test_patch_discriminator_output_shape(n_layers, norm, size):
    disc = PatchDiscriminator(in_channels=3, base_channels=8, n_layers=n_layers, norm=norm)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, size, size)
