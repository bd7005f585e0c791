"""Guidance: wrappers that turn a conditional denoiser into a sampler's model function.

A conditional denoiser is `denoiser(x, sigma, cond) -> x0_hat` (see `NoiseProcess.denoiser`),
where `cond` is a dict of condition tensors keyed by injection ("concat", "crossattn", "vector"),
batch first, or None. A sampler wants `model(x, sigma) -> x0_hat`. The wrappers here close over
the conditions; guided ones evaluate every condition in ONE batched forward pass
(`_denoise_each`) and then combine the outputs.

Combining x0 estimates is the same as combining ε estimates: at fixed x and σ,
x̂0 = x − σ·ε̂ is affine in ε̂ with the same (x, σ) for every branch, and the weights of a guidance
combination sum to 1, so Σ wᵢ·x̂0ᵢ = x − σ·Σ wᵢ·ε̂ᵢ.

Several conditions (DESIGN.md, "Several conditions at once") take one scale each, combined either
independently (composable diffusion) or nested (InstructPix2Pix): `multi_condition_guidance`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
                  batched_cond: Condition, n: int, max_batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """One forward pass for n conditions at once: x̂0 under each, a tuple of n (B, ...) tensors.

    batched_cond: `cat_conditions` of n conditions of batch B each; x: (B, ...); sigma: (B,).
    max_batch: when memory is tight, split the n·B samples into passes of at most this many
    (None: one pass); the results are the same.
    """
    x_in = repeat(x, "b ... -> (n b) ...", n=n)  # (n·B, ...)
    sigma_in = repeat(sigma, "b -> (n b)", n=n)  # (n·B,)
    if max_batch is None or max_batch >= x_in.shape[0]:
        return denoiser(x_in, sigma_in, batched_cond).chunk(n, dim=0)
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    parts = []
    for start in range(0, x_in.shape[0], max_batch):
        part = slice(start, start + max_batch)
        cond = None if batched_cond is None else {k: v[part] for k, v in batched_cond.items()}
        parts.append(denoiser(x_in[part], sigma_in[part], cond))
    return torch.cat(parts).chunk(n, dim=0)


def condition_only(denoiser: Callable[..., torch.Tensor], cond: Condition) -> Model:
    """No guidance: model(x, sigma) = denoiser(x, sigma, cond)."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma, cond)

    return model


def classifier_free_guidance(
    denoiser: Callable[..., torch.Tensor], cond: Condition, uncond: Condition, scale: float,
    max_batch: int | None = None,
) -> Model:
    """Classifier-free guidance (Ho & Salimans 2021) as a model function.

    model(x, sigma) = D(x, σ, ∅) + scale·(D(x, σ, c) − D(x, σ, ∅)), from one forward pass of batch
    2B (conditional half first). scale = 1 is plain conditional sampling (one pass of batch B);
    scale = 0 is unconditional. cond / uncond: condition dicts of batch B with the same keys.
    max_batch: split the forward into passes of at most this many samples (None: one pass).
    """
    if scale == 1:
        return condition_only(denoiser, cond)
    both = cat_conditions([cond, uncond])  # built once, reused at every step

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out_cond, out_uncond = _denoise_each(denoiser, x, sigma, both, 2, max_batch)
        return out_uncond + scale * (out_cond - out_uncond)

    return model


GUIDANCE_MODES = ("independent", "nested")


def guidance_terms(names: Sequence[str], mode: str) -> list[tuple[str, tuple[str, ...]]]:
    """The condition subset each scale of `multi_condition_guidance` is measured with.

    independent: condition i alone, cᵢ; nested: the first i conditions of ``names``, c₁…cᵢ
    (``names`` is the nesting order). Returns [(name, subset of names present), ...].
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode {mode!r} is not one of {', '.join(GUIDANCE_MODES)}")
    if mode == "independent":
        return [(name, (name,)) for name in names]
    return [(name, tuple(names[: i + 1])) for i, name in enumerate(names)]


def multi_condition_guidance(
    denoiser: Callable[..., torch.Tensor],
    conds: Mapping[str, Condition],
    uncond: Condition,
    scales: Mapping[str, float],
    mode: str = "independent",
    max_batch: int | None = None,
) -> Model:
    """Classifier-free guidance with one scale per condition, as a model function.

    conds: for each condition name, in order, the conditioning its scale is measured with (see
    `guidance_terms`): independent, only that condition present, cᵢ; nested, it and every condition
    before it present, c₁…cᵢ. uncond: every condition absent. All dicts of batch B, same keys.

        independent (composable diffusion, Liu et al. 2022):
            D̂ = D(∅) + Σᵢ sᵢ·(D(cᵢ) − D(∅))
        nested (InstructPix2Pix, Brooks et al. 2023, generalized from two conditions to n):
            D̂ = D(∅) + Σᵢ sᵢ·(D(c₁…cᵢ) − D(c₁…cᵢ₋₁))

    Every evaluation of a step is one forward pass of batch (n+1)·B (conditions in order, then ∅),
    split into passes of at most ``max_batch`` samples when given. With one condition this is
    exactly `classifier_free_guidance`. In independent mode a scale of 0 drops its evaluation.
    """
    names = list(conds)
    unknown = set(scales) - set(names)
    missing = [n for n in names if n not in scales]
    if unknown or missing:
        raise ValueError(f"guidance scales must name exactly the conditions {names}; "
                         f"unknown: {sorted(unknown) or 'none'}, without a scale: {missing or 'none'}")
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode {mode!r} is not one of {', '.join(GUIDANCE_MODES)}")
    if len(names) == 1:
        return classifier_free_guidance(denoiser, conds[names[0]], uncond, scales[names[0]], max_batch)
    if mode == "independent":
        names = [n for n in names if scales[n] != 0]  # a zero-scale term adds nothing
    batched = cat_conditions([*(conds[n] for n in names), uncond])  # built once, reused at every step
    weights = [float(scales[n]) for n in names]

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        *outs, out_uncond = _denoise_each(denoiser, x, sigma, batched, len(names) + 1, max_batch)
        guided, previous = out_uncond, out_uncond
        for scale, out in zip(weights, outs):
            guided = guided + scale * (out - previous)
            if mode == "nested":
                previous = out  # the next condition is measured against this one's subset
        return guided

    return model
