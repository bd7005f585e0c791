"""Stage 2: train the denoiser on latents. A plain loop that reads top to bottom."""

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
from ldmcore.training.checkpoint import load_module_state, module_tensors, save_run_checkpoint
from ldmcore.training.ema import EMA
from ldmcore.training.optim import load_optimizer_tensors, lr_factor, optimizer_tensors

log = logging.getLogger(__name__)


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
    """Train ``system.model`` for ``cfg.trainer.steps`` steps; returns the EMA copy and history.

    resume: ``{"tensors": ..., "state": ...}`` of a checkpoint of this same run to continue.
    on_sample(step, ema_model): called every ``trainer.sample_every`` steps (periodic grids).
    """
    opts = cfg.trainer
    model, process = system.model, system.process
    latent_size = system.latent_shape[1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    ema = EMA(model, opts.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    if resume is not None:
        tensors, state = resume["tensors"], resume["state"]
        load_module_state(model, tensors, "model")
        load_module_state(ema.shadow, tensors, "ema")
        load_optimizer_tensors(optimizer, tensors, state["optimizer_param_groups"])
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        ema.num_updates, step, elapsed = state["ema_updates"], state["step"], state["elapsed"]
        log.info("resuming at step %d", step)

    def checkpoint(at_step: int) -> Path:
        opt_tensors, groups = optimizer_tensors(optimizer)
        tensors = {**module_tensors(model, "model"), **module_tensors(ema.shadow, "ema"),
                   **module_tensors(system.first_stage, "first_stage"), **opt_tensors,
                   "rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
        state = {"step": at_step, "ema_updates": ema.num_updates, "elapsed": elapsed + time.perf_counter() - start,
                 "optimizer_param_groups": groups, "scale_factor": pool.scale_factor}
        return save_run_checkpoint(Path(run_dir) / "checkpoints", at_step, tensors, state, cfg, opts.keep_checkpoints)

    metrics_log = open(Path(run_dir) / "metrics.jsonl", "a")
    model.train()
    start = time.perf_counter()
    window_start, window_steps = start, 0
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
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the denoiser loss is {loss.item()} at step {step}; the last checkpoint is intact")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optimizer.step()
        ema.update(model)

        done = step + 1
        window_steps += 1
        if done % opts.log_every == 0 or done == opts.steps:
            now = time.perf_counter()
            rate = window_steps / (now - window_start)
            record = {"step": done, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr, "it_s": rate,
                      "img_s": rate * opts.batch_size, "time": elapsed + now - start}
            metrics_log.write(json.dumps(record) + "\n")
            metrics_log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{record['img_s']:.0f}")
            window_start, window_steps = now, 0
        if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < opts.steps:
            checkpoint(done)
        if on_sample is not None and opts.sample_every and done % opts.sample_every == 0 and done < opts.steps:
            on_sample(done, ema.shadow)
    metrics_log.close()
    model.eval()
    folder = checkpoint(opts.steps)
    return {"ema": ema.shadow, "checkpoint": folder, "train_seconds": elapsed + time.perf_counter() - start}
