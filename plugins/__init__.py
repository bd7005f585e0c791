"""ldmcore's built-in condition plugins (installed under the import name ``ldmcore_plugins``).

Each subpackage is one plugin, registered through the ``ldmcore.plugins`` entry-point group
exactly as a third-party plugin would be. No plugin imports another.
"""
