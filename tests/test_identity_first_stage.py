"""The pixel-space first stage (``autoencoder=identity``, the paper's f = 1) and the f=2 KL config:
the identity passes images through exactly, is neither trained nor cached, passes the gate, and
a class-conditional pixel-space model trains and samples end to end."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from ldmcore.autoencoder import IdentityFirstStage
from ldmcore.config import validate
from ldmcore.data.shapes import ShapesWorld
from ldmcore.tasks import train
from ldmcore.training.first_stage import obtain_first_stage


def test_identity_encodes_and_decodes_images_unchanged():
    stage = IdentityFirstStage()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    posterior = stage.encode(x)
    assert torch.equal(posterior.mode(), x) and torch.equal(posterior.sample(), x)
    assert torch.equal(posterior.std, torch.zeros_like(x)) and torch.equal(posterior.kl(), torch.zeros(2))
    assert torch.equal(stage.decode(x), x) and torch.equal(stage.decode_tiled(x, 4, 2), x)
    assert torch.equal(stage.encode_tiled(x, 4, 2).mean, x)
    assert (stage.downsample_factor, stage.latent_channels) == (1, 3) and not list(stage.parameters())
    stage.scale_factor = 2.5  # the buffer every first stage carries, set from the latent pool
    assert float(stage.scale_factor) == 2.5 and "scale_factor" in stage.state_dict()


def test_identity_refuses_tensors_of_other_channels():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 4, 8, 8\)"):
        IdentityFirstStage().decode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="latent_channels must be at least 1"):
        IdentityFirstStage(latent_channels=0)


def test_identity_is_not_trained_or_cached_and_passes_the_gate(tmp_path):
    cfg = validate(compose_config(["autoencoder=identity", f"cache_dir={tmp_path / 'cache'}", "autoencoder.gate.images=16"]))
    data = ShapesWorld(size=32)
    stage, record = obtain_first_stage(cfg, data, data.reader, tmp_path)
    assert isinstance(stage, IdentityFirstStage) and "no parameters" in record["source"]
    assert record["metrics"]["readback"] == 1.0 and record["metrics"]["psnr"] > 60
    assert not (tmp_path / "cache").exists() and (tmp_path / "first_stage.json").is_file()


def test_kl_f2_config_builds_a_factor_2_first_stage():
    cfg = validate(compose_config(["autoencoder=kl_f2"]))
    stage = instantiate(cfg.autoencoder.model)
    assert stage.downsample_factor == 2
    assert stage.encode(torch.zeros(1, 3, 32, 32)).mean.shape == (1, 4, 16, 16)


def test_pixel_space_class_model_trains_and_samples(tmp_path, one_thread):
    overrides = ["+condition=class", "autoencoder=identity", f"cache_dir={tmp_path / 'cache'}", "autoencoder.gate.images=16",
                 "data.size=64", "denoiser.model_channels=8", "denoiser.channel_mult=[1,2,4]", "denoiser.attention_resolutions=[4]",
                 "denoiser.num_heads=2", "trainer.steps=2", "trainer.batch_size=4", "trainer.log_every=1",
                 "trainer.checkpoint_every=0", "trainer.grid_columns=1", "sampler.steps=2", "sampler.batch_size=18"]
    metrics = train(compose_config(overrides), tmp_path / "run")
    assert metrics["samples"] == 18 and 0.0 <= metrics["class_accuracy"] <= 1.0
    assert "no parameters" in (tmp_path / "run" / "first_stage.json").read_text()
    assert list((tmp_path / "run").glob("checkpoints/step_*/model.safetensors"))
