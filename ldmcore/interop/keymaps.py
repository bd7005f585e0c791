"""Tensor names in the three layouts weights come in: ldmcore's, CompVis / Stable Diffusion single
files (``model.diffusion_model.*``, ``first_stage_model.*``) and diffusers model folders.

A `KeyMap` is built by walking an ldmcore module, so it covers exactly that module's state dict:
for every ldmcore name it gives the foreign name. The UNet keeps the CompVis layout module for
module, so its CompVis names are its own; the first stage keeps its blocks in flat Sequentials,
so both of its maps are spelled out here. The renamings are those of CompVis
``ldm/modules/diffusionmodules/{openaimodel,model}.py`` and of diffusers' ``UNet2DConditionModel``
/ ``AutoencoderKL`` module trees (diffusers ``models/unets/unet_2d_condition.py``,
``models/autoencoders/vae.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ldmcore.autoencoder import KLAutoencoder
from ldmcore.denoiser import UNet
from ldmcore.nn import Downsample, ResBlock, SpatialSelfAttention, SpatialTransformer, Upsample

# ResBlock sub-modules: ldmcore/CompVis UNet name -> diffusers ResnetBlock2D name
RESBLOCK_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# ... and the CompVis first stage's ResnetBlock names (no time embedding there)
RESBLOCK_COMPVIS_VAE = {**RESBLOCK_DIFFUSERS, "skip_connection": "nin_shortcut"}
# The first stage's middle attention: diffusers uses linear layers where CompVis has 1×1 convs
ATTENTION_DIFFUSERS_VAE = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


@dataclass
class KeyMap:
    """names: ldmcore name -> foreign name. as_linear: ldmcore names of 1×1-conv weights that are
    linear-layer weights (2-D) in the foreign layout. local: ldmcore names with no tensor in the
    foreign layout (the first stage's ``scale_factor``, a config value there)."""

    names: dict[str, str] = field(default_factory=dict)
    as_linear: set[str] = field(default_factory=set)
    local: set[str] = field(default_factory=set)

    def add(self, module: nn.Module, ours: str, theirs: str, renames: Mapping[str, str] | None = None,
            as_linear: bool = False) -> None:
        """Map every tensor under ``ours.`` (of ``module``) to ``theirs.``, renaming the leading
        sub-module names listed in ``renames``."""
        for key in module.state_dict():
            rest = key
            for old, new in (renames or {}).items():
                if key.startswith(old + "."):
                    rest = new + key[len(old):]
                    break
            self.names[f"{ours}.{key}" if ours else key] = f"{theirs}.{rest}" if theirs else rest
            if as_linear and key.endswith("weight") and not key.startswith("norm."):
                self.as_linear.add(f"{ours}.{key}")

    def to_foreign(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ldmcore-named tensors -> foreign-named tensors (every name but the local ones is mapped)."""
        return {
            self.names[k]: (v.flatten(1) if k in self.as_linear else v) for k, v in tensors.items() if k not in self.local
        }

    def from_foreign(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Foreign-named tensors -> ldmcore names; names this map does not know are kept as they are
        (so that a strict load reports them as unexpected)."""
        ours = {theirs: mine for mine, theirs in self.names.items()}
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            mine = ours.get(key)
            if mine is None:
                out[key] = value
            else:
                out[mine] = value[:, :, None, None] if mine in self.as_linear and value.ndim == 2 else value
        return out


def _check_complete(keymap: KeyMap, module: nn.Module, what: str) -> KeyMap:
    unmapped = set(module.state_dict()) - set(keymap.names) - keymap.local
    if unmapped:  # a module this walker does not know: a bug here, not in the user's file
        raise NotImplementedError(f"no {what} name for {sorted(unmapped)[:5]}")
    return keymap


def unet_diffusers(unet: UNet) -> KeyMap:
    """ldmcore UNet -> diffusers ``UNet2DConditionModel`` names."""
    km = KeyMap()
    km.add(unet.time_embed[0], "time_embed.0", "time_embedding.linear_1")
    km.add(unet.time_embed[2], "time_embed.2", "time_embedding.linear_2")
    if unet.vector_embed is not None:  # class_embed_type="simple_projection": one linear layer
        km.add(unet.vector_embed, "vector_embed", "class_embedding")
    km.add(unet.input_blocks[0][0], "input_blocks.0.0", "conv_in")
    km.add(unet.out[0], "out.0", "conv_norm_out")
    km.add(unet.out[2], "out.2", "conv_out")

    level = j = 0
    for n, block in enumerate(unet.input_blocks):
        if n == 0:
            continue
        if isinstance(block[0], Downsample):
            km.add(block[0], f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", {"op": "conv"})
            level, j = level + 1, 0
            continue
        _add_layers(km, block, f"input_blocks.{n}", f"down_blocks.{level}", j)
        j += 1

    names = iter(("resnets.0", "attentions.0", "resnets.1"))
    for i, layer in enumerate(unet.middle_block):
        km.add(layer, f"middle_block.{i}", f"mid_block.{next(names)}", RESBLOCK_DIFFUSERS if isinstance(layer, ResBlock) else None)

    per_level = len(unet.output_blocks) // _levels(unet)  # num_res_blocks + 1
    for m, block in enumerate(unet.output_blocks):
        _add_layers(km, block, f"output_blocks.{m}", f"up_blocks.{m // per_level}", m % per_level)
    return _check_complete(km, unet, "diffusers")


def _add_layers(km: KeyMap, block: nn.Module, ours: str, theirs: str, j: int) -> None:
    for i, layer in enumerate(block):
        if isinstance(layer, ResBlock):
            km.add(layer, f"{ours}.{i}", f"{theirs}.resnets.{j}", RESBLOCK_DIFFUSERS)
        elif isinstance(layer, SpatialTransformer):
            km.add(layer, f"{ours}.{i}", f"{theirs}.attentions.{j}")
        elif isinstance(layer, Upsample):
            km.add(layer, f"{ours}.{i}", f"{theirs}.upsamplers.0")


def autoencoder_diffusers(ae: KLAutoencoder) -> KeyMap:
    """ldmcore KLAutoencoder -> diffusers ``AutoencoderKL`` names (``scale_factor`` is config there)."""
    return _autoencoder(ae, diffusers=True)


def autoencoder_compvis(ae: KLAutoencoder) -> KeyMap:
    """ldmcore KLAutoencoder -> CompVis ``AutoencoderKL`` names, without the ``first_stage_model.``
    prefix (``scale_factor`` is not a tensor of the first stage there)."""
    return _autoencoder(ae, diffusers=False)


def _autoencoder(ae: KLAutoencoder, diffusers: bool) -> KeyMap:
    km = KeyMap()
    resblock = RESBLOCK_DIFFUSERS if diffusers else RESBLOCK_COMPVIS_VAE
    norm_out = "conv_norm_out" if diffusers else "norm_out"
    for side in ("encoder", "decoder"):
        coder = getattr(ae, side)
        km.add(coder.conv_in, f"{side}.conv_in", f"{side}.conv_in")
        km.add(coder.norm_out, f"{side}.norm_out", f"{side}.{norm_out}")
        km.add(coder.conv_out, f"{side}.conv_out", f"{side}.conv_out")
        resnet = attention = 0
        for i, layer in enumerate(coder.mid):
            if isinstance(layer, SpatialSelfAttention):
                theirs = f"{side}.mid_block.attentions.{attention}" if diffusers else f"{side}.mid.attn_{attention + 1}"
                km.add(layer, f"{side}.mid.{i}", theirs, ATTENTION_DIFFUSERS_VAE if diffusers else None, as_linear=diffusers)
                attention += 1
            else:
                theirs = f"{side}.mid_block.resnets.{resnet}" if diffusers else f"{side}.mid.block_{resnet + 1}"
                km.add(layer, f"{side}.mid.{i}", theirs, resblock)
                resnet += 1

    levels = _levels(ae)
    level = j = 0  # encoder: level 0 (full resolution) first
    for i, layer in enumerate(ae.encoder.down):
        stage = f"encoder.down_blocks.{level}" if diffusers else f"encoder.down.{level}"
        if isinstance(layer, Downsample):
            theirs = f"{stage}.downsamplers.0" if diffusers else f"{stage}.downsample"
            km.add(layer, f"encoder.down.{i}", theirs, {"op": "conv"})
            level, j = level + 1, 0
        else:
            km.add(layer, f"encoder.down.{i}", f"{stage}.resnets.{j}" if diffusers else f"{stage}.block.{j}", resblock)
            j += 1
    level, j = levels - 1, 0  # decoder: the deepest level first; diffusers counts up_blocks from there
    for i, layer in enumerate(ae.decoder.up):
        stage = f"decoder.up_blocks.{levels - 1 - level}" if diffusers else f"decoder.up.{level}"
        if isinstance(layer, Upsample):
            km.add(layer, f"decoder.up.{i}", f"{stage}.upsamplers.0" if diffusers else f"{stage}.upsample")
            level, j = level - 1, 0
        else:
            km.add(layer, f"decoder.up.{i}", f"{stage}.resnets.{j}" if diffusers else f"{stage}.block.{j}", resblock)
            j += 1
    for name in ("quant_conv", "post_quant_conv"):
        if getattr(ae, name) is not None:
            km.add(getattr(ae, name), name, name)
    km.local.add("scale_factor")
    return _check_complete(km, ae, "diffusers" if diffusers else "CompVis")


def _levels(module: UNet | KLAutoencoder) -> int:
    return module.downsample_factor.bit_length()  # f = 2 ** (levels - 1)
