"""scripts/audit_house.py: the house rules (long functions, big constructors, attribute probes)
hold for src/mlxlab with the exceptions docs/architecture.md lists, and a new breach fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import PYTHON

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "audit_house.py"


def audit(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(SCRIPT), "--root", str(root)], capture_output=True,
                          text=True, timeout=120)


def test_the_package_keeps_the_house_rules():
    out = audit(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    # one: the training loop, read top to bottom (training/loop.py Fit.run, its row in the docs)
    assert "functions over 80 lines: 1" in out.stdout
    assert "allowed  training/loop.py" in out.stdout and "Fit.run" in out.stdout
    assert "BREACH" not in out.stdout
    # the contracts' optional members are called, never probed
    for gone in ("checkpoint_init", "hf_config", "make_cache", "max_seq_len", "train_idx",
                 "log_text", "has_validation", "_architecture", "'path'", "examples"):
        assert gone not in out.stdout, gone


def test_a_new_breach_fails_until_the_docs_give_its_reason(tmp_path):
    package = tmp_path / "src" / "mlxlab"
    package.mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (package / "room.py").write_text(
        "class Big:\n"
        "    def __init__(self, " + ", ".join(f"a{i}" for i in range(13)) + "):\n"
        "        pass\n\n\n"
        f"def long(data):\n{body}\n    return hasattr(data, 'tokenizer')\n")
    docs = tmp_path / "docs" / "architecture.md"
    docs.parent.mkdir()
    table = "## House rules, measured\n\n| kind | where | what | why |\n|---|---|---|---|\n"
    docs.write_text(table)
    out = audit(tmp_path)
    assert out.returncode == 1
    breaches = [line.split() for line in out.stdout.splitlines() if "BREACH" in line]
    assert [b[1:3] for b in breaches] == [["room.py:6", "long"], ["room.py:2", "Big.__init__"],
                                          ["room.py:92", "hasattr(data,"]]
    assert "add a row with the reason" in out.stderr

    docs.write_text(table + "| long function | `room.py` | `long` | a test |\n"
                    "| constructor | `room.py` | `Big.__init__` | a test |\n"
                    "| probe | `room.py` | `hasattr(data, 'tokenizer')` | a test |\n"
                    "| probe | `gone.py` | `hasattr(x, 'y')` | removed since |\n")
    out = audit(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stale allowlist row (matches nothing; remove it): probe | gone.py" in out.stdout
