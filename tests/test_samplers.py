"""Samplers against an exact Gaussian denoiser.

For data x0 ~ N(μ, diag(s²)) and x = x0 + σ·ε (VE coordinates), x ~ N(μ, s² + σ²) and the optimal
denoiser is closed form: E[x0 | x] = μ + s²/(s² + σ²)·(x − μ). The exact probability-flow ODE keeps
the standardized coordinate (x − μ)/sqrt(s² + σ²) fixed. A perfect sampler started from the exact
marginal at σ_max therefore returns N(μ, s²); what remains is its discretization error.

Data scale: s ∈ {0.5, 1.0, 1.5}, the order of a latent rescaled to unit variance. (A much smaller
s, say 0.1, mostly measures the last jump σ_min → 0, which returns E[x0 | x] and so shrinks the
std by s/sqrt(s² + σ_min²), about 8 % at scaled_linear's σ_1 = 0.041.)

Tolerances, per dimension, with N samples:
- mean: the samplers are affine in the noise around μ, so the mean has no discretization bias;
  |mean − μ| < 5·s/sqrt(N) (five standard errors).
- std: |std/s − 1| < bias + 5/sqrt(2N), where 1/sqrt(2N) is the standard error of a sample std
  (0.35 % at N = 40 000) and `bias` bounds the sampler's measured discretization bias at that
  number of steps (recorded beside each case, for both schedules).
"""

import math

import pytest
import torch

from ldmcore.diffusion import (
    SAMPLERS,
    NoiseProcess,
    NoiseSchedule,
    classifier_free_guidance,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)

MU = torch.tensor([1.0, -2.0, 0.5])
S = torch.tensor([0.5, 1.5, 1.0])
N = 40_000


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(MU, S²): x (B, 3), sigma (B,)."""
    k = S**2 / (S**2 + sigma[:, None] ** 2)
    return MU + k * (x - MU)


def exact_start(sigma_max, n=N, seed=0):
    """n draws of x ~ N(MU, S² + σ_max²), the exact marginal at σ_max, and the generator used."""
    g = torch.Generator().manual_seed(seed)
    return MU + (S**2 + sigma_max**2).sqrt() * torch.randn(n, 3, generator=g), g


def check_moments(out, bias):
    n = out.shape[0]
    mean_err = (out.mean(0) - MU).abs()
    std_err = (out.std(0) / S - 1).abs()
    assert (mean_err < 5 * S / math.sqrt(n)).all(), f"mean error {mean_err}"
    assert (std_err < bias + 5 / math.sqrt(2 * n)).all(), f"relative std error {std_err}"


# name, keyword arguments, steps, bound on the discretization bias of std/s (measured:
# cosine / scaled_linear, worst dimension), "leading" spacing as in LDM / SD.
CASES = [
    ("ddim", {}, 250, 0.015),  # first order: -0.6 % / -1.3 % (the paper uses 250 DDIM steps)
    ("ddim", {"eta": 1.0}, 500, 0.02),  # -0.7 % / -1.6 %
    ("ddpm", {}, 1000, 0.015),  # -0.6 % / -1.1 %: β̃ ("fixed small") under-disperses slightly
    ("plms", {}, 50, 0.005),  # +0.1 % / +0.3 %
    ("dpmpp_2m", {}, 100, 0.01),  # +0.3 % / +0.7 %
]


@pytest.mark.parametrize("kind", ["cosine", "scaled_linear"])
@pytest.mark.parametrize("name, kwargs, steps, bias", CASES, ids=[f"{c[0]}{c[1]}-{c[2]}" for c in CASES])
def test_sampler_reproduces_gaussian_data(kind, name, kwargs, steps, bias):
    sigmas = NoiseSchedule.from_name(kind).sampling_sigmas(steps)
    x, g = exact_start(sigmas[0])
    sampler = get_sampler(name)
    if name == "ddpm" or kwargs.get("eta", 0) > 0:
        kwargs = {**kwargs, "generator": g}
    out = sampler(gaussian_denoiser, x, sigmas, **kwargs)
    assert out.shape == x.shape and torch.isfinite(out).all()
    check_moments(out, bias)


def relative_error(out, target):
    """Per-dimension RMS error relative to the target's spread around μ: (3,)."""
    return (out - target).pow(2).mean(0).sqrt() / (target - MU).pow(2).mean(0).sqrt()


def exact_flow_then_denoise(x, sigmas):
    """Exact ODE solution from sigmas[0] to the last σ > 0, then the final jump E[x0 | x]: the
    endpoint every sampler here aims at for this σ grid."""
    sigma_first, sigma_last = sigmas[0], sigmas[-2]
    x_last = MU + ((S**2 + sigma_last**2) / (S**2 + sigma_first**2)).sqrt() * (x - MU)
    return gaussian_denoiser(x_last, sigma_last.expand(len(x)))


@pytest.mark.parametrize("kind", ["cosine", "scaled_linear"])
def test_dpmpp_2m_at_20_steps_beats_ddim(kind):
    # "trailing" spacing: evenly spaced log σ near the end, where 2M's step-size ratio r stays
    # moderate. Measured worst error relative to s: DPM++(2M) 1.3 % / 0.5 %, DDIM 6.5 % / 5 %.
    sigmas = NoiseSchedule.from_name(kind).sampling_sigmas(20, "trailing")
    x, _ = exact_start(sigmas[0], n=2000)
    target = exact_flow_then_denoise(x, sigmas)
    err_dpm = relative_error(sample_dpmpp_2m(gaussian_denoiser, x, sigmas), target)
    err_ddim = relative_error(sample_ddim(gaussian_denoiser, x, sigmas), target)
    assert (err_dpm < 0.02).all()
    assert (err_dpm < err_ddim).all() and err_dpm.max() < err_ddim.max() / 3


def test_deterministic_samplers_converge_to_the_exact_flow():
    # On a grid uniform in log σ (the λ of DPM-Solver), halving the step halves DDIM's error
    # (first order) and quarters DPM-Solver++(2M)'s (second order).
    def error(sampler, steps):
        sigmas = torch.cat([torch.logspace(math.log10(15.0), math.log10(0.03), steps), torch.zeros(1)])
        x, _ = exact_start(sigmas[0], n=500)
        return relative_error(sampler(gaussian_denoiser, x, sigmas), exact_flow_then_denoise(x, sigmas)).max()

    assert 1.8 < error(sample_ddim, 20) / error(sample_ddim, 40) < 2.2
    assert 3.4 < error(sample_dpmpp_2m, 20) / error(sample_dpmpp_2m, 40) < 4.6


def test_end_to_end_v_prediction_from_initial_noise():
    """NoiseProcess.denoiser + initial_noise + a sampler: a v-predicting "network" that is exact
    for the Gaussian data. Cosine with "trailing" starts at t = T-1, σ ≈ 2·10⁴, where N(0, I) in VP
    space is q(z_T) up to ~s/σ_max, so no exact start is needed."""
    schedule = NoiseSchedule.from_name("cosine")
    process = NoiseProcess(schedule, prediction="v")

    def net(z, t, cond):
        assert cond is None
        sigma = schedule.t_to_sigma(t)[:, None]
        x = z * (1 + sigma**2).sqrt()
        x0 = MU + S**2 / (S**2 + sigma**2) * (x - MU)
        eps = (x - x0) / sigma
        alpha, sigma_vp = (1 + sigma**2).rsqrt(), sigma * (1 + sigma**2).rsqrt()
        return alpha * eps - sigma_vp * x0

    denoiser = process.denoiser(net)
    sigmas = schedule.sampling_sigmas(50, "trailing")
    g = torch.Generator().manual_seed(1)
    x = process.initial_noise(torch.randn(N, 3, generator=g), sigmas[0])
    out = sample_dpmpp_2m(lambda x, sigma: denoiser(x, sigma, None), x, sigmas)
    check_moments(out, bias=0.015)  # measured: +1.1 % for s = 0.5 at 50 trailing steps


# ----- contract: purity, reproducibility, callback, registry ---------------------------------


def run(name, x, sigmas, seed):
    g = torch.Generator().manual_seed(seed)
    kwargs = {"generator": g} if name in ("ddim", "ddpm") else {}
    if name == "ddim":
        kwargs["eta"] = 0.5
    return SAMPLERS[name](gaussian_denoiser, x, sigmas, **kwargs)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_is_pure_and_reproducible(name):
    sigmas = NoiseSchedule.from_name("scaled_linear").sampling_sigmas(10)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    x_before, sigmas_before = x.clone(), sigmas.clone()
    first = run(name, x, sigmas, seed=3)
    assert torch.equal(x, x_before) and torch.equal(sigmas, sigmas_before)
    assert torch.equal(first, run(name, x, sigmas, seed=3))
    if name in ("ddim", "ddpm"):  # stochastic ones depend on the seed
        assert not torch.equal(first, run(name, x, sigmas, seed=4))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step(name):
    sigmas = NoiseSchedule.from_name("cosine").sampling_sigmas(6)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    seen = []
    SAMPLERS[name](gaussian_denoiser, x, sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert [float(d["sigma"]) for d in seen] == sigmas[:-1].tolist()
    assert all(d["x"].shape == d["denoised"].shape == x.shape for d in seen)


def test_model_receives_batch_shaped_sigma():
    shapes = []

    def model(x, sigma):
        shapes.append(tuple(sigma.shape))
        return gaussian_denoiser(x, sigma)

    sigmas = NoiseSchedule.from_name("cosine").sampling_sigmas(4)
    sample_plms(model, torch.randn(5, 3), sigmas)
    assert set(shapes) == {(5,)}


def test_final_step_returns_the_denoised_estimate():
    sigmas = torch.tensor([2.0, 0.0])
    x = torch.randn(4, 3)
    expected = gaussian_denoiser(x, sigmas[:1].expand(4))
    for sampler in (sample_ddim, sample_ddpm, sample_plms, sample_dpmpp_2m):
        torch.testing.assert_close(sampler(gaussian_denoiser, x, sigmas), expected)


def test_ddpm_is_ddim_with_eta_one():
    sigmas = NoiseSchedule.from_name("linear").sampling_sigmas(20)
    x = torch.randn(16, 3) * sigmas[0]
    a = sample_ddpm(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(7))
    b = sample_ddim(gaussian_denoiser, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_registry():
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "dpmpp_2m"}
    assert get_sampler("ddim") is sample_ddim
    with pytest.raises(ValueError, match="dpmpp_2m"):
        get_sampler("euler")



# ----- precision: σ and t stay float32 whatever the latent's dtype ---------------------------


def unit_gaussian_eps_net(schedule, seen_t):
    """ε̂(z_t, t) exact for data x0 ~ N(0, 1), sqrt(1 − ᾱ_t)·z_t, recording the t it is given."""

    def net(z, t, cond):
        seen_t.append(t)
        sigma = schedule.t_to_sigma(t).reshape(-1, 1)
        return (z * sigma * (1 + sigma**2).rsqrt()).to(z.dtype)

    return net


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bfloat16_latent_sees_the_float32_sigmas_and_integer_timesteps(name):
    # Cast to bfloat16, σ(t = 981) of SD's schedule would reach the network as t = 980 (bfloat16
    # keeps 8 significant bits: from 512 to 1024 it steps by 4). σ follows x's device, not its dtype.
    schedule = NoiseSchedule.from_name("scaled_linear")
    process = NoiseProcess(schedule)
    sigmas, ts = schedule.sampling_sigmas(50), schedule.sampling_timesteps(50)  # t = 981, 961, ..., 1
    seen_sigma, seen_t = [], []
    denoiser = process.denoiser(unit_gaussian_eps_net(schedule, seen_t))
    guided = classifier_free_guidance(denoiser, {"vector": torch.ones(4, 1)}, {"vector": torch.zeros(4, 1)}, 2.0)

    def model(x, sigma):
        assert x.dtype == torch.bfloat16
        seen_sigma.append(sigma)
        return guided(x, sigma)

    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    kwargs = {"generator": torch.Generator().manual_seed(3)} if name == "ddpm" else {}
    out = SAMPLERS[name](model, process.initial_noise(noise, sigmas[0]), sigmas, **kwargs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert {s.dtype for s in seen_sigma} == {t.dtype for t in seen_t} == {torch.float32}
    assert set(torch.cat(seen_sigma).tolist()) == set(sigmas[:-1].tolist())  # PLMS visits σ_1 twice
    assert set(torch.cat(seen_t).tolist()) == set(ts.tolist())  # the exact integers
    if name != "ddpm":  # deterministic: the float32 run, to bfloat16's precision (measured: 0.04)
        out32 = SAMPLERS[name](guided, process.initial_noise(noise.float(), sigmas[0]), sigmas)
        torch.testing.assert_close(out.float(), out32, atol=0.06, rtol=0)
