"""Write the docs site's generated pages, so that they cannot drift from the code they describe.

mkdocs-gen-files runs this file on every `mkdocs build` and `mkdocs serve` (mkdocs.yml, plugin
`gen-files`); the pages exist only inside the build, never in docs/:

- configuration/: an overview (conf/train.yaml: the groups, their defaults, the top-level keys)
  and one page per config group (conf/<group>/**/*.yaml): each option's header comment, the
  configs it composes, its keys with their values and comments, and the file itself;
- cli.md: `mlxlab --help`, every verb's `--help` (cli/main.py's VERBS, cli/runs.py's ACTIONS)
  and `mlxlab-train --help` (Hydra's: the groups and the composed default config);
- benchmarks.md: docs/benchmarks.md with its tables generated from the benchmark records
  (benchmarks/results/*.json), by scripts/gen_benchmarks.py;
- api/: one page per room of src/mlxlab (a package or a top-level module), every public module
  in it rendered by mkdocstrings from its docstrings. Found by walking the tree, so moving or
  renaming modules needs no edit here.

The configuration and API pages read files only (no import); the CLI page imports the verbs'
modules, as `mlxlab <verb> --help` does, and runs `mlxlab-train --help` in a child process
(Hydra parses sys.argv and exits). To read the pages without mkdocs:

    python scripts/gen_docs.py --out /tmp/mlxlab-pages
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import html
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF, PACKAGE = ROOT / "conf", ROOT / "src" / "mlxlab"
HELP_COLUMNS = "100"  # argparse wraps --help to the terminal: one fixed width for every build

Writer = Callable[[str, str], None]  # (path under docs/, markdown)


# -- Markdown helpers ----------------------------------------------------------------------------

CODE_SPAN = re.compile(r"(`[^`]*`)")
MARKDOWN_SPECIAL = re.compile(r"([\\*_{}\[\]|])")


def md_text(text: str) -> str:
    """Comment text as literal Markdown: `code spans` kept (Python-Markdown's tables leave the
    pipes inside them alone), everything else escaped (a comment's `<run dir>` is not an HTML
    tag, `_target_` not emphasis, `a | b` not a table cell)."""
    parts = CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(parts[i], quote=False))
    return "".join(parts)


def code(text: str) -> str:
    return f"`{text}`" if text else ""


def fenced(text: str, lang: str = "text") -> str:
    return f"```{lang}\n{text.rstrip()}\n```\n"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def first_sentence(text: str, limit: int = 160) -> str:
    match = re.match(r"(.*?(?<!e\.g)(?<!i\.e)\.)(?=\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " …"


# -- conf/: reading an option file ---------------------------------------------------------------


@dataclass
class Key:
    """One key of an option file: its dotted path, its value as written, its comments."""

    path: str
    value: str
    notes: list[str] = field(default_factory=list)  # the comment above it, the one beside it

    @property
    def note(self) -> str:
        return "<br>".join(md_text(note) for note in self.notes)


@dataclass
class Option:
    """One file conf/<group>/<name>.yaml, read line by line (PyYAML drops comments)."""

    group: str  # "model", "hydra/launcher"
    name: str  # "bert"
    source: Path
    header: list[str] = field(default_factory=list)  # comment lines above the first key
    package: str | None = None  # "# @package _global_"
    defaults: list[str] = field(default_factory=list)  # its defaults list, as written
    defaults_note: str = ""
    keys: list[Key] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return first_sentence(" ".join(paragraphs(self.header)[0][1]) if self.header else "")


KEY_LINE = re.compile(r"(?P<indent> *)(?P<key>[^\s#:\-'\"][^:#]*?|'[^']*'|\"[^\"]*\"):(?:\s+(?P<rest>.*))?$")
BLOCK_SCALAR = re.compile(r"[|>][+-]?$")


def comment_text(line: str) -> str:
    """`#   cmd` -> `  cmd`: one space after the hash dropped, deeper indentation kept."""
    text = line.strip()[1:]
    return text[1:] if text.startswith(" ") else text


def split_comment(text: str) -> tuple[str, str]:
    """`value   # note` -> (value, note); a hash inside quotes or glued to a word is no comment."""
    quote = ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def read_option(path: Path, group: str) -> Option:
    """An option file's header, package, defaults list and keys (one row per leaf, and per
    mapping whose line carries a comment)."""
    lines = path.read_text().splitlines()
    option = Option(group=group, name=path.stem, source=path)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        text = comment_text(lines[start])
        if text.startswith("@package"):
            option.package = text.split(None, 1)[1].strip()
        else:
            option.header.append(text)
        start += 1
    read_body(lines, start, option)
    return option


def read_body(lines: list[str], i: int, option: Option) -> None:
    stack: list[tuple[int, str]] = []  # the mappings the current line is inside
    # full-line comments since the last key: the next key's first notes (an indented comment
    # line, `#   paragraph  one document per ...`, is a row of a little table: its own line)
    pending: list[str] = []
    last: tuple[int, Key] | None = None  # the last key with an inline comment, for its continuations
    while i < len(lines):
        line, i = lines[i], i + 1
        stripped, indent = line.strip(), indent_of(line)
        if stripped.startswith("#"):
            if last and indent > last[0] and not pending:  # a comment wrapped under its key's
                last[1].notes[-1] += " " + comment_text(line).strip()
            elif pending and not comment_text(line).startswith("  "):
                pending[-1] += " " + comment_text(line).strip()
            else:
                pending.append(comment_text(line).strip())
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue  # blank lines, `{}` (an empty option), items consumed below
        key = match["key"].strip("'\"")
        value, comment = split_comment(match["rest"] or "")
        notes = [*pending, comment] if comment else pending
        pending, last = [], None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if indent == 0 and key == "defaults":
            option.defaults, i = list_items(lines, i, indent)
            option.defaults_note = " ".join(notes)
            continue
        path = ".".join([*(k for _, k in stack), key])
        nxt = next_content(lines, i)
        if BLOCK_SCALAR.match(value):
            i = skip_deeper(lines, i, indent)
            value = "(text block)"
        elif not value and nxt is not None and lines[nxt].strip().startswith("- "):
            items, i = list_items(lines, i, indent)
            value = "[" + ", ".join(items) + "]"
        elif not value and nxt is not None and indent_of(lines[nxt]) > indent:
            stack.append((indent, key))  # a mapping: its keys follow
            if notes:
                option.keys.append(Key(path, "", notes))
            continue
        row = Key(path, value or "null", notes)
        option.keys.append(row)
        if comment:
            last = (indent, row)


def next_content(lines: list[str], i: int) -> int | None:
    """The index of the next line that is neither blank nor a comment."""
    while i < len(lines):
        if lines[i].strip() and not lines[i].strip().startswith("#"):
            return i
        i += 1
    return None


def skip_deeper(lines: list[str], i: int, indent: int) -> int:
    while i < len(lines) and (not lines[i].strip() or indent_of(lines[i]) > indent):
        i += 1
    return i


def list_items(lines: list[str], i: int, indent: int) -> tuple[list[str], int]:
    """A block sequence under a key (`- item` lines at or below its indentation)."""
    items: list[str] = []
    while (j := next_content(lines, i)) is not None:
        stripped = lines[j].strip()
        if not stripped.startswith("- ") or indent_of(lines[j]) < indent:
            break
        items.append(split_comment(stripped[2:])[0])
        i = skip_deeper(lines, j + 1, indent_of(lines[j]))
    return items, i


def paragraphs(header: list[str]) -> list[tuple[str, list[str]]]:
    """Header comment lines as ("text" | "code", lines) blocks: `#` alone breaks a paragraph,
    an indented line (`#   mlxlab-train ...`) is a command shown as code."""
    blocks: list[tuple[str, list[str]]] = []
    for line in header:
        kind = "code" if line.startswith("  ") else "text" if line.strip() else ""
        if not kind:
            blocks.append(("", []))
        elif blocks and blocks[-1][0] == kind:
            blocks[-1][1].append(line)
        else:
            blocks.append((kind, [line]))
    return [block for block in blocks if block[0]] or [("text", [])]


def prose(header: list[str]) -> str:
    out = []
    for kind, lines in paragraphs(header):
        if kind == "code":
            out.append(fenced(textwrap.dedent("\n".join(lines)), "bash"))
        elif lines:
            out.append(md_text(" ".join(line.strip() for line in lines)) + "\n")
    return "\n".join(out)


# -- conf/: the pages ----------------------------------------------------------------------------


@dataclass
class Group:
    name: str  # the top folder under conf/: one page
    options: list[Option]


def read_groups(conf: Path = CONF) -> list[Group]:
    groups = []
    for folder in sorted(p for p in conf.iterdir() if p.is_dir()):
        options = [read_option(path, path.parent.relative_to(conf).as_posix())
                   for path in sorted(folder.rglob("*.yaml"))]
        groups.append(Group(folder.name, sorted(options, key=lambda o: (o.group, o.name))))
    return groups


def primary_defaults(primary: Option) -> dict[str, str]:
    """conf/train.yaml's defaults list as {group: default option} (`override hydra/sweeper:
    mlxlab` included); `_self_` left out."""
    chosen = {}
    for item in primary.defaults:
        group, _, choice = item.removeprefix("override ").partition(":")
        if choice:
            chosen[group.strip()] = choice.strip()
    return chosen


def included_by(groups: list[Group], group: str) -> list[str]:
    """Options whose defaults list includes an option of `group` (`- /lora/default@lora`)."""
    found = []
    for other in groups:
        for option in other.options:
            for item in option.defaults:
                if item.startswith(f"/{group}/"):
                    at = key_prefix(option, selectable=True) + (item.partition("@")[2] or group)
                    found.append(f"`{option.group}={option.name}` (at `{at}`)")
    return found


def option_id(option: Option, group: Group) -> str:
    """The option's anchor on its group page: `bert`, `launcher-ray`."""
    return option_label(option, group).replace("/", "-")


def key_prefix(option: Option, selectable: bool) -> str:
    """What a key of this option is called on the command line: `model.hidden_size`."""
    if option.package == "_global_" or not selectable:
        return ""
    return (option.package or option.group.replace("/", ".")) + "."


def option_label(option: Option, group: Group) -> str:
    """The option's name inside its group's page: `bert`, `launcher/ray`."""
    return (option.group.removeprefix(group.name).strip("/") + "/" + option.name).lstrip("/")


def option_section(option: Option, group: Group, selectable: bool) -> str:
    # what selects it on the command line; an option only included by others has no such line
    choose = f"{option.group}={option.name}" if selectable else f"{option.group}/{option.name}"
    out = [f"## `{choose}` {{#{option_id(option, group)}}}\n", prose(option.header)]
    if option.package == "_global_":
        out.append("*Global package*: its keys are paths from the config's root.\n")
    if option.defaults:
        composes = ", ".join(code(item) for item in option.defaults)
        note = f" ({md_text(option.defaults_note)})" if option.defaults_note else ""
        out.append(f"Composes: {composes}{note}.\n")
    prefix = key_prefix(option, selectable)
    rows = [[code(prefix + key.path), code(key.value), key.note] for key in option.keys]
    out.append(table(["key", "value", "what it does"], rows) if rows else "Sets nothing.\n")
    relative = option.source.relative_to(ROOT).as_posix()
    body = textwrap.indent(fenced(option.source.read_text(), "yaml"), "    ")
    out.append(f'??? note "{relative}"\n\n{body}')
    return "\n".join(out)


def group_page(group: Group, defaults: dict[str, str], groups: list[Group]) -> str:
    chosen = [f"`{g}={c}`" for g, c in defaults.items()
              if g == group.name or g.startswith(group.name + "/")]
    users = included_by(groups, group.name)
    selectable = bool(chosen) and not users
    out = [f"# {group.name}\n"]
    if selectable:
        out.append("Choose an option on the command line as its heading shows. The default "
                   f"(conf/train.yaml): {', '.join(chosen)}.\n")
    if users:
        out.append("Not chosen on its own: included by " + ", ".join(users) +
                   "; its keys below are relative to that node.\n")
    rows = [[f"[`{option_label(o, group)}`](#{option_id(o, group)})", md_text(o.summary)]
            for o in group.options]
    out.append(table(["option", "what it is"], rows))
    out += [option_section(option, group, selectable) for option in group.options]
    return "\n".join(out)


OVERRIDES = """\
## Changing the config on the command line

```bash
mlxlab-train model=transformer_tiny           # choose another option of a group
mlxlab-train trainer.max_epochs=3             # change a key (the tables list every one)
mlxlab-train '+tags.owner=me'                 # add a key the config does not have
mlxlab-train '~callbacks.progress'            # remove one
mlxlab-train experiment=tinystories_nano      # a preset: several groups and keys at once
mlxlab-train --cfg job                        # print the composed config, run nothing
```

Hydra's own syntax (sweeps, `choice()`, `range()`) is in the
[Hydra docs](https://hydra.cc/docs/advanced/override_grammar/basic/).
"""


def config_index(primary: Option, groups: list[Group]) -> str:
    defaults = primary_defaults(primary)
    out = ["# Configuration\n",
           "Every run is composed by [Hydra](https://hydra.cc) from `conf/train.yaml` and one "
           "option of each config group below. These pages are generated from the files in "
           "`conf/` at every docs build (`scripts/gen_docs.py`).\n",
           prose(primary.header)]
    rows = []
    for group in groups:
        links = ", ".join(f"[{option_label(o, group)}]({group.name}.md#{option_id(o, group)})"
                          for o in group.options)
        rows.append([f"[{group.name}]({group.name}.md)",
                     code(defaults.get(group.name, "")) or "(included by others)", links])
    out += ["## Config groups\n", table(["group", "default", "options"], rows)]
    out.append("## Top-level keys (conf/train.yaml)\n")
    out.append(table(["key", "value", "what it does"],
                     [[code(k.path), code(k.value), k.note] for k in primary.keys]))
    out.append(OVERRIDES)
    return "\n".join(out)


def write_config_pages(write: Writer, conf: Path = CONF) -> None:
    primary = read_option(conf / "train.yaml", "")
    groups = read_groups(conf)
    defaults = primary_defaults(primary)
    write("configuration/index.md", config_index(primary, groups))
    for group in groups:
        write(f"configuration/{group.name}.md", group_page(group, defaults, groups))


# -- the CLI page --------------------------------------------------------------------------------


@contextlib.contextmanager
def help_width() -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def captured_help(entry: Callable[[list[str]], object]) -> str:
    """What `entry(["--help"])` prints (argparse exits after printing; the runs verb returns)."""
    out = io.StringIO()
    with help_width(), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        entry(["--help"])
    return out.getvalue()


def train_help() -> str:
    """`mlxlab-train --help`, in a child: Hydra reads sys.argv and exits the process."""
    done = subprocess.run([sys.executable, "-c", "from mlxlab.train import main; main()", "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": HELP_COLUMNS, "NO_COLOR": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"mlxlab-train --help failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def cli_page() -> str:
    main = importlib.import_module("mlxlab.cli.main")
    runs = importlib.import_module("mlxlab.cli.runs")
    out = ["# CLI\n",
           "Generated at every docs build from the commands' own `--help` "
           "(`scripts/gen_docs.py`), so it says what the installed commands say.\n",
           fenced(main.usage()),
           table(["command", "what it does"],
                 [[f"[`mlxlab {verb}`](#mlxlab-{verb})", md_text(text)]
                  for verb, (_, text) in main.VERBS.items()])]
    for verb, (module, text) in main.VERBS.items():
        out.append(f"## `mlxlab {verb}` {{#mlxlab-{verb}}}\n\n{md_text(text)}.\n")
        if verb == "train":
            out.append("The same as `mlxlab-train`: Hydra overrides, see "
                       "[Configuration](configuration/index.md).\n")
            out.append(fenced(train_help()))
            continue
        out.append(fenced(captured_help(importlib.import_module(module).main)))
        if verb == "runs":
            for action, (sub, kwargs, about) in runs.ACTIONS.items():
                entry = functools.partial(importlib.import_module(sub).main, **kwargs)
                out.append(f"### `mlxlab runs {action}` {{#mlxlab-runs-{action}}}\n\n"
                           f"{md_text(about)}.\n\n{fenced(captured_help(entry))}")
    return "\n".join(out)


# -- the API reference ---------------------------------------------------------------------------


def module_docstring(path: Path) -> str:
    """The first sentence of a module's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return first_sentence(" ".join(doc.strip().split("\n\n")[0].split()), limit=200)


def room_modules(room: Path, package: Path = PACKAGE) -> list[str]:
    """Every public module of a room, as a dotted name: the package first, then its modules and
    subpackages in path order (folders without __init__.py, e.g. C sources, are no modules)."""
    if room.is_file():
        return [f"mlxlab.{room.stem}"]
    names = []
    for path in sorted(room.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if any(part.startswith("_") for part in parts[:-1]) or not all(
                (package.parent.joinpath(*parts[:n]) / "__init__.py").exists()
                for n in range(1, len(parts))):
            continue
        if parts[-1] == "__init__":
            names.append(".".join(parts[:-1]))
        elif not parts[-1].startswith("_"):
            names.append(".".join(parts))
    return sorted(names, key=lambda name: name.split("."))


def rooms(package: Path = PACKAGE) -> list[Path]:
    """The top level of src/mlxlab: packages (with __init__.py) and public modules."""
    return [path for path in sorted(package.iterdir())
            if (path.is_dir() and (path / "__init__.py").exists())
            or (path.suffix == ".py" and not path.name.startswith("_"))]


def defines_names(path: Path) -> bool:
    """Whether a module defines functions or classes itself (a package's __init__ often only
    re-exports its modules' names, which their own sections already show)."""
    types = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return any(isinstance(node, types) for node in ast.parse(path.read_text()).body)


def api_block(name: str, package: Path, heading: bool) -> str:
    """One mkdocstrings block; the room itself without a heading (the page's title names it),
    and without members when it defines none."""
    source = package.parent.joinpath(*name.split("."))
    source = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
    options = [] if heading else ["show_root_heading: false"]
    if not defines_names(source):
        options.append("members: false")
    lines = [f"::: {name}"] + (["    options:"] + [f"      {o}" for o in options]) * bool(options)
    return "\n".join(lines) + "\n"


def write_api_pages(write: Writer, package: Path = PACKAGE) -> None:
    rows = []
    for room in rooms(package):
        source = room / "__init__.py" if room.is_dir() else room
        rows.append([f"[`mlxlab.{room.stem}`]({room.stem}.md)",
                     md_text(module_docstring(source))])
        names = room_modules(room, package)
        blocks = [api_block(name, package, heading=i > 0) for i, name in enumerate(names)]
        write(f"api/{room.stem}.md", f"# mlxlab.{room.stem}\n\n" + "\n".join(blocks))
    index = ["# API reference\n",
             "One page per room of `src/mlxlab` (docs/architecture.md says what each may "
             "import), generated from the package tree and the docstrings "
             "(`scripts/gen_docs.py`, mkdocstrings). Private names (`_x`) and members without "
             "a docstring are left out.\n",
             table(["room", "what it is"], rows),
             "## The package itself\n",
             api_block("mlxlab", package, heading=False)]
    write("api/index.md", "\n".join(index))


# -- entry points --------------------------------------------------------------------------------


def benchmarks_page() -> str:
    """docs/benchmarks.md with its tables filled from the records (scripts/gen_benchmarks.py)."""
    spec = importlib.util.spec_from_file_location("gen_benchmarks", ROOT / "scripts" / "gen_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.page()


def write_pages(write: Writer) -> None:
    write_config_pages(write)
    write("cli.md", cli_page())
    write("benchmarks.md", benchmarks_page())
    write_api_pages(write)


def folder_writer(out: Path) -> Writer:
    def write(path: str, text: str) -> None:
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    return write


def gen_files_writer() -> Writer:
    import mkdocs_gen_files  # only inside mkdocs: the plugin's virtual files

    def write(path: str, text: str) -> None:
        with mkdocs_gen_files.open(path, "w") as handle:
            handle.write(text)

    return write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the generated docs pages to a folder.")
    parser.add_argument("--out", type=Path, required=True, help="folder for the markdown pages")
    args = parser.parse_args(argv)
    write_pages(folder_writer(args.out))
    print(f"pages written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "<run_path>":  # mkdocs-gen-files runs this file with runpy.run_path
    write_pages(gen_files_writer())
