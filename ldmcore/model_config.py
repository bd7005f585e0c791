"""Whether a checkpoint's saved config describes the model a run asks for, and the run config that
rebuilds a checkpoint's model: both fill the options a checkpoint predates with their defaults first."""

from __future__ import annotations

import inspect

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from ldmcore.config import known_options, validate, with_schema_defaults
from ldmcore.pluginmanager import installed
from ldmcore.training.checkpoint import CheckpointError

MODEL_SECTIONS = ("data", "autoencoder", "denoiser", "noise", "condition")
# Options that permit reading a file (a pickled one), by name at any depth of the model sections, a
# plugin's included: they do not change the model, so a checkpoint is compared without them.
LOADING_FLAGS = frozenset({"allow_pickle"})
# Options whose null means "derived from the selected conditions" (``ldmcore.system.coordinate_option``):
# the config cannot tell what was built, the weights' shapes can, and loading checks them key by key.
DERIVED_OPTIONS = frozenset({"coordinate_frequencies"})
NOTHING = object()  # an option a config does not have


def with_defaults(cfg: DictConfig) -> DictConfig:
    """The model sections of a (checkpoint's) config as this version reads them: each option they lack —
    one added since the config was written — at its default, from the schemas (``ldmcore/config.py``)
    and from each condition's own config file (or its ``legacy_defaults``: what a model without the
    option was); options the schemas no longer define dropped. Options they have keep their (resolved) values."""
    model = {s: OmegaConf.to_container(cfg[s], resolve=True) if isinstance(cfg[s], DictConfig) else cfg[s]
             for s in MODEL_SECTIONS if s in cfg}
    registry = installed()
    defaults = {}
    for name, saved in (model.get("condition") or {}).items():
        if name not in registry.conditions:  # a plugin not installed is named when the system is built
            continue
        options = registry.get(name).default_options()
        _apply_legacy_defaults(options, saved, options.get("legacy_defaults") or {})
        defaults[name] = options
    filled = with_schema_defaults(OmegaConf.merge({"condition": defaults}, known_options(model)))
    return OmegaConf.create({s: filled[s] for s in MODEL_SECTIONS})


def _apply_legacy_defaults(options: DictConfig, saved, legacy) -> None:
    """An option added to a plugin after a checkpoint was written takes the value that model was trained
    with, where the plugin names one (``legacy_defaults``, nested like the options), else its default."""
    saved = saved if isinstance(saved, dict) else {}
    for key, value in legacy.items():
        if isinstance(value, DictConfig) and isinstance(options.get(key), DictConfig):
            _apply_legacy_defaults(options[key], saved.get(key), value)
        elif key not in saved:
            options[key] = value


def _constructor_default(target, key: str):
    """The default of argument ``key`` of a ``_target_`` (what it got where a config left it out), or NOTHING."""
    try:
        parameter = inspect.signature(get_object(str(target))).parameters.get(key)
    except (ImportError, AttributeError, TypeError, ValueError):
        return NOTHING
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return NOTHING
    return list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default  # as a config holds it


def _shown(value) -> str:
    if value is NOTHING:
        return "(absent)"
    return f"{{{len(value)} options}}" if isinstance(value, dict) else repr(value)


def model_differences(saved, current, path: str = "") -> list[str]:
    """The options on which two model configs (plain containers) differ, as ``dotted.key: checkpoint A, config B``.
    Left out: loading flags (``LOADING_FLAGS``, at any depth), derived options (``DERIVED_OPTIONS``) and options only the checkpoint has (options
    since removed, which nothing reads); where an option of a ``_target_`` section is missing on one side,
    the constructor's default is what it got."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [f"{path}: checkpoint {saved!r}, config {current!r}"]
    same_target = saved.get("_target_") if saved.get("_target_") == current.get("_target_") else None
    found = []
    for key in [*saved, *(k for k in current if k not in saved)]:
        if key in LOADING_FLAGS or key in DERIVED_OPTIONS:
            continue
        a, b = saved.get(key, NOTHING), current.get(key, NOTHING)
        if same_target is not None:  # a constructor argument a config leaves out got its default
            a = _constructor_default(same_target, key) if a is NOTHING else a
            b = _constructor_default(same_target, key) if b is NOTHING else b
        if b is NOTHING and not isinstance(a, dict):
            continue  # an option this version no longer has
        where = f"{path}.{key}" if path else str(key)
        if a is NOTHING or b is NOTHING:
            found.append(f"{where}: checkpoint {_shown(a)}, config {_shown(b)}")
        else:
            found += model_differences(a, b, where)
    return found


def check_same_model(saved: DictConfig, cfg: DictConfig, source) -> None:
    """Resuming needs the checkpoint's model: the model sections of its saved config and of ``cfg``,
    each with the defaults of options it lacks (``with_defaults``), must agree. Raises ``CheckpointError``
    naming each differing option with both values."""
    found = model_differences(*(OmegaConf.to_container(with_defaults(c), resolve=True) for c in (saved, cfg)))
    if found:
        raise CheckpointError(f"{source} was trained with another configuration: " + "; ".join(found)
                              + " (give the checkpoint's values, or start a new run without checkpoint=)")


def checkpoint_run_config(cfg: DictConfig, saved: DictConfig) -> DictConfig:
    """This run's config with the model sections of a checkpoint's ``saved`` config (options added since
    it was written at their defaults): the model is the checkpoint's; sampler, seed and grid are this run's."""
    merged = OmegaConf.create(OmegaConf.to_container(cfg))
    model = OmegaConf.to_container(with_defaults(saved))
    for section in MODEL_SECTIONS:
        OmegaConf.update(merged, section, model.get(section) or {}, merge=False)
    return validate(merged)
