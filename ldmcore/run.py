"""The Hydra entry point: ``python -m ldmcore.run [task=train|sample|eval] [+condition=NAME] ...``.

Every run writes into its own Hydra output folder and prints that folder as its last line. Under
``torchrun --nproc_per_node=N -m ldmcore.run ...`` (docs/scaling.md) rank 0 lets Hydra choose that
folder and tells the other ranks, which write nothing of their own.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldmcore import hydra_search
from ldmcore.config import ConfigError, validate
from ldmcore.data.skips import DataError
from ldmcore.pluginmanager import PluginError
from ldmcore.tasks import TASKS
from ldmcore.training import distributed
from ldmcore.training.checkpoint import CheckpointError
from ldmcore.training.divergence import DivergedLossError
from ldmcore.training.first_stage import FirstStageRejected
from ldmcore.training.loop import NonFiniteLossError

log = logging.getLogger("ldmcore")
USER_ERRORS = (ConfigError, CheckpointError, FirstStageRejected, PluginError, NonFiniteLossError, DivergedLossError, distributed.PeerFailed,
               DataError)
hydra_search.register()


@hydra.main(version_base=None, config_path="pkg://ldmcore.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ctx = distributed.current()
    if ctx.enabled and ctx.is_main:
        distributed.broadcast_object(str(run_dir), ctx)  # received in launch() by the other ranks
    try:
        TASKS[validate(cfg).task](cfg, run_dir)
    except USER_ERRORS as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if ctx.is_main:
        print(run_dir)


def hydra_quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override value: quotes are escaped, and so are the
    backslashes before a quote or at the end (the parser keeps any other backslash as it is)."""
    return "'" + re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'") + "'"


def launch() -> None:
    """``python -m ldmcore.run``: a single process runs ``main`` as it is. With WORLD_SIZE > 1 the
    process joins the process group first; ranks > 0 wait for rank 0's output folder and run in
    it without Hydra's own files there (no .hydra/, no log file; warnings go to the console)."""
    ctx = distributed.init_from_env()
    try:
        if ctx.enabled and not ctx.is_main:
            run_dir = distributed.broadcast_object(None, ctx)
            sys.argv += [f"hydra.run.dir={hydra_quoted(run_dir)}", "hydra.output_subdir=null",
                         "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
        main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    launch()
