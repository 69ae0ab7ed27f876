"""benchmarks/speed/bench_gpu.py --dry-run: the GPU window's one command runs its whole path on the
CPU with tiny settings (every part: GEMM, the LM presets at fp32 and bf16 through mlxlab's
step, the PyTorch twin eager and compiled, the default experiment, LoRA on a Llama written
without PyTorch, `pytest -m gpu`), so a window is never spent on a broken script."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO


@pytest.mark.slow  # ~30 s of subprocesses for a script only a GPU window runs
def test_bench_gpu_dry_run_runs_every_part(tmp_path):
    out = subprocess.run([PYTHON, str(REPO / "benchmarks" / "speed" / "bench_gpu.py"), "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "bench_gpu.json").read_text())
    rows = res["mlx"]["rows"]
    assert [(r["preset"], r["dtype"]) for r in rows] == [
        (p, d) for p in ("nano", "small", "medium", "large") for d in ("fp32", "bf16")]
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in rows), rows
    assert set(res["mlx"]["gemm_tflops"]) == {"fp32", "bf16"}
    twin = res["torch"]["rows"]
    assert len(twin) == 16 and all(r.get("tokens_per_s", 0) > 0 for r in twin), twin
    assert res["default"]["wall_s"] > 0 and "val/accuracy" in res["default"]["summary"]
    assert res["first"]["wall_s"] > 0  # the first run (a GPU's kernel compiles)
    assert res["lora"]["lora"]["tokens_per_s"] > 0 and res["lora"]["qlora"]["tokens_per_s"] > 0
    assert res["pytest"]["summary"].startswith("4 skipped")  # no GPU here
    assert "| medium | bf16 |" in out.stdout and res["torch"]["torch"]  # the table, the twin's version
