"""Hydra search path for condition plugins: every installed plugin's config folder is added, so
that ``+condition=NAME`` finds the plugin's ``condition/NAME.yaml``.

Hydra discovers search-path plugins by scanning the ``hydra_plugins`` namespace package, which an
editable install cannot always expose; :func:`register` registers the class directly and is
called by ``ldmcore.run`` (call it yourself before Hydra's ``compose`` API).
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LdmcoreSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from ldmcore.pluginmanager import installed

        for condition in installed().conditions.values():
            search_path.append(provider=f"ldmcore-plugin-{condition.name}", path=f"file://{condition.call('ldmcore_config_dir')}")


def register() -> None:
    """Make Hydra use the plugin search path (idempotent)."""
    Plugins.instance().register(LdmcoreSearchPathPlugin)
