"""Checkpoints: a folder holding ``model.safetensors`` (every tensor), ``state.json`` (training
state, JSON-able) and ``config.yaml`` (the resolved run config), written atomically.

Atomic: everything is written into a temporary folder beside the target, each file fsynced,
then the folder is renamed into place, so a crash leaves either the old or the new checkpoint.
A write that fails (a full disk) removes its temporary folder and raises ``CheckpointError``;
temporaries left by a killed process are cleared by the next save into the same folder.
Pickled checkpoints are never loaded here. See docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
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
    """Write ``path`` through a temporary file in the same folder (fsync, rename); on failure the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _io_errno(error: BaseException) -> int | None:
    """The errno of an OSError, or of safetensors' SafetensorError ("... (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)", str(error))
    return int(found.group(1)) if found else None


def _write_failure(target: Path, error: BaseException) -> str:
    code = _io_errno(error)
    if code == errno.ENOSPC:
        reason = "the disk is full (no space left on device)"
    elif code == errno.EDQUOT:
        reason = "the disk quota is exceeded"
    else:
        reason = f"{type(error).__name__}: {error}"
    return f"could not write checkpoint {target}: {reason}"


def _write_folder(tmp: Path, tensors: dict[str, torch.Tensor], state: dict, config: DictConfig | None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / MODEL_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if config is not None:
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(config, resolve=True))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)


def _move_into_place(tmp: Path, folder: Path) -> None:
    if folder.exists():  # a directory cannot be renamed over a non-empty one: move the old aside first
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            os.replace(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    _fsync_dir(folder.parent)


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict, config: DictConfig | None) -> Path:
    """Write a checkpoint folder atomically; an existing folder of that name is replaced.

    If writing fails (a full disk, an I/O error), the temporary folder is removed, an existing
    folder of that name is left as it was, and ``CheckpointError`` names the folder and the cause.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_folder(tmp, tensors, state, config)
        _move_into_place(tmp, folder)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, (OSError, SafetensorError)):
            raise CheckpointError(_write_failure(folder, error) + "; its temporary folder was removed") from error
        raise
    return folder


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Clear what a killed process left in ``folder``: ``.tmp-*`` folders and files (incomplete
    writes) are removed; an ``.old-NAME-PID`` folder (a complete checkpoint that was being
    replaced) is put back as NAME if NAME is missing, removed otherwise. Only temporaries of
    processes that are no longer running are touched."""
    for path in Path(folder).glob(".*-[0-9]*"):
        name, _, pid = path.name.rpartition("-")
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        if name.startswith(".old-") and path.is_dir():
            target = path.with_name(name[len(".old-"):])
            if not target.exists():
                os.replace(path, target)
                continue
        if ".tmp-" in path.name or name.startswith(".old-"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _step_folders(run_checkpoints: Path) -> list[Path]:
    return sorted(p for p in Path(run_checkpoints).glob("step_*") if p.is_dir() and (p / MODEL_FILE).is_file())


def save_run_checkpoint(run_checkpoints: Path, step: int, tensors, state, config, keep: int) -> Path:
    """Save ``step_XXXXXXX`` under a run's checkpoints folder, point ``latest`` at it, then prune
    the oldest (only after the new one is complete; never the new one, never a later step left
    by an earlier attempt of this run). A failed write raises ``CheckpointError`` naming the
    folder, the cause and the previous checkpoint, which is intact."""
    run_checkpoints = Path(run_checkpoints)
    folder = run_checkpoints / f"step_{step:07d}"
    if run_checkpoints.is_dir():
        remove_stale_temporaries(run_checkpoints)
    try:
        save_checkpoint(folder, tensors, state, config)
        write_text_atomic(run_checkpoints / LATEST_FILE, folder.name)
    except (CheckpointError, OSError) as error:
        message = str(error) if isinstance(error, CheckpointError) else _write_failure(folder, error)
        try:
            previous = f"the previous checkpoint {resolve_checkpoint(run_checkpoints)} is intact"
        except CheckpointError:
            previous = "no earlier checkpoint exists"
        raise CheckpointError(f"{message}; {previous}") from error
    older = [p for p in _step_folders(run_checkpoints) if p.name < folder.name]
    for old in older[: max(len(older) - (keep - 1), 0)]:
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
            latest = candidate / (candidate / LATEST_FILE).read_text().strip()
            if (latest / MODEL_FILE).is_file():
                return latest
            complete = _step_folders(candidate)  # `latest` names a folder that is gone: take the newest complete one
            if complete:
                return complete[-1]
            raise CheckpointError(f"{candidate / LATEST_FILE} names {latest.name}, which holds no {MODEL_FILE}, and no other checkpoint is there")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"{path} is not a checkpoint: it holds no {MODEL_FILE} (nor checkpoints/{LATEST_FILE})")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, DictConfig | None, Path]:
    folder = resolve_checkpoint(path)
    tensors = load_file(str(folder / MODEL_FILE))
    state = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).is_file() else {}
    config = OmegaConf.load(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else None
    return tensors, state, config, folder


def _group(keys, depth: int = 3, notes: dict[str, str] | None = None) -> str:
    """Keys grouped by their first ``depth`` dotted parts, each group with its first three keys
    (and a note after each key, e.g. its shapes)."""
    groups = defaultdict(list)
    for key in sorted(keys):
        groups[".".join(key.split(".")[:depth])].append(key + (f" {notes[key]}" if notes and key in notes else ""))
    return "; ".join(f"{prefix}.* ({len(ks)}: {', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})" for prefix, ks in groups.items())


def load_module_state(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    source: str = "checkpoint",
    *,
    names: dict[str, str] | None = None,
    built_from: str = "the config",
) -> None:
    """Load ``prefix.*`` tensors (all tensors when prefix is "") into ``module`` strictly; a
    mismatch lists the missing, unexpected and mis-shaped keys grouped by prefix. Nothing is loaded
    partially.

    names: how the source spells the module's keys (module key -> source key, under the prefix),
    used in the messages only; keys of ``tensors`` that are no module key are reported as they are.
    """
    own = module.state_dict()
    start = f"{prefix}." if prefix else ""
    given = {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}
    missing = set(own) - set(given)
    unexpected = set(given) - set(own)
    misshaped = {k for k in set(own) & set(given) if own[k].shape != given[k].shape}
    if missing or unexpected or misshaped:

        def spelled(k: str) -> str:
            return start + (names.get(k, k) if names and k in own else k)

        depth = len(start.split(".")) + 1  # the prefix and two more parts, e.g. model.input_blocks.1
        parts = []
        if missing:
            parts.append(f"missing: {_group(map(spelled, missing), depth)}")
        if unexpected:
            parts.append(f"unexpected: {_group(map(spelled, unexpected), depth)}")
        if misshaped:
            shapes = {spelled(k): f"{tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in misshaped}
            parts.append(f"mis-shaped (given vs expected): {_group(shapes, depth, shapes)}")
        what = prefix or type(module).__name__
        raise CheckpointError(f"{source} does not fit the {what} built from {built_from} — " + " | ".join(parts))
    module.load_state_dict(given, strict=True)


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
