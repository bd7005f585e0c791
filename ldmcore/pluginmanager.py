"""Discovery of condition plugins through pluggy and the ``ldmcore.plugins`` entry-point group.

The core never imports a plugin: it asks this module for :class:`Condition` handles by name.
Built-in plugins arrive exactly as third-party ones do, through the entry-point group.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from pathlib import Path

import pluggy
from omegaconf import DictConfig, OmegaConf

from ldmcore import hookspecs

ENTRY_POINT_GROUP = "ldmcore.plugins"
REQUIRED_HOOKS = (
    "ldmcore_condition_name",
    "ldmcore_config_dir",
    "ldmcore_batch_keys",
    "ldmcore_build_encoder",
    "ldmcore_parse_value",
    "ldmcore_format_value",
)


class PluginError(RuntimeError):
    """A plugin is malformed: an unknown hook, a missing required hook, a duplicate name."""


class Condition:
    """One condition plugin, with its hooks callable for this plugin alone."""

    def __init__(self, manager: pluggy.PluginManager, plugin: object, source: str):
        self._manager = manager
        self._plugin = plugin
        self.source = source  # where it came from, for error messages
        implemented = {impl.function.__name__ for impl in _hookimpls(manager, plugin)}
        missing = [hook for hook in REQUIRED_HOOKS if hook not in implemented]
        if missing:
            raise PluginError(f"condition plugin {source} does not implement the required hooks: {', '.join(missing)}")
        self.name: str = self.call("ldmcore_condition_name")
        self._implemented = implemented

    def implements(self, hook: str) -> bool:
        return hook in self._implemented

    def default_options(self) -> DictConfig:
        """The plugin's own config file, ``condition/NAME.yaml``, without its defaults list: every
        option it defines, at its default."""
        options = OmegaConf.load(Path(self.call("ldmcore_config_dir")) / "condition" / f"{self.name}.yaml")
        options.pop("defaults", None)
        return options

    def call(self, hook: str, **kwargs):
        """Call ``hook`` on this plugin only; returns its result (None if not implemented)."""
        others = [p for p in self._manager.get_plugins() if p is not self._plugin]
        return self._manager.subset_hook_caller(hook, remove_plugins=others)(**kwargs)

    def __repr__(self) -> str:
        return f"Condition({self.name!r} from {self.source})"


def _hookimpls(manager: pluggy.PluginManager, plugin: object):
    return [impl for caller in manager.get_hookcallers(plugin) or [] for impl in caller.get_hookimpls() if impl.plugin is plugin]


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


class PluginRegistry:
    """The installed condition plugins, by name."""

    def __init__(self, manager: pluggy.PluginManager | None = None, load_entry_points: bool = True):
        self.manager = manager or new_manager()
        self.conditions: dict[str, Condition] = {}
        if load_entry_points:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                self.register(ep.load(), source=f"entry point {ep.name!r} ({ep.value})")

    def register(self, plugin: object, source: str | None = None) -> Condition:
        source = source or repr(plugin)
        try:
            self.manager.register(plugin)
        except ValueError as error:  # the same plugin object or name registered twice
            raise PluginError(f"cannot register condition plugin {source}: {error}") from error
        try:
            # Implementations of hooks that do not exist are typos or version skew: refuse them.
            self.manager.check_pending()
            condition = Condition(self.manager, plugin, source)
        except (pluggy.PluginValidationError, PluginError) as error:
            self.manager.unregister(plugin)
            raise PluginError(f"cannot register condition plugin {source}: {error}") from error
        if condition.name in self.conditions:
            self.manager.unregister(plugin)
            raise PluginError(
                f"two plugins name the condition {condition.name!r}: {self.conditions[condition.name].source} and {source}"
            )
        self.conditions[condition.name] = condition
        return condition

    def get(self, name: str) -> Condition:
        try:
            return self.conditions[name]
        except KeyError:
            valid = ", ".join(sorted(self.conditions)) or "(none installed)"
            raise KeyError(f"unknown condition {name!r}; installed conditions: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self.conditions)


@functools.lru_cache(maxsize=1)
def installed() -> PluginRegistry:
    """The registry of every plugin installed in this environment (loaded once)."""
    return PluginRegistry()
