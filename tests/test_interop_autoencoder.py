"""ldmcore's KL autoencoder loads diffusers folders and Stable Diffusion single files, and exports
diffusers folders, with encodings and decodings equal to diffusers' AutoencoderKL (max abs < 1e-4,
fp32, CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ldmcore.autoencoder import KLAutoencoder  # noqa: E402
from ldmcore.interop import load_autoencoder, save_autoencoder  # noqa: E402
from ldmcore.interop.keymaps import autoencoder_compvis  # noqa: E402
from ldmcore.training.checkpoint import CheckpointError  # noqa: E402

TOL = 1e-4
ARCHITECTURES = {
    # SD's VAE layout (f=8: 4 levels, mid attention, quant convs), narrow
    "f8": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215),
    # an LDM-style f=4 first stage with 2 ResBlocks per level and 3 latent channels
    "f4": dict(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=3, norm_num_groups=32, scaling_factor=0.5),
    # f=4 without middle attention, without quant convs, 16 groups (diffusers options ldmcore also has)
    "f4_plain": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                     mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_vae(name: str) -> AutoencoderKL:
    torch.manual_seed(0)
    n = len(ARCHITECTURES[name]["block_out_channels"])
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, sample_size=32,
                          **ARCHITECTURES[name]).eval()
    with torch.no_grad():  # perturb every tensor, so that no zero or unit init hides a mis-mapped name
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@torch.no_grad()
def compare(ae: KLAutoencoder, model: AutoencoderKL) -> float:
    """Max abs difference over the posterior mean, log-variance and a decoding."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, model.config.latent_channels, 32 // ae.downsample_factor, 32 // ae.downsample_factor, generator=g)
    posterior, expected = ae.encode(x), model.encode(x).latent_dist
    decoded, expected_decoded = ae.decode(z), model.decode(z).sample
    assert expected_decoded.abs().max() > 0.1
    return max(float((a - b).abs().max()) for a, b in
               [(posterior.mean, expected.mean), (posterior.logvar, expected.logvar), (decoded, expected_decoded)])


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_diffusers_folder_loads_and_exports_with_equal_outputs(name, tmp_path):
    model = diffusers_vae(name)
    model.save_pretrained(tmp_path / "theirs")
    ae = load_autoencoder(tmp_path / "theirs")
    assert ae.downsample_factor == 2 ** (len(model.config.block_out_channels) - 1)
    assert float(ae.scale_factor) == pytest.approx(model.config.scaling_factor)
    assert compare(ae, model) < TOL

    save_autoencoder(ae, tmp_path / "exported")
    back = AutoencoderKL.from_pretrained(tmp_path / "exported").eval()
    assert back.config.scaling_factor == pytest.approx(model.config.scaling_factor)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    assert compare(ae, back) < TOL


@pytest.mark.parametrize("name, prefix", [("f8", "first_stage_model."), ("f4", "")])
def test_single_file_has_stable_diffusion_names_and_equal_outputs(name, prefix, tmp_path):
    model = diffusers_vae(name)
    model.save_pretrained(tmp_path / "theirs")
    ae = load_autoencoder(tmp_path / "theirs")
    compvis = autoencoder_compvis(ae).to_foreign(ae.state_dict())
    save_file({prefix + k: v.contiguous() for k, v in compvis.items()}, str(tmp_path / "sd.safetensors"))
    # diffusers' own CompVis converter reads our file back into exactly its weights: the names are SD's
    converted = convert_ldm_vae_checkpoint(load_file(tmp_path / "sd.safetensors"), dict(model.config))
    assert set(converted) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in converted.items())

    loaded = load_autoencoder(tmp_path / "sd.safetensors", scale_factor=0.3)
    assert float(loaded.scale_factor) == pytest.approx(0.3)
    assert compare(loaded, model) < TOL
    # a first stage that is not SD's does not tell its latent scale
    with pytest.raises(CheckpointError, match="scale_factor"):
        load_autoencoder(tmp_path / "sd.safetensors")


def test_old_diffusers_attention_names_load(tmp_path):
    model = diffusers_vae("f8")
    model.save_pretrained(tmp_path / "theirs")
    weights = tmp_path / "theirs" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(weights).items():
        for new, name in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        tensors[key] = value
    save_file(tensors, str(weights))
    assert compare(load_autoencoder(tmp_path / "theirs"), model) < TOL


def test_an_autoencoder_without_a_diffusers_counterpart_is_refused(tmp_path):
    ae = KLAutoencoder(base_channels=32, channel_mult=(1, 2), encoder_res_blocks=1, decoder_res_blocks=1)
    with pytest.raises(CheckpointError) as info:
        save_autoencoder(ae, tmp_path / "out")
    message = str(info.value)
    assert "decoder_res_blocks" in message and "mid_res_blocks" in message and "asymmetric_downsample" in message
    assert not (tmp_path / "out").exists()
