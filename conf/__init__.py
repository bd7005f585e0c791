"""ldmcore's Hydra config groups (installed as the package ldmcore.conf)."""
