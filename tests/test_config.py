"""Every config in conf/ composes and instantiates; bad values fail before work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import real_data
from conftest import compose_config
from ldmcore.config import ConfigError, validate
from ldmcore.data.base import data_info
from ldmcore.pluginmanager import installed
from ldmcore.system import build, build_system
from ldmcore.model_config import check_same_model

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name != "experiment" and not group.name.startswith("_")
    for option in sorted(group.glob("*.yaml"))
]
# Configs of pretrained weights require their path (``???``); the weights are read when a run
# obtains its first stage, not when the system is built.
PRETRAINED = {("autoencoder", "sd_vae"): ["autoencoder.pretrained=/read/when/a/run/starts"]}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}/{o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_builds(group, option, tmp_path):
    files = real_data.required_options(option, tmp_path) if group == "data" else []  # real data sources need files
    files += PRETRAINED.get((group, option), [])
    # The tiny preset sizes a learned first stage's layers; the identity first stage (pixel space) has none.
    tiny = [] if (group, option) == ("autoencoder", "identity") else ["+experiment=tiny"]
    cfg = validate(compose_config([f"{group}={option}", *tiny, *files]))
    dataset = build("data", cfg.data)
    system = build_system(cfg, dataset)
    assert system.first_stage.latent_channels == cfg.autoencoder.model.latent_channels
    assert system.model.unet is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    validate(compose_config([f"+experiment={experiment}"]))


@pytest.mark.parametrize("name", installed().names())
def test_every_condition_composes_and_derives_the_unet(name):
    cfg = validate(compose_config([f"+condition={name}", "+experiment=tiny"]))
    assert name in cfg.condition
    system = build_system(cfg, build("data", cfg.data))
    conditioner = system.model.conditioner
    assert system.model.unet.in_channels == system.first_stage.latent_channels + conditioner.concat_channels


@pytest.mark.parametrize("name", installed().names())
def test_no_condition_keeps_the_cache_dir_in_its_options(name, tmp_path):
    """cache_dir reaches plugins through their hooks, never through their options: those are saved with
    each checkpoint and compared on resume, so a run resumed with another cache_dir is the same model."""
    a, b = (validate(compose_config([f"+condition={name}", f"cache_dir={tmp_path / folder}"])) for folder in "ab")
    assert OmegaConf.to_container(a.condition, resolve=True) == OmegaConf.to_container(b.condition, resolve=True)
    check_same_model(OmegaConf.create(OmegaConf.to_yaml(a, resolve=True)), b, "RUN")


@pytest.mark.parametrize("overrides, kind, steps", [
    ([], "single", 450),
    (["+condition=class"], "single", 450),
    (["+condition=layout"], "multi", 600),  # multi-object scenes bring the first stage they need
    (["+condition=[text,layout]"], "multi", 600),
    (["+condition=layout", "autoencoder=kl_f4"], "multi", 450),  # the command line still wins
    (["+condition=layout", "autoencoder.train.steps=300"], "multi", 300),
])
def test_multi_object_conditions_select_the_scenes_first_stage(overrides, kind, steps):
    cfg = compose_config(overrides)
    assert (cfg.data.kind, cfg.autoencoder.train.steps) == (kind, steps)


@pytest.mark.parametrize("overrides, attention", [
    ([], [2]),
    (["+condition=class"], [2]),
    (["+condition=layout"], [1, 2]),  # tokens that name small places attend at 8x8 too
    (["+condition=[text,layout]"], [1, 2]),
    (["+condition=image_text"], [1, 2]),
    (["+condition=layout", "denoiser=unet"], [2]),  # the command line still wins
    (["+condition=layout", "denoiser.attention_resolutions=[2]"], [2]),
])
def test_token_conditions_select_fine_attention(overrides, attention):
    assert list(compose_config(overrides).denoiser.attention_resolutions) == attention


@pytest.mark.parametrize("overrides, steps, lr, scales, autoguidance", [
    (["+condition=text"], 3200, 1e-3, {"text": 1.0}, 3.0),  # text's trainer and sampler presets
    (["+condition=text", "sampler=plms"], 3200, 1e-3, {"text": 1.0}, 3.0),  # merged over any sampler
    (["+condition=[text,layout]"], 3200, 1e-3, {"text": 1.0}, 3.0),  # the layout keeps the global scale
    (["+condition=text", "trainer=default", "sampler.guidance_scales.text=3", "sampler.conditional_autoguidance_scale=1"],
     1600, 2e-3, {"text": 3.0}, 1.0),  # the command line still wins
    (["+condition=layout"], 1600, 2e-3, {}, 1.0),
    (["+condition=image_text"], 3200, 1e-3, {}, 1.0),  # image_text takes the long trainer, not text's sampler preset
    (["+condition=image_text", "trainer=default"], 1600, 2e-3, {}, 1.0),
    (["+condition=masked_image"], 3200, 1e-3, {}, 1.0),  # inpainting takes the long trainer too
    (["+condition=[masked_image,text]"], 3200, 1e-3, {"text": 1.0}, 3.0),
])
def test_conditions_select_their_trainer_and_sampler_presets(overrides, steps, lr, scales, autoguidance):
    cfg = compose_config(overrides)
    assert (cfg.trainer.steps, cfg.trainer.lr, dict(cfg.sampler.guidance_scales)) == (steps, lr, scales)
    assert (cfg.sampler.conditional_autoguidance_scale, cfg.sampler.guidance_scale) == (autoguidance, 3.0)


def test_class_as_vector_derives_vector_dim():
    cfg = validate(compose_config(["+condition=class", "condition.class.injection=vector", "+experiment=tiny"]))
    system = build_system(cfg, build("data", cfg.data))
    assert system.model.conditioner.vector_dim == cfg.condition["class"].embed_dim
    assert system.model.conditioner.context_dim is None


def test_unknown_condition_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as info:
        compose_config(["+condition=nonexistent"])
    assert "class" in str(info.value)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("trainer.steps=many", "trainer.steps"),
        ("trainer.lr=fast", "trainer.lr"),
        ("+trainer.learning_rate=1", "learning_rate"),
        ("sampler.name=euler_magic", "sampler.name"),
        ("noise.prediction=score", "noise.prediction"),
        ("task=dance", "task"),
    ],
)
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as info:
        validate(compose_config([override]))
    assert fragment in str(info.value)


def test_bad_model_option_names_the_section():
    cfg = validate(compose_config(["+denoiser.wings=3", "+experiment=tiny"]))
    with pytest.raises(ConfigError) as info:
        build_system(cfg, build("data", cfg.data))
    assert "denoiser" in str(info.value) and "wings" in str(info.value)


def test_condition_reading_a_key_the_data_lacks_fails_at_start_up():
    cfg = validate(compose_config(["+condition=class", "+experiment=tiny"]))
    dataset = build("data", cfg.data)
    info = data_info(dataset)
    lacking = type(info)(name="NoLabels", resolution=info.resolution, provides=("image",))
    with pytest.raises(ConfigError) as err:
        build_system(cfg, info=lacking)
    assert "class_label" in str(err.value) and "NoLabels" in str(err.value)


def test_resolved_config_round_trips_through_yaml():
    cfg = validate(compose_config(["+condition=class"]))
    again = validate(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg, resolve=True)
