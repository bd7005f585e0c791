"""Shared fixtures: composing the real configs, tiny runs in temporary folders."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from ldmcore import hydra_search

hydra_search.register()


@pytest.fixture(autouse=True, scope="session")
def _cache_outside_home(tmp_path_factory):
    """Nothing a test builds (first stages, tokenizers) lands in the user's cache."""
    previous = os.environ.get("LDMCORE_CACHE")
    os.environ["LDMCORE_CACHE"] = str(tmp_path_factory.mktemp("ldmcore_cache"))
    yield
    if previous is None:
        os.environ.pop("LDMCORE_CACHE", None)
    else:
        os.environ["LDMCORE_CACHE"] = previous


@pytest.fixture
def one_thread():
    """Tiny models run as fast on one thread, and do not stall when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


def compose_config(overrides: list[str] | None = None):
    """Compose the run config exactly as ``python -m ldmcore.run`` would (search-path plugin included)."""
    GlobalHydra.instance().clear()
    with initialize_config_module("ldmcore.conf", version_base=None):
        return compose("config", overrides=overrides or [])


@pytest.fixture
def tiny(tmp_path):
    """Overrides of a tiny run that keeps everything (cache included) inside tmp_path."""
    return ["+experiment=tiny", f"cache_dir={tmp_path / 'cache'}"]


def load_bench(name: str):
    """A bench script as a module (bench/ is not a package)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
