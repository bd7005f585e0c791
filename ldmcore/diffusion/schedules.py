"""Noise schedules of discrete-time variance-preserving (VP) diffusion.

A schedule is a sequence of betas β_1..β_T; everything else follows from ᾱ_t = Π_{s≤t} (1 − β_s).
Samplers work in k-diffusion's "VE" coordinates x = x0 + σ·ε with

    σ_t = sqrt((1 − ᾱ_t) / ᾱ_t),      the VP latent being z_t = x / sqrt(1 + σ_t²).

Timesteps are 0-based indices into the tables (t = 0 is the least noisy step), as in CompVis and
diffusers.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace")

# Default endpoints: DDPM (Ho et al. 2020) for "linear"; LDM / Stable Diffusion
# (CompVis `make_beta_schedule`, linear_start=0.00085, linear_end=0.012) for "scaled_linear".
_DEFAULT_ENDPOINTS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
_COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: small offset so β_1 is not vanishingly small
_COSINE_MAX_BETA = 0.999  # ... and betas are clipped to avoid a singularity at t = T


def make_betas(
    kind: str,
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> torch.Tensor:
    """Betas β_1..β_T as a float64 tensor of shape (T,).

    kind: "linear" (DDPM: evenly spaced betas, default 1e-4..0.02), "scaled_linear" (LDM / SD:
    evenly spaced sqrt(β), default 0.00085..0.012) or "cosine" (Nichol & Dhariwal 2021,
    ᾱ(t) ∝ cos²(((t/T) + s)/(1 + s)·π/2), s = 0.008, β ≤ 0.999; takes no endpoints).
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; valid kinds: {', '.join(BETA_SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start / beta_end")
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2  # ᾱ(t) up to f(0)
        betas = 1 - f[1:] / f[:-1]
        return betas.clamp(max=_COSINE_MAX_BETA)

    default_start, default_end = _DEFAULT_ENDPOINTS[kind]
    start = default_start if beta_start is None else beta_start
    end = default_end if beta_end is None else beta_end
    if kind == "linear":
        return torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    # scaled_linear: linear in sqrt(β), then squared
    return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2


class NoiseSchedule:
    """The tables of one schedule: ᾱ_t (float64) and σ_t (float32, increasing with t).

    `sigma_to_t` and `t_to_sigma` interpolate linearly in log σ, so a network trained on integer
    timesteps can be queried at any σ in [σ_0, σ_{T−1}] (k-diffusion's convention).
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,) float64, decreasing
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().float()  # (T,) float32
        # (T,) float64, increasing: the interpolation grid, of the float32 table itself, so that
        # sigma_to_t(sigmas[t]) is exactly t and t_to_sigma(t) exactly sigmas[t]
        self.log_sigmas = self.sigmas.double().log()

    @classmethod
    def from_name(cls, kind: str, num_timesteps: int = 1000, **kw) -> "NoiseSchedule":
        """`NoiseSchedule(make_betas(kind, num_timesteps, **kw))`."""
        return cls(make_betas(kind, num_timesteps, **kw))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep t ∈ [0, T−1] (σ's shape, σ's dtype but at least float32) of σ, by
        interpolation in log σ; t of a table entry `sigmas[k]` is exactly k.

        σ outside [σ_0, σ_{T−1}] is clamped to the ends. Inverse of `t_to_sigma`.
        """
        sigma = torch.as_tensor(sigma)
        # at least float32: bfloat16 steps by 4 between t = 512 and 1024
        out_dtype = torch.promote_types(sigma.dtype, torch.float32) if sigma.is_floating_point() else torch.float32
        if self.num_timesteps == 1:  # a single timestep: nothing to interpolate
            return torch.zeros(sigma.shape, dtype=out_dtype, device=sigma.device)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-30).log()
        # left end `low` of the grid interval [low, low + 1] that holds log σ
        low = (torch.searchsorted(log_sigmas, log_sigma.contiguous()) - 1).clamp(0, self.num_timesteps - 2)
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        return (low + w.clamp(0, 1)).to(out_dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at a (possibly fractional) timestep t ∈ [0, T−1], by interpolation in log σ.

        Returns float32 for integer t, t's dtype for floating t.
        """
        t = torch.as_tensor(t)
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        log_sigmas = self.log_sigmas.to(t.device)
        t64 = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t64.floor().long()
        high = t64.ceil().long()
        w = t64 - low
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
        return log_sigma.exp().to(out_dtype)

    def sampling_timesteps(self, steps: int, spacing: str = "leading", offset: int = 1) -> torch.Tensor:
        """The `steps` integer timesteps a sampler visits, decreasing (LongTensor, shape (steps,)).

        Conventions (those of diffusers' `timestep_spacing`, with T = num_timesteps):
        - "leading": t = arange(steps)·(T // steps) + offset, reversed. This is DDIM's and
          diffusers' default; Stable Diffusion v1 uses it with offset (`steps_offset`) = 1, e.g.
          T = 1000, steps = 50 gives 981, 961, ..., 1. `offset` applies to "leading" only.
        - "trailing": t = round(arange(T, 0, −T/steps)) − 1, which always starts at T − 1
          (recommended by Lin et al. 2024), e.g. 999, 979, ..., 19.
        - "linspace": t = round(linspace(0, T − 1, steps)), reversed, e.g. 999, 979, ..., 0.
        steps == T visits every timestep T − 1, ..., 0 whatever the spacing.
        """
        T = self.num_timesteps
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if steps == T:
            return torch.arange(T - 1, -1, -1)
        if spacing == "leading":
            if offset < 0:
                raise ValueError(f"offset must be >= 0, got {offset}")
            ts = torch.arange(steps) * (T // steps) + offset
            if int(ts[-1]) > T - 1:
                raise ValueError(f"offset {offset} puts the last timestep past T - 1 = {T - 1} at {steps} steps")
            return ts.flip(0)
        if spacing == "trailing":
            # T − k·T/steps rather than arange(T, 0, −T/steps): a float step can add a spurious element
            return (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
        return ts.flip(0)

    def sampling_sigmas(self, steps: int, spacing: str = "leading", offset: int = 1) -> torch.Tensor:
        """Decreasing float32 σ's of `sampling_timesteps(...)` with a final 0: shape (steps + 1,).

        See `sampling_timesteps` for the spacing conventions. The last step (to σ = 0) returns the
        denoised estimate, i.e. the "alpha to one" choice of diffusers' DDIM.
        """
        ts = self.sampling_timesteps(steps, spacing, offset)
        return torch.cat([self.sigmas[ts], self.sigmas.new_zeros(1)])
