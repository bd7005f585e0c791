"""Autoguidance: the formula, the snapshot a run keeps, and where it applies (without conditions,
and with them: ``sampler.conditional_autoguidance_scale``)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import compose_config
from ldmcore.diffusion.autoguidance import add_autoguidance, autoguidance
from ldmcore.tasks import evaluate_checkpoint, train


def test_formula_and_identity_at_scale_one():
    strong = lambda x, s: 2 * x  # noqa: E731
    weak = lambda x, s: x + 1  # noqa: E731
    x, sigma = torch.randn(3, 4), torch.ones(3)
    assert autoguidance(strong, weak, 1.0) is strong
    expected = (x + 1) + 3.0 * (2 * x - (x + 1))
    assert torch.allclose(autoguidance(strong, weak, 3.0)(x, sigma), expected)


def test_added_term_on_top_of_guidance():
    strong = lambda x, s: 2 * x  # noqa: E731
    weak = lambda x, s: x + 1  # noqa: E731
    cfg = lambda x, s: 3 * x - 1  # noqa: E731  (some classifier-free guided output)
    x, sigma = torch.randn(3, 4), torch.ones(3)
    assert add_autoguidance(cfg, strong, weak, 1.0) is cfg
    assert torch.allclose(add_autoguidance(cfg, strong, weak, 3.0)(x, sigma), (3 * x - 1) + 2.0 * (2 * x - (x + 1)))
    # without classifier-free guidance it is autoguidance itself: weak + w (strong - weak)
    assert torch.allclose(add_autoguidance(strong, strong, weak, 3.0)(x, sigma), autoguidance(strong, weak, 3.0)(x, sigma))


def test_conditions_present_are_autoguided_when_asked(tmp_path, tiny):
    train(compose_config([*tiny, "+condition=class", "trainer.guide_snapshot=0.5"]), tmp_path / "run")
    runs = {}
    for name, overrides in {"off": [], "on": ["sampler.conditional_autoguidance_scale=3"],
                            "on_unguided": ["sampler.conditional_autoguidance_scale=3", "sampler.guidance_scale=1"]}.items():
        runs[name] = evaluate_checkpoint(compose_config([f"checkpoint={tmp_path / 'run'}", "+experiment=tiny", *overrides]),
                                         tmp_path / name)
    assert runs["off"]["conditional_autoguidance_scale"] == 1.0 and runs["on"]["conditional_autoguidance_scale"] == 3.0
    grids = {name: (tmp_path / name / "samples.png").read_bytes() for name in runs}
    assert len(set(grids.values())) == 3  # each changes the samples


def test_a_run_keeps_the_snapshot_and_uses_it_without_conditions(tmp_path, tiny):
    metrics = train(compose_config([*tiny, "trainer.guide_snapshot=0.5"]), tmp_path / "run")
    tensors = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors"))
    guide = {k[len("guide."):]: v for k, v in tensors.items() if k.startswith("guide.")}
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    assert guide.keys() == ema.keys()
    assert any(not torch.equal(guide[k], ema[k]) for k in guide)  # step 2's EMA, not step 4's
    assert metrics["autoguidance_scale"] == 6.0
    # the same checkpoint sampled with and without autoguidance gives different grids
    on = evaluate_checkpoint(compose_config([f"checkpoint={tmp_path / 'run'}", "+experiment=tiny"]), tmp_path / "on")
    off = evaluate_checkpoint(compose_config([f"checkpoint={tmp_path / 'run'}", "+experiment=tiny",
                                              "sampler.autoguidance_scale=1"]), tmp_path / "off")
    assert on["autoguidance_scale"] == 6.0 and off["autoguidance_scale"] == 1.0
    assert (tmp_path / "on" / "samples.png").read_bytes() != (tmp_path / "off" / "samples.png").read_bytes()


def test_no_snapshot_when_disabled(tmp_path, tiny):
    metrics = train(compose_config([*tiny, "trainer.guide_snapshot=0"]), tmp_path / "run")
    tensors = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert not any(k.startswith("guide.") for k in tensors) and metrics["autoguidance_scale"] is None
