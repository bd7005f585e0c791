"""The study benchmarks (bench/sampler_efficiency.py, latent_vs_pixel.py, scaling.py): each quick
mode runs in a subprocess and writes its JSON, plots and doc block under a temporary folder; the
JSON has the expected structure with finite, positive numbers. Also the pieces the scripts share:
the doc-block rewrite, the line plot, the per-f denoiser rule and the sampler goal."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import load_bench
from ldmcore.visualize import line_plot

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"



def run_quick(name: str, out: Path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--threads", "1", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    doc = (out / "performance-studies.md").read_text()
    assert f"<!-- {name}: begin (generated) -->" in doc and f"<!-- {name}: end -->" in doc
    return json.loads((out / f"{name}.json").read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_sampler_efficiency_quick(tmp_path):
    result = run_quick("sampler_efficiency", tmp_path)
    points = {(p["sampler"], p["steps"]): p for p in result["points"]}
    assert set(points) == {("ddim", 2), ("ddim", 4), ("plms", 2), ("dpmpp_2m", 2)}
    # Counted NFE: one per step, PLMS one more (its improved-Euler first step); guided = one forward of 2x the batch.
    assert [points[k]["nfe"] for k in sorted(points)] == [2, 4, 2, 3]  # ddim 2, ddim 4, dpmpp_2m 2, plms 2
    for p in points.values():
        assert p["forward_batch"] == 2 and p["samples"] == 18 and positive(p["eval_seconds"])
        assert 0.0 <= p["class_accuracy"] <= 1.0
    assert result["goal"] is None  # the quick grid has neither DPM-Solver++ at 20 nor DDIM at 250
    assert Image.open(tmp_path / "sampler_efficiency.png").size == (640, 400)


def test_sampler_goal_compares_dpm_at_20_with_ddim_at_250():
    goal = load_bench("sampler_efficiency").goal
    points = [{"sampler": "ddim", "steps": 250, "samples": 900, "acc": 0.97},
              {"sampler": "dpmpp_2m", "steps": 20, "samples": 900, "acc": 0.962}]
    within = goal(points, "acc")
    assert within["met"] and within["difference_points"] == pytest.approx(-0.8)
    points[1]["acc"] = 0.955
    assert not goal(points, "acc")["met"]
    assert goal(points[:1], "acc") is None


def test_latent_vs_pixel_quick(tmp_path):
    result = run_quick("latent_vs_pixel", tmp_path, "--budget-shares", "8=0.5")
    arms = {a["f"]: a for a in result["arms"]}
    assert sorted(arms) == [1, 2, 4, 8]
    assert [arms[f]["latent_shape"] for f in (1, 2, 4, 8)] == [[3, 32, 32], [4, 16, 16], [4, 8, 8], [4, 4, 4]]
    assert arms[1]["first_stage"]["config"] == "identity" and "no parameters" in arms[1]["first_stage"]["source"]
    # The same budget buys more steps where a step costs less; equal-parameter denoisers.
    per_step = [arms[f]["gflop_per_step"] for f in (1, 2, 4, 8)]
    assert per_step == sorted(per_step, reverse=True)
    params = [arms[f]["denoiser"]["parameters"] for f in (1, 2, 4, 8)]
    assert max(params) / min(params) < 1.1
    budget = result["budget_tflop"]
    assert result["budget_shares"] == {"8": 0.5}
    for arm in arms.values():
        share = 0.5 if arm["f"] == 8 else 1.0  # f=8 trains for half the budget
        assert arm["steps"] * arm["gflop_per_step"] / 1e3 <= share * budget * (1 + 1e-9)
        assert [p["target"] for p in arm["curve"]] == [0.5, 1.0] and arm["curve"][-1]["step"] == arm["steps"]
        assert all(0.0 <= p["class_accuracy"] <= 1.0 and positive(p["tflop"]) for p in arm["curve"])
        assert positive(arm["train_seconds"]) and positive(arm["sampling"]["images_per_second"])
        assert positive(arm["sampling"]["gflop_per_image"])
    summary = result["summary"]
    assert set(summary["compute_to_reach_pixel_final"]) == {"1", "2", "4", "8"}
    assert set(summary["goal"]) >= {"compute_met", "sampling_met"}
    for name in ("latent_vs_pixel_faithfulness.png", "latent_vs_pixel_throughput.png"):
        assert (tmp_path / name).is_file()
    assert "--budget-shares 8=0.5" in result["command"]

    # --merge: the run split into two (f=1, 4 and f=2, 8) and merged back gives the same arms and summary.
    halves = []
    for factors in ((1, 4), (2, 8)):
        half = {**result, "arms": [arms[f] for f in factors],
                "budget_shares": {f: s for f, s in result["budget_shares"].items() if int(f) in factors}}
        halves.append(tmp_path / f"f{factors[0]}{factors[1]}.json")
        halves[-1].write_text(json.dumps(half))
    merged_dir = tmp_path / "merged"
    done = subprocess.run([sys.executable, str(BENCH / "latent_vs_pixel.py"), "--merge", *map(str, halves),
                           "--out", str(merged_dir), "--doc", str(merged_dir / "doc.md")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads((merged_dir / "latent_vs_pixel.json").read_text())
    assert [a["f"] for a in merged["arms"]] == [1, 2, 4, 8]
    assert [{k: v for k, v in a.items() if k != "run"} for a in merged["arms"]] == [arms[f] for f in (1, 2, 4, 8)]
    assert [a["run"]["file"] for a in merged["arms"]] == ["f14.json", "f28.json", "f14.json", "f28.json"]
    assert merged["summary"] == result["summary"] and merged["budget_shares"] == {"8": 0.5}
    assert "Merged (`--merge`) from 2 runs" in (merged_dir / "doc.md").read_text()


def test_merge_refuses_runs_with_other_settings_or_a_factor_twice(tmp_path):
    merge = load_bench("latent_vs_pixel_report").merge
    run = {"family": "full_width", "budget_tflop": 600.0, "score": "class_accuracy", "eval_samples": 180,
           "eval_fractions": [0.5], "sampler": "ddim", "sampler_steps": 50, "guidance_scale": 3.0, "quick": False,
           "budget_kind": "training FLOPs", "machine": {"date": "2026-12-06 09:00"}, "arms": [{"f": 4}]}
    first, other = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(run))
    other.write_text(json.dumps({**run, "budget_tflop": 60.0, "arms": [{"f": 2}]}))
    with pytest.raises(SystemExit, match=r"b\.json has budget_tflop=60\.0"):
        merge([first, other])
    other.write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="f=4 is in a.json and in .*b.json"):
        merge([first, other])
    other.write_text(json.dumps({**run, "arms": [{"f": 2, "batch_size": 64}]}))
    first.write_text(json.dumps({**run, "arms": [{"f": 4, "batch_size": 128}]}))
    with pytest.raises(SystemExit, match="different batch sizes"):
        merge([first, other])
    other.write_text("{}")
    with pytest.raises(SystemExit, match="b.json: not a result of bench/latent_vs_pixel.py"):
        merge([first, other])


def test_latent_vs_pixel_sampling_quick(tmp_path):
    out = tmp_path / "sampling.json"
    done = subprocess.run([sys.executable, str(BENCH / "latent_vs_pixel_sampling.py"), "--quick", "--threads", "1",
                           "--factors", "1", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["family"] == "full_width" and result["weights"] == "initial (untrained)"
    rows = {r["f"]: r for r in result["rows"]}
    assert sorted(rows) == [1, 4] and rows[1]["speedup_over_f1"] == 1.0
    # One UNet design at every f: the pixel model runs it at 4x4 the positions, so it costs more per image.
    assert rows[1]["model_channels"] == rows[4]["model_channels"]
    assert rows[1]["gflop_per_image"] > 4 * rows[4]["gflop_per_image"]
    for r in rows.values():
        assert positive(r["images_per_second"]) and len(r["seconds"]) == 1
    goal = result["sampling_goal"]
    assert goal["factor"] == 4 and goal["met"] == (goal["speedup"] >= 3.0)


def test_budget_shares_name_a_factor_and_a_share():
    parse = load_bench("latent_vs_pixel").parse_shares
    assert parse(["4=0.333", "8=1"]) == {4: 0.333, 8: 1.0} and parse([]) == {}
    for bad in ("4", "four=0.5", "3=0.5", "4=0", "4=1.5"):
        with pytest.raises(SystemExit, match="--budget-shares"):
            parse([bad])


def test_denoiser_rule_gives_the_default_unet_at_f4():
    rule = load_bench("latent_vs_pixel").unet_overrides
    default = OmegaConf.load(ROOT / "conf" / "denoiser" / "unet.yaml")
    expected = [f"denoiser.model_channels={default.model_channels}", "denoiser.channel_mult=[1,2]",
                "denoiser.attention_resolutions=[2]"]
    assert rule(4, 32, "equal_params") == expected == rule(4, 32, "same_base") == rule(4, 32, "full_width")
    assert rule(8, 32, "full_width") == rule(8, 32, "equal_params")  # one 128-channel level at 4x4
    assert rule(1, 32, "full_width") == [f"denoiser.model_channels={default.model_channels}",
                                         "denoiser.channel_mult=[1,1,1,2]", "denoiser.attention_resolutions=[8]"]
    assert rule(1, 32, "equal_params") == ["denoiser.model_channels=16", "denoiser.channel_mult=[1,2,4,8]",
                                           "denoiser.attention_resolutions=[8]"]
    assert rule(1, 32, "same_base")[1:] == ["denoiser.channel_mult=[1,2,2,2]", "denoiser.attention_resolutions=[8]"]
    with pytest.raises(SystemExit, match="2x2 latent"):
        rule(16, 32, "equal_params")


def test_scaling_quick(tmp_path):
    result = run_quick("scaling", tmp_path)
    points = {p["mode"]: p for p in result["points"]}
    assert set(points) == {"train", "infer"}
    for p in points.values():
        assert (p["size"], p["latent"], p["batch"]) == (32, 8, 2)
        for key in ("seconds_median", "seconds_best", "images_per_second", "gflop", "gflop_per_second"):
            assert positive(p[key]), key
        assert 0.0 < p["attention_share"] <= p["transformer_share"] < 1.0
        assert math.isfinite(p["peak_rss_delta_mb"]) and p["peak_rss_delta_mb"] >= 0
    assert 2.5 < points["train"]["gflop"] / points["infer"]["gflop"] < 3.5  # backward ~ 2x forward
    assert set(result["summary"]) == {"train", "infer"}


def test_replace_section_rewrites_only_its_block(tmp_path):
    common = load_bench("study_common")
    doc = tmp_path / "doc.md"
    begin, end = common.markers("a")
    doc.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
    common.replace_section(doc, "a", "new table")
    assert doc.read_text() == f"intro\n{begin}\nnew table\n{end}\noutro\n"
    with pytest.raises(SystemExit, match="no block"):
        common.replace_section(doc, "b", "x")


def test_line_plot_draws_each_series(tmp_path):
    path = line_plot({"a": [(10, 0.5), (20, 0.9)], "b": [(10, 0.2), (250, 0.3)]}, tmp_path / "p.png", title="t",
                     x_label="x", y_label="y", log_x=True, y_range=(0.0, 1.0), reference=("ref", 0.8))
    image = Image.open(path).convert("RGB")
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # the two series' colours
    with pytest.raises(ValueError, match="nothing to plot"):
        line_plot({"a": []}, tmp_path / "q.png", title="t", x_label="x", y_label="y")
