"""The results side of bench/latent_vs_pixel.py: from the arms' records (the JSON) to the summary
against the goal, the doc block and the two plots, and ``--merge`` of several runs' results into one.
Works on the JSON alone, so a result can be re-rendered or merged without training anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_common import relative, replace_section, write_json  # noqa: E402

from ldmcore.visualize import line_plot  # noqa: E402

NAME = "latent_vs_pixel"
GOAL_FACTOR, GOAL_RATIO = 4, 3.0  # f=4 reaches the pixel model's final score with >= 3x less compute, samples >= 3x faster


def first_reaching(curve: list[dict], score: str, target: float) -> dict | None:
    return next((p for p in sorted(curve, key=lambda p: p["tflop"]) if p[score] >= target), None)


def summarize(records: list[dict], budget_tflop: float, score: str) -> dict:
    """Compute to reach the pixel model's final score and sampling speed-ups, from the arms' records."""
    by_f = {r["f"]: r for r in records}
    rates = {r["f"]: r["sampling"]["images_per_second"] for r in records}
    summary: dict = {"images_per_second": {str(f): rate for f, rate in rates.items()}}
    if 1 in by_f:
        target = by_f[1]["curve"][-1][score]
        summary["pixel_final"] = target
        summary["compute_to_reach_pixel_final"] = {}
        for r in records:
            hit = first_reaching(r["curve"], score, target)
            summary["compute_to_reach_pixel_final"][str(r["f"])] = {
                "tflop": hit["tflop"] if hit else None, "fraction": hit["fraction"] if hit else None,
                "compute_ratio": budget_tflop / hit["tflop"] if hit else None,  # a lower bound: evaluations are discrete
                "sampling_speedup": rates[r["f"]] / rates[1]}
        if GOAL_FACTOR in by_f:
            mine = summary["compute_to_reach_pixel_final"][str(GOAL_FACTOR)]
            summary["goal"] = {"factor": GOAL_FACTOR, "required_ratio": GOAL_RATIO,
                               "compute_met": mine["compute_ratio"] is not None and mine["compute_ratio"] >= GOAL_RATIO,
                               "sampling_met": mine["sampling_speedup"] >= GOAL_RATIO}
    return summary


def merged_runs(result: dict) -> list[str]:
    """The doc's lines naming the runs a merged result comes from (none for a single run)."""
    runs = result.get("merged_from")
    if not runs:
        return []
    listed = "; ".join(f"f={', '.join(map(str, r['factors']))}: `{r['command'] or r['file']}` ({r['date']})" for r in runs)
    return [f"Merged (`--merge`) from {len(runs)} runs with the same settings — {listed}. Each arm was trained and timed "
            "in its own run, so sampling speeds across runs were not measured side by side "
            "(`bench/latent_vs_pixel_sampling.py` times every f in one process).", ""]


def markdown(result: dict, plots: tuple[str, str]) -> str:
    score, arms, summary = result["score"], result["arms"], result["summary"]
    m = result["machine"]
    shares = result.get("budget_shares") or {}
    shared = "".join(f"; f={f} trains for {share:.3g} of it ({share * result['budget_tflop']:.3g} TFLOP)" for f, share in shares.items())
    lines = [f"Budget {result['budget_tflop']:.3g} TFLOP of training per model{shared} (FLOPs counted, not wall time), batch "
             f"{arms[0]['batch_size']}, family `{result['family']}`; scores of the EMA on {result['eval_samples']} samples "
             f"(DDIM {result['sampler_steps']} steps, guidance {result['guidance_scale']}); {m['machine']}, torch {m['torch']}, "
             f"{m['threads']} threads, {m['date']}.", "",
             *merged_runs(result),
             "| f | latent | UNet (channels x mult, attention at) | params | GFLOP / step | steps | train s | GFLOP/s "
             "| first stage (PSNR, read-back) |", "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        d, fs = a["denoiser"], a["first_stage"]
        quality = "exact" if a["f"] == 1 else f"{fs['psnr']:.1f} dB, {fs['readback']:.3f}"
        lines.append(f"| {a['f']} | {'x'.join(map(str, a['latent_shape']))} | {d['model_channels']} x {d['channel_mult']}, "
                     f"{d['attention_resolutions']} | {d['parameters'] / 1e6:.2f} M | {a['gflop_per_step']:.1f} | {a['steps']} | "
                     f"{a['train_seconds']:.0f} | {a['train_gflop_per_second']:.0f} | {fs['config']}: {quality} |")
    fractions = sorted({p["target"] for a in arms for p in a["curve"]})
    whose = "each model's own" if shares else "the"
    lines += ["", f"{score} at fractions of {whose} budget:", "",
              "| f | " + " | ".join(f"{fr:.0%}" for fr in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for a in arms:
        at = {p["target"]: p[score] for p in a["curve"]}
        lines.append(f"| {a['f']} | " + " | ".join(f"{at[fr]:.3f}" if fr in at else "—" for fr in fractions) + " |")
    lines += ["", "| f | sampling GFLOP / image | images/s | x f=1 | compute to reach f=1's final score |",
              "|---|---|---|---|---|"]
    reach = summary.get("compute_to_reach_pixel_final", {})
    for a in arms:
        r = reach.get(str(a["f"]))
        speed = f"{r['sampling_speedup']:.2f}" if r else "—"
        hit = (f"{r['tflop']:.3g} TFLOP ({r['fraction']:.0%}; ≥ {r['compute_ratio']:.2f}x less)" if r and r["tflop"]
               else ("not reached" if r else "—"))
        lines.append(f"| {a['f']} | {a['sampling']['gflop_per_image']:.2f} | {a['sampling']['images_per_second']:.2f} | "
                     f"{speed} | {hit} |")
    goal = summary.get("goal")
    if goal:
        r = reach[str(goal["factor"])]
        lines += ["", f"Goal (f={goal['factor']} reaches f=1's final {score}, {summary['pixel_final']:.3f}, with "
                      f"≥ {goal['required_ratio']:.0f}x less training compute and samples ≥ {goal['required_ratio']:.0f}x "
                      f"faster): compute **{'met' if goal['compute_met'] else 'not met'}** "
                      f"({'ratio ≥ ' + format(r['compute_ratio'], '.2f') if r['compute_ratio'] else 'not reached'}), "
                      f"sampling **{'met' if goal['sampling_met'] else 'not met'}** ({r['sampling_speedup']:.2f}x)."]
    lines += ["", f"![{score} against training compute]({plots[0]})", "", f"![sampling throughput]({plots[1]})"]
    return "\n".join(lines)


# Settings that must agree for arms of different runs to share one table and one plot.
SAME_IN_MERGED_RUNS = ("family", "budget_tflop", "score", "eval_samples", "eval_fractions", "sampler", "sampler_steps",
                       "guidance_scale", "quick")


def merge(paths: list[Path]) -> dict:
    """One result from the results of several runs of this script (e.g. f=1 and f=4 in one run,
    f=2 and f=8 in a later one): the same settings, each factor once. Each arm keeps its run's
    measurements; ``merged_from`` names the runs. Sampling speeds of arms from different runs were
    timed in different processes (bench/latent_vs_pixel_sampling.py times all f side by side)."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"--merge {path}: not a readable result of this script ({error})") from None
        missing = [key for key in (*SAME_IN_MERGED_RUNS, "arms") if key not in results[-1]]
        if missing:
            raise SystemExit(f"--merge {path}: not a result of bench/latent_vs_pixel.py (no {', '.join(missing)})")
    first = results[0]
    for path, other in zip(paths[1:], results[1:]):
        for key in SAME_IN_MERGED_RUNS:
            if other[key] != first[key]:
                raise SystemExit(f"--merge: {path} has {key}={other[key]!r}, {paths[0]} {key}={first[key]!r}; "
                                 "only runs with the same settings can be merged")
    arms: dict[int, dict] = {}
    for path, result in zip(paths, results):
        for record in result["arms"]:
            if record["f"] in arms:
                raise SystemExit(f"--merge: f={record['f']} is in {arms[record['f']]['run']['file']} and in {path}; "
                                 "give each factor once")
            # an arm of an already merged result keeps the run it came from
            arms[record["f"]] = {**record, "run": record.get("run") or {"file": path.name, "date": result["machine"]["date"]}}
    records = [arms[f] for f in sorted(arms)]
    batches = {r["f"]: r.get("batch_size") for r in records}
    if len(set(batches.values())) > 1:
        raise SystemExit(f"--merge: the arms were trained at different batch sizes ({batches}); "
                         "only runs with the same settings can be merged")
    shares = {f: s for result in results for f, s in (result.get("budget_shares") or {}).items()}
    return {**{key: first[key] for key in SAME_IN_MERGED_RUNS}, "budget_kind": first["budget_kind"],
            "budget_shares": dict(sorted(shares.items(), key=lambda item: int(item[0]))), "machine": first["machine"],
            "merged_from": [{"file": path.name, "date": result["machine"]["date"], "factors": [a["f"] for a in result["arms"]],
                             "command": result.get("command")} for path, result in zip(paths, results)],
            "arms": records, "summary": summarize(records, first["budget_tflop"], first["score"])}


def write_outputs(result: dict, json_path: Path, images: Path, doc: Path) -> None:
    """The JSON, the two plots and the doc block."""
    write_json(json_path, result)
    score, budget = result["score"], result["budget_tflop"]
    shares = result["budget_shares"]
    plots = (images / f"{NAME}_faithfulness.png", images / f"{NAME}_throughput.png")
    pixel = result["summary"].get("pixel_final")
    shared = " ".join(f"{f}={share}" for f, share in shares.items())
    line_plot({f"f={a['f']}": [(p["tflop"], p[score]) for p in a["curve"]] for a in result["arms"]}, plots[0],
              title=f"{score} of the EMA against training compute ({'budget shares ' + shared if shares else 'same budget for every f'})",
              x_label="training compute, TFLOP", y_label=score, x_range=(0.0, 1.02 * budget), y_range=(0.0, 1.0),
              reference=("f=1 (pixel space), final", pixel) if pixel is not None else None)
    line_plot({"sampling": [(a["f"], a["sampling"]["images_per_second"]) for a in result["arms"]]}, plots[1],
              title=f"sampling throughput ({result['sampler']} {result['sampler_steps']} steps, guided, decode included)",
              x_label="downsampling factor f", y_label="images / s", log_x=True,
              y_range=(0.0, 1.1 * max(a["sampling"]["images_per_second"] for a in result["arms"])))
    replace_section(doc, NAME, markdown(result, tuple(relative(p, doc) for p in plots)))
    print(f"wrote {json_path}, {plots[0]}, {plots[1]}, {doc}")
