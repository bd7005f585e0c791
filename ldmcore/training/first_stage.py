"""Stage 1: train (or reuse) the autoencoder, then measure it before anything is built on it.

A first stage caps everything downstream, and one was seen to collapse on this kind of machine
(PSNR 13.6 dB where another seed reached 29 dB), so after training or loading, the run measures
reconstructions (PSNR and, where the data has an exact reader, the read-back rate) and refuses
to go on below the configured gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from tqdm import tqdm

from ldmcore.autoencoder.losses import reconstruction_loss
from ldmcore.config import ConfigError, FirstStageTrainConfig
from ldmcore.data.stream import RankStream, head, streams
from ldmcore.training.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    load_module_state,
    module_tensors,
    save_checkpoint,
)
from ldmcore.training.optim import adamw, lr_factor
from ldmcore.training.pretrained import load_pretrained

log = logging.getLogger(__name__)


class FirstStageRejected(RuntimeError):
    """The first stage's reconstructions are below the gate: no denoiser is trained on it."""


def cache_key(cfg: DictConfig, streamed: bool = False) -> str:
    """Same data config + autoencoder config + seed -> same trained first stage. ``streamed``: it
    was trained on the data read as a stream (another sequence of batches than drawn by index)."""
    spec = {"data": cfg.data, "model": cfg.autoencoder.model, "train": cfg.autoencoder.train, "seed": cfg.seed}
    if streamed:
        spec["streamed"] = True
    text = json.dumps(OmegaConf.to_container(OmegaConf.create(spec), resolve=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The option that weighs each regularizer term a first stage's ``reconstruct`` returns.
REGULARIZER_WEIGHTS = {"kl": "kl_weight", "codebook": "codebook_weight"}


def train_first_stage(autoencoder, dataset, options: DictConfig, seed: int) -> list[dict]:
    """Train with the paper's first-stage loss: reconstruction (edge-weighted L1 + L2)
    + perceptual_weight · LPIPS (when ``lpips_weights`` names a file) + the first stage's
    regularizer (kl_weight · KL, or codebook_weight · the VQ loss) + from ``discriminator_start``
    on, a patch discriminator with adaptive weight (when discriminator_weight > 0).

    options: ``autoencoder.train`` (missing options take FirstStageTrainConfig's defaults).
    dataset: indexable (batches drawn at random), or a streaming source, read in order as one
    process of one (``ldmcore.data.stream``).
    Returns the history, every 50 steps and at the last: loss terms and the first stage's
    metrics (e.g. codebook perplexity and usage)."""
    options = OmegaConf.merge(OmegaConf.structured(FirstStageTrainConfig), options)
    generator = torch.Generator().manual_seed(seed)
    optimizer = adamw(autoencoder.parameters(), lr=options.lr)
    perceptual = _perceptual(options)
    discriminator = _discriminator(options)
    history = []
    autoencoder.train()
    start = time.perf_counter()
    images = image_batches(dataset, options.batch_size, generator, seed)
    bar = tqdm(range(options.steps), desc="first stage", dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = options.lr * lr_factor(step, options.steps, options.warmup_steps, "cosine")
        x = next(images)  # (B, 3, H, W)
        # latent_noise: robustness of the decoder to slightly-off latents (CALIBRATION.md)
        out = autoencoder.reconstruct(x, generator=generator, latent_noise=options.latent_noise)
        rec = reconstruction_loss(x, out.image, edge_strength=options.edge_strength)
        terms = {"rec": rec.item()}
        nll = rec
        if perceptual is not None:
            p_loss = perceptual(x, out.image).mean()
            nll = nll + options.perceptual_weight * p_loss
            terms["perceptual"] = p_loss.item()
        loss = nll + sum(_regularizer_weight(options, name) * value for name, value in out.losses.items())
        adversarial = discriminator is not None and step >= options.discriminator_start
        if adversarial:
            loss = loss + discriminator.generator_loss(nll, out.image, autoencoder)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), options.grad_clip)
        optimizer.step()
        if adversarial:
            terms["discriminator"] = discriminator.step(x, out.image.detach())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"first-stage loss is {loss.item()} at step {step}")
        if step % 50 == 0 or step == options.steps - 1:
            history.append({"step": step, "loss": loss.item(), **terms, **out.metrics, "time": time.perf_counter() - start})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    autoencoder.eval()
    return history


def image_batches(dataset, batch_size: int, generator: torch.Generator, seed: int) -> Iterator[torch.Tensor]:
    """Training images (B, 3, H, W) in [-1, 1], batch after batch: drawn by index from
    ``generator`` (one draw per batch, when it is asked for), or a streaming source's samples in
    the order of its epochs (``seed``), as one process reads them."""
    if streams(dataset):
        stream = RankStream(dataset, seed)
        while True:
            yield stream.next_batch(batch_size)["image"]
    while True:
        yield dataset.batch(torch.randint(len(dataset), (batch_size,), generator=generator).tolist())["image"]


def _regularizer_weight(options: DictConfig, name: str) -> float:
    if name not in REGULARIZER_WEIGHTS:
        known = ", ".join(REGULARIZER_WEIGHTS)
        raise KeyError(f"the first stage returned a loss term {name!r} that no option weighs (known: {known})")
    return options[REGULARIZER_WEIGHTS[name]]


def _perceptual(options: DictConfig):
    if options.lpips_weights is None:
        log.info("no LPIPS weights given: reconstruction loss only")
        return None
    from ldmcore.autoencoder.perceptual import LPIPS

    try:
        return LPIPS.from_file(options.lpips_weights)
    except (FileNotFoundError, CheckpointError) as error:
        raise ConfigError(f"autoencoder.train.lpips_weights: {error}") from None


def _discriminator(options: DictConfig):
    if options.discriminator_weight <= 0:
        return None
    from ldmcore.autoencoder.adversarial import AdversarialLoss

    return AdversarialLoss(weight=options.discriminator_weight, lr=options.lr)


@torch.no_grad()
def measure(autoencoder, dataset, reader, images: int, seed: int = 1234) -> dict:
    """PSNR of posterior-mode reconstructions of ``images`` images (drawn at random, or a
    streaming source's first ones) and, with an exact reader, the fraction read back as the same
    objects (same labels, boxes within 1 px) as the originals."""
    if streams(dataset):
        x = head(dataset, images)["image"]
    else:
        generator = torch.Generator().manual_seed(seed)
        x = dataset.batch(torch.randperm(len(dataset), generator=generator)[:images].tolist())["image"]
    recon = torch.cat([autoencoder.decode(autoencoder.encode(part).mode()) for part in x.split(128)]).clamp(-1, 1)
    mse = ((x - recon) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    metrics = {"psnr": float((10 * torch.log10(4.0 / mse)).mean()), "images": len(x)}
    if reader is not None:
        same = [_same_objects(a, b) for a, b in zip(reader.read_batch(x), reader.read_batch(recon))]
        metrics["readback"] = sum(same) / len(same)
    return metrics


def _same_objects(original, reconstructed) -> bool:
    if not all(o.valid for o in reconstructed) or len(original) != len(reconstructed):
        return False
    return all(
        a.label == b.label and max(abs(p - q) for p, q in zip(a.box, b.box)) <= 1 for a, b in zip(original, reconstructed)
    )


def obtain_first_stage(cfg: DictConfig, dataset, reader, run_dir: Path):
    """Load ``autoencoder.pretrained`` (ldmcore's own, diffusers or CompVis / SD weights, see
    ldmcore/training/pretrained.py), reuse a cached first stage of the same config, or train one
    (and cache it); a first stage without parameters is used as built. Then measure it, record
    the numbers and enforce the gate."""
    autoencoder = instantiate(cfg.autoencoder.model)
    record: dict = {}
    if next(autoencoder.parameters(), None) is None:  # e.g. the pixel-space identity: nothing to train, load or cache
        if cfg.autoencoder.pretrained:
            raise ConfigError(f"autoencoder.pretrained is set, but autoencoder.model ({cfg.autoencoder.model._target_}) "
                              "has no weights to load: leave it null, or choose a first stage with weights")
        record["source"] = f"{cfg.autoencoder.model._target_} (no parameters)"
    elif cfg.autoencoder.pretrained:
        record = load_pretrained(autoencoder, cfg.autoencoder)
    else:
        folder = Path(cfg.cache_dir).expanduser() / "first_stage" / cache_key(cfg, streams(dataset))
        if (folder / MODEL_FILE).is_file():
            load_module_state(autoencoder, load_file(str(folder / MODEL_FILE)), "first_stage", source=str(folder))
            record = {"source": str(folder), "reused": True}
            log.info("reusing the first stage trained for this config: %s", folder)
        else:
            start = time.perf_counter()
            history = train_first_stage(autoencoder, dataset, cfg.autoencoder.train, cfg.seed)
            record = {"source": str(folder), "reused": False, "train_seconds": time.perf_counter() - start, "history": history}
            save_checkpoint(folder, module_tensors(autoencoder, "first_stage"), {"kind": "first_stage"}, cfg.autoencoder)
    autoencoder.eval().requires_grad_(False)
    start = time.perf_counter()
    record["metrics"] = measure(autoencoder, dataset, reader, cfg.autoencoder.gate.images)
    record["metrics"]["measure_seconds"] = time.perf_counter() - start
    (Path(run_dir) / "first_stage.json").write_text(json.dumps(record, indent=1))
    gate, metrics = cfg.autoencoder.gate, record["metrics"]
    log.info("first stage: PSNR %.2f dB, read-back %s", metrics["psnr"], metrics.get("readback"))
    failures = []
    if metrics["psnr"] < gate.min_psnr:
        failures.append(f"PSNR {metrics['psnr']:.2f} dB < autoencoder.gate.min_psnr={gate.min_psnr}")
    if "readback" in metrics and metrics["readback"] < gate.min_readback:
        failures.append(f"read-back {metrics['readback']:.3f} < autoencoder.gate.min_readback={gate.min_readback}")
    if failures:
        raise FirstStageRejected(
            f"the first stage ({record['source']}) is below the gate: {'; '.join(failures)}. "
            "No denoiser is trained on it: train it longer or with another seed, or lower the gate on purpose."
        )
    return autoencoder, record

