"""benchmarks/speed/bench.py stays runnable: a quick two-round run on the small BERT writes a well-formed
report between its markers and replaces it on the next run. Speed is not asserted here (that is
what the benchmark itself reports); the figures must only be real numbers from real workers."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import PYTHON, REPO

BEGIN = "<!-- benchmarks/bench.py threads=1: begin -->"
END = "<!-- benchmarks/bench.py threads=1: end -->"


def run_bench(out, *extra):
    done = subprocess.run(
        [PYTHON, str(REPO / "benchmarks" / "speed" / "bench.py"), "--quick", "--models", "bert", "--no-torch",
         "--threads", "1", "--repeats", "2", "--variants", "replay", "--write", "--out", str(out),
         *extra],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_quick_bench_writes_its_section_and_replaces_it(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nProse that must stay.\n")

    report = run_bench(out)

    assert "2 interleaved rounds of every row" in report
    rows = {m[0]: m[1] for m in re.findall(r"^\| bert \| (\S+) \|.*?\| ([\d,]+) samples/s \|", report, re.M)}
    assert set(rows) == {"mlxlab", "mlxlab:replay", "mlx"}
    assert all(int(rate.replace(",", "")) > 0 for rate in rows.values())
    ratio = re.search(r"^\| bert: mlxlab / minimal MLX loop \| ([\d.]+) .*?\| ([\d.]+)-([\d.]+) "
                      r"\| ([\d.]+) \| 0.95 \|$", report, re.M)
    assert ratio, report
    median, low, high, by_median_step = map(float, ratio.groups())
    assert 0 < low <= median <= high and by_median_step > 0

    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nProse that must stay.\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    out.write_text(text + "\n## Later section\n")
    run_bench(out, "--steps", "3", "--repeats", "1", "--variants", "")  # replaces them in place
    text = out.read_text()
    assert text.count(BEGIN) == 1 and text.count("1 interleaved round of every row") == 1
    assert text.rstrip().endswith("## Later section") and "Prose that must stay." in text


def test_pytorch_ratios_are_withheld_when_the_baseline_disagrees_with_plain_pytorch():
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks.speed import bench

    fair = bench.baseline_check("nano", rows=[6300.0, 6500.0], plain=[6400.0, 6350.0])
    slowed = bench.baseline_check("nano", rows=[1725.0, 1700.0], plain=[6410.0, 6300.0])  # BLAS interposition
    assert fair["ok"] and not slowed["ok"]
    assert 0.25 < slowed["ratio"] < 0.3 and slowed["tolerance"] >= 0.10
    table = "\n".join(bench.check_lines([fair, slowed]))
    assert "| nano | 6,400 | 6,375 |" in table and "DISAGREE: PyTorch ratios withheld" in table
    assert bench.common_shape([[16, 128], [16, 128], [16, 64]]) == (16, 128)
