"""Every command of the guide pages runs as written: the fenced bash/shell blocks of README.md
and docs/**/*.md are read, and each command either runs (offline stand-ins, shortened training)
or is skipped for a reason given in tests/guide_commands.py (its module docstring says how a
page's command is made runnable). The default run checks that every command is decided and
that the pages' overrides reach Hydra as written; the slow test runs a page's commands in order
in a fresh project folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import guide_commands as gc

ALL = [c for page in gc.pages() for c in gc.commands(page)]
# every page with a command that runs
RUN_PAGES = sorted({c.page for c in ALL if gc.decide(c).run is not None})


def test_every_command_on_the_pages_is_run_or_skipped_with_a_reason():
    """A command that is neither (not an mlxlab, python or mlx_lm command, and matched by no
    skip) fails here, as does a placeholder no stand-in fills: the page or the tables move."""
    assert len(ALL) > 150  # the parser found the pages' blocks
    undecided, placeholders = [], []
    for command in ALL:
        decision = gc.decide(command)
        if decision.run is None and not decision.reason:
            undecided.append(f"{command.where}: {command.text}")
        elif decision.run is not None and gc.unresolved(decision.run):
            placeholders.append(f"{command.where}: {gc.unresolved(decision.run)}")
    assert not undecided, "\n".join(undecided)
    assert not placeholders, "\n".join(placeholders)


def test_the_parser_joins_continuations_quotes_and_heredocs(tmp_path):
    page = tmp_path / "probe.md"
    page.write_text("text\n```bash\n# a comment\nmlxlab train a=1 \\\n    b=2   # note\n"
                    "mlxlab train 'c=[x,\n    y]'\ncat > f <<'J'\n[1]\nJ\n```\n\n"
                    "<!-- commands: not run: a demo -->\n```shell\nmlxlab runs list\n```\n")
    found = gc.commands(page, "docs/probe.md")
    assert [c.text for c in found] == ["mlxlab train a=1 \\\n    b=2   # note",
                                       "mlxlab train 'c=[x,\n    y]'", "cat > f <<'J'\n[1]\nJ",
                                       "mlxlab runs list"]
    assert [c.line for c in found] == [4, 6, 8, 15]
    assert gc.decide(found[0]).run.startswith("mlxlab train a=1 b=2 trainer.max_steps=2")
    assert gc.decide(found[3]).reason == "a demo"


def test_a_single_quoted_override_has_no_doubled_backslash():
    """Inside single quotes the shell passes `\\\\d` as two backslashes, and Hydra keeps both in a
    quoted value: a regex written so never matches (write `\\d`)."""
    doubled = [f"{c.where}: {c.text}" for c in ALL
               if any("\\\\" in quoted for quoted in re.findall(r"'([^']*)'", c.text))
               and c.page not in gc.PAGE_SKIPS]
    assert not doubled, "\n".join(doubled)


def _environment(root: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join([str(gc.ROOT / "src"), str(root)]),
            "MLXLAB_ROOT": str(root), "MLXLAB_CACHE_DIR": str(root / "user-cache"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": "", "PYTHONUNBUFFERED": "1"}


def _project(root: Path, page: str) -> None:
    """A project folder as a reader's clone has it: scripts/ and src/ (links), the data files."""
    for name in ("scripts", "src"):
        (root / name).symlink_to(gc.ROOT / name)
    (root / ".venv").mkdir()
    (root / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    for name, text in gc.data_files(page).items():
        (root / name).write_text(text())
    (root / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **columns):\n"
        "    return [-len(c) / 100 for c in completions]\n")


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_a_pages_commands_run_as_written(page, tmp_path):
    """The page's commands in order, each to exit 0 within its time, in one project folder
    (each run folder a later command names is the one an earlier command made)."""
    if not gc.SMOL_GGUF.is_file():
        pytest.skip(f"{gc.SMOL_GGUF}: the offline SmolLM2 (tests/real_models.py)")
    root = tmp_path / "project"
    root.mkdir()
    _project(root, page)
    env = _environment(root)
    failures, report, logged = [], [], []
    for command in gc.commands(gc.ROOT / page):
        decision = gc.decide(command)
        if decision.run is None:
            report.append(f"skip {command.where}: {decision.reason}")
            continue
        run = gc.resolve_run_ids(gc.resolve_runs(decision.run, root), logged)
        assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", run)
        if assignment:
            env[assignment.group(1)] = assignment.group(2)
            continue
        for name in gc.tiny_models_named(run):
            if not (root / name).exists():
                subprocess.run([sys.executable, "scripts/tiny_hf_model.py",
                                *gc.TINY_MODELS[name][:1], name, *gc.TINY_MODELS[name][1:]],
                               cwd=root, env=env, check=True, capture_output=True, timeout=600)
        try:
            done = subprocess.run(["bash", "-c", run], cwd=root, env=env, capture_output=True,
                                  text=True, timeout=900)
            code, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
            logged += re.findall(r"mlflow run: ([0-9a-f]{32})", done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            code, tail = "timeout", ""
        report.append(f"{'ok  ' if code == 0 else 'FAIL'} {command.where}: {run}")
        if code != 0:
            failures.append(f"{command.where}: exit {code}: {run}\n{tail}")
    print("\n".join(report))
    assert not failures, "\n\n".join(failures)
