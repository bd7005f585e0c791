"""Inpainting scores of a trained masked_image run, with and without pasting the known pixels back.

    python bench/masked_image_compositing.py RUN_DIR [--samples 180] [--scales 3 1] [--out results.json] [overrides ...]

For each guidance scale, one set of samples is drawn with compositing off (what the model itself
makes); the composited images are ``ldmcore_finalize`` of those same samples, so the two rows differ
by compositing alone. A row samples the same model with the condition absent (its null
condition), the baseline "without that condition"; the last row scores the first stage's own
reconstructions of the original images, decode(encode(image)): the PSNR outside the mask that a
model decoded through this first stage could reach at best, without compositing. Results are
printed and appended to ``--out`` as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ldmcore import hydra_search
from ldmcore.config import validate
from ldmcore.sampling import finalize, generate
from ldmcore.system import set_threads
from ldmcore.tasks import load_trained, score

NAME = "masked_image"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--samples", type=int, default=180)
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="guidance scales (default: the config's)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sampler.steps=100")
    args = parser.parse_intermixed_args()
    hydra_search.register()
    with initialize_config_module("ldmcore.conf", version_base=None):
        cfg = validate(compose("config", overrides=[f"checkpoint={args.run_dir}", *args.overrides]))
    set_threads(cfg)
    system, dataset, merged = load_trained(cfg)
    indices = torch.randint(len(dataset), (args.samples,), generator=torch.Generator().manual_seed(merged.seed + 1)).tolist()
    batch = dataset.batch(indices)

    rows, seconds = {}, {}
    for scale in args.scales or [merged.sampler.guidance_scale]:
        sampler = OmegaConf.merge(merged.sampler, {"guidance_scale": scale})
        OmegaConf.update(system.condition_options, f"{NAME}.composite", False)  # generate() returns what the model made
        start = time.perf_counter()
        raw = generate(system, system.model, batch, args.samples, sampler, torch.Generator().manual_seed(merged.seed + 2))
        seconds[f"scale_{scale:g}"] = round(time.perf_counter() - start, 1)
        rows[f"scale_{scale:g}/composite_off"] = score(system, raw, batch)
        OmegaConf.update(system.condition_options, f"{NAME}.composite", True)
        rows[f"scale_{scale:g}/composite_on"] = score(system, finalize(system, raw, batch, [NAME]), batch)
    absent = generate(system, system.model, batch, args.samples, merged.sampler, torch.Generator().manual_seed(merged.seed + 2),
                      present=(), weak_model=system.guide)
    rows["condition_absent"] = score(system, absent, batch)
    with torch.no_grad():
        first_stage = system.first_stage
        reconstructed = first_stage.decode(first_stage.encode(torch.as_tensor(batch["image"])).mode()).clamp(-1, 1)
    rows["first_stage_reconstruction"] = score(system, reconstructed, batch)

    result = {"run": str(args.run_dir), "samples": args.samples, "sampler": merged.sampler.name, "steps": merged.sampler.steps,
              "sample_seconds": seconds, **rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
