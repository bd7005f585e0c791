"""What the study benchmarks share (bench/sampler_efficiency.py, latent_vs_pixel.py, scaling.py):
composing the run config as ``python -m ldmcore.run`` does, where results go, and rewriting one
generated block of docs/performance-studies.md.

A full run writes bench/results/NAME.json, docs/images/ and its block of the doc; ``--quick``
(a smoke check in seconds) writes the same files under /tmp/ldmcore_quick/NAME/ instead, so that
it never overwrites recorded results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ldmcore import hydra_search

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance-studies.md"


def compose_run(overrides: list[str]) -> DictConfig:
    """The run config of ``python -m ldmcore.run OVERRIDES`` (plugins' config folders included)."""
    hydra_search.register()
    GlobalHydra.instance().clear()
    with initialize_config_module("ldmcore.conf", version_base=None):
        return compose("config", overrides=overrides)


def add_output_options(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks that the script works")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder of {name}.json and the plots (default bench/results and docs/images; "
                             f"with --quick /tmp/ldmcore_quick/{name})")
    parser.add_argument("--doc", type=Path, default=None,
                        help="markdown file whose generated block is rewritten (default docs/performance-studies.md; "
                             "with --quick a copy under --out)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")


def output_paths(args: argparse.Namespace, name: str) -> tuple[Path, Path, Path]:
    """(JSON file, folder of images, markdown file) for this run."""
    if args.out is None and not args.quick:
        json_path, images = ROOT / "bench" / "results" / f"{name}.json", ROOT / "docs" / "images"
    else:
        folder = args.out or Path("/tmp/ldmcore_quick") / name
        json_path, images = folder / f"{name}.json", folder
    doc = args.doc or (DOC if not args.quick and args.out is None else images / "performance-studies.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    return json_path, images, doc


def machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def write_json(path: Path, data: dict) -> None:
    """JSON without NaN / inf (they are written as null)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    Path(path).write_text(json.dumps(clean(data), indent=1) + "\n")


def markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}: begin (generated) -->", f"<!-- {key}: end -->"


def replace_section(doc: Path, key: str, body: str) -> None:
    """Rewrite the block between ``key``'s markers in ``doc``; a missing file gets just the block."""
    begin, end = markers(key)
    block = f"{begin}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.is_file() else ""
    if not text:
        doc.write_text(block + "\n")
        return
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no block {begin} ... {end}; add the two markers where the table belongs")
    head, rest = text.split(begin, 1)
    doc.write_text(head + block + rest.split(end, 1)[1])


def relative(path: Path, doc: Path) -> str:
    """``path`` as a link from ``doc``'s folder."""
    return os.path.relpath(path, doc.parent)
