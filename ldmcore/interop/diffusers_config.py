"""diffusers ``config.json`` <-> ldmcore constructor arguments, for ``UNet2DConditionModel`` and
``AutoencoderKL``.

Reading: every diffusers option ldmcore has no counterpart for must hold the value ldmcore's
module implies, otherwise the model is refused with the options that differ (loading it anyway
would give other outputs in silence). Options absent from the file take diffusers' defaults
(``UNet2DConditionModel.__init__`` / ``AutoencoderKL.__init__``).
Writing: the ldmcore module is described from its own layers, and options it cannot express in
diffusers' terms are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import nn

from ldmcore.autoencoder import KLAutoencoder
from ldmcore.denoiser import UNet
from ldmcore.nn import Downsample, SpatialSelfAttention, SpatialTransformer
from ldmcore.training.checkpoint import CheckpointError

from . import compvis
from .keymaps import autoencoder_compvis

# Written into exported configs: the oldest diffusers release this export was checked against
# is 0.30, whose config keys these are.
DIFFUSERS_VERSION = "0.30.0"

# UNet2DConditionModel options without an ldmcore counterpart, and the value ldmcore implies.
# (upcast_attention is accepted either way: it only changes fp16 arithmetic.)
_UNET_FIXED = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)):  # a per-block option given as a list: every entry must match
        return all(_same(x, b) for x in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b or (b is None and a is False) or (b is False and a is None)


def _check(cfg: Mapping, class_name: str, fixed: Mapping) -> None:
    if cfg.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"config.json describes a {cfg['_class_name']}, not a {class_name}")
    differ = [f"{k}={cfg[k]!r} (ldmcore: {v!r})" for k, v in fixed.items() if k in cfg and not _same(cfg[k], v)]
    if differ:
        raise CheckpointError(f"this {class_name} uses options ldmcore's module does not implement: {', '.join(differ)}")


def _per_level(value, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels or any(isinstance(v, (list, tuple)) for v in values):
        raise CheckpointError(f"{name}={value!r}: ldmcore needs one number per level ({levels} levels)")
    return values


# ----- UNet2DConditionModel ---------------------------------------------------------------


def unet_kwargs(cfg: Mapping) -> dict:
    """ldmcore ``UNet`` arguments of a diffusers ``UNet2DConditionModel`` config."""
    _check(cfg, "UNet2DConditionModel", _UNET_FIXED)
    widths = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels, model_channels = len(widths), widths[0]
    down = list(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in kinds for t in down) or len(down) != levels:
        raise CheckpointError(f"down_block_types {down}: ldmcore's UNet has CrossAttnDownBlock2D / DownBlock2D, one per level")
    attention = [kinds[t] for t in down]
    mirror = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != mirror:
        raise CheckpointError(f"up_block_types {up}: ldmcore's UNet mirrors the down blocks ({mirror})")
    if any(w % model_channels for w in widths):
        raise CheckpointError(f"block_out_channels {widths} are not multiples of the first")
    res_blocks = set(_per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block"))
    if len(res_blocks) != 1:
        raise CheckpointError(f"layers_per_block={cfg['layers_per_block']}: ldmcore's UNet has as many at every level")
    depths = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if depths[-1] < 1:
        raise CheckpointError("the middle block has no transformer layer; ldmcore's UNet always has one")
    context = cfg.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise CheckpointError(f"cross_attention_dim={context}: ldmcore's UNet has one context width")
        context = context[0]
    class_embed = cfg.get("class_embed_type")
    if class_embed not in (None, "simple_projection"):
        raise CheckpointError(f"class_embed_type={class_embed!r}: ldmcore's vector path is one linear layer ('simple_projection')")
    return dict(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=[w // model_channels for w in widths],
        num_res_blocks=res_blocks.pop(),
        attention_resolutions=[2**level for level, a in enumerate(attention) if a],
        transformer_depth=depths,
        context_dim=context,
        vector_dim=cfg.get("projection_class_embeddings_input_dim") if class_embed else None,
        dropout=cfg.get("dropout", 0.0),
        use_linear_proj=cfg.get("use_linear_projection", False),
        num_groups=cfg.get("norm_num_groups", 32),
        **_heads(cfg, widths, attention),
    )


def _heads(cfg: Mapping, widths: list[int], attention: list[bool]) -> dict:
    # diffusers' `attention_head_dim` is, for this model, the number of heads (a naming kept for
    # compatibility, see UNet2DConditionModel.__init__); `num_attention_heads` wins when set.
    given = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = _per_level(given, len(widths), "attention_head_dim")
    used = [level for level, a in enumerate(attention) if a] + [len(widths) - 1]  # + the middle block
    if len({heads[level] for level in used}) == 1:
        return {"num_heads": heads[-1]}
    dims = {widths[level] / heads[level] for level in used}
    if len(dims) == 1 and float(next(iter(dims))).is_integer():
        return {"head_dim": int(dims.pop())}
    raise CheckpointError(f"attention heads {heads} over widths {widths}: ldmcore needs either equal heads or equal head widths")


def unet_config(unet: UNet, sample_size: int | None = None) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of an ldmcore UNet."""
    kw = compvis.unet_kwargs(unet.state_dict())  # the UNet keeps CompVis names
    levels = len(kw["channel_mult"])
    widths = [m * kw["model_channels"] for m in kw["channel_mult"]]
    attention = [2**level in kw["attention_resolutions"] for level in range(levels)]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    heads = _module_heads(unet, widths, attention)
    first_res = unet.input_blocks[1][0]
    config = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_channels"],
        "block_out_channels": widths,
        "layers_per_block": kw["num_res_blocks"],
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": kw["context_dim"],
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "transformer_layers_per_block": kw["transformer_depth"],
        "use_linear_projection": kw["use_linear_proj"],
        "norm_num_groups": _groups(unet),
        "norm_eps": first_res.in_layers[0].eps,
        "dropout": first_res.out_layers[2].p,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    if kw["vector_dim"] is not None:
        config.update(class_embed_type="simple_projection", projection_class_embeddings_input_dim=kw["vector_dim"])
    return config


def _module_heads(unet: UNet, widths: list[int], attention: list[bool]) -> list[int]:
    """Heads per level as built; levels without attention get the count their width would have
    (diffusers reads the deepest level's for the middle block and ignores the others)."""
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    attn = transformers[0].transformer_blocks[0].attn1
    head_dim = attn.to_q.out_features // attn.num_heads
    if len({t.transformer_blocks[0].attn1.num_heads for t in transformers}) == 1:
        return [attn.num_heads] * len(widths)  # fixed number of heads
    return [w // head_dim for w in widths]  # fixed head width


def _groups(module: nn.Module) -> int:
    counts = {m.num_groups for m in module.modules() if isinstance(m, nn.GroupNorm)}
    if len(counts) != 1:
        raise CheckpointError(f"the module's GroupNorms use {sorted(counts)} groups; diffusers uses one count (norm_num_groups) for all")
    return counts.pop()


# ----- AutoencoderKL ----------------------------------------------------------------------


def autoencoder_kwargs(cfg: Mapping) -> dict:
    """ldmcore ``KLAutoencoder`` arguments of a diffusers ``AutoencoderKL`` config."""
    _check(cfg, "AutoencoderKL", _VAE_FIXED)
    widths = list(cfg.get("block_out_channels", (64,)))
    levels = len(widths)
    if list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * levels)) != ["DownEncoderBlock2D"] * levels or list(
        cfg.get("up_block_types", ["UpDecoderBlock2D"] * levels)
    ) != ["UpDecoderBlock2D"] * levels:
        raise CheckpointError("ldmcore's KL autoencoder has DownEncoderBlock2D / UpDecoderBlock2D blocks only")
    if any(w % widths[0] for w in widths):
        raise CheckpointError(f"block_out_channels {widths} are not multiples of the first")
    in_channels = cfg.get("in_channels", 3)
    if cfg.get("out_channels", 3) != in_channels:
        raise CheckpointError("ldmcore's autoencoder decodes to as many channels as it encodes")
    quant, post_quant = cfg.get("use_quant_conv", True), cfg.get("use_post_quant_conv", True)
    if quant != post_quant:
        raise CheckpointError("ldmcore's autoencoder has both quant_conv and post_quant_conv, or neither")
    layers = cfg.get("layers_per_block", 1)
    return dict(
        in_channels=in_channels,
        base_channels=widths[0],
        channel_mult=[w // widths[0] for w in widths],
        encoder_res_blocks=layers,
        decoder_res_blocks=layers + 1,  # diffusers' Decoder: layers_per_block + 1 per level
        latent_channels=cfg.get("latent_channels", 4),
        mid_attention=cfg.get("mid_block_add_attention", True),
        num_groups=cfg.get("norm_num_groups", 32),
        scale_factor=cfg.get("scaling_factor", compvis.SD_SCALE_FACTOR),
        mid_res_blocks=2,  # UNetMidBlock2D(num_layers=1): two resnets
        quant_conv=quant,
        asymmetric_downsample=True,  # Downsample2D(padding=0) pads right/bottom
    )


def autoencoder_config(ae: KLAutoencoder, sample_size: int | None = None) -> dict:
    """The diffusers ``AutoencoderKL`` config of an ldmcore KLAutoencoder."""
    kw = compvis.autoencoder_kwargs(autoencoder_compvis(ae).to_foreign(ae.state_dict()))
    problems = []
    if kw["decoder_res_blocks"] != kw["encoder_res_blocks"] + 1:
        problems.append(f"decoder_res_blocks must be encoder_res_blocks + 1 (has {kw['decoder_res_blocks']} and {kw['encoder_res_blocks']})")
    if kw["mid_res_blocks"] != 2:
        problems.append(f"mid_res_blocks must be 2 (has {kw['mid_res_blocks']})")
    if any(isinstance(m, Downsample) and not m.asymmetric_padding for m in ae.encoder.modules()):
        problems.append("asymmetric_downsample must be True")
    if problems:
        raise CheckpointError("this autoencoder has no diffusers AutoencoderKL counterpart: " + "; ".join(problems))
    widths = [m * kw["base_channels"] for m in kw["channel_mult"]]
    levels = len(widths)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": 32 if sample_size is None else sample_size,  # AutoencoderKL's default; it needs one
        "in_channels": kw["in_channels"],
        "out_channels": kw["in_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths,
        "layers_per_block": kw["encoder_res_blocks"],
        "act_fn": "silu",
        "latent_channels": kw["latent_channels"],
        "norm_num_groups": _groups(ae),
        "scaling_factor": float(ae.scale_factor),
        "use_quant_conv": kw["quant_conv"],
        "use_post_quant_conv": kw["quant_conv"],
        "mid_block_add_attention": any(isinstance(m, SpatialSelfAttention) for m in ae.encoder.mid),
        "force_upcast": True,
    }
