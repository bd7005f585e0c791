"""Optimizer, learning-rate schedule, and optimizer state as safetensors-friendly tensors."""

from __future__ import annotations

import math

import torch


def adamw(parameters, lr: float, weight_decay: float = 0.0, **options) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one pass over all parameters; on this project's 2-core CPU a
    3.7 M-parameter update took 4.6 ms instead of 17.7 ms for the per-tensor loop, ~5 % of a training
    step at batch 64). Its state has the same tensors as the unfused one, so checkpoints are alike."""
    parameters = list(parameters)
    devices = {p.device.type for p in parameters}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None, **options)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optimizer") -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer's state into tensors (per parameter index) and JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict], prefix: str = "optimizer") -> None:
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})
