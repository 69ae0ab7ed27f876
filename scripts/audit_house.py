"""Audit src/mlxlab against four house rules:

1. no function longer than MAX_LINES lines (its `def` line to its last line);
2. no `__init__` with more than MAX_ARGS arguments (self not counted; a settings dataclass has
   no hand-written `__init__`: its fields are its keys, one per user setting);
3. no hasattr/getattr probe of a protocol member: every `hasattr(x, name)` and every
   `getattr(x, name, default)` is listed, and each must be an allowed one;
4. no branch on the objective in the modules that must not know which one runs (OBJECTIVE_BLIND:
   the loop, the step, the plan, checkpoint state, artifacts, analysis, task evaluation, the
   checkpoint room): no import of an objective's own module (objectives/ but the interface and
   the shared losses, metrics and evaluations), no read of an attribute named after an
   objective (`settings.distill`), no comparison with an objective's name (`task ==
   "preference"`). What differs between objectives belongs to the Objective (objectives/base.py).

The allowed exceptions live in one place, pyproject.toml's `[[tool.mlxlab.audit.allow]]` rows
(kind, where, what, why): a row without its reason is refused. Prints the three lists (plus the
two-argument getattr calls, dispatch by name, for the record) and exits 1 when something breaks a
rule without a row; a row that matches nothing is reported as stale (exit 0: remove it).

    python scripts/audit_house.py [--root <repository>]
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

MAX_LINES = 80
MAX_ARGS = 12
TABLE = "[[tool.mlxlab.audit.allow]]"  # in pyproject.toml
KINDS = ("long function", "constructor", "probe", "objective branch")
# Rule 4: the modules that never ask which objective runs, and what asking looks like.
OBJECTIVE_BLIND = ("training/loop.py", "training/eval_points.py", "training/run_end.py",
                   "training/fit_fields.py", "training/step.py", "training/plan.py",
                   "training/checkpointing.py", "training/state.py", "training/artifacts.py",
                   "training/analysis.py", "evaluation/in_training.py", "checkpoint/")
OBJECTIVE_SHARED = ("base", "losses", "metrics", "evaluation")  # objectives/ modules all may use
# Words for objectives besides their names; the names are read from conf/objective/ (each
# option, and its `_target_`'s module) into OBJECTIVE_WORDS, so a new objective joins by its files.
OTHER_OBJECTIVE_WORDS = ("distillation", "ipo", "simpo", "rewards")
OBJECTIVE_WORDS: tuple[str, ...] = OTHER_OBJECTIVE_WORDS  # audit() adds the names


def objective_words(package: Path) -> tuple[str, ...]:
    """OTHER_OBJECTIVE_WORDS and the objectives' names: conf/objective/<name>.yaml and the
    module of its `_target_` (mlxlab.objectives.<module>.<Class>)."""
    words = set(OTHER_OBJECTIVE_WORDS)
    for conf in sorted((package.parents[1] / "conf" / "objective").glob("*.yaml")):
        words.add(conf.stem)
        for line in conf.read_text().splitlines():
            if line.startswith("_target_:"):
                words.add(line.split(":", 1)[1].split("#")[0].strip().split(".")[-2])
    return tuple(sorted(words))


@dataclass(frozen=True)
class Finding:
    kind: str      # one of KINDS, or "dispatch" (a two-argument getattr: listed, never a breach)
    path: str      # relative to src/mlxlab, e.g. "models/encoders/bert.py"
    what: str      # the function's qualified name, or the call's source text
    line: int
    detail: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.kind, self.path, self.what


class Visitor(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path, self.scope, self.found = path, [], []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        name = ".".join([*self.scope, node.name])
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_LINES:
            self.found.append(Finding("long function", self.path, name, node.lineno,
                                      f"{lines} lines"))
        if node.name == "__init__":
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - 1  # minus self
            count += (a.vararg is not None) + (a.kwarg is not None)
            if count > MAX_ARGS:
                self.found.append(Finding("constructor", self.path, name, node.lineno,
                                          f"{count} arguments"))
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def blind(self) -> bool:
        return any(self.path == m or (m.endswith("/") and self.path.startswith(m))
                   for m in OBJECTIVE_BLIND)

    def branch(self, node: ast.AST) -> None:
        self.found.append(Finding("objective branch", self.path, ast.unparse(node), node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        names = [f"{module}.{a.name}" for a in node.names] if module in (
            "mlxlab.objectives", "mlxlab.training", "mlxlab") else [module]
        if self.blind() and any(objective_module(n) for n in names):
            self.branch(node)

    def visit_Import(self, node: ast.Import) -> None:
        if self.blind() and any(objective_module(a.name) for a in node.names):
            self.branch(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if self.blind() and node.attr in OBJECTIVE_WORDS:
            self.branch(node)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        constants = [c for c in [node.left, *node.comparators] for c in
                     (c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c])]
        if self.blind() and any(isinstance(c, ast.Constant) and c.value in OBJECTIVE_WORDS
                                for c in constants):
            self.branch(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            probe = node.func.id == "hasattr" or len(node.args) > 2
            self.found.append(Finding("probe" if probe else "dispatch", self.path,
                                      ast.unparse(node), node.lineno))
        self.generic_visit(node)


def objective_module(name: str) -> bool:
    """An objective's own module: under objectives/ but the shared ones, or any module of mlxlab
    named after an objective (training/distill.py, grpo_loss.py)."""
    parts = name.split(".")
    if parts[0] != "mlxlab" or len(parts) < 2:
        return False
    if parts[1] == "objectives" and len(parts) > 2:
        return parts[2] not in OBJECTIVE_SHARED
    return any(part.split("_")[0] in OBJECTIVE_WORDS for part in parts[1:])


def audit(package: Path) -> list[Finding]:
    global OBJECTIVE_WORDS  # noqa: PLW0603 - the rule's words, read once per audit
    OBJECTIVE_WORDS = objective_words(package)
    found: list[Finding] = []
    for file in sorted(package.rglob("*.py")):
        visitor = Visitor(file.relative_to(package).as_posix())
        visitor.visit(ast.parse(file.read_text(), str(file)))
        found += visitor.found
    return found


def allowed(pyproject: Path) -> dict[tuple[str, str, str], str]:
    """(kind, where, what) -> why, from pyproject.toml's TABLE rows; a malformed row exits 2."""
    if not pyproject.is_file():
        raise SystemExit(f"{pyproject} not found: --root names the repository")
    rows = tomllib.loads(pyproject.read_text()).get("tool", {}).get("mlxlab", {}).get("audit", {})
    allow = {}
    for n, row in enumerate(rows.get("allow", []), 1):
        cells = [str(row.get(key, "")).strip() for key in ("kind", "where", "what", "why")]
        if cells[0] not in KINDS or not all(cells):
            print(f"{pyproject}: {TABLE} row {n} needs kind (one of {', '.join(KINDS)}), where, "
                  f"what and why: {row}", file=sys.stderr)
            raise SystemExit(2)
        allow[tuple(cells[:3])] = cells[3]
    return allow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    found = audit(args.root / "src" / "mlxlab")
    allow = allowed(args.root / "pyproject.toml")
    breaches = []
    titles = {"long function": f"functions over {MAX_LINES} lines",
              "constructor": f"__init__ with over {MAX_ARGS} arguments",
              "probe": "hasattr / getattr-with-default probes",
              "objective branch": "branches on the objective where none may be",
              "dispatch": "getattr(x, name) dispatch by name (not probes; for the record)"}
    for kind, title in titles.items():
        rows = [f for f in found if f.kind == kind]
        print(f"{title}: {len(rows)}")
        for f in rows:
            mark = "allowed" if f.key in allow else ("" if kind == "dispatch" else "BREACH")
            if mark == "BREACH":
                breaches.append(f)
            detail = f" ({f.detail})" if f.detail else ""
            print(f"  {mark:8} {f.path}:{f.line}  {f.what}{detail}")
    stale = sorted(set(allow) - {f.key for f in found})
    for kind, path, what in stale:
        print(f"stale allowlist row (matches nothing; remove it): {kind} | {path} | {what}")
    if breaches:
        print(f"{len(breaches)} breach(es): fix them, or add a {TABLE} row with the reason to "
              "pyproject.toml", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
