"""docs/benchmarks.md's tables, generated from the benchmark records, so every figure on the page
has its record (benchmarks/results/*.json: the figures, the command, the machine, the date) and
no table can go stale by hand.

docs/benchmarks.md is the written part: prose, one section per standing question, and a line
`<!-- generated: summary -->` or `<!-- generated: QUESTION -->` where the tables go. At every
`mkdocs build` scripts/gen_docs.py calls `page()`, which replaces each such line:

- `summary`: one row per record that has a `ratio` (the newest record of each `name`): the
  question, mlxlab's figure as a ratio of the reference's, the reference, the machine, the date
  and the command;
- a question (`speed-pytorch`, `quality`, ... : a record's `question`): that question's other
  records, grouped by title, newest first, each with its machine, date, commit and command
  above its table; a record whose script has since been removed (its question answered once)
  keeps its title and a line naming the record.

benchmarks/README.md states the record schema; benchmarks/harness.py's `write_record` writes it.
To read the page without mkdocs:

    python scripts/gen_benchmarks.py > /tmp/benchmarks.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = ROOT / "docs" / "benchmarks.md"
PLACEHOLDER = re.compile(r"^<!-- generated: ([a-z0-9-]+) -->$", re.M)
QUESTION = re.compile(r"^## (.+?) \{#([a-z0-9-]+)\}$", re.M)  # a section's heading and its id
REQUIRED = ("schema", "name", "question", "date", "command", "machine", "figures")
SCRIPT = re.compile(r"benchmarks/[\w/]+\.py")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")  # a Markdown link's target
HEADING = re.compile(r"^#+ (.+?)\s*$", re.M)
# Scripts merged into another: a record run by the old path is still current (the new path runs it
# as a mode of the script it moved into; benchmarks/README.md names the flag).
MOVED = {"benchmarks/quality/bench_grpo_learning.py": "benchmarks/quality/bench_gkd_learning.py",
         "benchmarks/speed/bench_grpo_speed.py": "benchmarks/speed/bench_preference.py",
         "benchmarks/speed/bench_bf16.py": "benchmarks/speed/bench.py"}
GENERATED = ("cli.md", "configuration/", "api/")  # pages scripts/gen_docs.py writes at build time


def load_records(folder: Path = RESULTS) -> list[dict]:
    """Every record in `folder` (its top-level *.json files; sub-folders hold raw logs), each
    checked for the keys the page needs."""
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            raise ValueError(f"{path}: a benchmark record needs {', '.join(missing)}")
        records.append({**record, "_file": path.name})
    return records


def cell(value: object) -> str:
    """A value as one table cell: pipes escaped, newlines folded."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return " ".join(text.split()).replace("|", "\\|")


def machine(record: dict) -> str:
    m = record["machine"]
    if m.get("as_stated") or not m.get("cpu"):
        return m.get("as_stated") or ""
    cpu = m["cpu"]
    parts = [cpu.get("model", "?")]
    if cpu.get("family"):
        parts.append(f"family {cpu['family']} model {cpu.get('model_number')}")
    parts.append(f"{cpu.get('cores')} cores" + (f", {cpu['isa']}" if cpu.get("isa") else ""))
    if m.get("blas_threads"):
        parts.append(f"{m['blas_threads']} BLAS threads")
    return ", ".join([*m.get("gpu", []), *parts])


def load(record: dict) -> str:
    value = record.get("load")
    if isinstance(value, dict):  # as write_record logs it: 1, 5, 15-minute averages
        return f"{value['start'][0]:.1f} at the start, {value['end'][0]:.1f} at the end"
    return value or ""


def date(record: dict) -> str:
    return record["date"][:10]


def newest_by_name(records: list[dict]) -> list[dict]:
    newest: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r["date"]):
        newest[record["name"]] = record
    return list(newest.values())


def summary(records: list[dict], order: list[str], titles: dict[str, str]) -> str:
    rows = [r for r in newest_by_name(records) if r.get("ratio") is not None and not r.get("smoke")]
    rows.sort(key=lambda r: (order.index(r["question"]) if r["question"] in order else len(order),
                             r["name"]))
    lines = ["| question | mlxlab, as a ratio of the reference | reference | machine | date | command |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):  # the question on its first row only
        first = i == 0 or rows[i - 1]["question"] != r["question"]
        anchor = f"[{titles.get(r['question'], r['question'])}](#{r['question']})" if first else ""
        lines.append(f"| {anchor} | **{r['ratio']:g}x**: {cell(r.get('summary') or '')} "
                     f"| {cell(r.get('reference') or '')} | {cell(machine(r))} | {date(r)} "
                     f"| `{cell(r['command'])}` |")
    return "\n".join(lines)


def figures_table(figures: dict) -> str:
    """A record's figures: its own table when it carries one, else one row per figure."""
    table = figures.get("table")
    if isinstance(table, dict) and "head" in table:
        head = "| " + " | ".join(table["head"]) + " |"
        align = table.get("align") or "|" + "---|" * len(table["head"])
        return "\n".join([head, align, *("| " + " | ".join(map(str, row)) + " |"
                                          for row in table["rows"])])
    rows = ["| figure | value |", "|---|---|"]
    rows += [f"| {cell(key)} | {cell(value)} |" for key, value in figures.items()]
    return "\n".join(rows)


def record_block(record: dict) -> str:
    """One line of where the figures come from (machine, date, commit, load, the command, the
    raw logs, the record), then the figures."""
    stated = record["machine"].get("as_stated")
    facts = [machine(record) if stated != "per row" else "", date(record),
             record.get("commit") and f"commit {record['commit']}",
             load(record) and f"load {load(record)}"]
    line = ["*" + "; ".join(cell(f) for f in facts if f) + "*"]
    if record["command"]:
        line.append(f"`{cell(record['command'])}`")
    if record.get("raw"):
        line.append(f"raw: `{record['raw']}`")
    line.append(f"record: `{record['_file']}`")
    return " · ".join(line) + "\n\n" + figures_table(record["figures"])


def answered_once(command: str | None) -> bool:
    """Whether `command` runs a benchmark script that has since been removed: its question was
    answered once, so its figures stay in the records and the history record, not here."""
    scripts = SCRIPT.findall(command or "")
    return bool(scripts) and not any((ROOT / MOVED.get(s, s)).is_file() for s in scripts)


def current(record: dict) -> dict | None:
    """The record as the page shows it: without the rows whose command's script is removed,
    or None when nothing of it is left."""
    if answered_once(record["command"]):
        return None
    table = record["figures"].get("table")
    if not table or "command" not in table["head"]:
        return record
    column = table["head"].index("command")
    rows = [row for row in table["rows"] if not answered_once(row[column])]
    if not rows:
        return None
    return {**record, "figures": {**record["figures"], "table": {**table, "rows": rows}}}


def question_section(records: list[dict], question: str) -> str:
    """The question's records that are not summary rows, grouped by title, newest first."""
    mine = [r for r in records if r["question"] == question and r.get("ratio") is None
            and not r.get("smoke")]
    groups: dict[str, list[dict]] = {}
    for r in sorted(mine, key=lambda r: (r["date"], r["_file"]), reverse=True):
        groups.setdefault(r.get("title") or r["name"], []).append(r)
    parts = []
    for title, group in groups.items():
        shown = [c for c in map(current, sorted(group, key=lambda r: r["_file"])) if c]
        hidden = [f"`{r['_file']}`" for r in group if r["_file"] not in {c["_file"] for c in shown}]
        # the newest record of one command in full; an earlier run of it a line (its file)
        newest = {(c["name"], c["command"]): c["_file"] for c in shown}
        blocks = [record_block(c) if newest[c["name"], c["command"]] == c["_file"]
                  else f"An earlier run of `{cell(c['command'])}`: `{c['_file']}`." for c in shown]
        if hidden:  # the title stays, so what links to it still lands here
            blocks.append(f"{'Also answered' if shown else 'Answered'} once, by a script since "
                          f"removed: the figures are in {', '.join(hidden)} and on the "
                          "history record (`benchmarks/results/history/`).")
        parts.append(f"### {title}\n\n" + "\n\n".join(blocks))
    return "\n\n".join(parts) if parts else "*No record yet.*"


def anchors(markdown: str) -> set[str]:
    """The ids of a page's headings as mkdocs gives them: an explicit `{#id}`, else the title
    slugified by Markdown's toc extension (mkdocs' own)."""
    from markdown.extensions.toc import slugify

    ids = set()
    for title in HEADING.findall(markdown):
        explicit = re.search(r"\{#([\w-]+)\}$", title)
        ids.add(explicit.group(1) if explicit else slugify(title, "-"))
    return ids


def strings(value: object) -> list[str]:
    """Every string a record holds (its figures, tables, notes), however nested."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def dangling_links(records: list[dict], text: str, docs: Path = TEMPLATE.parent) -> list[str]:
    """The links in `records` that reach nothing the docs site has, each as `FILE: TARGET`: a
    page of docs/ that does not exist, or a heading the page does not have (`#id`: a heading of
    `text`, the Benchmarks page the records are rendered into). `mkdocs build --strict` fails on
    the same links, in the slow build; this is the check every page() makes."""
    own = anchors(text)
    bad = []
    for record in records:
        for target in (t for s in strings(record) for t in LINK.findall(s)):
            path, _, anchor = target.partition("#")
            if "://" in path or path.startswith("mailto:") or path.startswith(GENERATED):
                continue
            if not path:
                ok = anchor in own
            else:
                file = docs / path
                ok = file.is_file() and (not anchor or file.suffix != ".md"
                                         or anchor in anchors(file.read_text()))
            if not ok:
                bad.append(f"{record['_file']}: {target}")
    return bad


def page(template: Path = TEMPLATE, folder: Path = RESULTS) -> str:
    """docs/benchmarks.md with each `<!-- generated: ... -->` line replaced by its tables; a
    record's link that reaches nothing fails it (dangling_links)."""
    text = template.read_text()
    records = load_records(folder)
    order = [m for m in PLACEHOLDER.findall(text) if m != "summary"]
    titles = {anchor: title for title, anchor in QUESTION.findall(text)}
    unknown = sorted({r["question"] for r in records} - set(order))
    if unknown:
        raise ValueError(f"records of questions docs/benchmarks.md has no section for: {unknown}")

    def fill(match: re.Match) -> str:
        name = match.group(1)
        return (summary(records, order, titles) if name == "summary"
                else question_section(records, name))

    filled = PLACEHOLDER.sub(fill, text)
    dangling = dangling_links(records, filled, template.parent)
    if dangling:
        raise ValueError("benchmark records link to what the docs site does not have (a page of "
                         "docs/ or a heading): " + "; ".join(dangling))
    return filled


if __name__ == "__main__":
    sys.stdout.write(page())
