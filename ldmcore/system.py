"""Assembling a latent diffusion model from a validated config: the first stage, the conditioner
built from the selected plugins, the UNet whose sizes are derived from both, and the noise process.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldmcore.conditioning import Conditioner
from ldmcore.config import ConfigError
from ldmcore.data.base import DataInfo, data_info
from ldmcore.data.skips import DataError
from ldmcore.diffusion import NoiseProcess, NoiseSchedule
from ldmcore.pluginmanager import Condition, installed


class DenoiserModel(nn.Module):
    """What stage 2 trains: the UNet eps_theta and the condition encoders tau_theta."""

    def __init__(self, unet: nn.Module, conditioner: Conditioner):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner


@dataclass
class LatentDiffusion:
    first_stage: nn.Module
    model: DenoiserModel
    process: NoiseProcess
    conditions: dict[str, Condition]
    condition_options: DictConfig
    data: DataInfo
    guide: DenoiserModel | None = None  # the earlier EMA snapshot that autoguides unconditional samples

    def attach_guide(self, tensors: dict[str, torch.Tensor], prefix: str = "guide") -> None:
        """Build the autoguidance model from ``prefix.*`` tensors (no-op when there are none)."""
        from ldmcore.training.checkpoint import load_module_state

        if any(k.startswith(prefix + ".") for k in tensors):
            self.guide = copy.deepcopy(self.model).eval()
            load_module_state(self.guide, tensors, prefix)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.first_stage.downsample_factor
        return (self.first_stage.latent_channels, self.data.resolution // f, self.data.resolution // f)


def build(what: str, node: DictConfig, **derived: Any) -> Any:
    """``hydra.utils.instantiate`` with an error that names the config section (and any
    required option, ``???`` in the config, that was not given)."""
    missing = [key for key in node if OmegaConf.is_missing(node, key)]
    if missing:
        raise ConfigError(f"{what}.{missing[0]} is required: give it on the command line, e.g. {what}.{missing[0]}=...")
    try:
        return instantiate(node, **derived)
    except Exception as error:  # instantiate wraps constructor errors; surface the section name
        if isinstance(error.__cause__, (ConfigError, DataError)):  # the constructor's own error names the option / file
            raise error.__cause__ from None
        raise ConfigError(f"cannot build {what} from its config ({OmegaConf.to_container(node)}): {error}") from None


def selected_conditions(cfg: DictConfig) -> dict[str, Condition]:
    registry = installed()
    conditions = {}
    for name in cfg.condition or {}:
        try:
            conditions[name] = registry.get(name)
        except KeyError as error:
            raise ConfigError(f"condition.{name}: {error.args[0]}") from None
    return conditions


def check_batch_keys(conditions: dict[str, Condition], cfg: DictConfig, data: DataInfo) -> None:
    """Every key a selected plugin reads must be provided by the data source (checked at start-up)."""
    for name, condition in conditions.items():
        needed = condition.call("ldmcore_batch_keys", options=cfg.condition[name])
        missing = [k for k in needed if k not in data.provides]
        if missing:
            raise ConfigError(
                f"condition {name!r} reads batch keys {missing} that the data source {data.name} does not provide "
                f"(it provides {', '.join(data.provides)})"
            )


def cache_folder(cfg: DictConfig) -> Path | None:
    """The run's cache folder (``cache_dir``, ``~`` expanded), or None where the config has none."""
    return Path(str(cfg.cache_dir)).expanduser() if cfg.get("cache_dir") else None


def build_conditioner(cfg: DictConfig, conditions: dict[str, Condition], data: DataInfo,
                      latent_shape: tuple[int, int, int], first_stage: nn.Module) -> Conditioner:
    """One encoder per condition; ``latent_shape`` (C, h, w) at ``data.resolution`` tells concat encoders the latent size;
    ``first_stage`` is handed to encoders that work in latent space (they hold it, unregistered); ``cache_dir``
    is the run's, passed to the hook rather than kept in a plugin's options (those are part of the model's config)."""
    cache_dir = cache_folder(cfg)
    encoders = {name: c.call("ldmcore_build_encoder", options=cfg.condition[name], data=data, latent_shape=latent_shape,
                             first_stage=first_stage, cache_dir=cache_dir)
                for name, c in conditions.items()}
    return Conditioner(encoders, {name: float(cfg.condition[name].dropout) for name in conditions})


def build_process(cfg: DictConfig) -> NoiseProcess:
    schedule = NoiseSchedule.from_name(cfg.noise.schedule, cfg.noise.timesteps)
    return NoiseProcess(schedule, cfg.noise.prediction, cfg.noise.loss_weighting, cfg.noise.min_snr_gamma)


POSITION_FREQUENCIES = 2  # coordinate channels (4 per frequency) when a condition needs positions


def coordinate_option(denoiser: DictConfig, conditioner: Conditioner) -> dict:
    """``coordinate_frequencies`` of the denoiser where its config leaves it null (``auto``): 2 when a
    selected encoder declares ``needs_positions`` (tokens that name places), else 0."""
    if "coordinate_frequencies" not in denoiser or denoiser.coordinate_frequencies is not None:
        return {}
    return {"coordinate_frequencies": POSITION_FREQUENCIES if conditioner.needs_positions else 0}


def build_system(cfg: DictConfig, dataset=None, info: DataInfo | None = None) -> LatentDiffusion:
    """Build every module of the run (weights as initialized); ``dataset`` or ``info`` describe the data."""
    info = info or data_info(dataset)
    conditions = selected_conditions(cfg)
    check_batch_keys(conditions, cfg, info)
    first_stage = build("autoencoder.model", cfg.autoencoder.model)
    c, f = first_stage.latent_channels, first_stage.downsample_factor
    conditioner = build_conditioner(cfg, conditions, info, (c, info.resolution // f, info.resolution // f), first_stage)
    unet = build(
        "denoiser",
        cfg.denoiser,
        in_channels=c + conditioner.concat_channels,
        out_channels=c,
        context_dim=conditioner.context_dim,
        vector_dim=conditioner.vector_dim,
        **coordinate_option(cfg.denoiser, conditioner),
    )
    return LatentDiffusion(first_stage, DenoiserModel(unet, conditioner), build_process(cfg), conditions, cfg.condition, info)


def set_threads(cfg: DictConfig) -> None:
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
