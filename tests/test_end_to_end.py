"""End-to-end smoke runs on the tiny config: train, sample from a conditions file, evaluate,
resume, reuse of the first stage, the gate, and the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import compose_config
from ldmcore.config import ConfigError
from ldmcore.tasks import evaluate_checkpoint, sample, train
from ldmcore.training.checkpoint import CheckpointError
from ldmcore.training.first_stage import FirstStageRejected


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("class_run")
    cfg = compose_config(["+condition=class", "+experiment=tiny", f"cache_dir={root / 'cache'}"])
    metrics = train(cfg, root / "run")
    return root, metrics


def test_unconditional_run_leaves_its_outputs(tmp_path, tiny):
    run = tmp_path / "run"
    metrics = train(compose_config(tiny), run)
    for name in ("samples.png", "metrics.json", "metrics.jsonl", "first_stage.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("checkpoints/step_*/model.safetensors"))
    assert [p.name for p in sorted(run.glob("samples/*.png"))] == ["step_0000002.png"]  # the last step's grid is samples.png
    assert 0.0 <= metrics["readable"] <= 1.0 and metrics["conditions"] == []
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["img_s"] > 0 for r in log)


def test_first_stage_is_reused_for_the_same_config(tmp_path, tiny):
    train(compose_config(tiny), tmp_path / "a")
    train(compose_config(tiny), tmp_path / "b")
    first = json.loads((tmp_path / "a" / "first_stage.json").read_text())
    second = json.loads((tmp_path / "b" / "first_stage.json").read_text())
    assert first["reused"] is False and second["reused"] is True and first["source"] == second["source"]


def test_first_stage_below_the_gate_is_refused(tmp_path, tiny):
    with pytest.raises(FirstStageRejected, match="min_psnr"):
        train(compose_config([*tiny, "autoencoder.gate.min_psnr=99"]), tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_class_run_samples_from_a_conditions_file(class_run, tmp_path):
    root, metrics = class_run
    assert "class_accuracy" in metrics and metrics["samples"] == 18 * 2  # one row per class
    conditions = tmp_path / "conditions.jsonl"
    conditions.write_text('{"class": "red circle"}\n{"class": 8}\n\n{}\n')
    out = tmp_path / "out"
    out.mkdir()
    sample(compose_config([f"checkpoint={root / 'run'}", f"conditions={conditions}", "+experiment=tiny"]), out)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m.get("class") for m in manifest] == ["red circle", 8, None]
    assert all((out / m["file"]).is_file() for m in manifest)


@pytest.mark.parametrize(
    "line,fragment",
    [('{"text": "a red circle"}', "unknown condition"), ('{"class": "purple hexagon"}', "purple hexagon"),
     ('{"class": "red circle"', "not valid JSON"), ('["class"]', "JSON object")],
)
def test_bad_conditions_files_are_named(class_run, tmp_path, line, fragment):
    root, _ = class_run
    conditions = tmp_path / "conditions.jsonl"
    conditions.write_text('{"class": "red circle"}\n' + line + "\n")
    with pytest.raises(ConfigError) as info:
        sample(compose_config([f"checkpoint={root / 'run'}", f"conditions={conditions}"]), tmp_path / "out")
    assert fragment in str(info.value) and f"{conditions}:2" in str(info.value)


def test_eval_writes_metrics(class_run, tmp_path):
    root, _ = class_run
    metrics = evaluate_checkpoint(compose_config([f"checkpoint={root / 'run'}", "+experiment=tiny"]), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["class_accuracy"] == metrics["class_accuracy"]


def test_eval_scores_with_plugins_the_model_lacks(class_run, tmp_path):
    """score_with: the baseline of a model trained without a condition, scored by that condition's metric."""
    root, _ = class_run
    metrics = evaluate_checkpoint(compose_config([f"checkpoint={root / 'run'}", "+experiment=tiny", "score_with=[text]"]), tmp_path)
    assert 0.0 <= metrics["caption_accuracy"] <= 1.0 and "class_accuracy" in metrics
    with pytest.raises(ConfigError, match="score_with.*nosuch"):
        evaluate_checkpoint(compose_config([f"checkpoint={root / 'run'}", "+experiment=tiny", "score_with=[nosuch]"]), tmp_path)


def test_checkpoint_not_matching_the_config_lists_the_keys(class_run, tmp_path):
    root, metrics = class_run
    tensors = load_file(os.path.join(metrics["checkpoint"], "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("ema.unet.out")}, str(broken / "model.safetensors"))
    (broken / "config.yaml").write_text(open(os.path.join(metrics["checkpoint"], "config.yaml")).read())
    with pytest.raises(CheckpointError, match="missing: ema.unet"):
        evaluate_checkpoint(compose_config([f"checkpoint={broken}"]), tmp_path)


def test_resume_continues_the_same_run(tmp_path, tiny):
    overrides = [*tiny, "+condition=class", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3"]
    train(compose_config(overrides), tmp_path / "straight")
    half = tmp_path / "straight" / "checkpoints" / "step_0000002"
    train(compose_config([*overrides, f"checkpoint={half}"]), tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(("model.", "ema.", "optimizer.")):
            assert torch.equal(a[key], b[key]), key


def test_resume_from_a_checkpoint_written_before_newer_options(class_run, tmp_path, tiny):
    """A checkpoint's config.yaml without options added since (here autoencoder.allow_pickle and
    scale_factor) still resumes: they take their defaults; a loading flag is not compared at all."""
    root, _ = class_run
    old = shutil.copytree(root / "run" / "checkpoints" / "step_0000002", tmp_path / "old")
    saved = OmegaConf.load(old / "config.yaml")
    del saved.autoencoder["allow_pickle"], saved.autoencoder["scale_factor"]
    OmegaConf.save(saved, old / "config.yaml")
    metrics = train(compose_config([*tiny, "+condition=class", "autoencoder.allow_pickle=true", f"checkpoint={old}"]),
                    tmp_path / "resumed")
    assert metrics["resumed_from"] == str(old) and (tmp_path / "resumed" / "checkpoints" / "step_0000004").is_dir()


def test_resume_from_another_configuration_is_refused(class_run, tmp_path, tiny):
    root, _ = class_run
    with pytest.raises(CheckpointError, match="another configuration"):
        train(compose_config([*tiny, "+condition=class", "denoiser.model_channels=16", f"checkpoint={root / 'run'}"]), tmp_path)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ldmcore.run", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_prints_the_run_folder_last(tmp_path):
    run = tmp_path / "run"
    done = run_cli("+experiment=tiny", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(run)
    assert (run / "samples.png").is_file()


@pytest.mark.parametrize(
    "override,fragment",
    [("+condition=telepathy", "class"), ("trainer.steps=abc", "trainer.steps"), ("sampler.name=magic", "sampler.name")],
)
def test_cli_bad_input_fails_before_work(tmp_path, override, fragment):
    done = run_cli(override, f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode != 0
    assert fragment in done.stderr + done.stdout
    assert not (tmp_path / "cache").exists() and not list((tmp_path / "run").glob("checkpoints"))
