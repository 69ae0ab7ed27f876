"""benchmarks/speech/bench_speech_finetune.py's --reuse: a run is reused only once its command
exited 0 (a failed run's log stays, unmarked, and runs again), and only where the caller asks
(the quality part; each timing round of the speed part runs its own reference)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks.speech import bench_speech_finetune as bench  # noqa: E402

OK = [sys.executable, "-c", "print('ran')"]
FAILS = [sys.executable, "-c", "raise SystemExit(3)"]


def test_a_failed_run_leaves_its_log_but_is_not_reused(tmp_path):
    log = tmp_path / "train_s0.log"
    with pytest.raises(RuntimeError, match="train failed"):
        bench.run_marked(FAILS, log, True, what="train")
    assert log.exists() and not bench.finished(log).exists()
    assert bench.run_marked(OK, log, True, what="train") > 0  # ran: the failure was not reused
    assert bench.finished(log).exists() and log.read_text().strip() == "ran"
    assert bench.run_marked(FAILS, log, True, what="train") is None  # finished: reused
    with pytest.raises(RuntimeError):  # not asked to reuse: run, and unmarked by its failure
        bench.run_marked(FAILS, log, False, what="train")
    assert not bench.finished(log).exists()


def test_the_reference_is_reused_only_where_asked(tmp_path, monkeypatch):
    """The speed part's rounds call reference() without reuse: each runs and has its RSS."""
    script = tmp_path / "reference.py"
    script.write_text("import json, sys\n"
                      "out = sys.argv[sys.argv.index('--json') + 1]\n"
                      "json.dump({'train': {'step_seconds': [1.0]}}, open(out, 'w'))\n")
    monkeypatch.setattr(bench, "REFERENCE", script)
    args = SimpleNamespace(data="d", hf="m", batch=1, lr=1e-4, skip=0, reuse=True)
    rounds = [bench.reference(args, tmp_path, 4, 0, False, {}) for _ in range(2)]
    assert all(r["rss_mb"] > 0 for r in rounds)
    assert bench.reference(args, tmp_path, 4, 0, False, {}, reuse=True)["rss_mb"] is None
    assert json.loads((tmp_path / "reference_s0_4.json").read_text())["train"]
    assert Path(str(tmp_path / "reference_s0_4.log") + ".done").exists()
