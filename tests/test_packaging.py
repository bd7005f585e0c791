"""The distribution installs what the repository holds, under non-generic import names."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    settings = PYPROJECT["tool"]["setuptools"]
    listed = set(settings["packages"])
    for folder, name in (("ldmcore", "ldmcore"), ("plugins", "ldmcore_plugins"), ("conf", "ldmcore.conf")):
        for init in (ROOT / folder).rglob("__init__.py"):
            package = ".".join([name, *init.parent.relative_to(ROOT / folder).parts])
            assert package in listed, f"{package} is missing from [tool.setuptools].packages"


def test_no_generic_import_name_is_installed(tmp_path):
    # From outside the repository (python -m adds the current folder to sys.path).
    probe = "import importlib.util as u; print(u.find_spec('plugins') is None, u.find_spec('ldmcore_plugins') is not None)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]
    top_level = {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]}
    assert top_level == {"ldmcore", "ldmcore_plugins", "hydra_plugins"}


def test_entry_points_load():
    eps = entry_points(group="ldmcore.plugins")
    assert {ep.name for ep in eps} >= {"class"}
    for ep in eps:
        ep.load()


def test_core_imports_no_plugin():
    for path in (ROOT / "ldmcore").rglob("*.py"):
        text = path.read_text()
        assert "ldmcore_plugins" not in text, f"{path} names the plugins package"
