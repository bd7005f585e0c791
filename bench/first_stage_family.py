"""Train one first-stage config (kl_f4, kl_f8, kl_f16, vq_f4, ...) with its own train options on
the shapes world; record PSNR / read-back, the codebook's use (VQ), and tiled against untiled
reconstructions of 64-px images (ldmcore/autoencoder/tiling.py).

    python bench/first_stage_family.py vq_f4 autoencoder.model.restart_threshold=0

The first argument names the autoencoder config; the others are Hydra overrides. The result is
appended to bench/results/first_stage_family.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from ldmcore import hydra_search
from ldmcore.config import validate
from ldmcore.data.shapes import ShapesWorld
from ldmcore.training.first_stage import measure, train_first_stage

RESULTS = Path(__file__).parent / "results" / "first_stage_family.jsonl"
TILINGS = ((32, 16), (48, 32))  # (tile, overlap) in image pixels, multiples of f up to 16


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) over the batch of images in [-1, 1]."""
    return float((10 * torch.log10(4.0 / ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10))).mean())


@torch.no_grad()
def tiling_report(autoencoder, images: torch.Tensor) -> dict:
    f = autoencoder.downsample_factor
    untiled = autoencoder.decode(autoencoder.encode(images).mode()).clamp(-1, 1)
    report = {"untiled_psnr": psnr(untiled, images)}
    for tile, overlap in TILINGS:
        z = autoencoder.encode_tiled(images, tile, overlap).mode()
        tiled = autoencoder.decode_tiled(z, tile // f, overlap // f).clamp(-1, 1)
        report[f"tile{tile}_overlap{overlap}"] = {"psnr": psnr(tiled, images), "psnr_vs_untiled": psnr(tiled, untiled)}
    return report


def main(name: str, overrides: list[str]) -> dict:
    hydra_search.register()
    with initialize_config_module("ldmcore.conf", version_base=None):
        cfg = validate(compose("config", overrides=[f"autoencoder={name}", *overrides]))
    torch.manual_seed(cfg.seed)
    dataset = instantiate(cfg.data)
    autoencoder = instantiate(cfg.autoencoder.model)
    start = time.perf_counter()
    history = train_first_stage(autoencoder, dataset, cfg.autoencoder.train, cfg.seed)
    seconds = time.perf_counter() - start
    autoencoder.eval().requires_grad_(False)
    big = ShapesWorld(resolution=64, size=64)
    result = {"autoencoder": name, "overrides": overrides, "train_seconds": round(seconds, 1),
              "torch_threads": torch.get_num_threads(), **measure(autoencoder, dataset, dataset.reader, 512),
              "tiling_64px": tiling_report(autoencoder, big.batch(list(range(64)))["image"]), "last": history[-1]}
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
