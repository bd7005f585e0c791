"""Data-parallel training under ``torchrun`` with plain torch.distributed (docs/scaling.md).

Who this process is (rank, world size, device) and the few collectives a run needs besides the
gradient all-reduce of DistributedDataParallel: rank 0 does what only one process may do (train or
load the first stage, read a checkpoint, write files) and the others receive its result or its
error. Without ``WORLD_SIZE > 1`` no process group exists and every helper here is a no-op, so a
single process runs exactly as before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ldmcore.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Minutes a collective may wait: ranks > 0 wait while rank 0 trains the first stage, which can
# take long on CPU (torch's own default is 10-30 minutes).
TIMEOUT_ENV = "LDMCORE_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 180
BACKEND_ENV = "LDMCORE_DIST_BACKEND"  # override the backend chosen below, e.g. "gloo"


class PeerFailed(RuntimeError):
    """Raised on ranks > 0 when rank 0 failed in work that only rank 0 does; carries its message."""


@dataclass(frozen=True)
class Context:
    """This process's place in the run; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def env_context() -> Context:
    """Rank, world size and local rank from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""
    ctx = Context(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size:
        raise ConfigError(f"RANK={ctx.rank} and WORLD_SIZE={ctx.world_size} do not fit (0 <= RANK < WORLD_SIZE)")
    return ctx


def default_backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where this torch has it: one process group
    then serves both ``trainer.device=cpu`` and ``cuda`` (and object collectives go through gloo)."""
    if os.environ.get(BACKEND_ENV):
        return os.environ[BACKEND_ENV]
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env() -> Context:
    """Join the process group described by torchrun's environment when WORLD_SIZE > 1."""
    ctx = env_context()
    if ctx.enabled and not dist.is_initialized():
        minutes = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN)
        dist.init_process_group(backend=default_backend(), timeout=timedelta(minutes=minutes))
        log.info("rank %d of %d joined the process group (%s)", ctx.rank, ctx.world_size, dist.get_backend())
    return ctx


def current() -> Context:
    """The running process group's view (a single process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return Context()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def training_device(name: str, ctx: Context) -> torch.device:
    """``trainer.device``: cpu, or the GPU of this process's local rank."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but torch sees no GPU; use trainer.device=cpu")
    if ctx.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"trainer.device=cuda: LOCAL_RANK={ctx.local_rank} but only {torch.cuda.device_count()} "
                          "GPU(s) are visible; start at most one process per GPU (--nproc_per_node)")
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


def broadcast_object(obj: T, ctx: Context) -> T:
    """Rank 0's ``obj`` on every rank (pickled through the process group: our own objects only)."""
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_object(obj: T, ctx: Context) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T], ctx: Context) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank. If it raises, rank 0 re-raises
    and the other ranks raise ``PeerFailed`` with its message, instead of waiting forever."""
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as caught:
            error = caught
    outcome = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", ctx)
    if error is not None:
        raise error
    if outcome is not None:
        raise PeerFailed(f"rank 0 failed: {outcome}")
    return broadcast_object(result, ctx)


@torch.no_grad()
def broadcast_module(module: nn.Module, ctx: Context) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank 0's (same architecture)."""
    if not ctx.enabled:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


@torch.no_grad()
def check_in_sync(modules: dict[str, nn.Module], ctx: Context) -> None:
    """Raise if the ranks' copies of ``modules`` differ: DDP keeps them equal bit for bit, so a
    difference means a rank diverged (a bug, or non-determinism) and the run must not go on."""
    if not ctx.enabled:
        return
    fingerprint = torch.stack([torch.stack([t.double().square().sum() for t in m.state_dict().values()
                                            if t.dtype.is_floating_point]).sum() for m in modules.values()]).cpu()
    everyone = gather_object(fingerprint, ctx)
    differing = [name for i, name in enumerate(modules) if any(f[i] != everyone[0][i] for f in everyone)]
    if differing:
        raise RuntimeError(f"the ranks' copies of {differing} differ (fingerprints per rank: "
                           f"{[f.tolist() for f in everyone]}); data-parallel training lost sync")


def all_reduce_sum(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The element-wise sum over ranks of a small tensor (a copy; ``values`` is not changed)."""
    values = values.clone()
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
