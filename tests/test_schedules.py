"""Noise schedules and the noise process (training target, loss weighting, denoiser)."""

import math

import pytest
import torch

from ldmcore.diffusion import NoiseProcess, NoiseSchedule, make_betas

# ----- betas --------------------------------------------------------------------------------


def test_linear_betas_are_ddpm():
    betas = make_betas("linear")
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_scaled_linear_betas_are_stable_diffusion():
    betas = make_betas("scaled_linear")
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999))  # linear in sqrt(β)
    # ᾱ_T of Stable Diffusion v1 / v2 (diffusers' scheduler config): 0.0047
    assert NoiseSchedule(betas).alphas_cumprod[-1].item() == pytest.approx(0.004660, abs=2e-6)


def test_custom_endpoints():
    betas = make_betas("linear", 10, beta_start=0.001, beta_end=0.1)
    assert betas[0].item() == pytest.approx(0.001) and betas[-1].item() == pytest.approx(0.1)


def test_cosine_betas():
    betas = make_betas("cosine")
    alphas_cumprod = NoiseSchedule(betas).alphas_cumprod
    assert (betas <= 0.999).all() and (betas > 0).all()
    assert (alphas_cumprod.diff() < 0).all()
    # before clipping, ᾱ_t = f(t + 1)/f(0) with f(u) = cos²((u/T + s)/(1 + s)·π/2), s = 0.008
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    assert betas[-1].item() == 0.999  # clipped at t = T


def test_unknown_schedule_lists_valid_kinds():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        make_betas("quadratic")
    with pytest.raises(ValueError):
        make_betas("cosine", beta_start=0.1)


# ----- sigmas and timesteps --------------------------------------------------------------------


@pytest.fixture(params=["linear", "scaled_linear", "cosine"])
def schedule(request):
    return NoiseSchedule.from_name(request.param)


def test_sigmas(schedule):
    a = schedule.alphas_cumprod
    assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas.shape == (1000,)
    assert (schedule.sigmas.diff() > 0).all()
    torch.testing.assert_close(schedule.sigmas.double(), ((1 - a) / a).sqrt(), rtol=1e-6, atol=0)


def test_sigma_to_t_inverts_t_to_sigma(schedule):
    t = torch.linspace(0, 999, 4001)  # fractional timesteps
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    # integer timesteps hit the table exactly, both ways (the network sees t = 981, not 980.99997)
    assert torch.equal(schedule.t_to_sigma(torch.arange(1000)), schedule.sigmas)
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), torch.arange(1000.0))
    # t is at least float32: in bfloat16 it would step by 4 between 512 and 1024
    assert schedule.sigma_to_t(schedule.sigmas.bfloat16()).dtype == torch.float32
    # interpolation is linear in log σ
    mid = schedule.t_to_sigma(torch.tensor([10.5]))
    assert mid.item() == pytest.approx(math.sqrt(schedule.sigmas[10].item() * schedule.sigmas[11].item()), rel=1e-5)


def test_sigma_to_t_clamps_out_of_range(schedule):
    t = schedule.sigma_to_t(torch.tensor([1e-6, 1e9]))
    assert t.tolist() == [0.0, 999.0]


def test_sampling_sigmas_spacings():
    schedule = NoiseSchedule.from_name("scaled_linear")
    timesteps = {sp: schedule.sampling_timesteps(50, sp) for sp in ("leading", "trailing", "linspace")}
    # diffusers' DDIMScheduler with steps_offset=1 (SD v1): 981, 961, ..., 1
    assert timesteps["leading"].tolist() == list(range(981, 0, -20))
    assert timesteps["trailing"].tolist() == list(range(999, 0, -20))
    assert timesteps["linspace"][0] == 999 and timesteps["linspace"][-1] == 0
    assert schedule.sampling_timesteps(50, "leading", offset=0).tolist() == list(range(980, -1, -20))
    for spacing, ts in timesteps.items():
        sigmas = schedule.sampling_sigmas(50, spacing)
        assert sigmas.shape == (51,) and sigmas[-1] == 0
        assert (sigmas.diff() < 0).all()
        assert torch.equal(sigmas[:-1], schedule.sigmas[ts])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 333, 999, 1000])
def test_sampling_timesteps_are_distinct_and_in_range(spacing, steps):
    ts = NoiseSchedule.from_name("linear").sampling_timesteps(steps, spacing)
    assert ts.shape == (steps,) and (ts.diff() < 0).all()
    assert 0 <= ts.min() and ts.max() <= 999
    if steps == 1000:
        assert ts.tolist() == list(range(999, -1, -1))


def test_sampling_sigmas_rejects_bad_arguments():
    schedule = NoiseSchedule.from_name("linear")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        schedule.sampling_sigmas(10, "karras")
    with pytest.raises(ValueError):
        schedule.sampling_sigmas(0)
    with pytest.raises(ValueError):
        schedule.sampling_sigmas(1001)


# ----- the noise process ------------------------------------------------------------------------


def test_bad_options_name_the_option_and_the_allowed_values():
    schedule = NoiseSchedule.from_name("linear", 10)
    with pytest.raises(ValueError, match="prediction.*eps, v, x0"):
        NoiseProcess(schedule, prediction="score")
    with pytest.raises(ValueError, match="loss_weighting.*none, min_snr"):
        NoiseProcess(schedule, loss_weighting="p2")


def test_sample_t():
    process = NoiseProcess(NoiseSchedule.from_name("linear", 50))
    t = process.sample_t(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 49
    assert torch.equal(t, process.sample_t(10_000, generator=torch.Generator().manual_seed(0)))


def test_q_sample_statistics():
    process = NoiseProcess(NoiseSchedule.from_name("cosine"))
    n, t0 = 200_000, 600
    x0 = torch.full((n, 1, 1, 1), 2.0)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    z = process.q_sample(x0, torch.full((n,), t0), noise)
    a = process.schedule.alphas_cumprod[t0].item()
    assert z.shape == x0.shape
    # five standard errors of the mean and of the std
    assert abs(z.mean().item() - 2 * math.sqrt(a)) < 5 * math.sqrt(1 - a) / math.sqrt(n)
    assert abs(z.std().item() / math.sqrt(1 - a) - 1) < 5 / math.sqrt(2 * n)


def test_q_sample_broadcasts_per_sample_timesteps():
    process = NoiseProcess(NoiseSchedule.from_name("linear"))
    x0, noise = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    z = process.q_sample(x0, torch.tensor([0, 999]), noise)
    a = process.schedule.alphas_cumprod
    assert torch.allclose(z[0], torch.tensor(a[0].sqrt().item())) and torch.allclose(z[1], torch.tensor(a[999].sqrt().item()))


def hand_target(prediction, x0, noise, a):
    """The targets written out independently of the process: ε, x0, v = sqrt(ᾱ)ε − sqrt(1 − ᾱ)x0."""
    a = a.float()[:, None, None, None]
    return {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    return x0, noise, torch.tensor([0, 1, 10, 250, 700, 999])


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_training_loss_is_zero_at_the_exact_target(prediction, weighting, batch):
    x0, noise, t = batch
    process = NoiseProcess(NoiseSchedule.from_name("scaled_linear"), prediction, weighting)
    target = hand_target(prediction, x0, noise, process.schedule.alphas_cumprod[t])
    torch.testing.assert_close(process.target(x0, noise, t), target)
    loss = process.training_loss(target, x0, noise, t)
    assert loss.shape == (6,) and torch.allclose(loss, torch.zeros(6), atol=1e-10)
    off = process.training_loss(target + 0.1, x0, noise, t)
    torch.testing.assert_close(off, 0.01 * process.loss_weight(t))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights(prediction):
    schedule = NoiseSchedule.from_name("linear")
    process = NoiseProcess(schedule, prediction, "min_snr", min_snr_gamma=5.0)
    t = torch.arange(1000)
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    expected = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1), "x0": snr.clamp(max=5)}[prediction]
    torch.testing.assert_close(process.loss_weight(t), expected.float())
    assert torch.equal(NoiseProcess(schedule, prediction).loss_weight(t), torch.ones(1000))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_denoiser_recovers_x0_from_the_true_prediction(prediction, batch):
    """The conversion of each prediction type is consistent with q_sample and the target: for
    z_t = q_sample(x0, t, ε) and a network that outputs the exact target, the denoiser at
    x = z_t·sqrt(1 + σ_t²) returns x0."""
    x0, noise, t = batch
    schedule = NoiseSchedule.from_name("cosine")
    process = NoiseProcess(schedule, prediction)
    z = process.q_sample(x0, t, noise)
    sigma = schedule.sigmas[t]
    x = z * (1 + sigma**2).sqrt()[:, None, None, None]
    cond = {"vector": torch.zeros(6, 3)}

    def net(z_in, t_in, c):
        assert c is cond
        torch.testing.assert_close(z_in, z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t_in, t.float(), atol=1e-2, rtol=0)
        return process.target(x0, noise, t)

    x_before = x.clone()
    x0_hat = process.denoiser(net)(x, sigma, cond)
    assert torch.equal(x, x_before)
    # absolute error of x0 = x − σ·ε at σ ≈ 2·10⁴ (t = 999) is float32 rounding of x
    torch.testing.assert_close(x0_hat[:5], x0[:5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_hat[5], x0[5], rtol=0, atol=1e-2 if prediction == "eps" else 1e-4)


def test_denoiser_conversions_on_a_known_point():
    # x0 = 1, ε = 2, σ = 3 ⇒ x = 7, ᾱ = 1/10, v = sqrt(.1)·2 − sqrt(.9)·1
    sigma = torch.tensor([3.0])
    x = torch.tensor([[7.0]])
    outputs = {"eps": 2.0, "x0": 1.0, "v": math.sqrt(0.1) * 2 - math.sqrt(0.9)}
    schedule = NoiseSchedule.from_name("linear")
    for prediction, out in outputs.items():
        x0_hat = NoiseProcess(schedule, prediction).denoiser(lambda z, t, c: torch.full_like(z, out))(x, sigma)
        assert x0_hat.item() == pytest.approx(1.0, abs=1e-6)


def test_initial_noise():
    process = NoiseProcess(NoiseSchedule.from_name("linear"))
    noise = torch.randn(4, 3)
    x = process.initial_noise(noise, 3.0)
    torch.testing.assert_close(x, noise * math.sqrt(10))
    assert x is not noise
