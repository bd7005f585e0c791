"""The image half of the image_text condition: a timm model, built from its name, whose final
feature map becomes a sequence of tokens (one per spatial position).

The model is created with ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``:
nothing is ever downloaded. Weights, when wanted, come from a local file. The model is trained with
the denoiser, or frozen (no gradients, always in eval mode).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from ldmcore.config import ConfigError
from ldmcore.interop.safe_pickle import read_tensors
from ldmcore.training.checkpoint import CheckpointError, load_module_state

log = logging.getLogger(__name__)
OPTION = "condition.image_text.image"  # where these options live, for error messages


def create_timm_model(name: str, kwargs: Mapping) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`` with errors that
    name the option at fault."""
    import timm  # heavy: imported only when an image encoder is built

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=8)
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ConfigError(f"{OPTION}.model={name!r} is not a timm model (timm {timm.__version__}; "
                          f"timm.list_models() lists them){hint}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **dict(kwargs))
    except TypeError as error:  # an argument the model's constructor does not take
        raise ConfigError(f"{OPTION}.model_kwargs={dict(kwargs)} do not fit the timm model {name!r}: {error}") from None


def load_weights(model: nn.Module, path: str, allow_pickle: bool) -> None:
    """Load a LOCAL weights file into ``model`` strictly. Classifier weights in the file (a timm
    checkpoint of a classifier) are dropped: the model is built without its head."""
    try:
        tensors = read_tensors(path, allow_pickle=allow_pickle)
    except CheckpointError as error:
        raise ConfigError(f"{OPTION}.weights: {error}") from None
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    tensors = {k: v for k, v in tensors.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
    try:
        load_module_state(model, tensors, "", source=str(path), built_from=f"{OPTION}.model")
    except CheckpointError as error:
        raise ConfigError(f"{OPTION}.weights: {error}") from None


class ImageTokens(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> the timm model's final feature map as tokens (B, L, C).

    A convolutional map (B, C, h, w) gives L = h·w tokens; a transformer's sequence (B, N, C) gives
    its N patch tokens (class and register tokens, timm's ``num_prefix_tokens``, are dropped).
    L and C are measured once, on a blank image of the data's resolution; ``grid`` is (h, w) when
    the tokens are the cells of an h × w grid over the image, in row-major order (a feature map, or
    a square patch grid), else None.
    """

    def __init__(self, name: str, resolution: int, kwargs: Mapping | None = None, weights: str | None = None,
                 allow_pickle: bool = False, frozen: bool = False):
        super().__init__()
        self.name, self.frozen = name, frozen
        self.model = create_timm_model(name, kwargs or {})
        if weights:
            load_weights(self.model, str(Path(weights).expanduser()), allow_pickle)
        elif frozen:
            log.warning("%s.frozen=true without weights: the image tokens are features of a random %s", OPTION, name)
        # timm models expect inputs normalized by their training mean and std (in [0, 1] units)
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)
        self.prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        fmt = getattr(self.model, "output_fmt", "NCHW")  # timm's Format enum or a string
        self.layout = str(getattr(fmt, "value", fmt))
        if frozen:
            self.model.requires_grad_(False)
        self.model.eval()  # batch statistics of one blank image would fail (or spoil) batch norms
        with torch.no_grad():
            features = self.features(torch.zeros(1, 3, resolution, resolution))
            probe = self.tokens(features)
            self.num_tokens, self.width = int(probe.shape[1]), int(probe.shape[2])
            self.grid = self._grid(features)
        self.train()

    def _grid(self, features: torch.Tensor) -> tuple[int, int] | None:
        if features.dim() == 4:  # a feature map
            return tuple(features.shape[1:3]) if self.layout == "NHWC" else tuple(features.shape[2:4])
        side = round(self.num_tokens ** 0.5)  # a ViT's patches: row-major over a square grid
        grid = tuple(getattr(getattr(self.model, "patch_embed", None), "grid_size", None) or (side, side))
        return grid if grid[0] * grid[1] == self.num_tokens else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen model keeps its batch statistics and drops no paths
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The timm model's final features of images (B, 3, H, W) in [-1, 1]."""
        x = ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] -> the model's normalization
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model.forward_features(x)

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Final features -> tokens (B, L, C)."""
        if features.dim() == 4:  # a feature map
            pattern = "b h w c -> b (h w) c" if self.layout == "NHWC" else "b c h w -> b (h w) c"
            return rearrange(features, pattern)  # (B, h·w, C)
        if features.dim() == 3:  # a token sequence
            return features[:, self.prefix_tokens:]  # (B, N, C)
        raise ConfigError(f"{OPTION}.model={self.name!r}: forward_features gives a tensor of shape {tuple(features.shape)}, "
                          "neither a feature map (B, C, h, w) nor a token sequence (B, N, C)")
