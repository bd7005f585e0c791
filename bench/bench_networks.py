"""Training throughput (img/s: forward + backward + AdamW step) of the default denoiser and
first-stage configs on the CPU, fp32.

    python bench/bench_networks.py [--threads 2] [--steps 12] [--json bench/results/networks.json]

Prints, per network, its parameter count and img/s from the median and from the fastest step
(the fastest is the better estimate of the machine when other processes share the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ldmcore.autoencoder import KLAutoencoder, reconstruction_loss
from ldmcore.denoiser import UNet


def denoiser_case(batch: int):
    # The default denoiser: 8×8×4 latents (f=4 on 32 px), channels 64/128, attention at 4×4 only,
    # one cross-attention token of width 256.
    model = UNet(4, 4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                 num_heads=4, context_dim=256)
    z, t, context = torch.randn(batch, 4, 8, 8), torch.rand(batch) * 999, torch.randn(batch, 1, 256)
    noise = torch.randn_like(z)
    return model, lambda: (model(z, t, context) - noise).pow(2).mean()


def autoencoder_case(batch: int):
    # The tuned prototype's first stage (CALIBRATION.md): 16 → 64 → 128 channels, f=4, 4 latent
    # channels, 1 ResBlock per encoder level, 2 per decoder level.
    model = KLAutoencoder(3, base_channels=16, channel_mult=(1, 4, 8), encoder_res_blocks=1, decoder_res_blocks=2,
                          latent_channels=4)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1

    def loss():
        recon, posterior = model(x)
        return reconstruction_loss(x, recon) + 1e-4 * posterior.kl().mean()

    return model, loss


def measure(model: torch.nn.Module, loss_fn, batch: int, steps: int, warmup: int = 3) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "img_per_s_median": batch / statistics.median(times),
        "img_per_s_best": batch / min(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = {}
    for name, case, batch in (("denoiser", denoiser_case, 128), ("autoencoder", autoencoder_case, 64)):
        model, loss_fn = case(batch)
        results[name] = measure(model, loss_fn, batch, args.steps)
        r = results[name]
        print(f"{name:12s} {r['params'] / 1e6:5.2f} M params  batch {batch:3d}  "
              f"{r['img_per_s_median']:6.1f} img/s (median)  {r['img_per_s_best']:6.1f} img/s (best step)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine()}
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
