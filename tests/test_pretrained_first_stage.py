"""``autoencoder.pretrained`` takes a diffusers AutoencoderKL folder, a CompVis / SD single file and
(with autoencoder.allow_pickle=true) a pickled .ckpt: a tiny run's first stage then computes what
diffusers' AutoencoderKL computes (max abs < 1e-4). Weights of another architecture than
autoencoder.model fail before any work, with the overrides that fix it; autoencoder=sd_vae is SD's VAE."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import compose_config  # noqa: E402
from ldmcore.config import ConfigError, validate  # noqa: E402
from ldmcore.interop import load_autoencoder  # noqa: E402
from ldmcore.interop.diffusers_config import autoencoder_kwargs  # noqa: E402
from ldmcore.interop.keymaps import autoencoder_compvis, autoencoder_diffusers  # noqa: E402
from ldmcore.system import build  # noqa: E402
from ldmcore.tasks import train  # noqa: E402
from ldmcore.training.checkpoint import STATE_FILE, load_module_state, resolve_checkpoint  # noqa: E402
from ldmcore.training.first_stage import obtain_first_stage  # noqa: E402
from ldmcore.training.loop import LatentPool  # noqa: E402
from ldmcore.training.pretrained import load_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
# A tiny diffusers VAE near the shape +experiment=tiny gives the first stage (f=2, 2 latents), with
# widths 32/64: a CompVis single file cannot tell its GroupNorm groups, which are 32 there
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=2, norm_num_groups=32, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# ... and what +experiment=tiny (on kl_f4) lacks of its architecture, as the error must list it
# (+: options kl_f4 does not name, appended)
FITS_TINY = ["autoencoder.model.base_channels=32", "autoencoder.model.decoder_res_blocks=2", "autoencoder.model.mid_attention=true",
             "+autoencoder.model.mid_res_blocks=2", "+autoencoder.model.quant_conv=true", "+autoencoder.model.asymmetric_downsample=true"]
# Stable Diffusion's VAE config.json (stabilityai/sd-vae-ft-mse, the vae/ of SD v1.x pipelines)
SD_VAE_CONFIG = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                 "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.18215}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny diffusers VAE with every tensor perturbed (no init value hides a mis-mapped name),
    saved as a diffusers folder, a pipeline folder, an SD single file and a pickled .ckpt."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    model = AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "vae")
    model.save_pretrained(root / "pipeline" / "vae")
    ae = load_autoencoder(root / "vae")
    sd = {f"first_stage_model.{k}": v.contiguous() for k, v in autoencoder_compvis(ae).to_foreign(ae.state_dict()).items()}
    save_file(sd, str(root / "sd.safetensors"))
    torch.save({"state_dict": sd, "global_step": 7}, root / "sd.ckpt")
    # diffusers' own CompVis reader takes the single file back to exactly its weights: the names are SD's
    converted = convert_ldm_vae_checkpoint({k.removeprefix("first_stage_model."): v for k, v in sd.items()}, dict(model.config))
    assert set(converted) == set(model.state_dict()) and all(torch.equal(v, model.state_dict()[k]) for k, v in converted.items())
    return root, model


@torch.no_grad()
def max_difference(ae, model: AutoencoderKL) -> float:
    """Max abs difference of the posterior mean and of a decoding."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 2, 16, 16, generator=g)
    expected = model.decode(z).sample
    assert expected.abs().max() > 0.1  # a decoding that shows a difference
    return max(float((ae.encode(x).mean - model.encode(x).latent_dist.mean).abs().max()), float((ae.decode(z) - expected).abs().max()))


def run_first_stage(run, cfg):
    """The first stage in the run's last checkpoint, and the checkpoint's training state."""
    folder = resolve_checkpoint(run)
    ae = instantiate(cfg.autoencoder.model)
    load_module_state(ae, load_file(str(folder / "model.safetensors")), "first_stage")
    return ae.eval(), json.loads((folder / STATE_FILE).read_text())


def test_foreign_architecture_fails_before_work_and_the_listed_overrides_run(weights, tmp_path, tiny):
    root, model = weights
    with pytest.raises(ConfigError) as info:
        train(compose_config([*tiny, f"autoencoder.pretrained={root / 'vae'}"]), tmp_path / "refused")
    message = str(info.value)
    assert "autoencoder.pretrained" in message and "base_channels 8 vs 32" in message and "decoder_res_blocks 1 vs 2" in message
    listed = re.findall(r"\+?autoencoder\.model\.\w+=\S+", message.split("so set: ")[1])
    assert sorted(listed) == sorted(FITS_TINY)
    assert not (tmp_path / "refused" / "first_stage.json").exists() and not (tmp_path / "refused" / "checkpoints").exists()

    cfg = compose_config([*tiny, f"autoencoder.pretrained={root / 'vae'}", *listed])  # pasted as they are
    train(cfg, tmp_path / "run")
    ae, state = run_first_stage(tmp_path / "run", cfg)
    assert max_difference(ae, model) < TOL
    loaded = load_autoencoder(root / "vae").state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in ae.state_dict().items() if k != "scale_factor")
    assert json.loads((tmp_path / "run" / "first_stage.json").read_text())["format"] == "diffusers"
    # autoencoder.scale_factor=null: 1/std measured on this run's data, not the VAE's own 0.18215
    measured = LatentPool.encode(ae, build("data", validate(cfg).data), seed=cfg.seed).scale_factor
    assert state["scale_factor"] == pytest.approx(measured, rel=1e-5) and float(ae.scale_factor) == pytest.approx(measured, rel=1e-5)
    assert measured != pytest.approx(0.18215, rel=1e-2)

    # the run's own saved first stage (ldmcore's format) is a pretrained first stage too
    again = compose_config([*tiny, f"autoencoder.pretrained={tmp_path / 'run'}", *listed])
    train(again, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "first_stage.json").read_text())["format"] == "ldmcore"
    assert max_difference(run_first_stage(tmp_path / "again", again)[0], model) < TOL


def test_single_file_run_with_a_given_scale_factor(weights, tmp_path, tiny):
    root, model = weights
    cfg = compose_config([*tiny, f"autoencoder.pretrained={root / 'sd.safetensors'}", *FITS_TINY, "autoencoder.scale_factor=0.18215"])
    train(cfg, tmp_path / "run")
    ae, state = run_first_stage(tmp_path / "run", cfg)
    assert max_difference(ae, model) < TOL
    assert state["scale_factor"] == pytest.approx(0.18215) and float(ae.scale_factor) == pytest.approx(0.18215)
    assert json.loads((tmp_path / "run" / "first_stage.json").read_text())["format"] == "single file"


def test_pickled_file_needs_allow_pickle(weights, tmp_path, tiny):
    root, model = weights
    overrides = [*tiny, f"autoencoder.pretrained={root / 'sd.ckpt'}", *FITS_TINY]
    with pytest.raises(ConfigError, match=r"autoencoder\.allow_pickle=true") as info:
        train(compose_config(overrides), tmp_path / "refused")
    assert "pickled" in str(info.value) and "ldmcore.interop.convert" in str(info.value)
    assert not (tmp_path / "refused" / "first_stage.json").exists()

    cfg = compose_config([*overrides, "autoencoder.allow_pickle=true"])
    train(cfg, tmp_path / "run")
    assert max_difference(run_first_stage(tmp_path / "run", cfg)[0], model) < TOL


def test_pipeline_folder_loads_in_place(weights, tiny):
    root, model = weights
    cfg = validate(compose_config([*tiny, f"autoencoder.pretrained={root / 'pipeline'}", *FITS_TINY]))
    ae = instantiate(cfg.autoencoder.model)
    held = ae.encoder  # what a condition encoder built with the first stage would hold
    assert load_pretrained(ae, cfg.autoencoder) == {"source": str(root / "pipeline"), "format": "diffusers"}
    assert held is ae.encoder and max_difference(ae.eval(), model) < TOL


def test_other_groupnorm_groups_are_an_architecture_difference(weights, tiny):
    root, _ = weights
    cfg = validate(compose_config([*tiny, f"autoencoder.pretrained={root / 'vae'}", *FITS_TINY, "+autoencoder.model.num_groups=16"]))
    with pytest.raises(ConfigError, match=r"num_groups 16 vs 32\). .* so set: autoencoder\.model\.num_groups=32$"):
        load_pretrained(instantiate(cfg.autoencoder.model), cfg.autoencoder)


def test_weights_for_another_kind_of_first_stage_list_a_kl_config_that_fits(weights, tmp_path):
    root, model = weights
    pretrained = f"autoencoder.pretrained={root / 'vae'}"
    cfg = validate(compose_config(["+experiment=tiny", "autoencoder=vq_f4", pretrained]))
    with pytest.raises(ConfigError) as info:
        obtain_first_stage(cfg, None, None, tmp_path)  # fails before it would read the data
    message = str(info.value)
    assert "autoencoder.pretrained" in message and "VQAutoencoder" in message
    pasted = message.split("its architecture: ")[1].split(" (")[0].split()
    assert pasted[0] == "autoencoder=kl_f8" and "++autoencoder.model.channel_mult=[1,2]" in pasted
    cfg = validate(compose_config(["+experiment=tiny", pretrained, *pasted]))
    ae = instantiate(cfg.autoencoder.model)
    load_pretrained(ae, cfg.autoencoder)
    assert max_difference(ae.eval(), model) < TOL


def test_pretrained_for_a_first_stage_without_weights_is_refused(weights, tmp_path):
    root, _ = weights
    cfg = validate(compose_config(["autoencoder=identity", f"autoencoder.pretrained={root / 'vae'}"]))
    with pytest.raises(ConfigError, match=r"autoencoder\.pretrained is set, but .* has no weights to load"):
        obtain_first_stage(cfg, None, None, tmp_path)


def test_a_path_that_is_not_there_or_not_weights_is_named(tmp_path, tiny):
    (tmp_path / "weights").mkdir()
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a header cut short
    for path, fragment in [(tmp_path / "nowhere", "does not exist"),
                           (tmp_path / "weights", "neither an ldmcore run / checkpoint folder .* nor a diffusers AutoencoderKL folder"),
                           (tmp_path / "cut.safetensors", "no readable safetensors file")]:
        cfg = validate(compose_config([*tiny, f"autoencoder.pretrained={path}"]))
        with pytest.raises(ConfigError, match=fragment):
            load_pretrained(instantiate(cfg.autoencoder.model), cfg.autoencoder)


def test_sd_vae_is_stable_diffusions_vae():
    with pytest.raises(ConfigError, match=r"autoencoder\.pretrained is required"):
        validate(compose_config(["autoencoder=sd_vae"]))
    cfg = validate(compose_config(["autoencoder=sd_vae", "autoencoder.pretrained=/sd-vae"]))
    assert cfg.autoencoder.pretrained == "/sd-vae" and cfg.autoencoder.allow_pickle is False and cfg.autoencoder.scale_factor is None
    options = {k: v for k, v in OmegaConf.to_container(cfg.autoencoder.model).items() if k != "_target_"}
    derived = autoencoder_kwargs(SD_VAE_CONFIG)  # what interop builds from SD's config.json
    assert options == {k: list(v) if isinstance(v, tuple) else v for k, v in derived.items() if k != "scale_factor"}
    # ... and tensor for tensor the module diffusers builds from that config (on the meta device: no memory)
    with torch.device("meta"):
        ours = instantiate(cfg.autoencoder.model)
        theirs = AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")})
    mapped = {k: v.shape for k, v in autoencoder_diffusers(ours).to_foreign(ours.state_dict()).items()}
    assert mapped == {k: v.shape for k, v in theirs.state_dict().items()}


def test_scale_factor_must_be_positive():
    with pytest.raises(ConfigError, match=r"autoencoder\.scale_factor must be > 0"):
        validate(compose_config(["autoencoder.scale_factor=0"]))
