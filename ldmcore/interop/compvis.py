"""CompVis / Stable Diffusion single-file checkpoints: where the weights sit, what the weights say
about the architecture, and what only the original inference config (``v1-inference.yaml``,
``v2-inference-v.yaml`` ...) can say.

A single file holds ``model.diffusion_model.*`` (the UNet, in the layout ldmcore's UNet keeps),
optionally ``model_ema.*`` (the EMA of those weights, names without dots), ``first_stage_model.*``
(the KL autoencoder) and ``cond_stage_model.*`` (the text encoder, not read here). A standalone
first-stage file (e.g. ``vae-ft-mse-840000-ema-pruned``) holds the autoencoder without a prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldmcore.training.checkpoint import CheckpointError

UNET_PREFIX = "model.diffusion_model"
EMA_PREFIX = "model_ema"
FIRST_STAGE_PREFIX = "first_stage_model"
# Stable Diffusion v1 / v2 inference configs: model.params.scale_factor
SD_SCALE_FACTOR = 0.18215
# CompVis `make_beta_schedule` names -> ldmcore's: CompVis "linear" is linear in sqrt(β)
# (ldm/modules/diffusionmodules/util.py), i.e. ldmcore's "scaled_linear"; "sqrt_linear" is linear in β.
_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}


def read_config(config: str | Path | Mapping) -> dict:
    """The values a CompVis inference config holds that the weights cannot tell, as a flat dict
    with any of: prediction, schedule, beta_start, beta_end, timesteps, scale_factor, num_heads,
    head_dim. ``config``: a path to the YAML file, or its content as a mapping."""
    cfg = OmegaConf.load(Path(config).expanduser()) if isinstance(config, (str, Path)) else config
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    params = OmegaConf.select(cfg, "model.params", default=None)
    if params is None:
        raise CheckpointError("the config has no model.params: not a CompVis / Stable Diffusion inference config")
    out: dict = {"prediction": params.get("parameterization", "eps")}  # CompVis DDPM's default
    schedule = params.get("beta_schedule", "linear")
    if schedule not in _SCHEDULES:
        raise CheckpointError(f"beta_schedule {schedule!r} of the config has no ldmcore counterpart ({', '.join(_SCHEDULES)})")
    out["schedule"] = _SCHEDULES[schedule]
    if out["schedule"] != "cosine":  # CompVis DDPM defaults: linear_start 1e-4, linear_end 2e-2
        out["beta_start"] = float(params.get("linear_start", 1e-4))
        out["beta_end"] = float(params.get("linear_end", 2e-2))
    out["timesteps"] = int(params.get("timesteps", 1000))
    if "scale_factor" in params:
        out["scale_factor"] = float(params.scale_factor)
    unet = OmegaConf.select(params, "unet_config.params", default=None)
    if unet is not None:
        if unet.get("num_head_channels", -1) not in (-1, None):
            out["head_dim"] = int(unet.num_head_channels)
        elif unet.get("num_heads", -1) not in (-1, None):
            out["num_heads"] = int(unet.num_heads)
    return out


# ----- the UNet ---------------------------------------------------------------------------


def ema_name(key: str) -> str:
    """The EMA copy of ``model.diffusion_model.<key>``: CompVis LitEma stores each parameter of
    ``model`` under its name with the dots removed."""
    return f"{EMA_PREFIX}." + f"diffusion_model.{key}".replace(".", "")


def unet_weights(tensors: Mapping[str, torch.Tensor], ema: bool | None, source: str) -> tuple[dict, str]:
    """The UNet's tensors (names relative to the prefix) and the prefix they sit under.

    ema: True takes the ``model_ema.*`` copy (which must be there), False the raw weights, None
    the EMA copy when the file has one."""
    if any(k.startswith(UNET_PREFIX + ".") for k in tensors):
        prefix = UNET_PREFIX
    elif "input_blocks.0.0.weight" in tensors:
        prefix = ""  # a bare UNet state dict
    else:
        raise CheckpointError(f"{source} holds no UNet: expected {UNET_PREFIX}.* (a Stable Diffusion / CompVis checkpoint)")
    start = f"{prefix}." if prefix else ""
    raw = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
    has_ema = bool(prefix) and all(ema_name(k) in tensors for k in raw)
    if ema and not has_ema:
        raise CheckpointError(f"ema=True but {source} has no complete {EMA_PREFIX}.* copy of the UNet")
    if ema or (ema is None and has_ema):
        raw = {k: tensors[ema_name(k)] for k in raw}
    return raw, prefix


def _count(keys, pattern: str) -> int:
    """Number of distinct values of the single group of ``pattern`` among ``keys``."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"not a CompVis {what}: it has no {key}")
    return sd[key]


def unet_kwargs(sd: Mapping[str, torch.Tensor]) -> dict:
    """ldmcore ``UNet`` arguments read off a CompVis UNet state dict (names relative to the UNet),
    all but the attention heads, which the weights do not tell (see `default_heads`)."""
    conv_in = _need(sd, "input_blocks.0.0.weight", "UNet")
    model_channels, in_channels = conv_in.shape[:2]
    out_channels = _need(sd, "out.2.weight", "UNet").shape[0]
    blocks = _count(sd, r"input_blocks\.(\d+)\.")
    downsamples = _count(sd, r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = downsamples + 1
    res_blocks, rest = divmod(blocks - 1 - downsamples, levels)
    if rest or res_blocks < 1:
        raise CheckpointError(f"a UNet of {blocks} input blocks and {downsamples} downsamplings has no equal number of ResBlocks per level")
    mult, depths = [], []
    for level in range(levels):
        first = 1 + level * (res_blocks + 1)
        width = _need(sd, f"input_blocks.{first}.0.out_layers.3.weight", "UNet").shape[0]
        if width % model_channels:
            raise CheckpointError(f"level {level} has {width} channels, not a multiple of {model_channels}")
        mult.append(width // model_channels)
        depths.append(_count(sd, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
    mid_depth = _count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    attention = [2**level for level, d in enumerate(depths) if d > 0]
    if depths[-1] == 0:
        depths[-1] = mid_depth  # the deepest level has no attention: its depth only sizes the middle
    elif depths[-1] != mid_depth:
        raise CheckpointError(f"the middle transformer has depth {mid_depth}, the deepest level {depths[-1]}: ldmcore's UNet ties them")
    to_k = sd.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    vector = sd.get("vector_embed.weight")  # ldmcore's own y path (not in CompVis files)
    return dict(
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        model_channels=int(model_channels),
        channel_mult=mult,
        num_res_blocks=res_blocks,
        attention_resolutions=attention,
        transformer_depth=depths,
        context_dim=None if to_k is None else int(to_k.shape[1]),
        vector_dim=None if vector is None else int(vector.shape[1]),
        use_linear_proj=_need(sd, "middle_block.1.proj_in.weight", "UNet").ndim == 2,
        num_groups=32,  # CompVis GroupNorm32
    )


def default_heads(kwargs: dict) -> dict:
    """Attention heads of a recognisably Stable Diffusion UNet: SD 1.x (context 768, conv
    projections) has num_heads 8 (v1-inference.yaml), SD 2.x (context 1024, linear projections)
    64-channel heads (v2-inference*.yaml num_head_channels). Anything else must say it."""
    if kwargs["context_dim"] == 768 and not kwargs["use_linear_proj"]:
        return {"num_heads": 8}
    if kwargs["context_dim"] == 1024 and kwargs["use_linear_proj"]:
        return {"head_dim": 64}
    raise CheckpointError(
        "the weights do not tell the number of attention heads and this is not a Stable Diffusion 1.x/2.x UNet: "
        "pass num_heads= or head_dim=, or config= (its inference YAML)"
    )


# ----- the first stage --------------------------------------------------------------------


def first_stage_weights(tensors: Mapping[str, torch.Tensor], source: str) -> tuple[dict, str]:
    """The first stage's tensors (names relative to the prefix) and the prefix they sit under."""
    if any(k.startswith(FIRST_STAGE_PREFIX + ".") for k in tensors):
        prefix = FIRST_STAGE_PREFIX
    elif "encoder.conv_in.weight" in tensors:
        prefix = ""  # a standalone first-stage file
    else:
        raise CheckpointError(f"{source} holds no first stage: expected {FIRST_STAGE_PREFIX}.* or encoder.* / decoder.*")
    start = f"{prefix}." if prefix else ""
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}, prefix


def autoencoder_kwargs(sd: Mapping[str, torch.Tensor]) -> dict:
    """ldmcore ``KLAutoencoder`` arguments (but scale_factor) read off a CompVis first stage."""
    base, in_channels = _need(sd, "encoder.conv_in.weight", "first stage").shape[:2]
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    widths = [_need(sd, f"encoder.down.{level}.block.0.conv1.weight", "first stage").shape[0] for level in range(levels)]
    if any(w % base for w in widths):
        raise CheckpointError(f"first-stage widths {widths} are not multiples of {base}")
    out_channels = _need(sd, "decoder.conv_out.weight", "first stage").shape[0]
    if out_channels != in_channels:
        raise CheckpointError(f"the first stage maps {in_channels} channels to {out_channels}; ldmcore's decodes to its input channels")
    return dict(
        in_channels=int(in_channels),
        base_channels=int(base),
        channel_mult=[w // base for w in widths],
        encoder_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        decoder_res_blocks=_count(sd, r"decoder\.up\.0\.block\.(\d+)\."),
        latent_channels=int(_need(sd, "decoder.conv_in.weight", "first stage").shape[1]),
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
        num_groups=32,  # CompVis Normalize: GroupNorm(32, eps=1e-6)
        mid_res_blocks=_count(sd, r"encoder\.mid\.block_(\d+)\."),
        quant_conv="quant_conv.weight" in sd,
        asymmetric_downsample=True,  # CompVis Downsample pads right/bottom, then a stride-2 conv
    )


def is_sd_first_stage(kwargs: dict) -> bool:
    """Stable Diffusion's VAE: 128 channels, (1, 2, 4, 4), 4 latent channels."""
    return kwargs["base_channels"] == 128 and list(kwargs["channel_mult"]) == [1, 2, 4, 4] and kwargs["latent_channels"] == 4
