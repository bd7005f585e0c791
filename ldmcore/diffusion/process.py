"""The noise process: forward noising, the training target and its weighting, and the denoiser.

This is the ONE place that knows the prediction type of the network ("eps", "v" or "x0"): the
training target is built here, and `denoiser` turns the network's output into an x0 estimate in
the VE coordinates the samplers use (x = x0 + σ·ε, VP latent z = x / sqrt(1 + σ²)).

With ᾱ = 1 / (1 + σ²), i.e. sqrt(ᾱ) = 1/sqrt(1 + σ²) and sqrt(1 − ᾱ) = σ/sqrt(1 + σ²):

    z = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε
    eps:  x0 = x − σ·ε
    v:    v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0  (Salimans & Ho 2022)  ⇒  x0 = sqrt(ᾱ)·z − sqrt(1 − ᾱ)·v
    x0:   x0 = x0
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")

# net(z_in, t, cond) -> prediction; denoiser(x, sigma, cond) -> x0_hat
Network = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Denoiser = Callable[..., torch.Tensor]


def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (B,) tensor viewed as (B, 1, ..., 1) with `ndim` dims, to broadcast against a batch."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class NoiseProcess:
    """Forward process, training loss and x0-denoiser of one schedule and one prediction type.

    prediction: what the network predicts, "eps" (DDPM / LDM), "v" (SD 2.x 768) or "x0".
    loss_weighting: "none" (plain MSE on the target) or "min_snr" (Hang et al. 2023, γ =
    `min_snr_gamma`): the per-sample MSE is weighted so that, in x0 terms, every timestep weighs
    min(SNR, γ), SNR = ᾱ/(1 − ᾱ) = 1/σ².
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ):
        _check_option("prediction", prediction, PREDICTIONS)
        _check_option("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.schedule = schedule
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    # ----- training -------------------------------------------------------------------------

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Timesteps uniform in [0, T): LongTensor (batch_size,)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)

    def _alphas_cumprod(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t in `like`'s dtype and device, shaped (B, 1, ..., 1) to broadcast against it."""
        a = self.schedule.alphas_cumprod.to(t.device)[t].to(device=like.device, dtype=like.dtype)
        return append_dims(a, like.ndim)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε (VP space). x0, noise: (B, ...); t: long (B,)."""
        a = self._alphas_cumprod(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for z_t = q_sample(x0, t, noise): (B, ...)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = self._alphas_cumprod(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the MSE on the target: float32 (B,).

        min-SNR (Hang et al. 2023, sec. 3.4): the x0-space weight min(SNR, γ) becomes, on the
        network's own target, min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x0
        (since ‖ε − ε̂‖² = SNR·‖x0 − x̂0‖² and ‖v − v̂‖² = (SNR + 1)·‖x0 − x̂0‖²).
        """
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        a = self.schedule.alphas_cumprod.to(t.device)[t]
        snr = a / (1 - a)
        clipped = snr.clamp(max=self.min_snr_gamma)
        divisor = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.prediction]
        return (clipped / divisor).float()

    def training_loss(
        self, net_out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Weighted MSE of the network output against `target(x0, noise, t)`: (B,)."""
        err = (net_out - self.target(x0, noise, t)) ** 2
        mse = err.flatten(1).mean(dim=1)  # (B,)
        return mse * self.loss_weight(t).to(mse)

    # ----- sampling -------------------------------------------------------------------------

    def net_output_to_x0(self, net_out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 estimate (VE coordinates) from the network's prediction at x = x0 + σ·ε.

        net_out, x: (B, ...); sigma: (B,), broadcast over the remaining dims.
        """
        # the scalings in at least float32: with σ up to ~2·10⁴, σ² overflows float16
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = append_dims(sigma.to(device=x.device, dtype=dtype), x.ndim)
        if self.prediction == "eps":
            x0 = x - sigma * net_out
        elif self.prediction == "x0":
            x0 = net_out
        else:
            # v: x0 = sqrt(ᾱ)·z − sqrt(1 − ᾱ)·v with z = x/sqrt(1 + σ²), i.e. k-diffusion's
            # c_skip = 1/(1 + σ²), c_out = −σ/sqrt(1 + σ²) for σ_data = 1
            x0 = x / (1 + sigma**2) - sigma * (1 + sigma**2).rsqrt() * net_out
        return x0.to(x.dtype)

    def denoiser(self, net: Network) -> Denoiser:
        """Wrap `net(z_in, t, cond) -> prediction` as `denoiser(x, sigma, cond=None) -> x0_hat`.

        x: (B, ...) in VE coordinates; sigma: (B,) > 0. The network sees the VP input
        z_in = x / sqrt(1 + σ²) (in x's dtype) and the continuous timestep t = sigma_to_t(σ) (at
        least float32, (B,)): give σ in float32, not in a bfloat16 latent's dtype, or t is rounded.
        `cond` is passed to the network unchanged (a dict of condition tensors, or None).
        """

        def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
            dtype = torch.promote_types(x.dtype, torch.float32)
            c_in = append_dims((1 + sigma.to(device=x.device, dtype=dtype) ** 2).rsqrt(), x.ndim)
            t = self.schedule.sigma_to_t(sigma)
            return self.net_output_to_x0(net((x * c_in).to(x.dtype), t, cond), x, sigma)

        return denoise

    def initial_noise(self, noise: torch.Tensor, sigma_max: float | torch.Tensor) -> torch.Tensor:
        """The VE image x = sqrt(1 + σ_max²)·z_T of z_T = `noise` ~ N(0, I) (new tensor).

        This is what DDPM / DDIM start from in VP space. Note that for schedules whose ᾱ_T is not
        ~0 (scaled_linear: ᾱ_T ≈ 0.0047) N(0, I) is not exactly q(z_T) (Lin et al. 2024).
        """
        # the scale in at least float32 (σ_max rounded to bfloat16 is off by up to 0.2 %), then one rounding
        dtype = torch.promote_types(noise.dtype, torch.float32)
        sigma_max = torch.as_tensor(sigma_max, device=noise.device).to(dtype)
        return (noise * (1 + sigma_max**2).sqrt()).to(noise.dtype)
