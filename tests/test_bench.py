"""benchmarks/speed/bench.py stays runnable: a quick two-round run on the small BERT writes a
well-formed record. Speed is not asserted here (that is what the benchmark itself reports); the
figures must only be real numbers from real workers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, REPO


@pytest.mark.slow
def test_quick_bench_records_every_row_and_its_ratios(tmp_path):
    env = {**os.environ, "MLXLAB_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / "speed" / "bench.py"), "--quick", "--models", "bert", "--no-torch",
         "--threads", "1", "--repeats", "2", "--variants", "replay"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = tmp_path.glob("*.json")
    figures = json.loads(path.read_text())["figures"]
    rows = {r["impl"]: r for r in figures["rows"]}
    assert set(rows) == {"mlxlab", "mlxlab:replay", "mlx"}
    assert all(r["rate"] > 0 and r["rate_range"][0] <= r["rate"] <= r["rate_range"][1]
               for r in rows.values())
    ratio = next(r for r in figures["ratios"] if r["what"] == "bert: mlxlab / minimal MLX loop")
    assert ratio["target"] == 0.95
    assert 0 < ratio["low"] <= ratio["median"] <= ratio["high"] and ratio["by_median_step"] > 0
    assert len(figures["table"]["rows"]) == len(rows) + len(figures["ratios"])


def test_pytorch_ratios_are_withheld_when_the_baseline_disagrees_with_plain_pytorch():
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks.speed import bench

    fair = bench.baseline_check("nano", rows=[6300.0, 6500.0], plain=[6400.0, 6350.0])
    slowed = bench.baseline_check("nano", rows=[1725.0, 1700.0], plain=[6410.0, 6300.0])
    assert fair["ok"] and not slowed["ok"]
    assert 0.25 < slowed["ratio"] < 0.3 and slowed["tolerance"] >= 0.10
    assert fair["row"] == 6400 and fair["plain"] == 6375
    assert bench.common_shape([[16, 128], [16, 128], [16, 64]]) == (16, 128)
