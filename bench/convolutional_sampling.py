"""Convolutional sampling beyond the training size (paper Sec. 4.3.2) of a trained model whose
conditions are all spatial (``semantic_map``, ``low_res``, ``masked_image``): the same model, a
latent ``--scale`` times wider and taller, conditions given at the larger size.

    python bench/convolutional_sampling.py RUN [--scale 2] [--samples 90] [--out FILE] [overrides ...]

Two kinds of larger condition, both drawn from the run's own data source:
- ``tiled``: scale x scale training-size scenes side by side. Objects keep the size the model was
  trained on; the canvas holds scale**2 times as many.
- ``scaled``: scenes drawn at scale x the resolution. Objects are scale times larger than any the
  model saw, so this also asks the denoiser to fill shapes larger than its training ones.
The same set at the training size is sampled first, as the reference. Every set is scored by the
model's plugins (``ldmcore_score``) against its own conditions; a grid of each is written beside
the JSON (the condition's picture left of each sample), and the result is appended as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from einops import rearrange

from study_common import compose_run

from ldmcore.config import validate
from ldmcore.sampling import generate
from ldmcore.system import build, set_threads
from ldmcore.tasks import condition_pictures, load_trained, score
from ldmcore.visualize import save_grid

RESULTS = Path(__file__).resolve().parent / "results" / "convolutional_sampling.jsonl"
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def tile(batch: dict, scale: int) -> dict:
    """Stitch groups of scale**2 consecutive items into one, row by row: every tensor value
    (B, ..., H, W) becomes (B / scale**2, ..., scale H, scale W). Keys that are not tensors (captions,
    boxes) have no spatial layout to stitch; a model that reads them is refused before this."""
    return {key: rearrange(value, "(b y x) ... h w -> b ... (y h) (x w)", y=scale, x=scale)
            for key, value in batch.items() if torch.is_tensor(value) and value.dim() >= 3}


def require_spatial_conditions(system) -> None:
    """Refuse a model with a token condition: its context does not grow with the canvas."""
    encoders = system.model.conditioner.encoders
    if not encoders:
        raise SystemExit("this model has no condition: convolutional sampling here compares conditions at two sizes")
    tokens = [name for name, encoder in encoders.items() if "crossattn" in encoder.outputs]
    if tokens:
        raise SystemExit(f"conditions {tokens} inject tokens, which do not grow with the canvas; "
                         f"this benchmark takes models whose conditions are all spatial (concat)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--samples", type=int, default=90, help="images of each kind, at the larger size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--images", type=Path, default=IMAGES, help="folder of the grids")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sampler.steps=100")
    args = parser.parse_intermixed_args()
    cfg = validate(compose_run([f"checkpoint={args.run_dir}", *args.overrides]))
    set_threads(cfg)
    system, dataset, merged = load_trained(cfg)
    require_spatial_conditions(system)
    c, h, w = system.latent_shape
    small_data, n, s = system.data, args.samples, args.scale
    generator = torch.Generator().manual_seed(merged.seed + 1)
    indices = torch.randint(len(dataset), (n * s * s,), generator=generator).tolist()
    small = dataset.batch(indices)
    # The same source drawn at the larger size (every option of the run's data section but the resolution).
    big_source = build("data", merged.data, resolution=small_data.resolution * s)
    sets = {
        "training_size": ({k: v[:n] for k, v in small.items()}, 1),
        "tiled": (tile(small, s), s),
        "scaled": (big_source.batch(indices[:n]), s),
    }
    result = {"run": str(args.run_dir), "scale": s, "samples": n, "sampler": merged.sampler.name,
              "steps": merged.sampler.steps, "guidance_scale": merged.sampler.guidance_scale,
              "resolution": small_data.resolution, "date": time.strftime("%Y-%m-%d %H:%M")}
    name = "_".join(system.conditions)
    for kind, (batch, factor) in sets.items():
        system.data = dataclasses.replace(small_data, resolution=small_data.resolution * factor)
        start = time.perf_counter()
        images = generate(system, system.model, batch, n, merged.sampler, torch.Generator().manual_seed(merged.seed + 2),
                          latent_shape=(c, h * factor, w * factor), weak_model=system.guide)
        seconds = time.perf_counter() - start
        result[kind] = {"size": small_data.resolution * factor, "sample_seconds": round(seconds, 1),
                        **score(system, images, batch)}
        shown = min(n, 12)
        pictures = condition_pictures(system, {k: v[:shown] for k, v in batch.items()})  # each (shown, 3, H, W)
        tiles = torch.stack([*pictures, images[:shown]], dim=1).flatten(0, 1)
        args.images.mkdir(parents=True, exist_ok=True)
        save_grid(tiles, args.images / f"{name}_x{factor}_{kind}.png", columns=4 * (1 + len(pictures)))
    system.data = small_data
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
