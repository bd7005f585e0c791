"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself").

Guides a model with a weaker version of itself instead of with its unconditional output:
D(x, σ) = D_weak(x, σ) + w·(D_strong(x, σ) − D_weak(x, σ)). Classifier-free guidance needs a
condition to drop; autoguidance does not, so it also sharpens an unconditional model, pulling
samples away from the blurry in-between regions a less-trained model still fills (on the shapes
world: hybrids of two shapes). Here the weak model is the same network's EMA at an earlier step of
the same run (``trainer.guide_snapshot``), so it costs no extra training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autoguidance(strong: Model, weak: Model, scale: float) -> Model:
    """Model function (x, σ) -> x0 guided by ``weak``; ``scale`` = 1 returns ``strong`` alone."""
    if scale == 1.0:
        return strong

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        weak_out = weak(x, sigma)
        return weak_out + scale * (strong(x, sigma) - weak_out)

    return guided


def add_autoguidance(guided: Model, strong: Model, weak: Model, scale: float) -> Model:
    """``guided`` plus the autoguidance direction: guided + (scale − 1)·(strong − weak).

    With conditions present, ``strong`` and ``weak`` are both evaluated under all of them, so the
    term pulls toward what the trained model does better than its earlier snapshot (legible
    objects, and the condition followed) on top of whatever classifier-free guidance ``guided``
    applies; when ``guided`` is ``strong`` itself this is ``autoguidance(strong, weak, scale)``
    (Karras et al. 2024 guide conditional models this way, without CFG)."""
    if scale == 1.0:
        return guided
    if guided is strong:
        return autoguidance(strong, weak, scale)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return guided(x, sigma) + (scale - 1.0) * (strong(x, sigma) - weak(x, sigma))

    return model
