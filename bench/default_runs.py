"""The default runs, timed end to end from a cold start (no cached first stage).

    python bench/default_runs.py --seeds 0 1                 # unconditional
    python bench/default_runs.py --seeds 0 1 -- +condition=class

Each run is `python -m ldmcore.run` in a subprocess with its own empty cache, so the wall time
includes start-up, the first stage, the latent pool, the denoiser, sampling and scoring. Results
are appended to bench/results/default_runs.jsonl; the grid of the last run is copied to
docs/images/. Run it alone on the machine: a second busy process distorts the times badly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "default_runs.jsonl"
IMAGES = BENCH.parent / "docs" / "images"


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 matmul rate right now (torch's default threads): these shared machines were
    seen to run at 250 and at 394 GFLOP/s within one hour, so every wall time is recorded beside it."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return round(2 * size**3 * repeats / (time.perf_counter() - start) / 1e9, 1)


def run(seed: int, overrides: list[str], root: Path) -> dict:
    folder = root / f"seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "ldmcore.run", *overrides, f"seed={seed}", f"cache_dir={folder / 'cache'}", f"hydra.run.dir={folder}"]
    gflops_before = matmul_gflops()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    gflops_after = matmul_gflops()
    if done.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"command": "python -m ldmcore.run " + " ".join([*overrides, f"seed={seed}"]), "wall_seconds": round(wall, 1),
            "machine_gflops": [gflops_before, gflops_after], "folder": str(folder), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--name", default=None, help="name of the image copied to docs/images/")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    name = args.name or ("_".join(o.replace("+condition=", "") for o in args.overrides) or "unconditional")
    root = Path(os.environ.get("LDMCORE_BENCH_RUNS", "/tmp/ldmcore_bench")) / name
    RESULTS.parent.mkdir(exist_ok=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        result = run(seed, args.overrides, root)
        result.update(date=time.strftime("%Y-%m-%d %H:%M"), machine=f"{platform.machine()}, {os.cpu_count()} cpus",
                      torch=torch.__version__)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(result) + "\n")
        shutil.copy(Path(result["folder"]) / "samples.png", IMAGES / f"{name}_seed{seed}.png")
        keep = ("wall_seconds", "machine_gflops", "first_stage_seconds", "denoiser_seconds", "eval_seconds", "readable", "class_accuracy")
        print(json.dumps({k: result[k] for k in keep if k in result}))


if __name__ == "__main__":
    main()
