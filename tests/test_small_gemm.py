"""MLX's small products on one BLAS thread, its large ones on all (runtime/compute/small_gemm.py):
the wrapper libmlx's cblas_sgemm slot points at, the measured threshold, its cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlxlab.runtime.compute import blas_kernels, mkl, small_gemm

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS swap is Linux-only")

# Products of each size through MLX: how many the wrapper ran on one thread, their error.
PROBE = textwrap.dedent(
    """
    import json, sys
    import mlxlab
    import mlx.core as mx
    import numpy as np
    from mlxlab.runtime.compute import blas
    out = {"detail": mlxlab.blas.detail, "threads": blas.blas_threads(),
           "library": blas.mlx_gemm_library(), "slot": blas.calls_into(
               blas.loaded_path("libmlx.so"), "cblas_sgemm"), "batch": bool(blas.mlx_sgemm_batch()),
           "alone": {}, "errors": []}
    for n in json.loads(sys.argv[1]):
        a = np.random.default_rng(n).standard_normal((n, n), dtype=np.float32)
        before = blas._wrapper.alone()
        got = np.array(mx.array(a) @ mx.array(a))
        want = a.astype(np.float64) @ a.astype(np.float64)
        out["alone"][n] = blas._wrapper.alone() - before
        out["errors"].append(float(np.abs(got - want).max() / np.abs(want).max()))
    print(json.dumps(out))
    """
)
SIZES = [64, 128, 200, 256, 400]
LIBRARIES = {"openblas": "libscipy_openblas.so", "mkl": mkl.INTERFACE}


def _library(name: str) -> Path:
    import mlxlab

    if name == "mkl":
        directory = mkl.mkl_directory()
        if directory is None:
            pytest.skip("the optional mkl package is not installed (pip install 'mlxlab[mkl]')")
        return mkl.link_group(directory)[0]
    found = mlxlab.runtime.compute.blas._bundled_openblas()
    if found is None:
        pytest.skip("scipy-openblas32 is not installed")
    return found


def _environment(name: str) -> dict[str, str]:
    """The variables setup_blas loads `name` with when OPENBLAS_CORETYPE is the user's."""
    return {"OPENBLAS_THREAD_TIMEOUT": "4"} if name == "openblas" else {}


@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_small_products_run_alone_below_the_measured_size(name, tmp_path, monkeypatch):
    """A threshold verdict in the cache (threads pay from 256^3) decides: MLX's products below it
    run on one thread, the others threaded; every one equals numpy's to fp32 rounding, the
    products land in the library, and the attention's batched products still find it."""
    from mlxlab.runtime import settings

    monkeypatch.setenv("MLXLAB_KERNELS_CACHE", str(tmp_path))  # MKL's linked layers: there too
    settings.reload()
    try:
        library = _library(name)
    finally:
        monkeypatch.undo()
        settings.reload()
    threads = 2
    verdict = {"sizes": {}, "from": 256, "threads": threads, "decided": True, "measured": 0}
    (tmp_path / blas_kernels.CACHE_FILE).write_text(json.dumps(
        {small_gemm.cache_key(library, _environment(name), threads): verdict}))
    env = {**os.environ, "MLXLAB_BLAS": name, "MLXLAB_KERNELS_CACHE": str(tmp_path),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_CORETYPE": "Haswell"}
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(SIZES)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["alone"] == {"64": 1, "128": 1, "200": 1, "256": 0, "400": 0}, got
    assert max(got["errors"]) < 1e-4, got
    assert "one thread below 256^3, 2 from there (measured on this machine)" in got["detail"], got
    assert got["library"].endswith(LIBRARIES[name]) and got["slot"].startswith(str(tmp_path))
    assert got["threads"] == threads and got["batch"]


def test_a_busy_machines_thread_timing_is_not_kept_as_measured():
    """The threaded side's walls decide; a single-threaded round that waited for a core makes the
    verdict unsettled (its walls say nothing about threads)."""
    sample = lambda cpu_s, wall: {"cpu": cpu_s, "wall": wall}  # noqa: E731
    quiet = small_gemm.judge([sample(1.0, 1.0)] * 4, [sample(0.6, 0.5)] * 4)
    assert quiet["decided"] and quiet["speedup"] == 2.0
    busy = small_gemm.judge([sample(1.0, 3.0)] + [sample(1.0, 1.0)] * 3, [sample(0.6, 0.5)] * 4)
    assert not busy["decided"] and busy["waited_rounds"] == 1


@pytest.mark.slow
def test_the_threshold_is_measured_and_an_unsettled_one_kept_for_an_hour(tmp_path, monkeypatch):
    """A real timing (child processes at each size, one thread against two): its record names
    the size threads pay from; kept in the cache settled or not (unsettled: for RETRY_S)."""
    library = _library("openblas")
    monkeypatch.setenv("MLXLAB_KERNELS_CACHE", str(tmp_path))
    from mlxlab.runtime import settings

    settings.reload()
    try:
        below, why = small_gemm.threshold(library, _environment("openblas"), "openblas", 2)
    finally:
        monkeypatch.undo()
        settings.reload()
    (record,) = json.loads((tmp_path / blas_kernels.CACHE_FILE).read_text()).values()
    assert set(record["sizes"]) == {str(n) for n in small_gemm.SIZES}
    assert record["from"] in (0, *small_gemm.SIZES[1:], 2 * small_gemm.SIZES[-1])
    if record["decided"]:
        assert below == record["from"] ** 3 and "measured on this machine" in why
    else:
        assert below == small_gemm.DEFAULT_BELOW and "an hour later" in why
