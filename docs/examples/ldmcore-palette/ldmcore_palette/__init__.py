"""A palette condition for ldmcore: the set of colours present in an image (a worked example of
a third-party plugin, docs/writing-a-plugin.md)."""
