"""Hydra search path for ldmcore: the core's config groups, then each installed condition plugin's
config folder, so that ``+condition=NAME`` finds a plugin's ``condition/NAME.yaml``.

Hydra discovers this class by scanning the ``hydra_plugins`` namespace package.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LdmcoreSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from ldmcore.pluginmanager import installed

        for condition in installed().conditions.values():
            search_path.append(provider=f"ldmcore-plugin-{condition.name}", path=f"file://{condition.call('ldmcore_config_dir')}")
