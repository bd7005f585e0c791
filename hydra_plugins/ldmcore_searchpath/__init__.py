"""Exposes ldmcore's search-path plugin to Hydra's scan of the ``hydra_plugins`` namespace."""

from ldmcore.hydra_search import LdmcoreSearchPathPlugin  # noqa: F401
