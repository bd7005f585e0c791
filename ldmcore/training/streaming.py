"""Stage 2 on a stream (``trainer.latents=stream``, docs/data.md "Streaming"): no latent pool.
Each process reads its own part of the data (``ldmcore.data.stream.RankStream``) and encodes each
batch with the frozen first stage as it comes; only the scale factor is fixed up front, from the
first ``trainer.scale_batches`` global batches of the data, on rank 0, and kept in state.json."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ldmcore.config import ConfigError
from ldmcore.data.stream import RankStream, StreamPosition, as_stream, head_items


@torch.no_grad()
def estimate_scale_factor(first_stage: nn.Module, source, batches: int, batch_size: int, seed: int) -> float:
    """1 / std of posterior samples of the first ``batches`` batches of ``batch_size`` samples of
    ``source`` (``trainer.scale_batches``; in the source's own order, whatever the number of
    processes): unit-variance latents (paper Sec. 3.1), the unbiased std over every element, as
    ``LatentPool.encode`` computes it over its pool."""
    if batches < 1:
        raise ConfigError(f"trainer.scale_batches must be >= 1 (batches of trainer.batch_size samples), got {batches}")
    stream = as_stream(source)
    items = head_items(stream, batches * batch_size)
    if len(items) < 2:
        raise ConfigError(f"trainer.scale_batches: the data gave {len(items)} usable sample(s); the scale factor needs at least 2")
    generator = torch.Generator().manual_seed(seed)
    count, total, squares = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        posterior = first_stage.encode(stream.collate(items[start:start + batch_size])["image"])
        sample = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)).double()
        count, total, squares = count + sample.numel(), total + sample.sum(), squares + sample.square().sum()
    variance = (squares - total * total / count) / (count - 1)
    return float(1.0 / variance.sqrt())


class LatentStream:
    """What stage 2 trains on in stream mode (the stand-in for ``LatentPool``): the data source,
    the frozen first stage and the scale factor; ``open`` gives one process its reader."""

    def __init__(self, first_stage: nn.Module, source, scale_factor: float, seed: int):
        self.first_stage, self.source = first_stage, source
        self.scale_factor, self.seed = float(scale_factor), seed

    def open(self, rank: int, world_size: int, device: torch.device, position: StreamPosition | None = None) -> "StreamReader":
        return StreamReader(self, RankStream(self.source, self.seed, rank, world_size, position), device)


class StreamReader:
    """One process's batches and their latents. The first stage encodes on the training device
    (a copy there when that is not the CPU, where the run keeps its own for sampling)."""

    def __init__(self, latents: LatentStream, stream: RankStream, device: torch.device):
        self.stream, self.scale_factor = stream, latents.scale_factor
        self.first_stage = latents.first_stage if device.type == "cpu" else copy.deepcopy(latents.first_stage).to(device)
        self.device = device

    @property
    def position(self) -> StreamPosition:
        return self.stream.position

    def next_batch(self, n: int) -> dict:
        """This process's next ``n`` samples (batch keys as the data source gives them)."""
        return self.stream.next_batch(n)

    @torch.no_grad()
    def latents(self, images: torch.Tensor, posterior_noise: torch.Tensor) -> torch.Tensor:
        """images (b, 3, H, W) in [-1, 1], posterior_noise (b, C, h, w) -> z0 (b, C, h, w) on the
        device: a posterior sample times the scale factor, unit variance."""
        posterior = self.first_stage.encode(images.to(self.device))
        return (posterior.mean + posterior.std * posterior_noise.to(self.device)) * self.scale_factor
