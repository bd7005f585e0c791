"""Reading a file of tensors: safetensors by default, pickled checkpoints only when asked for and
then without executing anything.

A pickle is a program: unpickling may call any importable function (``os.system`` included).
Pickled files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.pkl``, anything not ``.safetensors``) are
refused unless the caller passes ``allow_pickle=True``; even then they are read with
``torch.load(weights_only=True)``, whose unpickler builds tensors, containers and numbers only, plus
the short allow-list below. Nothing in it runs code of the file's choosing.

What Stable Diffusion ``.ckpt`` files pickle besides tensors and dicts (the list checked by
lopho/pickle_inspector ``_importlists.py``, "stable_diffusion_v1"): the PyTorch Lightning training
state, whose ``callbacks`` dict is keyed by the class ``pytorch_lightning.callbacks.
model_checkpoint.ModelCheckpoint`` itself, and numpy scalars (``numpy.core.multiarray.scalar``,
``numpy.dtype``) in that state. The Lightning class is replaced by an inert stand-in that cannot
be instantiated; the numpy names are numpy's own data constructors. The training state is then
dropped: only the tensors of ``state_dict`` are returned.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldmcore.training.checkpoint import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"


class PickleRefused(CheckpointError):
    """A pickled checkpoint was given without ``allow_pickle=True``."""


class UnsafePickle(CheckpointError):
    """A pickled checkpoint holds something other than data; nothing of it was executed."""


class _LightningModelCheckpoint:
    """Stand-in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``: SD ``.ckpt``
    files use the class only as a dict key. Building one would mean running Lightning code, so the
    stand-in refuses to be instantiated (which aborts the load)."""

    def __new__(cls, *args, **kwargs):
        raise UnsafePickle("the checkpoint tries to build a Lightning ModelCheckpoint object; refused")


def _numpy_dtype_classes() -> list:
    # numpy >= 1.25 gives every dtype instance its own class, which BUILD must find allow-listed
    names = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "float16", "float32", "float64")
    return [(type(np.dtype(n)), f"numpy.dtypes.{type(np.dtype(n)).__name__}") for n in names]


def _allowed_globals() -> list:
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [
        (_LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (scalar, "numpy.core.multiarray.scalar"),  # the name numpy 1.x writes
        (scalar, "numpy._core.multiarray.scalar"),  # ... and numpy 2.x
        (np.dtype, "numpy.dtype"),
        *_numpy_dtype_classes(),
    ]


def refusal(path: Path) -> str:
    return (
        f"{path} is a pickled checkpoint ({path.suffix or 'no .safetensors suffix'}): unpickling a file can run "
        "arbitrary code, so ldmcore reads pickles only when asked to. Either convert it once to safetensors: "
        f"`python -m ldmcore.interop.convert {path} {path.with_suffix(SAFETENSORS_SUFFIX).name}`, or pass "
        "allow_pickle=True (it is then read with torch.load(weights_only=True) and a data-only allow-list)."
    )


def is_pickled(path: Path) -> bool:
    return Path(path).suffix != SAFETENSORS_SUFFIX


def load_pickle(path: str | Path) -> object:
    """The unpickled object of a torch-saved file, built by the weights-only unpickler with the
    allow-list above. Raises UnsafePickle naming the first global that is not data."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UnsafePickle:
        raise
    except pickle.UnpicklingError as error:
        raise UnsafePickle(f"{path} is refused and nothing of it was executed: {_reason(str(error))}") from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint: {error}") from None


def _reason(message: str) -> str:
    # torch's message wraps the cause in advice to retry with weights_only=False: keep the cause only
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it refers to {found.group(1)}, which is not on the allow-list of data types"
    paragraphs = [p.strip() for p in message.split("\n\n") if p.strip()]
    causes = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    return (causes or paragraphs or [message])[0]


def _tensors_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning / CompVis checkpoint: the weights sit under state_dict
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a dict of tensors (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_tensors(
    path: str | Path, *, allow_pickle: bool = False, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Name → tensor (on the CPU) of a ``.safetensors`` file, or of a pickled checkpoint when
    ``allow_pickle`` (its ``state_dict`` if it has one; non-tensor entries dropped).

    keep: read only the names it accepts (safetensors reads nothing else from disk).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    if is_pickled(path):
        if not allow_pickle:
            raise PickleRefused(refusal(path))
        tensors = _tensors_of(load_pickle(path), path)
        return {k: v for k, v in tensors.items() if keep is None or keep(k)}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}


def convert(source: str | Path, target: str | Path) -> Path:
    """Write the tensors of the pickled checkpoint ``source`` to the safetensors file ``target``."""
    tensors = read_tensors(source, allow_pickle=True)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        # safetensors stores no shared memory: copy a tensor whose storage was already written
        key = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if key in seen or not tensor.is_contiguous() else tensor
        seen.add(key)
    target = Path(target).expanduser()
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(out, str(tmp), {"format": "pt"})
    tmp.replace(target)
    return target
