"""Stage 2: train the denoiser on latents. A plain loop that reads top to bottom; the pieces it
calls (restore, metrics log, non-finite policy) follow it. Resume, signals, non-finite losses and
checkpoint failures are described in docs/reliability.md; data parallelism, bf16 and gradient
accumulation in docs/scaling.md."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ldmcore.conditioning import apply_denoiser_net
from ldmcore.config import ConfigError
from ldmcore.data.base import skipped_items
from ldmcore.data.stream import StreamPosition
from ldmcore.sampling import slice_batch
from ldmcore.training import distributed
from ldmcore.training.checkpoint import load_module_state, module_tensors, save_run_checkpoint, write_text_atomic
from ldmcore.training.divergence import DivergedLossError, DivergenceWatch
from ldmcore.training.ema import EMA
from ldmcore.training.optim import adamw, load_optimizer_tensors, lr_factor, optimizer_tensors
from ldmcore.training.signals import stop_on_signals
from ldmcore.training.streaming import LatentStream

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


class DenoisingLoss(nn.Module):
    """L_LDM per sample of one (micro-)batch: a module so that DistributedDataParallel can wrap its
    forward and all-reduce the gradients of ``model`` during the backward pass."""

    def __init__(self, model: nn.Module, process, latent_size: tuple[int, int], precision: str):
        super().__init__()
        self.model, self.process, self.latent_size = model, process, latent_size
        self.bf16 = precision == "bf16"

    def forward(self, batch: dict, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                keep: dict[str, torch.Tensor]) -> torch.Tensor:
        """z0, noise: (b, C, h, w); t: (b,) long; keep: {condition: (b,) bool} -> loss (b,) float32."""
        with torch.autocast(z0.device.type, dtype=torch.bfloat16, enabled=self.bf16):  # the forward only
            cond = self.model.conditioner(batch, len(t), self.latent_size, keep=keep)
            prediction = apply_denoiser_net(self.model.unet, self.process.q_sample(z0, t, noise), t.float(), cond)
        return self.process.training_loss(prediction.float(), z0, noise, t)


def shard_rows(batch_size: int, accumulation: int, ctx: distributed.Context) -> list[slice]:
    """This process's micro-batches as rows of the global batch: rank r takes the r-th of
    ``world_size`` equal parts, cut into ``accumulation`` equal micro-batches."""
    parts = ctx.world_size * accumulation
    if batch_size % parts:
        raise ConfigError(f"trainer.batch_size={batch_size} (the global batch) must be divisible by the number of "
                          f"processes ({ctx.world_size}) times trainer.grad_accumulation ({accumulation})")
    micro = batch_size // parts
    first = ctx.rank * accumulation * micro
    return [slice(first + i * micro, first + (i + 1) * micro) for i in range(accumulation)]


def train_denoiser(system, dataset, latents: LatentPool | LatentStream, cfg: DictConfig, run_dir: Path,
                   resume: dict | None = None, on_sample=None) -> dict:
    """Train ``system.model`` up to ``cfg.trainer.steps`` steps (docs/reliability.md).

    latents: the ``LatentPool`` of ``dataset`` (``trainer.latents=pool``), or a ``LatentStream``
    (``stream``): each process then reads its own next B / W samples every step and encodes them
    (docs/data.md "Streaming"); everything random is drawn as in pool mode.

    resume: ``{"tensors", "state", "folder"}`` of a checkpoint of this same model; training
    continues exactly where it stopped (weights, EMA, optimizer, every RNG, step, skip count).
    on_sample(step, ema_model): called every ``trainer.sample_every`` steps (periodic grids).
    SIGTERM / SIGINT end the run after the current step with a checkpoint. Returns the EMA copy
    (on the CPU), the last checkpoint, the step reached, the skip count and ``stopped_by``.

    Data parallel under torchrun (docs/scaling.md): every process draws the same global batch of
    ``trainer.batch_size`` samples (indices, t, noise, condition dropout) from the same generator
    and computes only its own rows; DDP averages the gradients, so each update equals a single
    process's on the whole batch. Only rank 0 writes files and calls on_sample.
    """
    opts = cfg.trainer
    ctx = distributed.current()
    rows = shard_rows(opts.batch_size, opts.grad_accumulation, ctx)  # this rank's micro-batches
    device = distributed.training_device(opts.device, ctx)
    run_dir = Path(run_dir)
    model, process = system.model.to(device), system.process
    objective = DenoisingLoss(model, process, system.latent_shape[1:], opts.precision)
    if ctx.enabled:  # DDP also broadcasts rank 0's weights now, so every rank starts from them
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = adamw(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    ema = EMA(model, opts.ema_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order, t, noise, condition dropout: same on every rank
    if ctx.rank > 0:  # torch's global generator (dropout layers): a stream of its own per rank
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)
    streaming = isinstance(latents, LatentStream)
    latent_shape = (opts.batch_size, *system.latent_shape)  # (B, C, h, w)
    step, elapsed, skipped, last_checkpoint = 0, 0.0, 0, None
    # The EMA at an early step, kept as the weak model of autoguidance (ldmcore/diffusion/autoguidance.py).
    snapshot_step = round(opts.guide_snapshot * opts.steps) if opts.guide_snapshot > 0 else None
    guide: dict[str, torch.Tensor] | None = None
    if resume is not None:
        guide = {k[len("guide."):]: v for k, v in resume["tensors"].items() if k.startswith("guide.")} or None
        state = restore(resume, model, ema, optimizer, generator, ctx.rank)
        step, elapsed, skipped, last_checkpoint = state["step"], state["elapsed"], state.get("skipped_steps", 0), resume.get("folder")
        if step > opts.steps:
            raise ConfigError(f"trainer.steps={opts.steps} is below the checkpoint's step {step}; raise it to train further")
        log.info("resuming at step %d from %s", step, last_checkpoint)
    watch = DivergenceWatch(opts.divergence_factor, opts.divergence_window, opts.divergence_patience)
    position = stream_position(resume, ctx, "stream" if streaming else "pool")  # this rank's, from the checkpoint
    reader = latents.open(ctx.rank, ctx.world_size, device, position) if streaming else None  # stream mode's data
    first_row = rows[0].start  # this rank's first row of the global batch

    def checkpoint(at_step: int) -> Path:
        """Called on every rank (the RNG states are gathered); rank 0 writes."""
        rng_states = distributed.gather_object(torch.get_rng_state(), ctx)
        distributed.check_in_sync({"model": model, "ema": ema.shadow}, ctx)
        opt_tensors, groups = optimizer_tensors(optimizer)
        tensors = {**module_tensors(model, "model"), **module_tensors(ema.shadow, "ema"),
                   **module_tensors(system.first_stage, "first_stage"), **opt_tensors,
                   **{f"guide.{k}": v for k, v in (guide or {}).items()},
                   "rng.generator": generator.get_state(), "rng.torch": rng_states[0],
                   **{f"rng.torch.rank{r}": s for r, s in enumerate(rng_states) if r > 0}}
        state = {"step": at_step, "ema_updates": ema.num_updates, "skipped_steps": skipped,
                 "elapsed": elapsed + time.perf_counter() - start, "world_size": ctx.world_size,
                 "optimizer_param_groups": groups, "scale_factor": latents.scale_factor}
        if streaming:  # what each rank has read, so that a resume reads on from there
            state.update(latents="stream", stream=[p.as_dict() for p in distributed.gather_object(reader.position, ctx)])
        return distributed.on_main(
            lambda: save_run_checkpoint(run_dir / "checkpoints", at_step, tensors, state, cfg, opts.keep_checkpoints), ctx)

    model.train()
    start = time.perf_counter()
    window_start, window_steps, done, stopping = start, 0, step, False
    metrics_file = open_metrics_log(run_dir / "metrics.jsonl", step) if ctx.is_main else nullcontext()
    with metrics_file as metrics_log, stop_on_signals() as stop:
        bar = tqdm(range(step, opts.steps), initial=step, total=opts.steps, desc="denoiser", dynamic_ncols=True,
                   mininterval=2.0, disable=not ctx.is_main)
        for step in bar:
            lr = opts.lr * lr_factor(step, opts.steps, opts.warmup_steps, opts.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The global batch's randomness, drawn whole on every rank; each rank then takes its rows.
            if streaming:  # this rank's own next B / W samples; the posterior noise of the whole batch
                own = reader.next_batch(opts.batch_size // ctx.world_size)
                posterior_noise = torch.randn(latent_shape, generator=generator)  # (B, C, h, w)
            else:
                indices = torch.randint(len(dataset), (opts.batch_size,), generator=generator)
                z0 = latents.sample(indices, generator)  # (B, C, h, w), unit variance
            t = process.sample_t(opts.batch_size, generator=generator)
            noise = torch.randn(latent_shape, generator=generator)
            keep = model.conditioner.draw_keep(opts.batch_size, generator)  # {condition: (B,) bool}
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for i, part in enumerate(rows):  # micro-batches; DDP all-reduces after the last one only
                last = i == len(rows) - 1
                with objective.no_sync() if ctx.enabled and not last else nullcontext():
                    if streaming:  # the micro-batch's rows of this rank's own samples, encoded now
                        batch = slice_batch(own, part.start - first_row, part.stop - first_row)
                        z = reader.latents(batch["image"], posterior_noise[part])
                    else:  # the items' condition keys; a model without conditions reads none
                        batch = dataset.batch(indices[part].tolist()) if model.conditioner.names else {}
                        z = z0[part]
                    loss = objective(batch, z.to(device), t[part].to(device), noise[part].to(device),
                                     {name: k[part] for name, k in keep.items()}).mean() / len(rows)
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip))
            # One small all-reduce: the global mean loss, and whether any rank was asked to stop
            # (a signal may reach the ranks at different steps; they must all stop at the same one).
            totals = distributed.all_reduce_sum(torch.tensor([loss_sum.item(), float(stop.requested)], dtype=torch.float64), ctx)
            loss_value, stopping = float(totals[0]) / ctx.world_size, bool(totals[1] > 0)
            done = step + 1
            if math.isfinite(loss_value) and math.isfinite(grad_norm):  # the same on every rank
                optimizer.step()
                ema.update(model)
                if done == snapshot_step:
                    guide = {k: v.detach().cpu().clone() for k, v in ema.shadow.state_dict().items()}
            else:  # no update: weights, optimizer state and EMA stay as they were
                skipped += 1
                refuse_nonfinite(loss_value, grad_norm, done, skipped, opts, last_checkpoint)
            if opts.on_divergence != "off" and (diverged := watch.update(done, loss_value)):  # the same on every rank
                refuse_diverged(diverged, opts, last_checkpoint)

            window_steps += 1
            if metrics_log is not None and (done % opts.log_every == 0 or done == opts.steps or stopping):
                now = time.perf_counter()
                rate = window_steps / (now - window_start)
                record = {"step": done, "loss": finite_or_none(loss_value), "grad_norm": finite_or_none(grad_norm),
                          "lr": lr, "skipped": skipped, "data_skipped": skipped_items(dataset), "it_s": rate, "img_s": rate * opts.batch_size,
                          "time": elapsed + now - start}
                metrics_log.write(json.dumps(record) + "\n")
                metrics_log.flush()
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{record['img_s']:.0f}")
                window_start, window_steps = now, 0
            if stopping:
                break
            if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < opts.steps:
                last_checkpoint = checkpoint(done)
            if (ctx.is_main and on_sample is not None and opts.sample_every and done % opts.sample_every == 0
                    and done < opts.steps):
                with torch.random.fork_rng(devices=[]):  # a grid must not move the training's RNG
                    on_sample(done, ema.shadow if device.type == "cpu" else copy.deepcopy(ema.shadow).cpu())
        bar.close()
        model.eval()
        folder = checkpoint(done)  # still inside: a signal now cannot cut the write short
    model.cpu()  # what follows (grids, sampling) runs on the CPU
    ema.shadow.cpu()
    stopped_by = stop.name or ("a signal to another rank" if stopping else None)
    if stopped_by and ctx.is_main:
        log.warning("stopped by %s at step %d; checkpoint %s (continue with checkpoint=%s)", stopped_by, done, folder, run_dir)
    return {"ema": ema.shadow, "guide": guide, "checkpoint": folder, "step": done, "skipped_steps": skipped,
            "stopped_by": stopped_by, "train_seconds": elapsed + time.perf_counter() - start}


# --- the pieces of the loop --------------------------------------------------------------------


def restore(resume: dict, model, ema: EMA, optimizer, generator: torch.Generator, rank: int = 0) -> dict:
    """Load a checkpoint of this run into the training objects; returns its state.json."""
    tensors, state = resume["tensors"], resume["state"]
    load_module_state(model, tensors, "model")
    load_module_state(ema.shadow, tensors, "ema")
    load_optimizer_tensors(optimizer, tensors, state["optimizer_param_groups"])
    generator.set_state(tensors["rng.generator"])
    # Dropout layers draw from the global generator, one stream per rank (rank 0's is "rng.torch").
    own = "rng.torch" if rank == 0 else f"rng.torch.rank{rank}"
    if own in tensors:
        torch.set_rng_state(tensors[own])
    else:
        log.warning("the checkpoint was written by %s process(es): rank %d keeps a fresh global RNG stream "
                    "(only dropout layers use it; the data stream is restored exactly)", state.get("world_size", 1), rank)
    ema.num_updates = state["ema_updates"]  # the EMA warm-up depends on it
    return state


def stream_position(resume: dict | None, ctx: distributed.Context, latents: str) -> StreamPosition | None:
    """This rank's position in the data stream from a checkpoint's state (None: from the start, or
    pool mode). A checkpoint of the other ``trainer.latents`` mode, or one written by another
    number of streaming processes (each read its own shards), cannot be continued."""
    if resume is None:
        return None
    state, where = resume["state"], f"checkpoint {resume.get('folder')}"
    if state.get("latents", "pool") != latents:
        raise ConfigError(f"{where} was trained with trainer.latents={state.get('latents', 'pool')}; resume it with the same")
    if latents == "pool":
        return None
    positions = state["stream"]
    if len(positions) != ctx.world_size:
        raise ConfigError(f"{where} was written by {len(positions)} streaming process(es), each reading its own shards; "
                          f"resume it with {len(positions)} (this run has {ctx.world_size})")
    return StreamPosition.from_dict(positions[ctx.rank], where)


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


def refuse_diverged(message: str, opts, last_checkpoint) -> None:
    """Log a diverged loss (``trainer.on_divergence=warn``) or raise ``DivergedLossError`` (``stop``)."""
    if opts.on_divergence == "warn":
        log.warning("%s; training goes on (trainer.on_divergence=warn)", message)
        return
    kept = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint had been written"
    raise DivergedLossError(f"{message}; training stopped (trainer.on_divergence=stop); {kept}. A lower trainer.lr "
                            f"is the usual fix (trainer.on_divergence=warn or off to go on regardless)")


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
