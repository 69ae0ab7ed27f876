"""No import cycles in src/mlxlab: every import statement counts, wherever it is written.

`lint-imports` (pyproject.toml) checks that arrows between rooms point down; inside a room it
sees nothing, and a function-level import or one under `TYPE_CHECKING` hides a cycle from a
reader as well as from Python's own import-time check. This test reads every module with `ast`
and draws an edge for each `import` / `from ... import` in it: at module level, inside functions
and classes, under `if TYPE_CHECKING:` or `try:`. `from a import b` is an edge to the module
`a.b` when there is one (else to `a`); a package's `__init__` is a module like any other. Any
strongly connected group of two or more modules is a cycle, and the test names one of its
shortest loops.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "mlxlab"


def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name, for __init__)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` (at `path`) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` names a.b.c (or a parent)
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycle_groups(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected groups of two or more modules (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(frozenset(group))
    return groups


def shortest_loop(graph: dict[str, set[str]], group: frozenset[str]) -> list[str]:
    """One shortest loop through the group, as a -> b -> ... -> a (breadth first from each)."""
    best: list[str] = []
    for start in sorted(group):
        parent = {start: ""}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for child in sorted(graph[node] & group):
                if child == start:
                    loop = [node]
                    while parent[loop[-1]]:
                        loop.append(parent[loop[-1]])
                    loop = [*reversed(loop), start]
                    if not best or len(loop) < len(best):
                        best = loop
                    queue.clear()
                    break
                if child not in parent:
                    parent[child] = node
                    queue.append(child)
    return best


def describe(graph: dict[str, set[str]], group: frozenset[str]) -> str:
    return (f"{' -> '.join(shortest_loop(graph, group))}  (a group of {len(group)} modules: "
            f"{', '.join(sorted(group))})")


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 100 and "mlxlab.tracking.base" in graph  # it read the package
    groups = cycle_groups(graph)  # none, not even training/'s run <-> trainer
    assert not groups, "import cycles (break each; see docs/architecture.md):\n" + "\n".join(
        describe(graph, g) for g in groups)


def test_every_kind_of_import_is_an_edge(tmp_path, monkeypatch):
    """A function-level, a TYPE_CHECKING and a relative import each close a loop the test names."""
    package = tmp_path / PACKAGE
    (package / "room").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "room" / "__init__.py").write_text("from mlxlab.room.a import A\n")
    (package / "room" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mlxlab.room import b\n"
        "A = 1\n")
    (package / "room" / "b.py").write_text("def f():\n    from . import c\n")
    (package / "room" / "c.py").write_text("import mlxlab.room.a\n")
    (package / "lone.py").write_text("import os\nfrom mlxlab import room\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    graph = import_graph()
    assert graph["mlxlab.lone"] == {"mlxlab.room"}
    groups = cycle_groups(graph)
    assert groups == [frozenset({"mlxlab.room.a", "mlxlab.room.b", "mlxlab.room.c"})]
    assert shortest_loop(graph, groups[0]) == [
        "mlxlab.room.a", "mlxlab.room.b", "mlxlab.room.c", "mlxlab.room.a"]
