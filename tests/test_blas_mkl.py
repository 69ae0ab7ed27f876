"""Intel MKL serving MLX (runtime/compute/mkl.py): loaded alone, measured against OpenBLAS once per
machine on an Intel CPU, and kept out of every other library's way.

Each end-to-end case runs in a fresh interpreter (test_blas.probe): what libmlx's BLAS calls
resolve to is fixed per process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlxlab.runtime.compute import blas_kernels, cpu, mkl
from test_blas import probe

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the BLAS swap is Linux-only"),
    pytest.mark.skipif(mkl.mkl_directory() is None,
                       reason="the optional mkl package is not installed (pip install 'mlxlab[mkl]')"),
]
# OpenBLAS's kernels named by the user: nothing is measured for them, so the MKL verdict's key is
# known to this process too (mkl.cache_key includes the kernels OpenBLAS runs).
CORE = {"OPENBLAS_CORETYPE": "Haswell"}


def _openblas() -> Path:
    import mlxlab

    found = mlxlab.runtime.compute.blas._bundled_openblas()
    if found is None:
        pytest.skip("scipy-openblas32 is not installed")
    return found


def _cache_with(tmp_path: Path, monkeypatch, speedup: float) -> Path:
    """A kernels cache holding an MKL verdict of `speedup` for this machine's MKL and OpenBLAS."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", CORE["OPENBLAS_CORETYPE"])
    key = mkl.cache_key(_openblas(), {}, mkl.mkl_directory())
    path = tmp_path / blas_kernels.CACHE_FILE
    path.write_text(json.dumps({key: {"openblas_s": speedup, "mkl_s": 1.0, "speedup": speedup,
                                      "ratios": [speedup] * 6, "waited_rounds": 0, "rounds": 6,
                                      "decided": True, "measured": 0}}))
    return path


def test_forced_mkl_serves_mlx_alone_and_matches_numpy(tmp_path):
    got = probe(MLXLAB_BLAS="mkl", MLXLAB_KERNELS_CACHE=str(tmp_path))
    assert got["status"] == "loaded" and got["fast"], got
    assert Path(got["library"]).name == mkl.INTERFACE  # libmlx's cblas_sgemm slot lands in MKL
    assert got["detail"].startswith(f"Intel MKL {mkl.mkl_version()}"), got["detail"]
    assert got["max_rel_err"] < 1e-4
    assert got["global_blas"] == []  # libmkl_rt would have put cblas_sgemm, sgemm_ there
    assert got["threads"][1] == 2  # set_blas_threads(2): MKL's own control


def test_a_cached_verdict_decides_and_is_not_taken_again(tmp_path, monkeypatch):
    path = _cache_with(tmp_path, monkeypatch, 2.0)
    written = path.stat().st_mtime_ns
    faster = probe(MLXLAB_BLAS="", MLXLAB_KERNELS_CACHE=str(tmp_path), **CORE)
    assert Path(faster["library"]).name == mkl.INTERFACE, faster
    assert "2.00x OpenBLAS's speed on this CPU" in faster["detail"], faster["detail"]
    assert faster["max_rel_err"] < 1e-4 and faster["global_blas"] == []
    assert path.stat().st_mtime_ns == written
    path = _cache_with(tmp_path, monkeypatch, 1.0)
    slower = probe(MLXLAB_BLAS="", MLXLAB_KERNELS_CACHE=str(tmp_path), **CORE)
    assert slower["library"].endswith("libscipy_openblas.so"), slower
    assert "MKL measured 1.00x" in slower["detail"], slower["detail"]


@pytest.mark.slow
def test_the_first_import_measures_and_caches_a_settled_verdict(tmp_path):
    """A real race (child processes, thread clocks): its verdict is cached when settled and then
    decides the BLAS; unsettled (a loaded machine), OpenBLAS serves and nothing is kept."""
    if not mkl.is_intel():
        pytest.skip("MKL is measured on Intel CPUs only")
    got = probe(MLXLAB_BLAS="", MLXLAB_KERNELS_CACHE=str(tmp_path), **CORE)
    path = tmp_path / blas_kernels.CACHE_FILE
    verdicts = json.loads(path.read_text()) if path.is_file() else {}
    mine = [v for k, v in verdicts.items() if k.startswith("mkl-")]
    if not mine:
        assert "MKL measured" in got["detail"] and "measured again at the next start" in got["detail"]
        assert got["library"].endswith("libscipy_openblas.so")
        return
    (record,) = mine
    assert record["decided"] and record["rounds"] == blas_kernels.ROUNDS
    assert len(record["ratios"]) == record["rounds"] and record["openblas_s"] > 0
    assert (Path(got["library"]).name == mkl.INTERFACE) == (record["speedup"] >= mkl.MARGIN), got


def test_a_non_intel_cpu_keeps_openblas_unmeasured(tmp_path, monkeypatch):
    amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
    assert cpu.cpu_vendor(amd) == "AuthenticAMD" and not mkl.is_intel(cpu.cpu_vendor(amd))
    parse = cpu.cpu_vendor  # this machine's /proc/cpuinfo read as an AMD one's
    monkeypatch.setattr(cpu, "cpu_vendor", lambda cpuinfo=None: parse(cpuinfo or amd))
    monkeypatch.setenv("MLXLAB_KERNELS_CACHE", str(tmp_path))
    from mlxlab.runtime import settings

    settings.reload()
    try:
        picked, why = mkl.choose(_openblas(), {})
    finally:
        monkeypatch.undo()
        settings.reload()
    assert picked is None and "AuthenticAMD" in why, why
    assert not (tmp_path / blas_kernels.CACHE_FILE).exists()  # nothing timed, nothing kept


def test_an_intel_cpu_without_mkl_is_told_the_install_that_adds_it(monkeypatch):
    """Without the mkl package, an Intel CPU's device line names `mlxlab[mkl]` and what it gave
    where measured; another vendor's says nothing of MKL."""
    monkeypatch.setattr(mkl, "mkl_directory", lambda: None)  # the package not installed
    for vendor, said in (("GenuineIntel", True), ("AuthenticAMD", False)):
        monkeypatch.setattr(cpu, "cpu_vendor", lambda cpuinfo=None, v=vendor: v)
        picked, why = mkl.choose(_openblas(), {})
        assert picked is None
        assert ("pip install 'mlxlab[mkl]'" in why and mkl.WHY_MKL in why) == said, (vendor, why)
        assert said or why == ""


@pytest.mark.parametrize("first, env, spins", [
    ("", {}, "0"),  # MLX's MKL loads libgomp: its idle threads sleep at once
    ("import torch; ", {}, "300000"),  # PyTorch loaded it first: its settings stand
    ("", {"OMP_WAIT_POLICY": "ACTIVE"}, "30000000000"),  # the user's wait wins
])
def test_mkl_loads_libgomp_passive_unless_it_is_loaded_or_the_user_chose(first, env, spins):
    """libgomp's settings as it reports them at load (OMP_DISPLAY_ENV=verbose), in a process
    where MLX's MKL serves MLX; the variable mlxlab set is gone from the environment after."""
    import os
    import subprocess

    if first and importlib.util.find_spec("torch") is None:  # found, not imported here
        pytest.skip("torch is not installed")
    code = f"{first}import os, mlxlab; print(mlxlab.blas.status, os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **os.environ, "MLXLAB_BLAS": "mkl", "OMP_DISPLAY_ENV": "verbose", **env}, check=True)
    assert f"GOMP_SPINCOUNT = '{spins}'" in done.stderr, done.stderr[-2000:]
    assert done.stdout.split() == ["loaded", env.get("OMP_WAIT_POLICY", "None")], done.stdout


# Products through MLX with MKL at 2 threads and the fused kernels loaded: the wrapper hands the
# large ones (M*N*K from 256^3, the unmeasured threshold at 1 thread) to the kernels' splitter.
SPLIT_PROBE = textwrap.dedent(
    """
    import json
    import mlxlab
    import mlx.core as mx
    import numpy as np
    from mlxlab import kernels
    from mlxlab.runtime.compute import blas
    blas.set_blas_threads(2)
    split = kernels.extension() is not None
    out = {"parted": [], "errors": []}
    rng = np.random.default_rng(0)
    # (m, k, n) and which operand is stored transposed: rows split (m long), columns split
    # (m short, n long), odd sizes, and one below the threshold (not split)
    for m, k, n, ta, tb in [(1024, 128, 128, False, False), (1000, 256, 66, True, False),
                            (64, 700, 400, False, True), (301, 333, 257, True, True),
                            (40, 50, 60, False, False)]:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        x, y = mx.array(a), mx.array(b)
        before = blas._wrapper.parted()
        got = np.array((x.T if ta else x) @ (y.T if tb else y))
        want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
        out["parted"].append(blas._wrapper.parted() - before)
        out["errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("kernels_mode", ["auto", "off"])
def test_large_products_split_over_the_kernels_pool_and_match_numpy(tmp_path, kernels_mode):
    proc = subprocess.run(
        [sys.executable, "-c", SPLIT_PROBE], capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLXLAB_BLAS": "mkl", "MKL_NUM_THREADS": "1",
             "MLXLAB_KERNEL_THREADS": "2", "MLXLAB_FUSED_KERNELS": kernels_mode})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(got["errors"]) < 1e-5, got
    # with the kernels off MKL keeps its own threads
    assert got["parted"] == ([1, 1, 1, 1, 0] if kernels_mode == "auto" else [0] * 5), got
