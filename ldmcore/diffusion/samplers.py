"""Samplers: small pure functions in the style of k-diffusion.

Every sampler has the shape `sample_x(model, x, sigmas, *, ..., callback=None) -> x0`:
- model(x, sigma) -> x0_hat, with x: (B, ...) in VE coordinates (x = x0 + σ·ε) and sigma: (B,);
  a sampler never sees a prediction type or a condition (see process.py and guidance.py);
- x: the starting point at sigmas[0], e.g. `NoiseProcess.initial_noise(noise, sigmas[0])`;
- sigmas: decreasing 1-D tensor ending in 0, e.g. `NoiseSchedule.sampling_sigmas(steps)`.
No state is kept between calls, inputs are never modified in place, and noise is drawn only from
the given torch.Generator (which must live on x's device), so a seed fixes the result.
The last step, to σ = 0, returns the denoised estimate.

Precision: the model sees x in x's dtype and σ in the sigmas' own dtype (float32 from the schedule)
on x's device, whatever x's dtype: a bfloat16 σ would reach the network as another timestep. The
step arithmetic runs in at least float32 and each new x is rounded back to x's dtype once, so a
bfloat16 latent is rounded once per step, not once per operation, and the multistep combinations
(PLMS's Adams–Bashforth weights up to 59/24, 2M's extrapolation), which cancel large terms, are
not taken in 8 significant bits.

In VE coordinates the noise estimate is ε̂ = (x − x̂0)/σ, and a deterministic DDIM step from σ to
σ' keeps ε̂ fixed: x' = x̂0 + σ'·ε̂ (Song et al. 2021; it is Euler's method on the probability-flow
ODE dx/dσ = ε̂, Karras et al. 2022). `_ddim_step` is that step; the other samplers only change the
x̂0 / ε̂ it is given, or add noise after it.
"""

from __future__ import annotations

from typing import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----- shared step math --------------------------------------------------------------------


def _step_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a step is computed in: x's, at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _denoise(model: Model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """model(x, σ repeated over the batch) in the step dtype: (B, ...).

    σ moves to x's device only and keeps its own dtype: cast to a bfloat16 x, it and the timestep the
    noise process derives from it would be rounded (SD's t = 981 would reach the network as 980).
    """
    return model(x, sigma.to(x.device).repeat(x.shape[0])).to(_step_dtype(x))


def _eps(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Noise estimate ε̂ = (x − x̂0)/σ of x = x0 + σ·ε."""
    return (x - denoised) / sigma


def _ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step σ → σ': x̂0 + σ'·ε̂ = x̂0 + (σ'/σ)(x − x̂0); σ' = 0 gives x̂0."""
    return denoised + (sigma_next / sigma) * (x - denoised)


def _ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split σ' into a deterministic part σ_down and fresh noise σ_up, σ_down² + σ_up² = σ'².

    DDIM's noise σ_η = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ') (Song et al. 2021, eq. 16) in VP space
    becomes σ_up = σ_η/sqrt(ᾱ') in VE space; with ᾱ = 1/(1 + σ²) this simplifies to
    σ_up = η·σ'·sqrt((σ² − σ'²)/σ²), the formula of k-diffusion's `get_ancestral_step`.
    """
    sigma_up = (eta * sigma_next * ((sigma**2 - sigma_next**2) / sigma**2).sqrt()).clamp(max=sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
    return sigma_down, sigma_up


def _report(callback, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


# ----- samplers ----------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback=None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) with stochasticity η ∈ [0, 1]: η = 0 deterministic, η = 1 DDPM."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if eta == 0 or sigma_next == 0:
            x = _ddim_step(x, denoised, sigma, sigma_next).to(x.dtype)
            continue
        sigma_down, sigma_up = _ancestral_sigmas(sigma, sigma_next, eta)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = (_ddim_step(x, denoised, sigma, sigma_down) + sigma_up * noise.to(denoised)).to(x.dtype)
    return x


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback=None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) with the posterior variance β̃ ("fixed small").

    It is DDIM with η = 1. In VP space (ᾱ at the current step, ᾱ' at the next, α = ᾱ/ᾱ', β = 1 − α)
    DDIM(η = 1) draws z' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ_η²)·ε̂ + σ_η·ξ with
    σ_η² = (1 − ᾱ')/(1 − ᾱ)·β = β̃, DDPM's posterior variance. Its mean equals DDPM's posterior mean
    μ̃ = sqrt(ᾱ')β/(1 − ᾱ)·x̂0 + sqrt(α)(1 − ᾱ')/(1 − ᾱ)·z: put z = sqrt(ᾱ)·x̂0 + sqrt(1 − ᾱ)·ε̂
    (the definition of ε̂); the x̂0 coefficient becomes sqrt(ᾱ')(β + α − ᾱ)/(1 − ᾱ) = sqrt(ᾱ'), and
    the squared ε̂ coefficient α(1 − ᾱ')²/(1 − ᾱ) = (1 − ᾱ')(1 − ᾱ − β)/(1 − ᾱ) = 1 − ᾱ' − β̃.
    Over strided steps this is the exact posterior q(z' | z, x0 = x̂0) of the skipped interval.
    """
    return sample_ddim(model, x, sigmas, eta=1.0, generator=generator, callback=callback)


# Adams–Bashforth coefficients on ε̂, newest first (orders 2, 3, 4), as in PNDM's PLMS.
_ADAMS_BASHFORTH = {
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.no_grad()
def sample_plms(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None) -> torch.Tensor:
    """Pseudo linear multistep (PLMS, Liu et al. 2022, "PNDM"), as used by LDM.

    A DDIM step taken with a 4th-order Adams–Bashforth combination of the last four ε̂'s (the
    "linear multistep" part, which assumes equally spaced steps). Warm-up: the first step uses
    the mean of ε̂ at both ends of a DDIM step (a 2nd-order pseudo improved Euler step, one extra
    model call), steps 2 and 3 use Adams–Bashforth of order 2 and 3.
    Combining ε̂'s over a step from σ multiplies their differences by σ, so start where σ is
    moderate: "leading" spacing as in LDM, not t = T − 1 of the cosine schedule (σ ≈ 2·10⁴).
    """
    old_eps: list[torch.Tensor] = []  # newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, i, x, sigma, denoised)
        eps = _eps(x, denoised, sigma)
        if not old_eps and sigma_next > 0:
            x_trial = _ddim_step(x, denoised, sigma, sigma_next).to(x.dtype)  # the model's input
            eps_next = _eps(x_trial, _denoise(model, x_trial, sigma_next), sigma_next)
            eps_prime = (eps + eps_next) / 2
        elif not old_eps:  # a single step straight to σ = 0: nothing to improve on
            eps_prime = eps
        else:
            history = [eps, *old_eps]
            coefficients = _ADAMS_BASHFORTH[len(history)]
            eps_prime = sum(c * e for c, e in zip(coefficients, history))
        old_eps = [eps, *old_eps][:3]
        x = _ddim_step(x, x - sigma * eps_prime, sigma, sigma_next).to(x.dtype)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, *, callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), a 2nd-order multistep solver in x̂0.

    With λ = −log σ and h = λ' − λ, the first-order step x' = (σ'/σ)·x − (e^{−h} − 1)·x̂0 is exactly
    `_ddim_step`; 2M replaces x̂0 by the extrapolation D = (1 + 1/(2r))·x̂0 − 1/(2r)·x̂0_prev,
    r = h_prev/h, which accounts for unequal step sizes. The first step and the last (σ' = 0,
    returning x̂0) are first order.
    """
    old_denoised = h_prev = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised.to(x.dtype)
            break
        h = sigma.log() - sigma_next.log()  # λ' − λ
        if old_denoised is None:
            d = denoised
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = _ddim_step(x, d, sigma, sigma_next).to(x.dtype)
        old_denoised, h_prev = denoised, h
    return x


# ----- registry ----------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler registered under `name`; unknown names raise ValueError listing the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}") from None
