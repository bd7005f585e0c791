"""The first-stage family: f = 4 / 8 / 16 configs, LPIPS from one local file, tiled encode/decode,
and the discriminator's start step."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from conftest import compose_config
from ldmcore.autoencoder import KLAutoencoder, VQAutoencoder, tiled
from ldmcore.autoencoder.adversarial import AdversarialLoss
from ldmcore.autoencoder.perceptual import LPIPS
from ldmcore.config import ConfigError, validate
from ldmcore.data.shapes import ShapesWorld
from ldmcore.interop import PickleRefused
from ldmcore.training.checkpoint import CheckpointError
from ldmcore.training.first_stage import train_first_stage

# -------------------------------------------------------------------------- configs and shapes


@pytest.mark.parametrize("name,f,channels", [("kl_f4", 4, 4), ("kl_f8", 8, 4), ("kl_f16", 16, 16), ("vq_f4", 4, 3)])
def test_each_config_has_its_factor_and_latent_shape(name, f, channels):
    cfg = validate(compose_config([f"autoencoder={name}"]))
    ae = instantiate(cfg.autoencoder.model).eval()
    assert ae.downsample_factor == f and ae.latent_channels == channels
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x).sample()
        assert z.shape == (2, channels, 32 // f, 32 // f)
        assert ae.decode(z).shape == x.shape


def test_kl_configs_follow_the_papers_channel_multipliers():
    # CompVis latent-diffusion models/first_stage_models/kl-f8 and kl-f16 (ch_mult, z_channels).
    for name, mult, z in [("kl_f8", [1, 2, 4, 4], 4), ("kl_f16", [1, 1, 2, 2, 4], 16)]:
        model = compose_config([f"autoencoder={name}"]).autoencoder.model
        assert list(model.channel_mult) == mult and model.latent_channels == z


@pytest.mark.parametrize("cls", [KLAutoencoder, VQAutoencoder])
@pytest.mark.parametrize("channel_mult,f", [((1, 1, 2, 2, 4), 16), ((1, 1, 1, 1, 1, 1), 32)])
def test_large_downsample_factors(cls, channel_mult, f):
    ae = cls(base_channels=4, channel_mult=channel_mult, decoder_res_blocks=1, latent_channels=2, num_groups=4).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x).mode()
        assert ae.downsample_factor == f and z.shape == (1, 2, 64 // f, 64 // f)
        assert ae.decode(z).shape == x.shape


# -------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """A weights file with LPIPS's key names and random weights (He-scaled convs, positive lins)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"classifier.0.weight": torch.zeros(4, 4)}  # torchvision's classifier: ignored
    for key, like in LPIPS().state_dict().items():
        if key.startswith("lins."):
            tensors[f"lin{key.split('.')[1]}.model.1.weight"] = torch.rand(like.shape, generator=generator)
        elif key.endswith("weight"):
            fan_in = like[0].numel()
            tensors[key] = torch.randn(like.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        else:
            tensors[key] = torch.zeros(like.shape)
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_lpips_is_zero_for_identical_images_and_positive_for_different_ones(lpips_file, one_thread):
    lpips = LPIPS.from_file(lpips_file[0])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape)).clamp(-1, 1)
    same, different = lpips(x, x.clone()), lpips(x, y)
    assert same.shape == (3,) and bool((same == 0).all())
    assert bool((different > 0).all())
    torch.testing.assert_close(different, lpips(y, x))
    assert not any(p.requires_grad for p in lpips.parameters())
    torch.testing.assert_close(lpips.lins[4].weight, lpips_file[1]["lin4.model.1.weight"])


def test_lpips_file_errors_name_the_file(lpips_file, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LPIPS.from_file(missing)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in lpips_file[1].items() if k != "lin4.model.1.weight"}, str(partial))
    with pytest.raises(CheckpointError, match="lin4.model.1.weight") as info:
        LPIPS.from_file(partial)
    assert str(partial) in str(info.value)
    pickled = tmp_path / "lpips.pt"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, pickled)
    with pytest.raises(PickleRefused, match=str(pickled)):
        LPIPS.from_file(pickled)


TRAIN = dict(steps=2, batch_size=4, lr=1e-3, warmup_steps=1)


def tiny_kl() -> KLAutoencoder:
    return KLAutoencoder(base_channels=8, channel_mult=(1, 2), decoder_res_blocks=1, latent_channels=2, num_groups=8)


def test_first_stage_training_uses_lpips_when_given(lpips_file, one_thread):
    options = OmegaConf.create({**TRAIN, "lpips_weights": str(lpips_file[0])})
    history = train_first_stage(tiny_kl(), ShapesWorld(size=16), options, seed=0)
    assert all(h["perceptual"] > 0 and h["loss"] > h["rec"] + h["perceptual"] * 0.99 for h in history)


def test_first_stage_training_without_lpips_says_so_once(caplog, one_thread):
    with caplog.at_level(logging.INFO, logger="ldmcore.training.first_stage"):
        history = train_first_stage(tiny_kl(), ShapesWorld(size=16), OmegaConf.create(TRAIN), seed=0)
    said = [r for r in caplog.records if "no LPIPS weights given: reconstruction loss only" in r.getMessage()]
    assert len(said) == 1 and "perceptual" not in history[0]


def test_a_missing_lpips_file_is_a_config_error(tmp_path):
    missing = tmp_path / "lpips.safetensors"
    with pytest.raises(ConfigError, match="autoencoder.train.lpips_weights") as info:
        train_first_stage(tiny_kl(), ShapesWorld(size=16), OmegaConf.create({**TRAIN, "lpips_weights": str(missing)}), seed=0)
    assert str(missing) in str(info.value)


# ------------------------------------------------------------------------------------- tiling


def test_tiling_is_exact_for_a_network_whose_receptive_field_fits_the_overlap():
    torch.manual_seed(0)
    # Receptive-field radius about 2 output pixels (encoder-like, /2) and 3 (decoder-like, ×2):
    # within a quarter of the overlap, where tiles get weight 0.
    down = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 5, 3, padding=1))
    up = nn.Sequential(nn.Conv2d(5, 4, 3, padding=1), nn.Upsample(scale_factor=2.0), nn.Conv2d(4, 3, 3, padding=1))
    x = torch.randn(2, 3, 80, 112)  # not a whole number of tile strides
    z = torch.randn(2, 5, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(tiled(down, x, tile=32, overlap=16, down=2), down(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(tiled(up, z, tile=16, overlap=8, up=2), up(z), atol=1e-5, rtol=0)


def without_group_norm(ae: nn.Module) -> nn.Module:
    """The model with every GroupNorm replaced by the identity: purely convolutional, so tiles
    see exactly what the whole image sees away from their borders."""
    for module in list(ae.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())
    return ae


@pytest.mark.parametrize("cls", [KLAutoencoder, VQAutoencoder])
def test_tiled_autoencoder_matches_untiled_when_the_receptive_field_fits(cls):
    torch.manual_seed(0)
    ae = without_group_norm(cls(base_channels=8, channel_mult=(1, 2), decoder_res_blocks=1, latent_channels=2)).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1  # larger than a tile
    with torch.no_grad():
        z = ae.encode(x).mode()  # (1, 2, 32, 32)
        # Measured: max |tiled - untiled| about 2e-5 with these overlaps (outputs are O(0.3)).
        torch.testing.assert_close(ae.encode_tiled(x, tile=48, overlap=32).mode(), z, atol=1e-4, rtol=0)
        torch.testing.assert_close(ae.decode_tiled(z, tile=24, overlap=16), ae.decode(z), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["kl_f4", "vq_f4"])
def test_tiled_first_stage_runs_on_images_larger_than_a_tile(name):
    # With GroupNorm each tile normalizes by its own statistics: close to, not equal to, the
    # untiled result (bench/results/first_stage_family.jsonl measures it on trained models).
    ae = instantiate(compose_config([f"autoencoder={name}"]).autoencoder.model).eval()
    x = torch.rand(1, 3, 96, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode_tiled(x, tile=32, overlap=16).mode()
        assert z.shape == (1, ae.latent_channels, 24, 16)
        image = ae.decode_tiled(z, tile=8, overlap=4)
        assert image.shape == x.shape and bool(torch.isfinite(image).all())
        # One tile covering the image is the untiled computation.
        torch.testing.assert_close(ae.encode_tiled(x, tile=96, overlap=16).mode(), ae.encode(x).mode())


def test_tiling_rejects_bad_tiles():
    ae = tiny_kl()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="multiples of the downsample factor 2"):
        ae.encode_tiled(x, tile=15, overlap=4)
    with pytest.raises(ValueError, match="tile > overlap"):
        ae.decode_tiled(torch.rand(1, 2, 16, 16), tile=8, overlap=8)


# ------------------------------------------------------------------------------ discriminator


def test_the_discriminator_starts_at_discriminator_start(monkeypatch, one_thread):
    calls = {"generator_loss": 0, "step": 0}
    for method in calls:
        original = getattr(AdversarialLoss, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(AdversarialLoss, method, counted)
    world = ShapesWorld(size=16)
    options = {"steps": 5, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "discriminator_weight": 0.5, "discriminator_start": 3}
    history = train_first_stage(tiny_kl(), world, OmegaConf.create(options), seed=0)
    assert calls == {"generator_loss": 2, "step": 2}  # steps 3 and 4 only
    assert "discriminator" not in history[0] and "discriminator" in history[-1]

    # Before the start, training is exactly that of a run without a discriminator.
    torch.manual_seed(0)
    gated = tiny_kl()
    torch.manual_seed(0)
    plain = tiny_kl()
    train_first_stage(gated, world, OmegaConf.create({**options, "steps": 3}), seed=0)
    train_first_stage(plain, world, OmegaConf.create({**options, "steps": 3, "discriminator_weight": 0.0}), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(gated.parameters(), plain.parameters()))
