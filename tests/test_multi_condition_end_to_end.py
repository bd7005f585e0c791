"""A tiny model conditioned on text and layout together: train, then sample from a conditions file
whose lines give both conditions or only one, with one guidance scale per condition."""

from __future__ import annotations

import json

import pytest

from conftest import compose_config, load_bench
from ldmcore.tasks import sample, train


@pytest.fixture(scope="module")
def text_layout_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_layout_run")
    overrides = ["+condition=[text,layout]", "+experiment=tiny", f"cache_dir={root / 'cache'}",
                 "condition.text.embed_dim=32", "condition.text.depth=1", "condition.layout.embed_dim=32", "condition.layout.depth=1"]
    metrics = train(compose_config(overrides), root / "run")
    return root, metrics


def test_training_on_text_and_layout_scores_both(text_layout_run):
    root, metrics = text_layout_run
    assert metrics["conditions"] == ["text", "layout"]
    assert 0.0 <= metrics["caption_accuracy"] <= 1.0 and 0.0 <= metrics["box_recall"] <= 1.0
    assert 0.0 <= metrics["joint_accuracy"] <= min(metrics["caption_accuracy"], metrics["box_recall"])
    assert "joint_accuracy" in metrics["score_names"]
    assert len(list((root / "cache" / "tokenizers").glob("*.model"))) == 1


def test_failure_breakdown_sorts_every_box_and_caption_of_the_grid(text_layout_run):
    root, metrics = text_layout_run
    result = load_bench("failure_breakdown").main([str(root / "run")])
    assert sum(result["text (per caption)"].values()) == metrics["samples"]
    assert sum(result["layout (per target box)"].values()) >= metrics["samples"]  # every layout has 1-3 boxes
    assert (root / "run" / "samples.failures.json").is_file()


@pytest.mark.parametrize("guidance", ["independent", "nested"])
def test_sampling_lines_with_both_or_one_condition(text_layout_run, tmp_path, guidance):
    root, _ = text_layout_run
    lines = [
        {"text": "a red circle", "layout": [{"label": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}]},
        {"text": "a blue square and a green triangle"},
        {"layout": [{"label": "yellow triangle", "box": [0.5, 0.5, 0.9, 0.9]}]},
        {},
    ]
    conditions = tmp_path / "conditions.jsonl"
    conditions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    out.mkdir()
    cfg = compose_config([f"checkpoint={root / 'run'}", f"conditions={conditions}", "+experiment=tiny",
                          f"sampler.guidance={guidance}", "++sampler.guidance_scales.text=4", "sampler.guidance_order=[layout]"])
    assert sample(cfg, out) == {"images": 4}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k != "file"} for m in manifest] == lines
    assert all((out / m["file"]).is_file() for m in manifest)
    assert len(list((root / "cache" / "tokenizers").glob("*.model"))) == 1  # the model's tokenizer was reused
