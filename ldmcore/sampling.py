"""Generating images: conditioning -> guided denoiser -> sampler -> first-stage decoder."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import torch
from omegaconf import DictConfig

from ldmcore.conditioning import apply_denoiser_net
from ldmcore.config import ConfigError
from ldmcore.diffusion import condition_only, get_sampler
from ldmcore.diffusion.autoguidance import add_autoguidance, autoguidance
from ldmcore.diffusion.guidance import GUIDANCE_MODES, guidance_terms, multi_condition_guidance


def _sampler_options(sampler, options: Mapping) -> dict:
    """Pass a sampler only the options its signature names (eta is DDIM's alone, for instance)."""
    accepted = inspect.signature(sampler).parameters
    return {k: v for k, v in options.items() if k in accepted}


def slice_batch(batch: Mapping, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def guidance_plan(sampler_cfg: DictConfig, model_conditions: Sequence[str], present: Sequence[str]) -> tuple[list[str], dict[str, float]]:
    """The present conditions in guidance order, and each one's scale.

    Scales: ``sampler.guidance_scales[name]``, else ``sampler.guidance_scale``. Order: the model's,
    or for nested guidance ``sampler.guidance_order`` first, then the rest in the model's order.
    Names the model does not have are refused.
    """
    scales = dict(sampler_cfg.get("guidance_scales") or {})
    order = list(sampler_cfg.get("guidance_order") or [])
    for option, names in (("guidance_scales", list(scales)), ("guidance_order", order)):
        unknown = [n for n in names if n not in model_conditions]
        if unknown:
            raise ConfigError(f"sampler.{option} names {unknown}, not conditions of this model "
                              f"(its conditions: {', '.join(model_conditions) or 'none'})")
    mode = sampler_cfg.get("guidance", "independent")
    if mode not in GUIDANCE_MODES:
        raise ConfigError(f"sampler.guidance={mode!r} is not allowed; choose one of: {', '.join(GUIDANCE_MODES)}")
    ranked = [n for n in order if n in present] if mode == "nested" else []
    ranked += [n for n in model_conditions if n in present and n not in ranked]
    return ranked, {n: float(scales.get(n, sampler_cfg.guidance_scale)) for n in ranked}


def guided_model(denoiser, conditioner, part: Mapping, n: int, latent_size: tuple[int, int], sampler_cfg: DictConfig,
                 present: Sequence[str], weak_denoiser=None):
    """The sampler's model function for ``n`` samples of ``part`` given the ``present`` conditions.

    No condition present: the unconditional denoiser, autoguided by ``weak_denoiser`` (the run's
    earlier EMA snapshot) with ``sampler.autoguidance_scale`` when there is one — classifier-free
    guidance needs a condition to drop, autoguidance does not. Every scale 1: plain conditional sampling
    with all present conditions (no guidance). Otherwise one scale per condition (see
    ``multi_condition_guidance``); with a single condition that is classifier-free guidance. With
    conditions present and ``sampler.conditional_autoguidance_scale`` w ≠ 1, the weak model guides
    too, under the same conditions: + (w − 1)·(D(c) − D_weak(c)) (``add_autoguidance``; one more
    forward of the weak model per step, and one of the strong model unless every scale is 1).
    """
    names, scales = guidance_plan(sampler_cfg, conditioner.names, present)
    if not names:
        null = conditioner(part, n, latent_size, present=())
        strong = condition_only(denoiser, null)
        if weak_denoiser is None:
            return strong
        return autoguidance(strong, condition_only(weak_denoiser, null), sampler_cfg.autoguidance_scale)
    autoguided = weak_denoiser is not None and float(sampler_cfg.get("conditional_autoguidance_scale", 1.0)) != 1.0
    unguided = all(s == 1.0 for s in scales.values())
    full = conditioner(part, n, latent_size, present=names) if unguided or autoguided else None
    if unguided:
        guided = strong = condition_only(denoiser, full)
    else:
        mode = sampler_cfg.get("guidance", "independent")
        conds = {name: conditioner(part, n, latent_size, present=subset) for name, subset in guidance_terms(names, mode)}
        guided = multi_condition_guidance(denoiser, conds, conditioner.null(n, latent_size), scales, mode,
                                          max_batch=sampler_cfg.get("max_batch"))
        strong = condition_only(denoiser, full) if autoguided else None
    if not autoguided:
        return guided
    return add_autoguidance(guided, strong, condition_only(weak_denoiser, full), float(sampler_cfg.conditional_autoguidance_scale))


@torch.no_grad()
def generate(system, model, batch: Mapping, batch_size: int, sampler_cfg: DictConfig, generator: torch.Generator,
             present: Iterable[str] | None = None, latent_shape: tuple[int, int, int] | None = None,
             weak_model=None) -> torch.Tensor:
    """Sample ``batch_size`` images (B x 3 x H x W in [-1, 1]) conditioned on ``batch``.

    model: the DenoiserModel to sample (usually the EMA copy); present: the conditions given
    (default: all of the model's); latent_shape: (C, h, w), default the training size;
    weak_model: the earlier EMA snapshot that autoguides samples with no condition present.
    Guidance: one scale per present condition (``sampler.guidance_scale`` / ``guidance_scales``),
    combined as ``sampler.guidance`` says. The decoded images pass through each present
    condition's ``ldmcore_finalize`` hook, where a plugin implements one.
    """
    c, h, w = latent_shape or system.latent_shape
    conditioner, unet, process = model.conditioner, model.unet, system.process
    present = list(conditioner.names if present is None else present)
    sampler = get_sampler(sampler_cfg.name)
    sigmas = process.schedule.sampling_sigmas(sampler_cfg.steps, spacing=sampler_cfg.spacing)
    options = _sampler_options(sampler, {"eta": sampler_cfg.eta, "generator": generator})
    denoiser = process.denoiser(partial(apply_denoiser_net, unet))
    weak = process.denoiser(partial(apply_denoiser_net, weak_model.unet)) if weak_model is not None else None
    images = []
    for start in range(0, batch_size, sampler_cfg.batch_size):
        n = min(sampler_cfg.batch_size, batch_size - start)
        part = slice_batch(batch, start, start + n)
        guided = guided_model(denoiser, conditioner, part, n, (h, w), sampler_cfg, present, weak)
        noise = torch.randn((n, c, h, w), generator=generator)
        z = sampler(guided, process.initial_noise(noise, sigmas[0]), sigmas, **options)
        decoded = system.first_stage.decode(z / system.first_stage.scale_factor).clamp(-1, 1)
        images.append(finalize(system, decoded, part, present))
    return torch.cat(images)


def finalize(system, images: torch.Tensor, batch: Mapping, present: Iterable[str]) -> torch.Tensor:
    """Each present condition's optional ``ldmcore_finalize`` on the decoded images (B x 3 x H x W)."""
    for name in present:
        condition = system.conditions[name]
        if condition.implements("ldmcore_finalize"):
            images = condition.call("ldmcore_finalize", images=images, batch=batch,
                                    options=system.condition_options[name], data=system.data)
    return images
