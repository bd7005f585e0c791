"""``autoencoder.pretrained``: a run's first stage from saved weights, in any format ldmcore reads.

- ldmcore's own first stage: a run or checkpoint folder, or a ``.safetensors`` with ``first_stage.*``;
- a diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``) or a CompVis / Stable
  Diffusion single file (``first_stage_model.*``), read by ``ldmcore.interop.load_autoencoder``;
  pickled files (``.ckpt``, ``.pt``, ``.bin``) only with ``autoencoder.allow_pickle=true``.

The run builds its first stage from ``autoencoder.model`` before the weights are read, and condition
encoders may already hold that module, so the weights are loaded into it in place. Foreign weights
therefore must have the architecture ``autoencoder.model`` describes; when they do not, the error
lists the options to set, ready to paste.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ldmcore.autoencoder import KLAutoencoder
from ldmcore.config import ConfigError
from ldmcore.interop import PickleRefused, load_autoencoder
from ldmcore.interop.compvis import autoencoder_kwargs, is_sd_first_stage
from ldmcore.interop.diffusers_io import model_folder
from ldmcore.interop.keymaps import autoencoder_compvis
from ldmcore.nn import Downsample, normalization
from ldmcore.training.checkpoint import MODEL_FILE, CheckpointError, load_module_state, resolve_checkpoint

OWN_PREFIX = "first_stage"  # how ldmcore's checkpoints name the first stage's tensors


def load_pretrained(autoencoder: nn.Module, options: DictConfig) -> dict:
    """Load the weights ``options.pretrained`` names into ``autoencoder`` (built from
    ``options.model``), in place. options: the run's ``autoencoder`` section.
    Returns what was read: {"source": path, "format": "ldmcore" | "diffusers" | "single file"}."""
    path = Path(options.pretrained).expanduser()
    if not path.exists():
        raise ConfigError(f"autoencoder.pretrained={path} does not exist")
    own = _own_file(path)
    if own is not None:
        load_module_state(autoencoder, load_file(str(own)), OWN_PREFIX, source=str(own))
        return {"source": str(own), "format": "ldmcore"}
    kind = "diffusers" if model_folder(path, "vae") is not None else "single file"
    try:
        # The run sets the latent scale itself (tasks.train: measured, or autoencoder.scale_factor), so
        # a placeholder stands in when none is given: a single file need not tell its own.
        scale = 1.0 if options.scale_factor is None else options.scale_factor
        weights = load_autoencoder(path, scale_factor=scale, allow_pickle=options.allow_pickle)
    except PickleRefused as error:
        raise ConfigError(f"autoencoder.pretrained: {error} In the run config that is autoencoder.allow_pickle=true.") from None
    _check_architecture(autoencoder, options.model, weights, f"autoencoder.pretrained={path} ({kind})")
    load_module_state(autoencoder, weights.state_dict(), "", source=str(path), built_from="autoencoder.model")
    return {"source": str(path), "format": kind}


def _own_file(path: Path) -> Path | None:
    """ldmcore's saved first stage at ``path`` (its model.safetensors), or None for a foreign format."""
    if path.is_dir():
        if model_folder(path, "vae") is not None:
            return None
        try:
            return resolve_checkpoint(path) / MODEL_FILE
        except CheckpointError as error:
            raise ConfigError(
                f"autoencoder.pretrained={path} is neither an ldmcore run / checkpoint folder ({error}) nor a diffusers "
                "AutoencoderKL folder (config.json, or vae/config.json in a pipeline folder)"
            ) from None
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return path if any(k.startswith(OWN_PREFIX + ".") for k in f.keys()) else None
        except SafetensorError as error:
            raise ConfigError(f"autoencoder.pretrained={path} is no readable safetensors file: {error}") from None
    return None  # a pickled file: ldmcore never writes those, so a CompVis / SD checkpoint


def architecture(ae: KLAutoencoder) -> dict:
    """The KLAutoencoder options that shape ``ae``'s tensors and computation, read off the built
    module (so that a config's module and a file's compare alike), num_groups aside (see
    ``_groups_differ``) and scale_factor aside (a value, not architecture)."""
    options = autoencoder_kwargs(autoencoder_compvis(ae).to_foreign(ae.state_dict()))
    options.pop("num_groups")
    # read off the layers: CompVis weights cannot tell it, so interop's reading assumes True
    options["asymmetric_downsample"] = any(isinstance(m, Downsample) and m.asymmetric_padding for m in ae.encoder.modules())
    return options


def _groups_differ(num_groups: int, weights: nn.Module) -> bool:
    """True when ``num_groups`` (ldmcore's rule: that many groups, or the largest divisor of the
    channels below it) would not give every GroupNorm of ``weights`` its group count."""
    norms = [m for m in weights.modules() if isinstance(m, nn.GroupNorm)]
    return any(normalization(m.num_channels, num_groups).num_groups != m.num_groups for m in norms)


def _check_architecture(autoencoder: nn.Module, model: DictConfig, weights: KLAutoencoder, source: str) -> None:
    """``autoencoder`` (built from the config ``model``) must be what ``weights`` is; otherwise a
    ConfigError lists the differing options as overrides."""
    wanted = architecture(weights)
    groups = max(m.num_groups for m in weights.modules() if isinstance(m, nn.GroupNorm))
    hint = " (Stable Diffusion's VAE: autoencoder=sd_vae sets all of them)" if is_sd_first_stage(wanted) else ""
    if not isinstance(autoencoder, KLAutoencoder):
        every = " ".join(f"++autoencoder.model.{k}={_value(v)}" for k, v in {**wanted, "num_groups": groups}.items())
        raise ConfigError(
            f"{source} is a KL autoencoder, but autoencoder.model builds a {type(autoencoder).__name__}; "
            f"choose a KL first stage with its architecture: autoencoder=kl_f8 {every}{hint}"
        )
    have = architecture(autoencoder)
    differ = {k: v for k, v in wanted.items() if have[k] != v}
    if _groups_differ(_num_groups(model), weights):
        differ["num_groups"], have["num_groups"] = groups, _num_groups(model)
    if differ:
        listed = "; ".join(f"{k} {_value(have[k])} vs {_value(v)}" for k, v in differ.items())
        # Hydra: an option the config does not name yet is appended with +
        overrides = " ".join(f"{'' if k in model else '+'}autoencoder.model.{k}={_value(v)}" for k, v in differ.items())
        raise ConfigError(
            f"{source} has another architecture than autoencoder.model (config vs weights: {listed}). The run "
            f"loads the weights into the first stage it builds from autoencoder.model, so set: {overrides}{hint}"
        )


def _num_groups(model: DictConfig) -> int:
    """``autoencoder.model.num_groups``, or KLAutoencoder's default when the config leaves it out."""
    return model.get("num_groups", inspect.signature(KLAutoencoder).parameters["num_groups"].default)


def _value(value) -> str:
    """A value as a Hydra override writes it: true/false, [1,2,4]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)
