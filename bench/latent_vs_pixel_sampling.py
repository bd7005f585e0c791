"""Sampling cost of the latent-vs-pixel study's denoisers, without training them (issue 5).

    python bench/latent_vs_pixel_sampling.py [--family full_width] [--factors 1 2 4 8]
    python bench/latent_vs_pixel_sampling.py --quick      # tiny models: a smoke check in seconds

Sampling speed depends on the networks' shapes, not on their weights, so each factor's model is
built exactly as ``bench/latent_vs_pixel.py`` builds it (same first stage, same UNet rule of
``--family``) and sampled at its initial weights: DDIM 50 steps with classifier-free guidance,
decode included, the same conditions for every f; images/s from the median of interleaved repeats,
and FLOPs per image counted. This answers the sampling half of the study's goal for a family at a
few minutes of CPU instead of the training runs (default ``full_width``: the f=4 UNet with
64-channel levels added above 8x8, so every f works at 64 channels at its latent's resolution).
Writes bench/results/latent_vs_pixel_sampling_FAMILY.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_vs_pixel import FAMILIES, images_per_second, measure_throughput, prepare  # noqa: E402
from latent_vs_pixel_report import GOAL_FACTOR, GOAL_RATIO  # noqa: E402
from study_common import machine, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--family", default="full_width", choices=FAMILIES)
    parser.add_argument("--samples", type=int, default=None, help="images per timed sampling (default 90; quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per f (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks that the script works")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default bench/results/...; quick: /tmp)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="first-stage cache (default the run config's)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # What prepare() reads of the study's options; the evaluation grid is unused here.
    args.batch_size, args.eval_samples = (8, 18) if args.quick else (128, 180)
    samples = args.samples or (4 if args.quick else 90)
    repeats = args.repeats or (1 if args.quick else 3)
    runs = Path("/tmp/ldmcore_quick" if args.quick else "/tmp/ldmcore_bench") / "latent_vs_pixel_sampling"
    if args.quick:
        args.cache_dir = args.cache_dir or runs / "cache"
    out = args.out or (runs if args.quick else RESULTS) / f"latent_vs_pixel_sampling_{args.family}.json"

    arms = [prepare(f, args, runs / f"f{f}") for f in sorted(set(args.factors))]
    for arm in arms:
        arm.ema = arm.system.model.eval()  # initial weights: the cost of a step does not depend on them
    measure_throughput(arms, samples, repeats)
    rates = {arm.f: images_per_second(arm) for arm in arms}
    rows = [{"f": arm.f, "latent_shape": list(arm.system.latent_shape), "model_channels": arm.system.model.unet.model_channels,
             "channel_mult": list(arm.cfg.denoiser.channel_mult),
             "parameters": sum(p.numel() for p in arm.system.model.parameters()),
             "gflop_per_image": arm.sample_flops / 1e9, "seconds": arm.sample_seconds, "images_per_second": rates[arm.f],
             "speedup_over_f1": rates[arm.f] / rates[1] if 1 in rates else None} for arm in arms]
    goal = None
    if 1 in rates and GOAL_FACTOR in rates:
        speedup = rates[GOAL_FACTOR] / rates[1]
        goal = {"factor": GOAL_FACTOR, "required": GOAL_RATIO, "speedup": speedup, "met": speedup >= GOAL_RATIO}
    first = arms[0].cfg.sampler
    result = {"family": args.family, "weights": "initial (untrained)", "samples": samples, "repeats": repeats,
              "sampler": first.name, "steps": first.steps, "guidance_scale": first.guidance_scale, "quick": args.quick,
              "machine": machine(), "rows": rows, "sampling_goal": goal}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print("| f | latent | UNet | params | GFLOP / image | images/s | x f=1 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['speedup_over_f1']:.2f}" if r["speedup_over_f1"] else "—"
        print(f"| {r['f']} | {'x'.join(map(str, r['latent_shape']))} | {r['model_channels']} x {r['channel_mult']} | "
              f"{r['parameters'] / 1e6:.2f} M | {r['gflop_per_image']:.2f} | {r['images_per_second']:.2f} | {speedup} |")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
