"""Guidance: wrappers that turn a conditional denoiser into a sampler's model function.

A conditional denoiser is `denoiser(x, sigma, cond) -> x0_hat` (see `NoiseProcess.denoiser`),
where `cond` is a dict of condition tensors keyed by injection ("concat", "crossattn", "vector"),
batch first, or None. A sampler wants `model(x, sigma) -> x0_hat`. The wrappers here close over
the conditions; guided ones evaluate every condition in ONE batched forward pass
(`_denoise_each`) and then combine the outputs.

Combining x0 estimates is the same as combining ε estimates: at fixed x and σ,
x̂0 = x − σ·ε̂ is affine in ε̂ with the same (x, σ) for every branch, and the weights of a guidance
combination sum to 1, so Σ wᵢ·x̂0ᵢ = x − σ·Σ wᵢ·ε̂ᵢ.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from einops import repeat

Condition = dict[str, torch.Tensor] | None
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cat_conditions(conds: Sequence[Condition]) -> Condition:
    """Concatenate condition dicts along the batch dim, key by key.

    All must be None (an unconditional model: returns None) or all dicts with the same keys.
    """
    if all(c is None for c in conds):
        return None
    if any(c is None for c in conds):
        raise ValueError("cannot concatenate conditions where some are None and some are not")
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"condition keys differ: {sorted(keys)} vs {sorted(c)}")
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}


def _denoise_each(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                  batched_cond: Condition, n: int) -> tuple[torch.Tensor, ...]:
    """One forward pass for n conditions at once: x̂0 under each, a tuple of n (B, ...) tensors.

    batched_cond: `cat_conditions` of n conditions of batch B each; x: (B, ...); sigma: (B,).
    """
    x_in = repeat(x, "b ... -> (n b) ...", n=n)  # (n·B, ...)
    sigma_in = repeat(sigma, "b -> (n b)", n=n)  # (n·B,)
    return denoiser(x_in, sigma_in, batched_cond).chunk(n, dim=0)


def condition_only(denoiser: Callable[..., torch.Tensor], cond: Condition) -> Model:
    """No guidance: model(x, sigma) = denoiser(x, sigma, cond)."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma, cond)

    return model


def classifier_free_guidance(
    denoiser: Callable[..., torch.Tensor], cond: Condition, uncond: Condition, scale: float
) -> Model:
    """Classifier-free guidance (Ho & Salimans 2021) as a model function.

    model(x, sigma) = D(x, σ, ∅) + scale·(D(x, σ, c) − D(x, σ, ∅)), from one forward pass of batch
    2B (conditional half first). scale = 1 is plain conditional sampling (one pass of batch B);
    scale = 0 is unconditional. cond / uncond: condition dicts of batch B with the same keys.
    """
    if scale == 1:
        return condition_only(denoiser, cond)
    both = cat_conditions([cond, uncond])  # built once, reused at every step

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out_cond, out_uncond = _denoise_each(denoiser, x, sigma, both, 2)
        return out_uncond + scale * (out_cond - out_uncond)

    return model
