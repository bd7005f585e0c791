"""Generating images: conditioning -> guided denoiser -> sampler -> first-stage decoder."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from functools import partial

import torch
from omegaconf import DictConfig

from ldmcore.conditioning import apply_denoiser_net
from ldmcore.diffusion import classifier_free_guidance, condition_only, get_sampler


def _sampler_options(sampler, options: Mapping) -> dict:
    """Pass a sampler only the options its signature names (eta is DDIM's alone, for instance)."""
    accepted = inspect.signature(sampler).parameters
    return {k: v for k, v in options.items() if k in accepted}


def slice_batch(batch: Mapping, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


@torch.no_grad()
def generate(system, model, batch: Mapping, batch_size: int, sampler_cfg: DictConfig, generator: torch.Generator,
             present: Iterable[str] | None = None, latent_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Sample ``batch_size`` images (B x 3 x H x W in [-1, 1]) conditioned on ``batch``.

    model: the DenoiserModel to sample (usually the EMA copy); present: the conditions given
    (default: all of the model's); latent_shape: (C, h, w), default the training size.
    """
    c, h, w = latent_shape or system.latent_shape
    conditioner, unet, process = model.conditioner, model.unet, system.process
    present = list(conditioner.names if present is None else present)
    sampler = get_sampler(sampler_cfg.name)
    sigmas = process.schedule.sampling_sigmas(sampler_cfg.steps, spacing=sampler_cfg.spacing)
    options = _sampler_options(sampler, {"eta": sampler_cfg.eta, "generator": generator})
    denoiser = process.denoiser(partial(apply_denoiser_net, unet))
    images = []
    for start in range(0, batch_size, sampler_cfg.batch_size):
        n = min(sampler_cfg.batch_size, batch_size - start)
        part = slice_batch(batch, start, start + n)
        cond = conditioner(part, n, (h, w), present=present)
        if present and sampler_cfg.guidance_scale != 1.0:
            guided = classifier_free_guidance(denoiser, cond, conditioner.null(n, (h, w)), sampler_cfg.guidance_scale)
        else:
            guided = condition_only(denoiser, cond)
        noise = torch.randn((n, c, h, w), generator=generator)
        z = sampler(guided, process.initial_noise(noise, sigmas[0]), sigmas, **options)
        images.append(system.first_stage.decode(z / system.first_stage.scale_factor).clamp(-1, 1))
    return torch.cat(images)
