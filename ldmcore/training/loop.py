"""Stage 2: train the denoiser on latents. A plain loop that reads top to bottom; the pieces it
calls (restore, metrics log, non-finite policy) follow it. Resume, signals, non-finite losses and
checkpoint failures are described in docs/reliability.md."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ldmcore.conditioning import apply_denoiser_net
from ldmcore.config import ConfigError
from ldmcore.training.checkpoint import load_module_state, module_tensors, save_run_checkpoint, write_text_atomic
from ldmcore.training.ema import EMA
from ldmcore.training.optim import load_optimizer_tensors, lr_factor, optimizer_tensors
from ldmcore.training.signals import stop_on_signals

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm was NaN or infinite and ``trainer.on_nonfinite`` did not
    allow skipping the step; the message names the step and the last good checkpoint."""


class LatentPool:
    """Posterior means and stds of a fixed pool of images, encoded once: encoding every batch
    anew cost 12-15 % of training time for no gain when the data is finite (CALIBRATION.md)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scale_factor: float):
        self.mean, self.std, self.scale_factor = mean, std, scale_factor

    @classmethod
    @torch.no_grad()
    def encode(cls, autoencoder, dataset, batch_size: int = 500, seed: int = 0) -> "LatentPool":
        means, stds = [], []
        for start in range(0, len(dataset), batch_size):
            posterior = autoencoder.encode(dataset.batch(list(range(start, min(start + batch_size, len(dataset)))))["image"])
            means.append(posterior.mean)
            stds.append(posterior.std)
        mean, std = torch.cat(means), torch.cat(stds)
        sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
        return cls(mean, std, float(1.0 / sample.std()))  # unit-variance latents (paper Sec. 3.1)

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[indices], self.std[indices]
        return (mean + std * torch.randn(mean.shape, generator=generator)) * self.scale_factor  # (B, C, h, w)


def train_denoiser(system, dataset, pool: LatentPool, cfg: DictConfig, run_dir: Path, resume: dict | None = None,
                   on_sample=None) -> dict:
    """Train ``system.model`` up to ``cfg.trainer.steps`` steps (docs/reliability.md).

    resume: ``{"tensors", "state", "folder"}`` of a checkpoint of this same model; training
    continues exactly where it stopped (weights, EMA, optimizer, every RNG, step, skip count).
    on_sample(step, ema_model): called every ``trainer.sample_every`` steps (periodic grids).
    SIGTERM / SIGINT end the run after the current step with a checkpoint. Returns the EMA copy,
    the last checkpoint, the step reached, the skip count and ``stopped_by`` (a signal name or None).
    """
    opts = cfg.trainer
    run_dir = Path(run_dir)
    model, process = system.model, system.process
    latent_size = system.latent_shape[1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    ema = EMA(model, opts.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order, t, noise, condition dropout
    step, elapsed, skipped, last_checkpoint = 0, 0.0, 0, None
    # The EMA at an early step, kept as the weak model of autoguidance (ldmcore/diffusion/autoguidance.py).
    snapshot_step = round(opts.guide_snapshot * opts.steps) if opts.guide_snapshot > 0 else None
    guide: dict[str, torch.Tensor] | None = None
    if resume is not None:
        guide = {k[len("guide."):]: v for k, v in resume["tensors"].items() if k.startswith("guide.")} or None
        state = restore(resume, model, ema, optimizer, generator)
        step, elapsed, skipped, last_checkpoint = state["step"], state["elapsed"], state.get("skipped_steps", 0), resume.get("folder")
        if step > opts.steps:
            raise ConfigError(f"trainer.steps={opts.steps} is below the checkpoint's step {step}; raise it to train further")
        log.info("resuming at step %d from %s", step, last_checkpoint)

    def checkpoint(at_step: int) -> Path:
        opt_tensors, groups = optimizer_tensors(optimizer)
        tensors = {**module_tensors(model, "model"), **module_tensors(ema.shadow, "ema"),
                   **module_tensors(system.first_stage, "first_stage"), **opt_tensors,
                   **{f"guide.{k}": v for k, v in (guide or {}).items()},
                   "rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
        state = {"step": at_step, "ema_updates": ema.num_updates, "skipped_steps": skipped,
                 "elapsed": elapsed + time.perf_counter() - start,
                 "optimizer_param_groups": groups, "scale_factor": pool.scale_factor}
        return save_run_checkpoint(run_dir / "checkpoints", at_step, tensors, state, cfg, opts.keep_checkpoints)

    model.train()
    start = time.perf_counter()
    window_start, window_steps, done = start, 0, step
    with open_metrics_log(run_dir / "metrics.jsonl", step) as metrics_log, stop_on_signals() as stop:
        bar = tqdm(range(step, opts.steps), initial=step, total=opts.steps, desc="denoiser", dynamic_ncols=True, mininterval=2.0)
        for step in bar:
            lr = opts.lr * lr_factor(step, opts.steps, opts.warmup_steps, opts.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = torch.randint(len(dataset), (opts.batch_size,), generator=generator)
            batch = dataset.batch(indices.tolist())
            z0 = pool.sample(indices, generator)  # (B, C, h, w), unit variance
            t = process.sample_t(opts.batch_size, generator=generator)
            noise = torch.randn(z0.shape, generator=generator)
            cond = model.conditioner(batch, opts.batch_size, latent_size, generator=generator)
            prediction = apply_denoiser_net(model.unet, process.q_sample(z0, t, noise), t.float(), cond)
            loss = process.training_loss(prediction, z0, noise, t).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.item()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip))
            done = step + 1
            if math.isfinite(loss_value) and math.isfinite(grad_norm):
                optimizer.step()
                ema.update(model)
                if done == snapshot_step:
                    guide = {k: v.clone() for k, v in ema.shadow.state_dict().items()}
            else:  # no update: weights, optimizer state and EMA stay as they were
                skipped += 1
                refuse_nonfinite(loss_value, grad_norm, done, skipped, opts, last_checkpoint)

            stopping = stop.requested  # read once: a signal may land anywhere below
            window_steps += 1
            if done % opts.log_every == 0 or done == opts.steps or stopping:
                now = time.perf_counter()
                rate = window_steps / (now - window_start)
                record = {"step": done, "loss": finite_or_none(loss_value), "grad_norm": finite_or_none(grad_norm),
                          "lr": lr, "skipped": skipped, "it_s": rate, "img_s": rate * opts.batch_size,
                          "time": elapsed + now - start}
                metrics_log.write(json.dumps(record) + "\n")
                metrics_log.flush()
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{record['img_s']:.0f}")
                window_start, window_steps = now, 0
            if stopping:
                break
            if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < opts.steps:
                last_checkpoint = checkpoint(done)
            if on_sample is not None and opts.sample_every and done % opts.sample_every == 0 and done < opts.steps:
                with torch.random.fork_rng(devices=[]):  # a grid must not move the training's RNG
                    on_sample(done, ema.shadow)
        bar.close()
        model.eval()
        folder = checkpoint(done)  # still inside: a signal now cannot cut the write short
    if stop.requested:
        log.warning("stopped by %s at step %d; checkpoint %s (continue with checkpoint=%s)", stop.name, done, folder, run_dir)
    return {"ema": ema.shadow, "guide": guide, "checkpoint": folder, "step": done, "skipped_steps": skipped, "stopped_by": stop.name,
            "train_seconds": elapsed + time.perf_counter() - start}


# --- the pieces of the loop --------------------------------------------------------------------


def restore(resume: dict, model, ema: EMA, optimizer, generator: torch.Generator) -> dict:
    """Load a checkpoint of this run into the training objects; returns its state.json."""
    tensors, state = resume["tensors"], resume["state"]
    load_module_state(model, tensors, "model")
    load_module_state(ema.shadow, tensors, "ema")
    load_optimizer_tensors(optimizer, tensors, state["optimizer_param_groups"])
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])  # dropout layers draw from the global generator
    ema.num_updates = state["ema_updates"]  # the EMA warm-up depends on it
    return state


def open_metrics_log(path: Path, from_step: int):
    """``metrics.jsonl`` opened for appending, holding only the records of steps <= from_step: a
    run resumed in its own folder continues one loss curve (records past the checkpoint, from the
    attempt that was cut short, are dropped, and so is a line torn by a kill)."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= from_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        write_text_atomic(path, "".join(kept))
    return open(path, "a")


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def refuse_nonfinite(loss: float, grad_norm: float, done: int, skipped: int, opts, last_checkpoint) -> None:
    """Raise ``NonFiniteLossError`` unless ``trainer.on_nonfinite`` lets this step be skipped."""
    if opts.on_nonfinite == "skip" and skipped <= opts.max_skipped_steps:
        log.warning("step %d: loss %s, gradient norm %s; update skipped (%d so far)", done, loss, grad_norm, skipped)
        return
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    why = ("trainer.on_nonfinite=stop" if opts.on_nonfinite == "stop"
           else f"{skipped} steps skipped, more than trainer.max_skipped_steps={opts.max_skipped_steps}")
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint had been written"
    raise NonFiniteLossError(f"the denoiser's {what} is not finite at step {done} (loss={loss}, grad_norm={grad_norm}); "
                             f"training stopped ({why}); {kept}")
