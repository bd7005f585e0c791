"""The Hydra entry point: ``python -m ldmcore.run [task=train|sample|eval] [+condition=NAME] ...``.

Every run writes into its own Hydra output folder and prints that folder as its last line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ldmcore import hydra_search
from ldmcore.config import ConfigError, validate
from ldmcore.pluginmanager import PluginError
from ldmcore.tasks import TASKS
from ldmcore.training.checkpoint import CheckpointError
from ldmcore.training.first_stage import FirstStageRejected
from ldmcore.training.loop import NonFiniteLossError

log = logging.getLogger("ldmcore")
USER_ERRORS = (ConfigError, CheckpointError, FirstStageRejected, PluginError, NonFiniteLossError)
hydra_search.register()


@hydra.main(version_base=None, config_path="pkg://ldmcore.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        TASKS[validate(cfg).task](cfg, run_dir)
    except USER_ERRORS as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(run_dir)


if __name__ == "__main__":
    main()
