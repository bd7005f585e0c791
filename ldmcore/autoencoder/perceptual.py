"""LPIPS, the learned perceptual distance of Zhang et al. 2018 (VGG16 variant, v0.1), used as
the first stage's perceptual loss as in the paper's autoencoders. Nothing is downloaded: the
network is torchvision's VGG16 architecture built without weights, and all weights come from
one local safetensors file the user gives.

The file's tensors (``LPIPS.from_file``):

- ``features.<i>.weight`` / ``features.<i>.bias`` for the 13 convs of VGG16's feature trunk up
  to relu5_3, i ∈ {0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28}: the names and shapes of
  torchvision's ``vgg16().state_dict()`` (its ``classifier.*`` tensors may be present; they are
  ignored);
- ``lin<k>.model.1.weight`` (1, C_k, 1, 1), k = 0..4, C = 64, 128, 256, 512, 512: the linear
  layers, named as in the ``lpips`` package's ``weights/v0.1/vgg.pth``.

So a file is made by merging torchvision's ImageNet VGG16 state dict with that ``vgg.pth`` and
saving the result with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Where VGG16's relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 sit in torchvision's ``features``.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1's input scaling: ImageNet statistics expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """d(x, y) = Σ_l mean_hw Σ_c w_l,c · (φ̂_l(x) − φ̂_l(y))_c², with φ̂_l the VGG16 features at
    layer l normalized to unit length over channels and w_l the learned linear layers.
    Frozen (no trainable parameters). Build it with ``from_file``: the bare constructor leaves
    the weights uninitialized, since they are always loaded."""

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        # Built on the meta device: no memory and no random init for weights that are loaded anyway
        # (and no classifier, which LPIPS does not use).
        with torch.device("meta"):
            trunk = vgg16(weights=None).features[: _TAPS[-1] + 1]
        self.features = trunk.to_empty(device="cpu")
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False).to_empty(device="cpu") for c in _CHANNELS)
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # the tapped activations must stay as they are
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)  # no dropout either: the reference evaluates LPIPS without it

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """LPIPS with the weights of the safetensors file ``path`` (the keys in the module
        docstring). A missing file, a pickled file or tensors that do not fit fail with the path."""
        from ldmcore.interop.safe_pickle import read_tensors
        from ldmcore.training.checkpoint import load_module_state

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file {path} does not exist")
        lpips = cls()
        names = {f"lins.{k}.weight": f"lin{k}.model.1.weight" for k in range(len(_CHANNELS))}
        ours = {theirs: ours for ours, theirs in names.items()}
        tensors = read_tensors(path, keep=lambda key: not key.startswith("classifier."))
        tensors = {ours.get(key, key): value for key, value in tensors.items()}
        load_module_state(lpips, tensors, "", source=str(path), names=names, built_from="LPIPS (VGG16, v0.1)")
        return lpips

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: images (B, 3, H, W) in [-1, 1]. Returns the distance per image (B,), 0 for x == y."""
        fx, fy = self._features(x), self._features(y)
        distance = x.new_zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy):
            diff = (_unit(a) - _unit(b)).pow(2)  # (B, C_l, h_l, w_l)
            distance = distance + lin(diff).mean(dim=(1, 2, 3))
        return distance

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                taps.append(h)
        return taps


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Each pixel's feature vector scaled to unit length over channels (B, C, h, w)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
