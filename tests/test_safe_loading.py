"""Pickled checkpoints are refused unless allowed, and even then nothing in them executes: only
tensors, containers, numbers and the few data types real Stable Diffusion .ckpt files hold."""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from ldmcore.denoiser import UNet
from ldmcore.interop import PickleRefused, UnsafePickle, convert, load_autoencoder, load_unet, read_tensors
from ldmcore.training.checkpoint import CheckpointError

LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


def tiny_unet() -> UNet:
    return UNet(4, 4, model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), context_dim=8, num_heads=2, num_groups=8)


@contextlib.contextmanager
def lightning_installed(init=None):
    """A stand-in ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` while a test
    *writes* a checkpoint as Lightning does; it is gone again before anything is read."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING]
    saved = {name: sys.modules.get(name) for name in names}
    body = {"__module__": LIGHTNING}
    if init is not None:  # instances pickle as a call of the class, which runs __init__ on load
        body.update(__init__=init, __reduce__=lambda self: (type(self), ()))
    try:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        sys.modules[LIGHTNING].ModelCheckpoint = cls = type("ModelCheckpoint", (), body)
        yield cls
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def globals_in(path) -> set[str]:
    """The GLOBAL names a torch-saved file's pickle refers to."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
    return found


def test_pickled_files_are_refused_by_default_with_how_to_convert(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, path)
    for load in (read_tensors, load_unet, load_autoencoder):
        with pytest.raises(PickleRefused) as info:
            load(path)
        assert "allow_pickle=True" in str(info.value) and "python -m ldmcore.interop.convert" in str(info.value)
    # also the pickled weights of an old diffusers folder
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    torch.save({}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PickleRefused):
        load_unet(tmp_path)


def test_a_stable_diffusion_style_ckpt_loads_when_allowed(tmp_path):
    unet = tiny_unet()
    weights = OrderedDict((f"model.diffusion_model.{k}", v) for k, v in unet.state_dict().items())
    path = tmp_path / "sd.ckpt"
    with lightning_installed() as model_checkpoint:
        ckpt = {  # the layout of the SD v1 .ckpt files: Lightning training state around state_dict
            "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": weights,
            "callbacks": {model_checkpoint: {"monitor": None, "best_model_score": np.float64(0.25), "dirpath": "/logs"}},
            "optimizer_states": [], "lr_schedulers": [],
        }
        torch.save(ckpt, path)
    assert f"{LIGHTNING}.ModelCheckpoint" in globals_in(path)  # the file really refers to Lightning
    assert any("multiarray.scalar" in g for g in globals_in(path))  # ... and to numpy scalars

    tensors = read_tensors(path, allow_pickle=True)
    assert set(tensors) == set(weights) and all(torch.equal(tensors[k], v) for k, v in weights.items())
    loaded = load_unet(path, allow_pickle=True, num_heads=2)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in unet.state_dict().items())

    target = convert(path, tmp_path / "sd.safetensors")
    assert all(torch.equal(read_tensors(target)[k], v) for k, v in weights.items())


class _ShellPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_ShellPayload, _ExecPayload])
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_a_malicious_pickle_runs_nothing_even_when_allowed(payload, container, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    ckpt = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": payload(marker)}
    if container == "torch_zip":
        torch.save(ckpt, path)
    else:
        path.write_bytes(pickle.dumps(ckpt, protocol=2))
    for load in (lambda: read_tensors(path, allow_pickle=True), lambda: load_unet(path, allow_pickle=True, num_heads=2)):
        with pytest.raises(CheckpointError):
            load()
        assert not marker.exists()


def test_the_payload_is_live_so_the_test_above_means_something(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_ExecPayload(marker)))  # what a plain torch.load(weights_only=False) would do
    assert marker.read_text() == "pwned"


def test_the_allow_listed_lightning_name_cannot_be_called(tmp_path):
    marker = tmp_path / "marker"

    def init(self):  # what "Lightning code" would do if it were run
        marker.write_text("pwned")

    path = tmp_path / "evil.ckpt"
    with lightning_installed(init) as model_checkpoint:
        torch.save({"state_dict": {}, "callbacks": [model_checkpoint()]}, path)
    marker.unlink()  # written by the call above, while saving
    with pytest.raises(UnsafePickle):
        read_tensors(path, allow_pickle=True)
    assert not marker.exists()
