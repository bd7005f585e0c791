"""With Stable Diffusion v1's noise schedule, ldmcore's DDIM (η = 0) and DPM-Solver++(2M) follow
diffusers' DDIMScheduler / DPMSolverMultistepScheduler step by step (max abs < 1e-4) for the same
model function and initial noise, given the σ's of diffusers' timestep convention."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from ldmcore.diffusion import sample_ddim, sample_dpmpp_2m  # noqa: E402
from ldmcore.interop import diffusers_sigmas  # noqa: E402
from ldmcore.interop.schedulers import noise_process  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # numpy 2 notices inside diffusers
              pytest.mark.usefixtures("one_thread")]
TOL = 1e-4
# Stable Diffusion v1's scheduler_config.json (the DDIM / PNDM settings of its pipeline)
SD_V1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="epsilon", steps_offset=1)



def make_eps_model(schedule):
    """ε̂(z_t, t): the exact noise prediction for data x0 ~ N(μ, s²) per element, plus a smooth
    nonlinear term; defined for continuous t (ldmcore) and integer t (diffusers) alike."""
    g = torch.Generator().manual_seed(3)
    mu, s2 = torch.randn(1, 4, 8, 8, generator=g) * 0.5, 0.25

    def eps(z: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        a = (1 / (1 + schedule.t_to_sigma(t) ** 2)).reshape(-1, 1, 1, 1)  # ᾱ_t
        exact = (1 - a).sqrt() * (z.double() - a.sqrt() * mu) / (a * s2 + 1 - a)
        return (exact + 0.1 * torch.tanh(z.double()) * torch.cos(t.reshape(-1, 1, 1, 1) / 300)).float()

    return eps


def run_both(scheduler, cfg: dict, sampler, steps: int) -> tuple[list, list]:
    """The VP latents after every step: (diffusers', ldmcore's)."""
    process = noise_process(cfg)
    eps = make_eps_model(process.schedule)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    scheduler.set_timesteps(steps)
    z, theirs = noise.clone(), []
    for t in scheduler.timesteps:
        z = scheduler.step(eps(z, t.expand(2)), t, z).prev_sample
        theirs.append(z)

    sigmas = diffusers_sigmas(cfg, steps, process.schedule)
    assert torch.allclose(sigmas[:-1], process.schedule.sigmas[scheduler.timesteps])
    states = []
    denoiser = process.denoiser(lambda z_in, t, cond: eps(z_in, t))
    final = sampler(denoiser, process.initial_noise(noise, sigmas[0]), sigmas, callback=lambda d: states.append(d["x"]))
    ours = [x / (1 + s**2).sqrt() for x, s in zip([*states[1:], final], sigmas[1:])]  # VE -> VP
    return theirs, ours


def max_diff(theirs: list, ours: list) -> float:
    assert len(theirs) == len(ours)
    return max(float((a - b).abs().max()) for a, b in zip(theirs, ours))


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_follows_diffusers(set_alpha_to_one):
    cfg = {"_class_name": "DDIMScheduler", **SD_V1, "clip_sample": False, "set_alpha_to_one": set_alpha_to_one}
    scheduler = DDIMScheduler(**{k: v for k, v in cfg.items() if k != "_class_name"})
    theirs, ours = run_both(scheduler, cfg, sample_ddim, steps=50)
    assert max_diff(theirs, ours) < TOL
    if set_alpha_to_one:  # ldmcore's own "leading" spacing with offset 1 is this convention
        schedule = noise_process(cfg).schedule
        assert torch.equal(diffusers_sigmas(cfg, 50, schedule), schedule.sampling_sigmas(50, "leading", 1))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmpp_2m_follows_diffusers(spacing):
    cfg = {"_class_name": "DPMSolverMultistepScheduler", **SD_V1, "algorithm_type": "dpmsolver++", "solver_order": 2,
           "timestep_spacing": spacing}
    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in cfg.items() if k != "_class_name"})
    theirs, ours = run_both(scheduler, cfg, sample_dpmpp_2m, steps=20)
    assert max_diff(theirs, ours) < TOL
    if spacing == "trailing":
        schedule = noise_process(cfg).schedule
        assert torch.equal(diffusers_sigmas(cfg, 20, schedule), schedule.sampling_sigmas(20, "trailing"))
