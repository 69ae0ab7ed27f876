"""The docs site (mkdocs.yml, docs/, scripts/gen_docs.py): `mkdocs build --strict` passes, and the
generated pages cover every config group and option, every verb and every room of the package;
the config reader keeps each key's comments; the Benchmarks page is generated from the benchmark
records (scripts/gen_benchmarks.py), each figure with its command, machine and date."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_docs.py"
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues? \d+")  # the project's tracker: history, for CHANGELOG.md


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
    benchmarks = (site / "benchmarks.html").read_text()
    assert 'id="summary"' in benchmarks and "<!-- generated:" not in benchmarks
    assert "2026-11-26-nano-vs-pytorch.json" not in benchmarks  # a summary row, not a section
    assert "2026-11-25-gguf-export.json" in benchmarks  # a section's record, with its name
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


def load_gen_benchmarks():
    spec = importlib.util.spec_from_file_location("gen_benchmarks",
                                                  ROOT / "scripts" / "gen_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_page_answers_first_from_the_records():
    """The summary table opens the page, one row per record with a ratio, each with its command
    and machine; one section per question; no internal issue numbers; about 600 lines."""
    gen = load_gen_benchmarks()
    records = gen.load_records()
    page = gen.page()
    assert page.index("## Summary") < page.index("{#speed-pytorch}")
    summary = page[page.index("## Summary"):page.index("{#speed-pytorch}")]
    rows = [r for r in gen.newest_by_name(records) if r.get("ratio") is not None]
    assert len(rows) >= 10
    for r in rows:
        assert f"**{r['ratio']:g}x**" in summary and gen.cell(r["command"]) in summary, r["name"]
    for question in {r["question"] for r in records}:
        assert f"{{#{question}}}" in page
    assert "<!-- generated:" not in page
    assert not ISSUE_NUMBER.search(page), ISSUE_NUMBER.search(page)
    # about 780: a new script or command adds its record, an earlier run of a command one line
    assert len(page.splitlines()) <= 800


def test_a_script_merged_into_another_keeps_its_records_on_the_page():
    """A record whose command runs a script since merged into another (gen_benchmarks.MOVED) is
    still current: shown in full, not filed as answered once."""
    gen = load_gen_benchmarks()
    merged = ("benchmarks/quality/bench_grpo_learning.py", "benchmarks/speed/bench_grpo_speed.py",
              "benchmarks/speed/bench_bf16.py")
    moved = [r for r in gen.load_records() if any(s in (r["command"] or "") for s in merged)]
    assert {s for r in moved for s in merged if s in r["command"]} == set(merged)
    for old in merged:
        assert not (gen.ROOT / old).exists() and (gen.ROOT / gen.MOVED[old]).is_file(), old
    page = gen.page()
    for r in moved:
        assert gen.current(r) == r and gen.cell(r["command"]) in page, r["_file"]


def test_a_runs_record_reaches_the_page(tmp_path):
    """A real run's record (benchmarks/harness.py write_record, in its own process as a script
    runs it) lands in MLXLAB_BENCH_RESULTS and is on the page built from that folder: the ratio
    in the summary, the figures under their question with the command and the machine."""
    write = ("import sys; sys.path.insert(0, '.')\n"
             "sys.argv = ['benchmarks/speed/bench.py', '--rounds', '2']\n"
             "from benchmarks.harness import write_record\n"
             "write_record('demo-vs-pytorch', {'tokens_per_s': 1234.5}, question='speed-pytorch',"
             " reference='PyTorch eager', ratio=1.5, summary='demo throughput')\n"
             "write_record('demo-memory', {'peak_mb': 321.0}, question='memory')\n")
    env = {**os.environ, "MLXLAB_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run([PYTHON, "-c", write], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = {json.loads(p.read_text())["name"]: json.loads(p.read_text())
               for p in tmp_path.glob("*.json")}
    assert set(records) == {"demo-vs-pytorch", "demo-memory"}
    record = records["demo-vs-pytorch"]
    assert record["command"] == "python benchmarks/speed/bench.py --rounds 2"
    assert record["machine"]["cpu"]["cores"] == os.cpu_count() and record["load"]["start"]
    page = load_gen_benchmarks().page(folder=tmp_path)
    assert "**1.5x**: demo throughput | PyTorch eager |" in page
    memory = page[page.index("{#memory}"):page.index("{#faults}")]
    assert "| peak_mb | 321.0 |" in memory and "`python benchmarks/speed/bench.py --rounds 2`" in memory
    assert record["machine"]["cpu"]["model"] in memory


def test_records_are_checked_and_a_run_under_pytest_keeps_out_of_the_repository(tmp_path):
    gen = load_gen_benchmarks()
    (tmp_path / "bad.json").write_text(json.dumps({"schema": 1, "name": "x"}))
    with pytest.raises(ValueError, match="needs question, date, command, machine, figures"):
        gen.load_records(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps(
        {"schema": 1, "name": "x", "question": "nowhere", "date": "2026-11-26", "command": "c",
         "machine": {}, "figures": {}}))
    with pytest.raises(ValueError, match="no section for: \\['nowhere'\\]"):
        gen.page(folder=tmp_path)
    # without MLXLAB_BENCH_RESULTS, a run under pytest writes to a temporary folder
    env = {k: v for k, v in os.environ.items() if k != "MLXLAB_BENCH_RESULTS"}
    env["PYTEST_CURRENT_TEST"] = "a test"
    done = subprocess.run([PYTHON, "-c", "import sys; sys.path.insert(0, '.')\n"
                           "from benchmarks.harness import write_record\n"
                           "print(write_record('x', {('a', 1): (2, 3)}, question='memory'))"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    written = Path(done.stdout.strip().splitlines()[-1])
    assert written.is_file() and ROOT not in written.parents
    assert json.loads(written.read_text())["figures"] == {"a/1": [2, 3]}  # a tuple key, as JSON


def test_a_records_link_that_reaches_nothing_fails_the_page(tmp_path):
    """Links inside the records (rendered into the Benchmarks page) are checked as the strict
    build checks the pages' links, in the default run: the shipped records' links all land,
    and a record linking to a removed page or to a heading the page lacks fails page(), naming
    the record and the link; links that land (a heading, a page of docs/) pass."""
    gen = load_gen_benchmarks()
    records = gen.load_records()
    assert any(gen.LINK.findall(s) for r in records for s in gen.strings(r))  # there are some
    assert gen.dangling_links(records, gen.page()) == []
    note = ("[gone](benchmarks-history.md#verdicts), [a heading](#summary), [no heading](#nowhere), "
            "[a guide](guide/training.md), [its heading](guide/training.md#no-such-heading)")
    (tmp_path / "planted.json").write_text(json.dumps(
        {"schema": 1, "name": "planted", "question": "memory", "date": "2026-11-27",
         "command": "c", "machine": {}, "figures": {"note": note}}))
    with pytest.raises(ValueError) as raised:
        gen.page(folder=tmp_path)
    assert str(raised.value).endswith(
        "planted.json: benchmarks-history.md#verdicts; planted.json: #nowhere; "
        "planted.json: guide/training.md#no-such-heading")


def test_links_from_outside_the_site_reach_a_heading_of_the_benchmarks_page():
    """README.md and benchmarks/README.md are not built by mkdocs: their links into
    docs/benchmarks.md are checked here against the generated page's headings."""
    from markdown.extensions.toc import slugify

    page = load_gen_benchmarks().page()
    anchors = set()
    for title in re.findall(r"^#+ (.+)$", page, re.M):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", title)
        anchors.add(explicit.group(1) if explicit else slugify(title, "-"))
    links = {(name, anchor) for name in ("README.md", "benchmarks/README.md")
             for anchor in re.findall(r"benchmarks\.md#([\w-]+)", (ROOT / name).read_text())}
    assert links, "the READMEs link into the benchmarks page"
    broken = sorted(link for link in links if link[1] not in anchors)
    assert not broken, broken
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300  # a quickstart, not a manual
