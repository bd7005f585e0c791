"""The guidance-sweep preset: one Hydra multirun command evaluates ONE checkpoint with each setting
of the per-condition guidance scales and of the present conditions, and ends with a table and a plot
of every faithfulness score."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import compose_config
from ldmcore.config import ConfigError
from ldmcore.evaluation.sweep import OUTPUTS, SweepError, main, read_sweep
from ldmcore.tasks import evaluate_checkpoint, train

SCORES = ["readable", "caption_accuracy", "box_recall"]
TEXT, LAYOUT = "sampler.guidance_scales.text", "sampler.guidance_scales.layout"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_model")
    overrides = ["+condition=[text,layout]", "+experiment=tiny", f"cache_dir={root / 'cache'}", "num_threads=1",
                 "condition.text.embed_dim=32", "condition.text.depth=1", "condition.layout.embed_dim=32", "condition.layout.depth=1"]
    train(compose_config(overrides), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def sweep_dir(checkpoint, tmp_path_factory):
    """The preset's one command: 2 x 2 scales x 2 settings of the present conditions = 8 jobs."""
    folder = tmp_path_factory.mktemp("sweep") / "multirun"
    command = [sys.executable, "-m", "ldmcore.run", "-m", "+experiment=sweep_guidance", f"checkpoint={checkpoint}",
               f"+{TEXT}=1,3", f"+{LAYOUT}=1,3", "present=null,[text]", f"hydra.sweep.dir={folder}",
               "trainer.grid_rows=2", "trainer.grid_columns=2", "sampler.steps=3", "num_threads=1"]
    done = subprocess.run(command, cwd=folder.parent, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_one_command_writes_a_table_with_one_row_per_job(sweep_dir):
    assert all((sweep_dir / name).is_file() for name in OUTPUTS)
    with open(sweep_dir / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert list(rows[0])[:4] == ["job", TEXT, LAYOUT, "present"] and set(SCORES) <= set(rows[0])
    settings = {(r[TEXT], r[LAYOUT], r["present"]) for r in rows}
    assert settings == set(itertools.product(["1", "3"], ["1", "3"], ["null", "[text]"]))
    assert all(0.0 <= float(r[score]) <= 1.0 for r in rows for score in SCORES)
    table = (sweep_dir / "sweep.md").read_text()
    assert table.count("\n| ") == 1 + 8  # header + one line per job
    assert json.loads((sweep_dir / "sweep.json").read_text())["rows"] == read_sweep(sweep_dir).rows


def test_the_plot_is_a_png_with_a_panel_per_score(sweep_dir):
    with Image.open(sweep_dir / "sweep.png") as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 3 * 250 and height >= 200  # three scores: three panels side by side


def test_each_job_used_its_scales_and_its_present_conditions(sweep_dir):
    for row in read_sweep(sweep_dir).rows:
        metrics = json.loads((sweep_dir / row["job"] / "metrics.json").read_text())
        if row["present"] == "null":  # all conditions given, each with its own scale
            assert metrics["present"] == ["text", "layout"]
            assert metrics["guidance_scales"] == {"text": float(row[TEXT]), "layout": float(row[LAYOUT])}
        else:  # the layout is absent: only the text is given and guided
            assert metrics["present"] == ["text"]
            assert metrics["guidance_scales"] == {"text": float(row[TEXT])}


def test_the_collector_rewrites_the_same_table_from_the_command_line(sweep_dir, capsys):
    table = (sweep_dir / "sweep.csv").read_text()
    (sweep_dir / "sweep.csv").unlink()
    main([str(sweep_dir)])
    assert (sweep_dir / "sweep.csv").read_text() == table
    assert "8 jobs" in capsys.readouterr().out


def test_a_folder_without_finished_jobs_is_refused(tmp_path):
    with pytest.raises(SweepError, match="no finished job"):
        read_sweep(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])


def test_present_may_only_name_the_models_conditions(checkpoint, tmp_path, one_thread):
    cfg = compose_config(["+experiment=sweep_guidance", f"checkpoint={checkpoint}", "present=[text,colour]"])
    with pytest.raises(ConfigError, match=r"present names \['colour'\].*its conditions: text, layout"):
        evaluate_checkpoint(cfg, tmp_path)
