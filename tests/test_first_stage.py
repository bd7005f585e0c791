"""Stage 1: training runs (with and without the discriminator), measuring, the latent pool."""

from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from ldmcore.autoencoder import KLAutoencoder
from ldmcore.data.shapes import ShapesWorld
from ldmcore.training.first_stage import measure, train_first_stage
from ldmcore.training.loop import LatentPool

TRAIN = dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, kl_weight=1e-4, edge_strength=4.0, latent_noise=0.1,
             discriminator_weight=0.0, discriminator_start=0, grad_clip=1.0)


def tiny_autoencoder():
    return KLAutoencoder(base_channels=8, channel_mult=(1, 2), decoder_res_blocks=1, latent_channels=2)


def test_training_changes_the_weights_and_logs_finite_losses():
    ae, world = tiny_autoencoder(), ShapesWorld(size=32)
    before = [p.detach().clone() for p in ae.parameters()]
    history = train_first_stage(ae, world, OmegaConf.create(TRAIN), seed=0)
    assert history and all(math.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, ae.parameters()))


def test_training_with_the_patch_discriminator():
    ae, world = tiny_autoencoder(), ShapesWorld(size=32)
    history = train_first_stage(ae, world, OmegaConf.create({**TRAIN, "discriminator_weight": 0.5}), seed=0)
    assert all(math.isfinite(h["loss"]) for h in history)


class Identity(torch.nn.Module):
    """A perfect 'autoencoder' (f = 1): reconstructions equal the input."""

    downsample_factor, latent_channels = 1, 3

    def encode(self, x):
        return type("P", (), {"mode": lambda self: x, "mean": x, "std": torch.zeros_like(x)})()

    def decode(self, z):
        return z


class Blank(Identity):
    """A collapsed one: every reconstruction is the background."""

    def decode(self, z):
        return torch.full_like(z, 200 / 127.5 - 1)


def test_measure_tells_a_perfect_first_stage_from_a_collapsed_one():
    world = ShapesWorld(size=64)
    perfect = measure(Identity(), world, world.reader, images=32)
    collapsed = measure(Blank(), world, world.reader, images=32)
    assert perfect["readback"] == 1.0 and perfect["psnr"] > 60
    assert collapsed["readback"] == 0.0 and collapsed["psnr"] < 20


def test_latent_pool_is_unit_variance():
    world = ShapesWorld(size=40)
    pool = LatentPool.encode(tiny_autoencoder().eval(), world, batch_size=16)
    z = pool.sample(torch.arange(40), torch.Generator().manual_seed(0))
    assert z.shape[0] == 40 and abs(float(z.std()) - 1.0) < 0.1
