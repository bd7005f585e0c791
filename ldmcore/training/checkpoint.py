"""Checkpoints: a folder holding ``model.safetensors`` (every tensor), ``state.json`` (training
state, JSON-able) and ``config.yaml`` (the resolved run config), written atomically.

Atomic: everything is written into a temporary folder beside the target, each file fsynced,
then the folder is renamed into place, so a crash leaves either the old or the new checkpoint.
Pickled checkpoints are never loaded here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
LATEST_FILE = "latest"  # in a run's checkpoints/ folder: the name of the newest complete checkpoint
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class CheckpointError(RuntimeError):
    pass


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict, config: DictConfig | None) -> Path:
    """Write a checkpoint folder atomically; an existing folder of that name is replaced."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / MODEL_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if config is not None:
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(config, resolve=True))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if folder.exists():  # a directory cannot be renamed over a non-empty one: move the old aside first
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    return folder


def save_run_checkpoint(run_checkpoints: Path, step: int, tensors, state, config, keep: int) -> Path:
    """Save ``step_XXXXXXX`` under a run's checkpoints folder, point ``latest`` at it, then prune
    older ones (only after the new one is complete)."""
    folder = save_checkpoint(Path(run_checkpoints) / f"step_{step:07d}", tensors, state, config)
    write_text_atomic(Path(run_checkpoints) / LATEST_FILE, folder.name)
    steps = sorted(p for p in Path(run_checkpoints).glob("step_*") if p.is_dir())
    for old in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(old)
    return folder


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, its model.safetensors, a run folder or a run's checkpoints folder."""
    path = Path(path).expanduser()
    if path.suffix in PICKLED_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickled checkpoints can execute code when loaded and are refused; "
            "ldmcore checkpoints are folders with model.safetensors"
        )
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    for candidate in (path, path / "checkpoints"):
        if (candidate / MODEL_FILE).is_file():
            return candidate
        if (candidate / LATEST_FILE).is_file():
            return candidate / (candidate / LATEST_FILE).read_text().strip()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"{path} is not a checkpoint: it holds no {MODEL_FILE} (nor checkpoints/{LATEST_FILE})")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, DictConfig | None, Path]:
    folder = resolve_checkpoint(path)
    tensors = load_file(str(folder / MODEL_FILE))
    state = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).is_file() else {}
    config = OmegaConf.load(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    return tensors, state, config, folder


def _group(keys) -> str:
    groups = defaultdict(list)
    for key in sorted(keys):
        groups[".".join(key.split(".")[:3])].append(key)
    return "; ".join(f"{prefix}.* ({len(ks)}: {', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})" for prefix, ks in groups.items())


def load_module_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: str = "checkpoint") -> None:
    """Load ``prefix.*`` tensors into ``module`` strictly; a mismatch lists the missing,
    unexpected and mis-shaped keys grouped by prefix. Nothing is loaded partially."""
    own = module.state_dict()
    given = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = set(own) - set(given)
    unexpected = set(given) - set(own)
    misshaped = {k for k in set(own) & set(given) if own[k].shape != given[k].shape}
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing: {_group(f'{prefix}.{k}' for k in missing)}")
        if unexpected:
            parts.append(f"unexpected: {_group(f'{prefix}.{k}' for k in unexpected)}")
        if misshaped:
            parts.append("mis-shaped: " + ", ".join(f"{prefix}.{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(misshaped)[:5]))
        raise CheckpointError(f"{source} does not fit the {prefix} built from the config — " + " | ".join(parts))
    module.load_state_dict(given, strict=True)


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
