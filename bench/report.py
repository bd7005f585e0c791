"""Write docs/quality.md from the recorded default runs (bench/results/default_runs.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "default_runs.jsonl"
DOC = ROOT / "docs" / "quality.md"

HEADER = """# Quality of the default runs

Measured by `bench/default_runs.py` (each run `python -m ldmcore.run ...` from a cold start: no
cached first stage, so the wall time includes start-up, the first stage, the latent pool, the
denoiser, sampling and scoring), on the 2-core CPU machine this project is developed on, one run
at a time. Scores come from the shapes world's exact reader (SHAPES.md: shape by template IoU,
valid only at IoU ≥ 0.75) on the run's evaluation grid: 180 samples (10 per class for the class
model), DDIM 50 steps, guidance scale 3 for the class model.

- *readable*: the sample reads back as valid objects only (at least one).
- *class accuracy*: exactly one valid object, of the requested class.
- *caption accuracy*: every object valid and, left to right, they spell the caption; *box recall*:
  target boxes matched by a valid object of the right label at IoU ≥ 0.5.
- *first stage*: PSNR and read-back rate of the autoencoder's reconstructions (512 images).

| command | seed | guidance | wall time | first stage | denoiser | first stage PSNR / read-back | readable | class accuracy (circle / square / triangle) | other scores |
|---|---|---|---|---|---|---|---|---|---|
"""


def row(r: dict) -> str:
    fs = r.get("first_stage") or {}
    per = "/".join(f"{100 * r[k]:.0f}" for k in ("class_accuracy/circle", "class_accuracy/square", "class_accuracy/triangle") if k in r)
    acc = f"**{100 * r['class_accuracy']:.1f} %** ({per})" if "class_accuracy" in r else "—"
    command = r["command"].rsplit(" seed=", 1)[0]
    if r.get("conditions"):
        guidance = f"classifier-free {r['guidance_scale']:g}"
    elif r.get("autoguidance_scale"):
        guidance = f"autoguidance {r['autoguidance_scale']:g}"
    else:
        guidance = "none"
    return (f"| `{command}` | {r['seed']} | {guidance} | {r['wall_seconds'] / 60:.1f} min | {r['first_stage_seconds']:.0f} s | "
            f"{r['denoiser_seconds']:.0f} s | {fs.get('psnr', float('nan')):.1f} dB / {100 * fs.get('readback', float('nan')):.1f} % | "
            f"**{100 * r['readable']:.1f} %** | {acc} | {others(r)} |")


def others(r: dict) -> str:
    """Plugin scores beyond class accuracy (caption accuracy, box recall, ...)."""
    keys = [k for k in ("caption_accuracy", "box_recall") if k in r]
    return ", ".join(f"{k.replace('_', ' ')} {100 * r[k]:.1f} %" for k in keys) or "—"


def main() -> None:
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    DOC.write_text(HEADER + "\n".join(row(r) for r in runs) + "\n")
    print(DOC.read_text())


if __name__ == "__main__":
    main()
