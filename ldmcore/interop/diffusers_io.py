"""diffusers model folders on disk: ``config.json`` + ``diffusion_pytorch_model.safetensors``
(or the pickled ``.bin`` of older exports), alone or as a subfolder (``unet/``, ``vae/``) of a
pipeline folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldmcore.autoencoder import KLAutoencoder
from ldmcore.denoiser import UNet
from ldmcore.training.checkpoint import CheckpointError

from .diffusers_config import autoencoder_config, unet_config
from .keymaps import autoencoder_diffusers, unet_diffusers
from .safe_pickle import read_tensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS_FILE = "diffusion_pytorch_model.bin"
# The first stage's attention as diffusers < 0.14 named it (diffusers still renames these on load)
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def model_folder(path: Path, subfolder: str) -> Path | None:
    """The diffusers model folder ``path`` stands for, or None when it is no such folder: the
    folder itself, its ``subfolder`` (a pipeline folder), or the folder of a weights file."""
    if path.is_file() and path.name.startswith("diffusion_pytorch_model"):
        path = path.parent
    for folder in (path, path / subfolder):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def read_model_folder(folder: Path, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, name -> tensor) of a diffusers model folder."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    for name in (WEIGHTS_FILE, PICKLED_WEIGHTS_FILE):
        if (folder / name).is_file():
            tensors = read_tensors(folder / name, allow_pickle=allow_pickle)
            return config, {_modern_name(k): v for k, v in tensors.items()}
    raise CheckpointError(f"{folder} has a {CONFIG_FILE} but no {WEIGHTS_FILE} (nor {PICKLED_WEIGHTS_FILE})")


def _modern_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in _OLD_ATTENTION_NAMES:
        parts[-2] = _OLD_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def save_unet(unet: UNet, folder: str | Path, sample_size: int | None = None) -> Path:
    """Write ``unet`` as a diffusers ``UNet2DConditionModel`` folder (atomically; an existing
    folder is replaced). sample_size: the latent size pipelines default to (64 for SD 1.x)."""
    if unet.coordinate_frequencies:
        raise ValueError(f"this UNet appends {4 * unet.coordinate_frequencies} coordinate channels to its input "
                         "(denoiser.coordinate_frequencies); a diffusers UNet2DConditionModel has no such input")
    tensors = unet_diffusers(unet).to_foreign(unet.state_dict())
    return _write(Path(folder), unet_config(unet, sample_size), tensors)


def save_autoencoder(ae: KLAutoencoder, folder: str | Path, sample_size: int | None = None) -> Path:
    """Write ``ae`` as a diffusers ``AutoencoderKL`` folder (atomically; an existing folder is
    replaced). ``scale_factor`` becomes the config's ``scaling_factor``. sample_size: the image
    size diffusers' tiling refers to (512 for SD; default 32, AutoencoderKL's own default)."""
    tensors = autoencoder_diffusers(ae).to_foreign(ae.state_dict())
    return _write(Path(folder), autoencoder_config(ae, sample_size), tensors)


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    # Same scheme as ldmcore's checkpoints: a temporary sibling folder, fsynced, renamed into place.
    folder = folder.expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), {"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for path in (tmp / WEIGHTS_FILE, tmp / CONFIG_FILE, tmp):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if folder.exists():
            old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
