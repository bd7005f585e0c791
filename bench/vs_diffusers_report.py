"""The report of bench/vs_diffusers.py (imported by it; bench/ is not a package): the issue's goals
as measured in a run, the markdown section of docs/performance.md rendered from a results JSON
(which ``--render`` rewrites on its own), and the machine's name for the run's metadata.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from vs_diffusers_models import ROOT, SAMPLE_RUNS


def goals(result: dict) -> list[dict]:
    """The issue's goals, as ratios measured in this run (compiled variants count when present)."""
    fwd, train = result["forward"], result["train"]
    eager = [n for n in fwd if n.startswith("ldmcore") and "@" not in n and "without" not in n]
    best = lambda table, names: max(names, key=lambda n: table[n]["per_s"])  # noqa: E731
    rows = [
        ("forward ≥ 1.5× diffusers", 1.5, fwd[best(fwd, eager)]["vs_diffusers"], best(fwd, eager)),
        ("train step ≥ 1.3× diffusers", 1.3, train[best(train, eager)]["vs_diffusers"], best(train, eager)),
        ("forward GFLOP/s ≥ 60 % of the matmul peak", 60.0, fwd[best(fwd, eager)]["pct_peak"], best(fwd, eager)),
    ]
    if "sampling" in result:
        runs = result["sampling"]["runs"]
        name = best(runs, [n for n in runs if n.startswith("ldmcore")])
        rows.append(("sampling ≥ 1.5× the diffusers pipeline", 1.5, runs[name]["vs_diffusers"], name))
    if "memory" in result:
        worst = max(m["ldmcore"]["peak_over_built_mib"] / max(m["diffusers"]["peak_over_built_mib"], 1e-9)
                    for task, m in result["memory"].items() if task != "method")
        rows.append(("peak memory ≤ diffusers' (worst task, ratio)", 1.0, worst, "ldmcore"))
    return [{"goal": g, "target": target, "measured": value, "by": by,
             "met": value <= target if g.startswith("peak memory") else value >= target} for g, target, value, by in rows]


def markers(json_path: Path) -> tuple[str, str]:
    """The lines around the doc's section of one results file (a CPU and a GPU run keep one each)."""
    path = json_path.resolve()
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"<!-- {name}: begin (python bench/vs_diffusers.py --render --json {name}) -->", f"<!-- {name}: end -->"


def render(result: dict, json_path: Path) -> str:
    """The markdown section of docs/performance.md for one result."""
    m = result["meta"]
    begin, end = markers(json_path)
    lines = [
        begin,
        f"Measured {m['date']} on {m['machine']} ({m['threads']} threads), {m['dtype']}, attention kernel: {m['sdpa']}, "
        f"{'malloc keeping freed memory, ' if m.get('keep_freed_memory') else ''}torch {m['torch']}, "
        f"diffusers {m['diffusers']}; load average {m['load_start'][0]:.2f} at the start, {m['load_end'][0]:.2f} at the end"
        f"{' (QUICK: a smoke run, not a measurement)' if m['quick'] else ''}. Command: `{m['command']}`."
        f"{' Note: ' + m['note'] + '.' if m.get('note') else ''}",
        f"Matmul peak ({m['peak_n']}³, best of 5 at the start and 5 at the end): **{m['peak_gflops']:.0f} GFLOP/s**. FLOPs per call: forward "
        f"{result['flops']['forward_gflop']:.1f} GFLOP (diffusers' count: {result['flops']['forward_gflop_diffusers']:.1f}), "
        f"train step {result['flops']['train_gflop']:.1f} GFLOP. Parity: UNet max |Δ| {result['parity']['unet_max_abs']:.1e}, "
        f"VAE {result['parity']['vae_max_abs']:.1e}.",
        "",
        f"| variant (batch {m['batch']}) | forward img/s | × diffusers | GFLOP/s | % peak | train img/s | × diffusers | GFLOP/s | % peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in result["forward"].items():
        t = result["train"][name]
        lines.append(f"| {name} | {f['per_s']:.1f} | {f['vs_diffusers']:.2f} | {f['gflops']:.0f} | {f['pct_peak']:.0f} "
                     f"| {t['per_s']:.1f} | {t['vs_diffusers']:.2f} | {t['gflops']:.0f} | {t['pct_peak']:.0f} |")
    for name, c in result.get("compile_s", {}).items():
        lines.append(f"\nCompilation of {name}: {c['forward']:.0f} s (forward), {c['train']:.0f} s (train step).")
    if "sampling" in result:
        s = result["sampling"]
        lines += ["", f"| sampling: {s['steps']} DDIM steps, guidance {s['guidance_scale']}, decode, batch {s['batch']} "
                  "| images/s | × diffusers | max abs Δ image |", "|---|---|---|---|"]
        lines += [f"| {n} | {r['per_s']:.2f} | {r['vs_diffusers']:.2f} | {r['max_abs_vs_diffusers']:.1e} |" for n, r in s["runs"].items()]
    if "memory" in result:
        mem = result["memory"]
        lines += ["", f"Memory: {mem['method']}.", "", "| task | diffusers MiB | ldmcore MiB | ldmcore / diffusers |", "|---|---|---|---|"]
        for task in ("forward", "train", "sample"):
            d = mem[task]["diffusers"]["peak_over_built_mib"]
            for name, cell in mem[task].items():
                if name != "diffusers":
                    label = task if name == "ldmcore" else f"{task}, {SAMPLE_RUNS[name]}"
                    o = cell["peak_over_built_mib"]
                    lines.append(f"| {label} | {d:.0f} | {o:.0f} | {o / max(d, 1e-9):.2f} |")
    lines += ["", "| goal | measured | by | met |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']:.2f} | {g['by']} | {'yes' if g['met'] else 'no'} |" for g in result["goals"]]
    return "\n".join(lines + [end])


def write_doc(result: dict, json_path: Path, doc: Path) -> None:
    """Replace this result's section of ``doc`` (other sections stay), creating the doc if needed."""
    text = doc.read_text() if doc.exists() else "# Performance\n"
    begin, end = markers(json_path)
    section = render(result, json_path)
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} CPUs"
