"""The example plugin of docs/writing-a-plugin.md is a real package: pip installs it, ldmcore finds it
through the entry point, and a tiny model trains with it alone and beside a built-in condition —
with the core unchanged. The tutorial's code is the package's code."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import test_plugins as contract
from conftest import compose_config
from ldmcore.data.shapes import ShapesWorld
from ldmcore.pluginmanager import ENTRY_POINT_GROUP, installed
from ldmcore.tasks import load_trained, sample, train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "ldmcore-palette"
DOC = ROOT / "docs" / "writing-a-plugin.md"
TINY_TEXT = ["condition.text.embed_dim=32", "condition.text.depth=1"]


@pytest.fixture(scope="module")
def palette_site(tmp_path_factory):
    """The example installed by pip into a temporary folder on ``sys.path`` (the environment is left
    as it was); the cached plugin registry is reloaded on the way in and on the way out."""
    root = tmp_path_factory.mktemp("palette")
    # pip builds in the source folder (build/, *.egg-info): build a copy, keep the repository clean
    source = shutil.copytree(EXAMPLE, root / "source", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    installed.cache_clear()
    yield site
    sys.path.remove(str(site))
    for module in [m for m in sys.modules if m.split(".")[0] == "ldmcore_palette"]:
        del sys.modules[module]
    importlib.invalidate_caches()
    installed.cache_clear()


def test_the_plugin_arrives_through_the_entry_point_from_the_installed_package(palette_site):
    assert "palette" in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    palette = installed().get("palette")
    assert "entry point" in palette.source
    assert Path(palette.call("ldmcore_config_dir")).is_relative_to(palette_site)  # not the repository's copy
    assert (Path(palette.call("ldmcore_config_dir")) / "condition" / "palette.yaml").is_file()


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_the_plugin_passes_the_contract(palette_site, kind):
    contract.test_contract("palette", ShapesWorld(resolution=32, kind=kind, size=64, seed=3))
    contract.test_unreadable_user_value_is_refused_with_what_is_allowed("palette", ShapesWorld(size=8))


@pytest.mark.parametrize("conditions, lines", [
    ("palette", [{"palette": ["red", "blue"]}, {"palette": []}, {}]),
    ("[palette,text]", [{"palette": ["green"], "text": "a green square"}, {"text": "a red circle and a blue square"},
                        {"palette": ["cyan", "yellow"]}]),
])
def test_trains_and_samples_alone_and_beside_a_builtin(palette_site, tmp_path, one_thread, conditions, lines):
    common = ["+experiment=tiny", f"cache_dir={tmp_path / 'cache'}"]
    overrides = [f"+condition={conditions}", *common, "condition.palette.embed_dim=32", *(TINY_TEXT if "text" in conditions else [])]
    metrics = train(compose_config(overrides), tmp_path / "run")
    assert metrics["conditions"] == conditions.strip("[]").split(",")
    assert 0.0 <= metrics["palette_accuracy"] <= metrics["palette_iou"] <= 1.0
    if "text" in conditions:
        assert 0.0 <= metrics["caption_accuracy"] <= 1.0

    run = [f"checkpoint={tmp_path / 'run'}", *common]
    system, _, _ = load_trained(compose_config(run))
    assert system.model.conditioner.vector_dim == 32  # the palette's vector, routed by its declared injection

    # a conditions file with user palettes (and captions) -> images and a manifest of the same values
    conditions_file = tmp_path / "conditions.jsonl"
    conditions_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "samples"
    out.mkdir()
    assert sample(compose_config([*run, f"conditions={conditions_file}"]), out) == {"images": len(lines)}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k != "file"} for m in manifest] == lines
    assert all((out / m["file"]).is_file() for m in manifest)
    conditions_file.write_text('{"palette": ["red"]}\n{"palette": ["purple"]}\n')  # a colour the data does not have
    with pytest.raises(ValueError, match=r"conditions.jsonl:2.*'purple'.*known colours: red, green"):
        sample(compose_config([*run, f"conditions={conditions_file}"]), out)


# --- the tutorial shows the package's actual code ----------------------------------------------

def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of a markdown text."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def test_every_code_block_of_the_tutorial_is_in_the_package():
    files = {p: p.read_text() for p in EXAMPLE.rglob("*") if p.is_file() and p.suffix in {".py", ".toml", ".yaml"}}
    blocks = [(lang, code) for lang, code in code_blocks(DOC.read_text()) if lang in {"python", "toml", "yaml"}]
    assert len(blocks) >= 5
    for lang, code in blocks:
        assert any(code in text for text in files.values()), f"this {lang} block of {DOC.name} is not in {EXAMPLE}:\n{code}"


def test_the_tutorial_shows_every_hook_the_package_implements():
    shown = "\n".join(code for _, code in code_blocks(DOC.read_text()))
    tree = ast.parse((EXAMPLE / "ldmcore_palette" / "plugin.py").read_text())
    hooks = [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("ldmcore_")]
    assert len(hooks) >= 6
    missing = [h for h in hooks if f"def {h}(" not in shown]
    assert not missing, f"{DOC.name} does not show {missing}"
