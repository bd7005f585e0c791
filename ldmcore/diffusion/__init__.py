"""Noise schedules, the noise process (prediction types), samplers and guidance."""

from .guidance import cat_conditions, classifier_free_guidance, condition_only
from .process import NoiseProcess
from .samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)
from .schedules import NoiseSchedule, make_betas

__all__ = [
    "NoiseSchedule",
    "make_betas",
    "NoiseProcess",
    "SAMPLERS",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_plms",
    "sample_dpmpp_2m",
    "cat_conditions",
    "classifier_free_guidance",
    "condition_only",
]
