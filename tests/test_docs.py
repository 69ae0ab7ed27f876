"""The docs site (mkdocs.yml, docs/, scripts/gen_docs.py): `mkdocs build --strict` passes, and the
generated pages cover every config group and option, every verb and every room of the package;
the config reader keeps each key's comments."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_docs.py"


def load_gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_site_builds_strict_and_covers_conf_cli_and_api(tmp_path):
    site = tmp_path / "site"
    # The banners some plugins print about MkDocs' future are noise in a test log.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    out = subprocess.run([PYTHON, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (site / "index.html").exists() and (site / "benchmarks.html").exists()
    for folder in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir()):
        page = (site / "configuration" / f"{folder.name}.html").read_text()
        for option in folder.rglob("*.yaml"):
            assert f"conf/{option.relative_to(ROOT / 'conf').as_posix()}" in page, option
    cli = (site / "cli.html").read_text()
    for verb in ("train", "eval", "predict", "generate", "register", "serve", "runs", "export"):
        assert f'id="mlxlab-{verb}"' in cli, verb
    assert "== Configuration groups ==" in cli  # mlxlab-train --help, from Hydra
    assert "usage: mlxlab runs merge" in cli
    gen_docs = load_gen_docs()
    for room in gen_docs.rooms():
        assert (site / "api" / f"{room.stem}.html").exists(), room
    # a function documented in the stats room, read from its docstring
    assert "seeds_needed" in (site / "api" / "stats.html").read_text()
    # nothing loaded from the network when the site is opened (fonts, scripts)
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()


def test_an_option_file_is_read_with_its_comments(tmp_path):
    gen_docs = load_gen_docs()
    path = tmp_path / "demo.yaml"
    path.write_text(
        "# @package _global_\n"
        "# A demo option: its header.\n"
        "#   mlxlab-train demo=x    (a command)\n"
        "defaults:                 # what it composes\n"
        "  - base\n"
        "  - _self_\n"
        "\n"
        "size: 128                 # how big: a | b\n"
        "                          # (continued)\n"
        "# The comment above a key.\n"
        "name: 'a # b'\n"
        "sub:                      # a mapping\n"
        "  inner: [1, 2]\n"
        "  items:\n"
        "    - x   # first\n"
        "    - y\n"
        "text: |\n"
        "  two: lines\n"
        "  of text\n"
        "last: null\n")
    option = gen_docs.read_option(path, "demo")
    assert option.package == "_global_"
    assert option.header == ["A demo option: its header.", "  mlxlab-train demo=x    (a command)"]
    assert option.defaults == ["base", "_self_"] and option.defaults_note == "what it composes"
    keys = {key.path: (key.value, key.notes) for key in option.keys}
    assert keys == {
        "size": ("128", ["how big: a | b (continued)"]),
        "name": ("'a # b'", ["The comment above a key."]),
        "sub": ("", ["a mapping"]),
        "sub.inner": ("[1, 2]", []),
        "sub.items": ("[x, y]", []),
        "text": ("(text block)", []),
        "last": ("null", []),
    }
    # in a table cell: pipes, angle brackets and underscores stay literal text
    assert gen_docs.md_text("a | b <run dir> _x_ `c|d`") == r"a \| b &lt;run dir&gt; \_x\_ `c|d`"
    assert "```bash\nmlxlab-train demo=x    (a command)\n```" in gen_docs.prose(option.header)
