"""Sampler efficiency (issue 5): faithfulness against the number of denoiser evaluations (NFE) for
DDIM, PLMS and DPM-Solver++(2M) on one trained conditional model.

    python bench/sampler_efficiency.py --checkpoint RUN_DIR [--samples 900]
    python bench/sampler_efficiency.py                  # first trains `python -m ldmcore.run +condition=class`
    python bench/sampler_efficiency.py --quick          # a tiny model and grid: a smoke check in seconds

Every point is the evaluation of ``task=eval`` (``ldmcore.tasks.load_trained`` + ``evaluate``) with
``sampler=NAME sampler.steps=N``: the same grid conditions (``seed``) and the same initial noise for
every sampler, classifier-free guidance at the sampler config's scale. ``--samples`` sets the grid
size (rounded up to whole columns; a class grid has one row per class): more samples, less noise
(the standard error of an accuracy p over n samples is sqrt(p(1-p)/n)).

NFE is counted, not computed: the UNet's forward calls during sampling, divided by the number of
sampler batches. Classifier-free guidance runs the conditional and the unconditional halves as
one batched forward (of twice the batch), counted as one evaluation; PLMS's warm-up makes one
call more than its steps.

Writes bench/results/sampler_efficiency.json, docs/images/sampler_efficiency.png and the table
block of docs/performance-studies.md.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_common import (  # noqa: E402
    add_output_options, compose_run, machine, output_paths, relative, replace_section, write_json,
)

from ldmcore.tasks import evaluate, grid_batch, load_trained, train  # noqa: E402
from ldmcore.visualize import line_plot  # noqa: E402

NAME = "sampler_efficiency"
FULL_GRID = {"ddim": [10, 20, 50, 100, 250], "plms": [10, 20, 50], "dpmpp_2m": [10, 20, 50]}
QUICK_GRID = {"ddim": [2, 4], "plms": [2], "dpmpp_2m": [2]}
GOAL = (("dpmpp_2m", 20), ("ddim", 250), 0.01)  # DPM-Solver++ at 20 within 1 point of DDIM at 250
TRAIN_OVERRIDES = ["+condition=class"]
QUICK_TRAIN_OVERRIDES = ["+condition=class", "+experiment=tiny"]


def train_model(folder: Path, quick: bool) -> tuple[Path, str]:
    """Train the default class-conditional run (``python -m ldmcore.run +condition=class``) into
    ``folder``; in quick mode the tiny experiment with its own cache. Returns (run folder, command)."""
    overrides = [*(QUICK_TRAIN_OVERRIDES if quick else TRAIN_OVERRIDES)]
    if quick:
        overrides.append(f"cache_dir={folder / 'cache'}")
    train(compose_run(overrides), folder / "run")
    return folder / "run", "python -m ldmcore.run " + " ".join(overrides)


def evaluate_point(checkpoint: Path, sampler: str, steps: int, columns: int, args, folder: Path) -> dict:
    """One ``task=eval`` of the checkpoint with this sampler; adds the counted NFE per sample."""
    overrides = [f"checkpoint={checkpoint}", f"sampler={sampler}", f"sampler.steps={steps}",
                 f"trainer.grid_columns={columns}", f"seed={args.seed}"]
    if args.guidance_scale is not None:
        overrides.append(f"sampler.guidance_scale={args.guidance_scale}")
    system, dataset, cfg = load_trained(compose_run(overrides))
    batches: list[int] = []  # the batch of every UNet forward
    handle = system.model.unet.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    try:
        metrics = evaluate(system, system.model, dataset, cfg, folder, grid_name=f"{sampler}_{steps}.png")
    finally:
        handle.remove()
    chunks = math.ceil(metrics["samples"] / cfg.sampler.batch_size)  # generate() samples in batches of this size
    if len(batches) % chunks:
        raise RuntimeError(f"{len(batches)} UNet calls do not split evenly over {chunks} sampler batches")
    first = min(cfg.sampler.batch_size, metrics["samples"])
    return {"sampler": sampler, "steps": steps, "nfe": len(batches) // chunks,
            "forward_batch": batches[0] // first if batches else None,  # 2: guided (cond + uncond in one forward)
            **{k: v for k, v in metrics.items() if k in metrics["score_names"]},
            "samples": metrics["samples"], "guidance_scale": metrics["guidance_scale"],
            "eval_seconds": metrics["eval_seconds"]}


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def reference_point(points: list[dict]) -> dict:
    """DDIM with the most steps (the paper's tables use 250), else the last point."""
    return max((p for p in points if p["sampler"] == "ddim"), key=lambda p: p["steps"], default=points[-1])


def goal(points: list[dict], score: str) -> dict | None:
    (fast, slow, tolerance) = GOAL
    found = {(p["sampler"], p["steps"]): p for p in points}
    if fast not in found or slow not in found or score not in found[fast]:
        return None
    a, b = found[fast][score], found[slow][score]
    return {"fast": list(fast), "slow": list(slow), "score": score, "fast_value": a, "slow_value": b,
            "difference_points": 100 * (a - b), "tolerance_points": 100 * tolerance, "met": a >= b - tolerance,
            "standard_error_points": 100 * standard_error(b, found[slow]["samples"])}


def markdown(result: dict, plot: str) -> str:
    score, points = result["score"], result["points"]
    other = [s for s in points[0] if s not in (score, "sampler", "steps", "nfe", "forward_batch", "samples",
                                               "guidance_scale", "eval_seconds") and "/" not in s]
    ref = reference_point(points)
    lines = [f"{points[0]['samples']} samples per point (one grid, the same conditions and initial noise for every "
             f"sampler), guidance scale {points[0]['guidance_scale']}, checkpoint `{result['checkpoint']}`; "
             f"{result['machine']['machine']}, torch {result['machine']['torch']}, {result['machine']['date']}. "
             f"Standard error of one {score} near {ref[score]:.3f}: "
             f"{100 * standard_error(ref[score], ref['samples']):.1f} points.", "",
             f"| sampler | steps | NFE | {score} | {' | '.join(other)} | seconds |",
             "|---|---|---|---|" + "---|" * len(other) + "---|"]
    for p in points:
        cells = " | ".join(f"{p[s]:.3f}" for s in other)
        lines.append(f"| {p['sampler']} | {p['steps']} | {p['nfe']} | {p[score]:.3f} | {cells} | {p['eval_seconds']:.1f} |")
    g = result["goal"]
    if g:
        verdict = "met" if g["met"] else "not met"
        lines += ["", f"Goal ({g['fast'][0]} at {g['fast'][1]} steps within {g['tolerance_points']:.0f} point of "
                      f"{g['slow'][0]} at {g['slow'][1]}): {g['fast_value']:.3f} against {g['slow_value']:.3f}, "
                      f"{g['difference_points']:+.1f} points — **{verdict}** (standard error of one value "
                      f"{g['standard_error_points']:.1f} points)."]
    lines += ["", f"![{score} against NFE]({plot})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a trained conditional run (or checkpoint) folder; default: train the class run first")
    parser.add_argument("--samples", type=int, default=None, help="grid size per point (default 900; quick 18)")
    parser.add_argument("--score", default="class_accuracy", help="the faithfulness score plotted (a score name of the run)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the grid's conditions and initial noise")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the sampler config's")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/ldmcore_bench/sampler_efficiency"),
                        help="without --checkpoint the model is trained into RUNS/run (which must not exist yet)")
    for name, steps in FULL_GRID.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, nargs="*", default=None,
                            help=f"{name} step counts (default {steps})")
    add_output_options(parser, NAME)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    json_path, images, doc = output_paths(args, NAME)
    defaults = QUICK_GRID if args.quick else FULL_GRID
    grid = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name] for name in FULL_GRID}
    samples = args.samples or (18 if args.quick else 900)
    if samples < 1:
        raise SystemExit(f"--samples must be at least 1, got {samples}")

    trained_with = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        folder = images / "model" if args.quick else args.runs
        if args.quick:
            shutil.rmtree(folder, ignore_errors=True)  # the quick check's own scratch model
        elif (folder / "run").exists():
            raise SystemExit(f"{folder / 'run'} exists: evaluate it with --checkpoint {folder / 'run'}, "
                             "or remove it to train anew")
        print(f"no --checkpoint: training the class-conditional model in {folder}", flush=True)
        checkpoint, trained_with = train_model(folder, args.quick)
    system, dataset, cfg = load_trained(compose_run([f"checkpoint={checkpoint}", "trainer.grid_columns=1"]))
    rows = grid_batch(system, dataset, cfg)[1]  # one column: as many samples as the grid has rows
    columns = math.ceil(samples / rows)

    points = []
    with tempfile.TemporaryDirectory() as grids:
        for sampler, steps_list in grid.items():
            for steps in steps_list:
                start = time.perf_counter()
                point = evaluate_point(checkpoint, sampler, steps, columns, args, Path(grids))
                if args.score not in point:
                    raise SystemExit(f"the run has no score {args.score!r}; its scores: "
                                     f"{', '.join(k for k in point if k not in ('sampler', 'steps', 'nfe'))}")
                points.append(point)
                print(f"{sampler:9s} steps {steps:4d}  NFE {point['nfe']:4d}  {args.score} {point[args.score]:.3f}  "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
    result = {"checkpoint": str(checkpoint), "trained_with": trained_with, "score": args.score, "seed": args.seed,
              "quick": args.quick, "machine": machine(), "points": points, "goal": goal(points, args.score),
              "nfe_counting": "UNet forward calls per sampler batch; a guided step (cond + uncond in one batched "
                              "forward) counts as 1"}
    write_json(json_path, result)
    plot = images / f"{NAME}.png"
    series = {name: [(p["nfe"], p[args.score]) for p in points if p["sampler"] == name] for name in grid}
    values = [p[args.score] for p in points]
    slow = reference_point(points)
    line_plot({k: v for k, v in series.items() if v}, plot,
              title=f"{args.score} against denoiser evaluations ({points[0]['samples']} samples each)",
              x_label="denoiser evaluations per sample (NFE; a guided cond + uncond forward counts as 1)",
              y_label=args.score, log_x=True, y_range=(0.0, 1.0) if all(0 <= v <= 1 for v in values) else None,
              reference=(f"{slow['sampler']}, {slow['steps']} steps", slow[args.score]))
    replace_section(doc, NAME, markdown(result, relative(plot, doc)))
    print(f"wrote {json_path}, {plot}, {doc}")
    return result


if __name__ == "__main__":
    main()
