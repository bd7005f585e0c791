"""Why a layout or text model misses: each target of a run's evaluation grid, sorted by how it failed.

    python bench/failure_breakdown.py RUN_DIR            # RUN_DIR/samples.png against its grid's conditions
    python bench/failure_breakdown.py RUN_DIR --grid samples/step_0000800.png

The grid's conditions are drawn again exactly as the run drew them (``ldmcore.tasks.grid_batch``, from
the run's saved config and seed) and its samples are read back from the PNG (lossless; each tile is the
sample upscaled 2x, nearest), so nothing is sampled again. For ``layout``, every target box gets one
outcome: no read-back object at IoU >= 0.5 (placement or size missed), an unreadable one there, or a
valid one there with its colour and shape right or wrong. For ``text``, every caption gets one: an
object unreadable, the wrong number of objects, the right objects in the wrong order, or which of
colours and shapes are wrong. Prints a table and writes it as JSON beside the grid (``*.failures.json``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldmcore.config import validate
from ldmcore.data.stream import data_config
from ldmcore.evaluation.shapes_reader import box_iou
from ldmcore.system import build, build_system
from ldmcore.tasks import condition_pictures, grid_batch

SCALE, PAD = 2, 2  # ldmcore.visualize.save_grid's defaults


def grid_samples(path: Path, n: int, columns: int, tiles_per_sample: int, resolution: int) -> torch.Tensor:
    """The n samples of a saved grid, (n, 3, R, R) in [-1, 1]; each sample is the last of its tiles."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    side = resolution * SCALE
    expected = (n * tiles_per_sample // columns) * (side + PAD) + PAD
    if grid.shape[0] != expected:
        raise SystemExit(f"{path}: {grid.shape[0]} px high, a grid of {n} samples at {resolution} px is {expected} px")
    tiles = []
    for i in range(n):
        r, c = divmod(i * tiles_per_sample + tiles_per_sample - 1, columns)
        y, x = PAD + r * (side + PAD), PAD + c * (side + PAD)
        tiles.append(grid[y:y + side:SCALE, x:x + side:SCALE])
    return torch.tensor(np.stack(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1


def run_config(run: Path) -> Path:
    """The run's config: Hydra's copy, else the one saved with its last checkpoint."""
    saved = sorted((run / "checkpoints").glob("step_*/config.yaml"))
    path = run / ".hydra" / "config.yaml" if (run / ".hydra" / "config.yaml").is_file() else (saved[-1] if saved else None)
    if path is None:
        raise SystemExit(f"{run}: no .hydra/config.yaml and no checkpoint: not a run folder")
    return path


def layout_outcomes(objects_per_image, batch, names, resolution) -> Counter:
    outcomes = Counter()
    for objects, boxes, labels in zip(objects_per_image, batch["boxes"], batch["box_labels"]):
        for box, label in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(labels).reshape(-1)):
            target = [float(v) * resolution for v in box]
            color, shape = names[int(label)].split()
            iou, found = max(((box_iou(o.box, target), o) for o in objects), key=lambda p: p[0], default=(0.0, None))
            if found is None or iou < 0.5:
                outcomes["no object at IoU >= 0.5"] += 1
            elif not found.valid:
                outcomes["an unreadable object there"] += 1
            else:
                outcomes[f"an object there: colour {'right' if found.color == color else 'wrong'}, "
                         f"shape {'right' if found.shape == shape else 'wrong'}"] += 1
    return outcomes


def text_outcomes(objects_per_image, batch) -> Counter:
    outcomes = Counter()
    for objects, caption in zip(objects_per_image, batch["caption"]):
        wanted = [w.split(" ", 1)[1] for w in caption.replace(" and ", ", ").split(", ")]  # "a red circle" -> "red circle"
        named = f"{len(wanted)} named: "
        got = [f"{o.color} {o.shape}" for o in objects if o.valid]
        if len(got) != len(objects):
            outcomes[named + "an object unreadable"] += 1
        elif len(got) != len(wanted):
            outcomes[named + f"{len(got)} objects"] += 1
        elif got == wanted:
            outcomes[named + "right"] += 1
        elif sorted(got) == sorted(wanted):
            outcomes[named + "right objects, wrong order"] += 1
        else:
            colours = sorted(g.split()[0] for g in got) == sorted(w.split()[0] for w in wanted)
            shapes = sorted(g.split()[1] for g in got) == sorted(w.split()[1] for w in wanted)
            outcomes[named + f"colours {'right' if colours else 'wrong'}, shapes {'right' if shapes else 'wrong'}"] += 1
    return outcomes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--grid", default="samples.png", help="the grid, relative to the run folder")
    args = parser.parse_args(argv)
    cfg = validate(OmegaConf.load(run_config(args.run)))
    dataset = build("data", data_config(cfg.data, cfg.trainer.latents))
    system = build_system(cfg, dataset)
    batch, n, _ = grid_batch(system, dataset, cfg)
    tiles = 1 + len(condition_pictures(system, batch))
    images = grid_samples(args.run / args.grid, n, cfg.trainer.grid_columns * tiles, tiles, system.data.resolution)
    objects = system.data.reader.read_batch(images)
    result = {}
    if "layout" in system.conditions:
        result["layout (per target box)"] = layout_outcomes(objects, batch, system.data.class_names, system.data.resolution)
    if "text" in system.conditions:
        result["text (per caption)"] = text_outcomes(objects, batch)
    if not result:
        raise SystemExit(f"{args.run}: the model has neither layout nor text ({', '.join(system.conditions) or 'no condition'})")
    for title, outcomes in result.items():
        total = sum(outcomes.values())
        print(f"\n{title}, {total} in all")
        for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
            print(f"  {count / total:6.1%}  {outcome}")
    out = (args.run / args.grid).with_suffix(".failures.json")
    out.write_text(json.dumps({title: dict(o) for title, o in result.items()}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
