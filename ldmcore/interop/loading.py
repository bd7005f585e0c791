"""Load pretrained weights into ldmcore modules: a diffusers model (or pipeline) folder, or a
CompVis / Stable Diffusion single file. The module is configured from the weights (and the
folder's config.json); what a single file cannot tell comes from explicit arguments or from its
inference YAML (``config=``). A file that does not fit is refused with its mismatched keys; nothing
is ever loaded partially."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ldmcore.autoencoder import KLAutoencoder
from ldmcore.denoiser import UNet
from ldmcore.diffusion import NoiseProcess, NoiseSchedule
from ldmcore.training.checkpoint import CheckpointError, load_module_state

from . import compvis, diffusers_config, schedulers
from .diffusers_io import model_folder, read_model_folder
from .keymaps import autoencoder_compvis, autoencoder_diffusers, unet_diffusers
from .safe_pickle import read_tensors

Config = str | Path | Mapping


def _exists(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return path


def _diffusers_folder(path: Path, subfolder: str) -> Path | None:
    folder = model_folder(path, subfolder)
    if folder is None and path.is_dir():
        raise CheckpointError(f"{path} is no diffusers model folder: it has no config.json (nor {subfolder}/config.json)")
    return folder


def load_unet(
    path: str | Path,
    *,
    config: Config | None = None,
    num_heads: int | None = None,
    head_dim: int | None = None,
    ema: bool | None = None,
    allow_pickle: bool = False,
) -> UNet:
    """An ldmcore ``UNet`` with the weights of ``path``, in eval mode, float32.

    path: a diffusers ``UNet2DConditionModel`` folder (or a pipeline folder with ``unet/``), or a
        single file with ``model.diffusion_model.*`` (``.safetensors``; ``.ckpt`` with allow_pickle).
    For single files only (a diffusers config says all of it):
    config: the model's CompVis inference YAML (path or mapping), for the attention heads;
    num_heads / head_dim: the attention heads directly (default: Stable Diffusion's when the
        weights are recognisably SD 1.x / 2.x, otherwise one of them is required);
    ema: True the ``model_ema.*`` weights, False the raw ones, None the EMA ones when present.
    allow_pickle: read pickled files (restricted unpickler, see safe_pickle.py); default refuses.
    """
    path = _exists(path)
    folder = _diffusers_folder(path, "unet")
    if folder is not None:
        cfg, tensors = read_model_folder(folder, allow_pickle)
        unet = UNet(**diffusers_config.unet_kwargs(cfg))
        keymap = unet_diffusers(unet)
        load_module_state(unet, keymap.from_foreign(tensors), "", str(folder), names=keymap.names, built_from="its config.json")
        return unet.eval()
    tensors = read_tensors(path, allow_pickle=allow_pickle, keep=lambda k: not k.startswith(("first_stage_model.", "cond_stage_model.")))
    weights, prefix = compvis.unet_weights(tensors, ema, str(path))
    kwargs = compvis.unet_kwargs(weights)
    heads = {k: v for k, v in (("num_heads", num_heads), ("head_dim", head_dim)) if v is not None}
    if not heads and config is not None:
        heads = {k: v for k, v in compvis.read_config(config).items() if k in ("num_heads", "head_dim")}
    unet = UNet(**kwargs, **(heads or compvis.default_heads(kwargs)))
    start = f"{prefix}." if prefix else ""
    load_module_state(unet, {start + k: v for k, v in weights.items()}, prefix, str(path), built_from="the weights")
    return unet.eval()


def load_autoencoder(
    path: str | Path,
    *,
    config: Config | None = None,
    scale_factor: float | None = None,
    allow_pickle: bool = False,
) -> KLAutoencoder:
    """An ldmcore ``KLAutoencoder`` with the weights of ``path``, in eval mode, float32.

    path: a diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``), or a single
        file with ``first_stage_model.*`` or a standalone first stage (``encoder.*``, ``decoder.*``).
    scale_factor: the latent scale; default the folder's ``scaling_factor``, for single files the
        config's ``scale_factor``, a ``scale_factor`` tensor in the file, or 0.18215 for Stable
        Diffusion's VAE; any other single-file first stage needs it said.
    """
    path = _exists(path)
    folder = _diffusers_folder(path, "vae")
    if folder is not None:
        cfg, tensors = read_model_folder(folder, allow_pickle)
        ae = KLAutoencoder(**diffusers_config.autoencoder_kwargs(cfg))
        keymap, source, prefix, built_from = autoencoder_diffusers(ae), str(folder), "", "its config.json"
        scale = scale_factor if scale_factor is not None else float(ae.scale_factor)
    else:
        tensors = read_tensors(path, allow_pickle=allow_pickle, keep=lambda k: not k.startswith(("model.", "model_ema.", "cond_stage_model.")))
        weights, prefix = compvis.first_stage_weights(tensors, str(path))
        kwargs = compvis.autoencoder_kwargs(weights)
        ae = KLAutoencoder(**kwargs)
        scale = _single_file_scale(scale_factor, config, tensors, kwargs, str(path))
        keymap, source, built_from = autoencoder_compvis(ae), str(path), "the weights"
        tensors = weights
    given = keymap.from_foreign(tensors)
    given["scale_factor"] = torch.tensor(float(scale))
    start = f"{prefix}." if prefix else ""
    load_module_state(ae, {start + k: v for k, v in given.items()}, prefix, source, names=keymap.names, built_from=built_from)
    return ae.eval()


def _single_file_scale(scale_factor, config, tensors, kwargs, source: str) -> float:
    if scale_factor is not None:
        return float(scale_factor)
    if config is not None and "scale_factor" in (values := compvis.read_config(config)):
        return values["scale_factor"]
    if "scale_factor" in tensors:  # CompVis LatentDiffusion(scale_by_std=True) keeps it as a buffer
        return float(tensors["scale_factor"])
    if compvis.is_sd_first_stage(kwargs):
        return compvis.SD_SCALE_FACTOR
    raise CheckpointError(f"{source} does not tell its latent scale factor: pass scale_factor= or config=")


def load_noise_process(source: str | Path | Mapping, *, prediction: str | None = None) -> NoiseProcess:
    """The ``NoiseProcess`` (schedule and prediction type) a pretrained model was trained with —
    what its weights cannot tell.

    source: a diffusers pipeline folder, its ``unet/`` or ``scheduler/`` folder, a
        ``scheduler_config.json``, or a CompVis inference YAML (path or mapping; v-prediction is its
        ``parameterization: v``).
    prediction: "eps", "v" or "x0", overriding what the source says.
    """
    if isinstance(source, Mapping):
        return _from_compvis(source, prediction)
    path = _exists(source)
    if path.suffix in (".yaml", ".yml"):
        return _from_compvis(path, prediction)
    if path.is_file():
        cfg = json.loads(path.read_text())
        if not str(cfg.get("_class_name", "")).endswith("Scheduler"):
            raise CheckpointError(f"{path} is no diffusers scheduler_config.json (its _class_name is {cfg.get('_class_name')!r})")
        return schedulers.noise_process(cfg, prediction)
    for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return schedulers.noise_process(json.loads(candidate.read_text()), prediction)
    raise CheckpointError(
        f"no scheduler_config.json found for {path}: a model folder alone does not tell its noise schedule or "
        "prediction type; give the pipeline folder, the scheduler config, or the CompVis inference YAML"
    )


def _from_compvis(config: Config, prediction: str | None) -> NoiseProcess:
    values = compvis.read_config(config)
    ends = {k: values[k] for k in ("beta_start", "beta_end") if k in values}
    schedule = NoiseSchedule.from_name(values["schedule"], values["timesteps"], **ends)
    return NoiseProcess(schedule, prediction or values["prediction"])
