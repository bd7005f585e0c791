"""The table and plot of a sweep: one row per job of a Hydra multirun of ``task=eval`` over one
checkpoint (``conf/experiment/sweep_guidance.yaml``), with the options the jobs vary and every
faithfulness score the jobs measured.

    python -m ldmcore.evaluation.sweep MULTIRUN_DIR

(run by the preset's Hydra callback after the last job) writes into ``MULTIRUN_DIR``:
``sweep.md`` (markdown table), ``sweep.csv``, ``sweep.json`` and ``sweep.png`` (one panel per
score, plotted against the first varied option, one line per setting of the other varied options).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont

OUTPUTS = ("sweep.md", "sweep.csv", "sweep.json", "sweep.png")


class SweepError(ValueError):
    """The folder holds no sweep that can be read; the message names the folder or file."""


@dataclass
class Sweep:
    """parameters: the options whose values differ between jobs (as given on the command line);
    scores: the faithfulness scores; rows: per job, its folder name, option values and scores."""

    folder: str
    parameters: list[str]
    scores: list[str]
    rows: list[dict]


# --- reading the jobs --------------------------------------------------------------------------


def _overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides as {option: value}, prefixes (+, ++, ~) dropped."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise SweepError(f"{path} is missing: {job} is not a Hydra job folder")
    pairs = (str(o).lstrip("+~").partition("=") for o in OmegaConf.load(path))
    return {key: value for key, _, value in pairs}


def read_sweep(folder: Path) -> Sweep:
    """Read every finished job (a subfolder with ``metrics.json``) of a multirun folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SweepError(f"sweep folder {folder} does not exist")
    jobs = sorted((p.parent for p in folder.glob("*/metrics.json")), key=lambda p: (not p.name.isdigit(), p.name.zfill(9)))
    if not jobs:
        raise SweepError(f"{folder} holds no finished job (a subfolder with metrics.json)")
    options, metrics = [], []
    for job in jobs:
        options.append(_overrides(job))
        metrics.append(json.loads((job / "metrics.json").read_text()))
        if "score_names" not in metrics[-1]:
            raise SweepError(f"{job / 'metrics.json'} does not list its score_names (not written by task=eval)")
    keys = list(dict.fromkeys(k for o in options for k in o))
    parameters = [k for k in keys if len({o.get(k) for o in options}) > 1]
    scores = list(dict.fromkeys(s for m in metrics for s in m["score_names"]))
    rows = [{"job": job.name, **{p: o.get(p) for p in parameters}, **{s: m.get(s) for s in scores}}
            for job, o, m in zip(jobs, options, metrics)]
    return Sweep(str(folder), parameters, scores, rows)


# --- table -------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(sweep: Sweep) -> str:
    columns = ["job", *sweep.parameters, *sweep.scores]
    lines = [f"# Sweep {sweep.folder}", "", f"{len(sweep.rows)} jobs; scores as measured by each job's task=eval.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in sweep.rows]
    return "\n".join([*lines, "", "![scores against the swept options](sweep.png)", ""])


def write_csv(sweep: Sweep, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", *sweep.parameters, *sweep.scores])
        writer.writeheader()
        writer.writerows(sweep.rows)


# --- plot --------------------------------------------------------------------------------------

# Qualitative line colours (matplotlib's "tab10" RGB values).
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANEL, MARGIN, COLUMNS = (300, 200), (46, 28, 16, 34), 3  # panel size; margins left, top, right, bottom


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _x_axis(sweep: Sweep) -> tuple[str, list]:
    """The option plotted along x (the first varied numeric one, else the first varied one, else the
    job) and its values in plotting order."""
    numeric = [p for p in sweep.parameters if all(_number(r[p]) is not None for r in sweep.rows)]
    x = (numeric or sweep.parameters or ["job"])[0]
    values = list(dict.fromkeys(r[x] for r in sweep.rows))
    return x, sorted(values, key=_number) if x in numeric else values


def _y_range(values: list[float]) -> tuple[float, float]:
    if all(0.0 <= v <= 1.0 for v in values):  # ratios: the full [0, 1], so panels compare at a glance
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], score: str, xs: list, series: dict, font) -> None:
    """One score: axes, ticks and one polyline per series ({label: (colour, {x value: y})})."""
    left, top = origin[0] + MARGIN[0], origin[1] + MARGIN[1]
    width, height = PANEL[0] - MARGIN[0] - MARGIN[2], PANEL[1] - MARGIN[1] - MARGIN[3]
    values = [y for _, points in series.values() for y in points.values()]
    draw.text((left, origin[1] + 8), score, fill=(0, 0, 0), font=font)
    if not values:
        draw.text((left, top + height // 2), "not measured", fill=(120, 120, 120), font=font)
        return
    lo, hi = _y_range(values)

    def at(i: int, y: float) -> tuple[float, float]:
        return (left + width * (i + 0.5) / len(xs), top + height * (1 - (y - lo) / (hi - lo)))

    for k in range(5):  # horizontal grid lines with their values
        y = lo + (hi - lo) * k / 4
        _, py = at(0, y)
        draw.line([(left, py), (left + width, py)], fill=(225, 225, 225))
        draw.text((origin[0] + 4, py - 6), f"{y:.2f}", fill=(90, 90, 90), font=font)
    draw.rectangle([left, top, left + width, top + height], outline=(0, 0, 0))
    for i, x in enumerate(xs):
        px, _ = at(i, lo)
        draw.text((px - 3 * len(str(x)), top + height + 4), str(x), fill=(0, 0, 0), font=font)
    for colour, points in series.values():
        line = [at(i, points[x]) for i, x in enumerate(xs) if x in points]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for px, py in line:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def plot(sweep: Sweep, path: Path) -> None:
    """Every score against the x option (see ``_x_axis``), one line per setting of the others."""
    x, xs = _x_axis(sweep)
    others = [p for p in sweep.parameters if p != x]
    groups: dict[str, list[dict]] = {}
    for row in sweep.rows:
        groups.setdefault(", ".join(f"{p}={row[p]}" for p in others) or "all jobs", []).append(row)
    font = ImageFont.load_default()
    rows_of_panels = -(-max(len(sweep.scores), 1) // COLUMNS)
    legend_height = 18 * len(groups) + 30
    canvas = Image.new("RGB", (COLUMNS * PANEL[0], rows_of_panels * PANEL[1] + legend_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, score in enumerate(sweep.scores):
        series = {label: (COLOURS[j % len(COLOURS)], {r[x]: r[score] for r in rows if r[score] is not None})
                  for j, (label, rows) in enumerate(groups.items())}
        _panel(draw, ((k % COLUMNS) * PANEL[0], (k // COLUMNS) * PANEL[1]), score, xs, series, font)
    top = rows_of_panels * PANEL[1]
    draw.text((MARGIN[0], top), f"x: {x}", fill=(0, 0, 0), font=font)
    for j, label in enumerate(groups):
        y = top + 20 + 18 * j
        draw.rectangle([MARGIN[0], y + 2, MARGIN[0] + 14, y + 12], fill=COLOURS[j % len(COLOURS)])
        draw.text((MARGIN[0] + 22, y), label, fill=(0, 0, 0), font=font)
    canvas.save(path)


# --- writing, the Hydra callback and the command line ------------------------------------------


def write_sweep(folder: Path) -> Sweep:
    """Read the sweep in ``folder`` and write its table (md, csv, json) and plot (png) there."""
    sweep = read_sweep(folder)
    folder = Path(folder)
    (folder / "sweep.md").write_text(markdown(sweep))
    write_csv(sweep, folder / "sweep.csv")
    (folder / "sweep.json").write_text(json.dumps(asdict(sweep), indent=1) + "\n")
    plot(sweep, folder / "sweep.png")
    return sweep


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks``): after the last job of a multirun, write the sweep's
    table and plot into the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = write_sweep(Path(config.hydra.sweep.dir))
        print(f"sweep table: {Path(sweep.folder) / 'sweep.md'} ({len(sweep.rows)} jobs)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldmcore.evaluation.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the multirun folder (its jobs are its numbered subfolders)")
    args = parser.parse_args(argv)
    try:
        sweep = write_sweep(args.folder)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(str(args.folder / name) for name in OUTPUTS))
    print(f"{len(sweep.rows)} jobs, parameters {sweep.parameters}, scores {sweep.scores}")


if __name__ == "__main__":
    main()
