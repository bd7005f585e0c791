"""ldmcore's UNet loads diffusers folders and Stable Diffusion single files, and exports diffusers
folders, with outputs equal to diffusers' UNet2DConditionModel (max abs < 1e-4, fp32, CPU)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ldmcore.interop import load_unet, save_unet  # noqa: E402
from ldmcore.training.checkpoint import CheckpointError  # noqa: E402

TOL = 1e-4
SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
ARCHITECTURES = {
    # SD 1.x: conv projections, a fixed number of heads (8), 2 ResBlocks per level
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8, **SD_BLOCKS),
    # SD 2.x: linear projections, fixed head width (8 here, 64 in SD 2), fp32-upcast attention
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=48, attention_head_dim=(4, 8, 8),
                use_linear_projection=True, upcast_attention=True, **SD_BLOCKS),
    # tiny: attention only at the deeper level, 2-block transformers, 8 groups, a vector condition
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=2, attention_head_dim=2,
                 norm_num_groups=8, cross_attention_dim=16, in_channels=3, out_channels=5,
                 class_embed_type="simple_projection", projection_class_embeddings_input_dim=6),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(sample_size=16, **ARCHITECTURES[name]).eval()
    with torch.no_grad():  # perturb every tensor, so that no zero or unit init hides a mis-mapped name
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(model: UNet2DConditionModel) -> dict:
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    return dict(
        x=torch.randn(2, cfg.in_channels, 16, 16, generator=g),
        t=torch.tensor([3, 700]),
        context=torch.randn(2, 7, cfg.cross_attention_dim, generator=g),
        y=torch.randn(2, 6, generator=g) if cfg.class_embed_type else None,
    )


@torch.no_grad()
def theirs(model: UNet2DConditionModel, i: dict) -> torch.Tensor:
    return model(i["x"], i["t"], encoder_hidden_states=i["context"], class_labels=i["y"]).sample


@torch.no_grad()
def ours(unet, i: dict) -> torch.Tensor:
    return unet(i["x"], i["t"], context=i["context"], y=i["y"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0.1  # the comparison is not between near-zero outputs
    return float((a - b).abs().max())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_diffusers_folder_loads_and_exports_with_equal_outputs(name, tmp_path):
    model = diffusers_unet(name)
    model.save_pretrained(tmp_path / "theirs")
    i = inputs(model)
    expected = theirs(model, i)

    unet = load_unet(tmp_path / "theirs")
    assert max_diff(ours(unet, i), expected) < TOL

    save_unet(unet, tmp_path / "exported", sample_size=16)
    back = UNet2DConditionModel.from_pretrained(tmp_path / "exported").eval()
    assert set(back.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    assert max_diff(theirs(back, i), expected) < TOL


def single_file(unet, path, extra: dict | None = None) -> None:
    tensors = {f"model.diffusion_model.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    save_file({**tensors, **(extra or {})}, str(path))


@pytest.mark.parametrize("name, heads", [("sd1", {"config": {"model": {"params": {"unet_config": {"params": {"num_heads": 8}}}}}}),
                                         ("sd2", {"head_dim": 8})])
def test_single_file_has_stable_diffusion_names_and_equal_outputs(name, heads, tmp_path):
    model = diffusers_unet(name)
    model.save_pretrained(tmp_path / "theirs")
    single_file(load_unet(tmp_path / "theirs"), tmp_path / "sd.safetensors")
    # diffusers' own CompVis converter reads our file back into exactly its weights: the names are SD's
    converted = convert_ldm_unet_checkpoint(load_file(tmp_path / "sd.safetensors"), dict(model.config))
    assert set(converted) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in converted.items())

    i = inputs(model)
    assert max_diff(ours(load_unet(tmp_path / "sd.safetensors", **heads), i), theirs(model, i)) < TOL


def test_single_file_ema_weights_are_taken_when_present(tmp_path):
    model = diffusers_unet("sd1")
    model.save_pretrained(tmp_path / "ema")
    ema = load_unet(tmp_path / "ema")
    diffusers_unet("sd1", seed=5).save_pretrained(tmp_path / "raw")
    raw = load_unet(tmp_path / "raw")
    ema_tensors = {"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in ema.state_dict().items()}
    single_file(raw, tmp_path / "sd.safetensors", {**ema_tensors, "model_ema.decay": torch.tensor(0.9999)})

    i = inputs(model)
    assert max_diff(ours(load_unet(tmp_path / "sd.safetensors", num_heads=8), i), theirs(model, i)) < TOL
    assert torch.equal(ours(load_unet(tmp_path / "sd.safetensors", num_heads=8, ema=False), i), ours(raw, i))


def test_weights_that_do_not_fit_are_refused_with_their_keys(tmp_path):
    diffusers_unet("tiny").save_pretrained(tmp_path / "theirs")
    unet = load_unet(tmp_path / "theirs")

    to_q = "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"
    bad = {k: v for k, v in unet.state_dict().items()}
    bad[to_q] = torch.zeros(32, 31)
    single_file_tensors = {f"model.diffusion_model.{k}": v.contiguous() for k, v in bad.items()}
    single_file_tensors["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(2, 2)
    save_file(single_file_tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_unet(tmp_path / "bad.safetensors", num_heads=2)
    message = str(info.value)
    assert "unexpected: model.diffusion_model.label_emb.0.* (1: model.diffusion_model.label_emb.0.0.weight)" in message
    assert f"mis-shaped (given vs expected): model.diffusion_model.input_blocks.3.* (1: model.diffusion_model.{to_q} (32, 31) vs (32, 32))" in message

    # in a diffusers folder a missing tensor is named as diffusers names it
    weights = tmp_path / "theirs" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["down_blocks.1.resnets.0.norm1.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"missing: down_blocks\.1\.\* \(1: down_blocks\.1\.resnets\.0\.norm1\.weight\)"):
        load_unet(tmp_path / "theirs")


def test_what_ldmcore_cannot_express_is_refused(tmp_path):
    model = diffusers_unet("tiny")
    model.save_pretrained(tmp_path / "theirs")
    config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    (tmp_path / "theirs" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="resnet_time_scale_shift='scale_shift'"):
        load_unet(tmp_path / "theirs")

    # a single file does not tell its attention heads; a non-SD one must be told
    single_file(_tiny_unet(), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="num_heads= or head_dim="):
        load_unet(tmp_path / "tiny.safetensors")


def _tiny_unet():
    from ldmcore.denoiser import UNet

    return UNet(4, 4, model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), context_dim=16, num_heads=2, num_groups=8)


def test_a_pipeline_folder_gives_its_unet_and_noise_process(tmp_path):
    from ldmcore.interop import load_noise_process

    model = diffusers_unet("tiny")
    model.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "scheduler").mkdir()
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "steps_offset": 1}
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))

    i = inputs(model)
    assert max_diff(ours(load_unet(tmp_path / "pipe"), i), theirs(model, i)) < TOL
    for source in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        process = load_noise_process(source)
        assert process.prediction == "v" and process.schedule.num_timesteps == 1000
    # a single file's prediction type comes from its inference YAML (SD 2.x 768: parameterization v)
    yaml = {"model": {"params": {"parameterization": "v", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}}}
    from_yaml = load_noise_process(yaml)
    assert from_yaml.prediction == "v"
    assert torch.allclose(from_yaml.schedule.alphas_cumprod, process.schedule.alphas_cumprod)
    # a model folder alone does not tell; nor does a model's config.json
    model.save_pretrained(tmp_path / "alone")
    with pytest.raises(CheckpointError, match="no scheduler_config.json found"):
        load_noise_process(tmp_path / "alone")
    with pytest.raises(CheckpointError, match="no diffusers scheduler_config.json"):
        load_noise_process(tmp_path / "alone" / "config.json")
