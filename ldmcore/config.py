"""Schemas of the run config: a wrong type or an unknown option fails before any work starts,
naming the option and what is allowed.

Model sections (``autoencoder.model``, ``denoiser``, ``data``) are ``_target_`` configs checked
by their constructors; the sections below are plain options checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is wrong; the message names the option."""


def choice(*allowed: str, default: str):
    return field(default=default, metadata={"choices": allowed})


@dataclass
class FirstStageTrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-4
    codebook_weight: float = 1.0  # VQ first stage: weight of codebook + beta * commitment loss (VQGAN's)
    perceptual_weight: float = 1.0  # LPIPS term, used only when lpips_weights names a file
    lpips_weights: Optional[str] = None  # local safetensors file (ldmcore/autoencoder/perceptual.py)
    edge_strength: float = 4.0
    latent_noise: float = 0.0
    discriminator_weight: float = 0.0
    discriminator_start: int = 0
    grad_clip: float = 1.0


@dataclass
class FirstStageGateConfig:
    images: int = 512
    min_psnr: float = 22.0
    min_readback: float = 0.9


@dataclass
class AutoencoderConfig:
    model: Any = None
    train: FirstStageTrainConfig = field(default_factory=FirstStageTrainConfig)
    gate: FirstStageGateConfig = field(default_factory=FirstStageGateConfig)
    # an ldmcore first stage (run / checkpoint folder, .safetensors), a diffusers AutoencoderKL (or
    # pipeline) folder, or a CompVis / SD single file (ldmcore/training/pretrained.py)
    pretrained: Optional[str] = None
    allow_pickle: bool = False  # read a pickled pretrained file (.ckpt/.pt/.bin), restricted unpickler (a loading
                                # permission, not part of the model: checkpoints are compared without it)
    scale_factor: Optional[float] = None  # latent scale; None: 1/std measured on the run's data


@dataclass
class NoiseConfig:
    schedule: str = choice("linear", "scaled_linear", "cosine", default="cosine")
    timesteps: int = 1000
    prediction: str = choice("eps", "v", "x0", default="eps")
    loss_weighting: str = choice("none", "min_snr", default="min_snr")
    min_snr_gamma: float = 5.0


@dataclass
class SamplerConfig:
    name: str = choice("ddpm", "ddim", "plms", "dpmpp_2m", default="ddim")
    steps: int = 50
    eta: float = 0.0
    spacing: str = choice("leading", "trailing", "linspace", default="leading")
    guidance_scale: float = 3.0  # every condition's scale unless guidance_scales names it; 1 = none
    autoguidance_scale: float = 6.0  # no condition present: guidance by the earlier EMA snapshot; 1 = none
    conditional_autoguidance_scale: float = 1.0  # conditions present: also guided by the snapshot; 1 = none
    guidance_scales: Dict[str, float] = field(default_factory=dict)  # per-condition scales, {name: scale}
    guidance: str = choice("independent", "nested", default="independent")  # how several conditions combine
    guidance_order: List[str] = field(default_factory=list)  # nested: conditions in the order they are added
    batch_size: int = 90
    max_batch: Optional[int] = None  # most samples in one denoiser forward (guidance multiplies the batch)


@dataclass
class TrainerConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    lr_schedule: str = choice("cosine", "constant", default="cosine")
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    guide_snapshot: float = 0.3  # fraction of steps at which the EMA is kept for autoguidance; 0 = none
    log_every: int = 25
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    on_nonfinite: str = choice("stop", "skip", default="stop")  # a NaN/inf loss or gradient norm
    max_skipped_steps: int = 10  # on_nonfinite=skip: stop once more steps than this were skipped
    on_divergence: str = choice("stop", "warn", "off", default="stop")  # a finite loss that jumped and stayed up
    divergence_factor: float = 3.0  # diverged: window means above this many times the lowest one...
    divergence_window: int = 25  # ...each over this many steps...
    divergence_patience: int = 4  # ...this many windows in a row
    sample_every: int = 0
    grid_columns: int = 10
    grid_rows: int = 18
    device: str = choice("cpu", "cuda", default="cpu")  # where the denoiser trains (cuda: the local rank's GPU)
    precision: str = choice("fp32", "bf16", default="fp32")  # bf16: autocast of the forward pass
    grad_accumulation: int = 1  # micro-batches per update (batch_size stays the global batch)
    latents: str = choice("pool", "stream", default="pool")  # pool: encode the data once | stream: each batch as read
    scale_batches: int = 8  # stream: the scale factor is 1/std over the latents of this many first batches


@dataclass
class RunConfig:
    task: str = choice("train", "sample", "eval", default="train")
    seed: int = 0
    checkpoint: Optional[str] = None
    conditions: Optional[str] = None
    present: Optional[List[str]] = None  # task=eval and run grids: the conditions given; None = all, [] = none
    sample_scale: int = 1  # task=sample: images this many times the training resolution (convolutional sampling)
    score_with: List[str] = field(default_factory=list)  # extra plugins scoring the samples (baselines of models without them)
    cache_dir: str = ".cache/ldmcore"
    num_threads: int = 0
    data: Any = None
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    denoiser: Any = None
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    condition: Any = field(default_factory=dict)


def _check_choices(schema_type, node: DictConfig, path: str) -> None:
    for f in fields(schema_type):
        value = node[f.name]
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{path}{f.name}={value!r} is not allowed; choose one of: {', '.join(f.metadata['choices'])}")
        if (schema_type, f.name) in _SUBSCHEMAS:
            _check_choices(_SUBSCHEMAS[schema_type, f.name], value, f"{path}{f.name}.")


_SUBSCHEMAS = {
    (RunConfig, "autoencoder"): AutoencoderConfig,
    (RunConfig, "noise"): NoiseConfig,
    (RunConfig, "sampler"): SamplerConfig,
    (RunConfig, "trainer"): TrainerConfig,
    (AutoencoderConfig, "train"): FirstStageTrainConfig,
    (AutoencoderConfig, "gate"): FirstStageGateConfig,
}


def _required(schema_type, node: DictConfig, path: str) -> list[str]:
    """The schema's options that ``node`` leaves required (``???``): merged with the schema's
    defaults they would be lost in silence. (Model sections keep theirs; ``system.build`` names them.)"""
    found = []
    for f in fields(schema_type):
        if OmegaConf.is_missing(node, f.name):  # (``in`` is False for a ``???`` value)
            found.append(path + f.name)
        elif (schema_type, f.name) in _SUBSCHEMAS and isinstance(node.get(f.name), DictConfig):
            found += _required(_SUBSCHEMAS[schema_type, f.name], node[f.name], f"{path}{f.name}.")
    return found


def with_schema_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` merged onto the schemas: typed, and every option it lacks (e.g. one added after a
    checkpoint's config was written) at its default."""
    try:
        return OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(f"invalid config{f' at {key}' if key else ''}: {str(error).splitlines()[0]}") from None


def known_options(node: dict, schema_type=RunConfig) -> dict:
    """A plain config dict without the options the schemas do not define (in the typed sections; the
    ``Any`` sections are kept whole): a checkpoint's options that this version has since removed."""
    known = {f.name for f in fields(schema_type)}
    kept = {}
    for key, value in node.items():
        if key in known:
            sub = _SUBSCHEMAS.get((schema_type, key))
            kept[key] = known_options(value, sub) if sub is not None and isinstance(value, dict) else value
    return kept


def validate(cfg: DictConfig) -> DictConfig:
    """Check ``cfg`` against the schemas; return it typed (ints are ints, floats floats)."""
    required = _required(RunConfig, cfg, "")
    if required:
        raise ConfigError(f"{required[0]} is required: give it on the command line, e.g. {required[0]}=...")
    typed = with_schema_defaults(cfg)
    _check_choices(RunConfig, typed, "")
    if typed.trainer.grad_accumulation < 1 or typed.trainer.batch_size % typed.trainer.grad_accumulation:
        raise ConfigError(f"trainer.grad_accumulation={typed.trainer.grad_accumulation} must be >= 1 and divide "
                          f"trainer.batch_size={typed.trainer.batch_size}")
    if typed.autoencoder.scale_factor is not None and typed.autoencoder.scale_factor <= 0:
        raise ConfigError(f"autoencoder.scale_factor must be > 0 (or null: 1/std measured on the data), got {typed.autoencoder.scale_factor}")
    if typed.sample_scale < 1:
        raise ConfigError(f"sample_scale must be a whole number >= 1 (1 = the training resolution), got {typed.sample_scale}")
    for name, options in (typed.condition or {}).items():
        if "dropout" not in options:
            raise ConfigError(f"condition.{name} has no 'dropout' option (every condition config sets one)")
    # A run that names no condition but a checkpoint (sample, eval) takes the checkpoint's
    # conditions: its guidance options are checked once merged with the checkpoint's config.
    if typed.condition or not typed.checkpoint:
        check_guidance(typed.sampler, list(typed.condition or {}))
        check_present(typed.present, list(typed.condition or {}))
    return typed


def check_present(present: list[str] | None, conditions: list[str]) -> None:
    """``present`` (the conditions an evaluation gives) may only name the model's conditions."""
    unknown = sorted(set(present or ()) - set(conditions))
    if unknown:
        raise ConfigError(f"present names {unknown}, not conditions of this model (its conditions: {', '.join(conditions) or 'none'})")


def check_guidance(sampler: DictConfig, conditions: list[str]) -> None:
    """The per-condition guidance options may only name the model's conditions."""
    if sampler.max_batch is not None and sampler.max_batch < 1:
        raise ConfigError(f"sampler.max_batch must be at least 1 (or null: no limit), got {sampler.max_batch}")
    have = ", ".join(conditions) or "none"
    unknown = sorted(set(sampler.guidance_scales) - set(conditions))
    if unknown:
        raise ConfigError(f"sampler.guidance_scales names {unknown}, not conditions of this model (its conditions: {have})")
    order = list(sampler.guidance_order)
    unknown = [n for n in order if n not in conditions]
    if unknown:
        raise ConfigError(f"sampler.guidance_order names {unknown}, not conditions of this model (its conditions: {have})")
    repeated = sorted({n for n in order if order.count(n) > 1})
    if repeated:
        raise ConfigError(f"sampler.guidance_order lists {repeated} more than once")
