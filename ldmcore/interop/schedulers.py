"""diffusers scheduler configs in ldmcore's terms: the noise process they describe, and the σ's at
which diffusers' ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` evaluate the model, so that
ldmcore's `sample_ddim` / `sample_dpmpp_2m` follow the same trajectory.

Timestep conventions (diffusers ``set_timesteps``; T = num_train_timesteps, n = steps):
- DDIMScheduler: "leading" t = arange(n)·(T // n) + steps_offset; "trailing" round(arange(T, 0,
  −T/n)) − 1; "linspace" round(linspace(0, T − 1, n)) — all three as ldmcore's
  `NoiseSchedule.sampling_timesteps`. Each step goes from t to t − T // n; below 0 it lands on
  ᾱ = 1 (σ = 0, ``set_alpha_to_one=True``) or on ᾱ_0 (σ_0 ≈ 0.029 for SD, ``False``: SD v1's setting,
  whose last output keeps that little noise).
- DPMSolverMultistepScheduler visits n + 1 points and drops the last: "linspace" round(linspace(0,
  T − 1, n + 1))[::-1][:-1], "leading" arange(n + 1)·(T // (n + 1)) reversed minus the last, plus
  steps_offset; "trailing" as DDIM's. It ends at σ = 0 (``final_sigmas_type="zero"``) or σ_0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldmcore.diffusion import NoiseProcess, NoiseSchedule
from ldmcore.training.checkpoint import CheckpointError

_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def noise_process(cfg: Mapping, prediction: str | None = None) -> NoiseProcess:
    """The ``NoiseProcess`` of a diffusers scheduler config (``scheduler_config.json``).
    prediction: overrides the config's ``prediction_type`` ("eps", "v" or "x0")."""
    if cfg.get("rescale_betas_zero_snr"):
        raise CheckpointError("rescale_betas_zero_snr=True has no ldmcore counterpart")
    steps = cfg.get("num_train_timesteps", 1000)
    if cfg.get("trained_betas") is not None:
        schedule = NoiseSchedule(torch.tensor(cfg["trained_betas"], dtype=torch.float64))
    else:
        kind = cfg.get("beta_schedule", "linear")
        if kind not in _BETA_SCHEDULES:
            raise CheckpointError(f"beta_schedule {kind!r} has no ldmcore counterpart ({', '.join(_BETA_SCHEDULES)})")
        ends = {} if kind == "squaredcos_cap_v2" else {"beta_start": cfg.get("beta_start", 1e-4), "beta_end": cfg.get("beta_end", 0.02)}
        schedule = NoiseSchedule.from_name(_BETA_SCHEDULES[kind], steps, **ends)
    if prediction is None:
        given = cfg.get("prediction_type", "epsilon")
        if given not in _PREDICTIONS:
            raise CheckpointError(f"prediction_type {given!r} has no ldmcore counterpart ({', '.join(_PREDICTIONS)})")
        prediction = _PREDICTIONS[given]
    return NoiseProcess(schedule, prediction)


def diffusers_sigmas(cfg: Mapping, steps: int, schedule: NoiseSchedule) -> torch.Tensor:
    """The decreasing σ's (float32, ending at 0 or σ_0) at which diffusers' scheduler of config
    ``cfg`` (its ``_class_name``: DDIMScheduler or DPMSolverMultistepScheduler) evaluates the
    model in ``steps`` steps; hand them to `sample_ddim` / `sample_dpmpp_2m`.

    For DPMSolverMultistepScheduler with fewer than 15 steps, diffusers' default
    ``lower_order_final=True`` also makes the next-to-last step first order, which ldmcore's 2M
    does not: the trajectories then part at that step."""
    kind = cfg.get("_class_name")
    T = schedule.num_timesteps
    spacing = cfg.get("timestep_spacing", "leading" if kind == "DDIMScheduler" else "linspace")
    offset = cfg.get("steps_offset", 0)
    sigma_0 = schedule.sigmas[:1]
    if kind == "DDIMScheduler":
        ts = schedule.sampling_timesteps(steps, spacing, offset if spacing == "leading" else 0)
        stride = T // steps  # DDIM steps from t to t - T // n, whatever the spacing
        if bool((ts[:-1] - ts[1:] != stride).any()) or int(ts[-1]) - stride >= 0:
            raise CheckpointError(f"with {spacing!r} spacing and {steps} steps diffusers' DDIM does not step between its own timesteps")
        last = torch.zeros(1) if cfg.get("set_alpha_to_one", True) else sigma_0
    elif kind == "DPMSolverMultistepScheduler":
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "thresholding") if cfg.get(k)]
        if cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++" or cfg.get("solver_order", 2) != 2:
            unsupported.append("algorithm_type/solver_order other than dpmsolver++ / 2")
        if unsupported:
            raise CheckpointError(f"DPMSolverMultistepScheduler options without an ldmcore counterpart: {', '.join(unsupported)}")
        if spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().long().flip(0)[:-1]
        elif spacing == "leading":
            ts = (torch.arange(steps + 1) * (T // (steps + 1))).flip(0)[:-1] + offset
        else:
            ts = schedule.sampling_timesteps(steps, spacing)
        last = sigma_0 if cfg.get("final_sigmas_type", "zero") == "sigma_min" else torch.zeros(1)
    else:
        raise CheckpointError(f"no σ convention known for {kind!r}; known: DDIMScheduler, DPMSolverMultistepScheduler")
    return torch.cat([schedule.sigmas[ts], last.float()])
