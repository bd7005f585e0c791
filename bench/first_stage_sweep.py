"""Train first stages of several configs on the shapes world and record PSNR / read-back vs time.

    python bench/first_stage_sweep.py autoencoder.train.steps=600 autoencoder.model.base_channels=16 ...

Each positional argument is a Hydra override applied to the default run config; the result is
appended to bench/results/first_stage_sweep.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from ldmcore import hydra_search
from ldmcore.config import validate
from ldmcore.training.first_stage import measure, train_first_stage

RESULTS = Path(__file__).parent / "results" / "first_stage_sweep.jsonl"


def main(overrides: list[str]) -> dict:
    hydra_search.register()
    with initialize_config_module("ldmcore.conf", version_base=None):
        cfg = validate(compose("config", overrides=overrides))
    torch.manual_seed(cfg.seed)
    dataset = instantiate(cfg.data)
    autoencoder = instantiate(cfg.autoencoder.model)
    start = time.perf_counter()
    history = train_first_stage(autoencoder, dataset, cfg.autoencoder.train, cfg.seed)
    seconds = time.perf_counter() - start
    autoencoder.eval()
    metrics = measure(autoencoder, dataset, dataset.reader, 1000)
    result = {"overrides": overrides, "train_seconds": round(seconds, 1), "params": sum(p.numel() for p in autoencoder.parameters()),
              "img_s": cfg.autoencoder.train.steps * cfg.autoencoder.train.batch_size / seconds, **metrics,
              "final_loss": history[-1]["loss"], "torch_threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
