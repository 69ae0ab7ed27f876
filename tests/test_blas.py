"""The fast BLAS that mlxlab binds into MLX (and nothing else), and its opt-outs.

Each case runs in a fresh interpreter: what a library's BLAS calls resolve to is fixed per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlxlab.runtime.compute import blas_kernels, cpu

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS swap is Linux-only")

# Prints what got loaded, which libraries are mapped, GEMM error vs numpy and the best GEMM time.
PROBE = textwrap.dedent(
    """
    import ctypes, json, os, time
    import mlxlab
    import mlx.core as mx
    import numpy as np
    from mlxlab.runtime.compute.blas import blas_threads, set_blas_threads

    threads = [blas_threads(), set_blas_threads(2) and blas_threads()]
    set_blas_threads(1)

    rng = np.random.default_rng(0)
    a = rng.standard_normal((384, 256), dtype=np.float32)
    b = rng.standard_normal((256, 320), dtype=np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    want = a.astype(np.float64) @ b.astype(np.float64)
    x = mx.random.normal((512, 512))
    mx.eval(x @ x)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(x @ x)
        best = min(best, time.perf_counter() - t)
    maps = open("/proc/self/maps").read()
    from pathlib import Path
    from mlxlab.runtime.compute import blas_kernels, cpu
    kernels = blas_kernels.cache_path()
    verdicts = json.loads(kernels.read_text()) if kernels.is_file() else {}
    mine = mlxlab.blas.library and blas_kernels.cache_key(Path(mlxlab.blas.library), cpu.cpu_flags())
    # The default run's attention scores with K's heads contiguous (B^T to BLAS) and strided
    # (MLX copies them: B as it is): what kernels.split_heads changes.
    q = mx.random.normal((32, 32, 4, 32)).transpose(0, 2, 1, 3)
    k = mx.random.normal((32, 32, 4, 32)).transpose(0, 2, 1, 3)
    nt, nn = q @ mx.contiguous(k).swapaxes(-1, -2), q @ k.swapaxes(-1, -2)
    print(json.dumps({
        "status": mlxlab.blas.status, "library": mlxlab.blas.library, "fast": mlxlab.blas.fast,
        "detail": mlxlab.blas.detail, "coretype_env": os.environ.get("OPENBLAS_CORETYPE"),
        "nt_equals_nn": bool(np.array_equal(np.array(nt), np.array(nn))),
        "openblas_mapped": "/libscipy_openblas.so" in maps, "threads": threads,
        "global_blas": [n for n in ("cblas_sgemm", "sgemm_") if hasattr(ctypes.CDLL(None), n)],
        "max_rel_err": float(np.abs(got - want).max() / np.abs(want).max()),
        "gemm_s": best,
        "verdict": verdicts.get(mine),
    }))
    """
)


def probe(prelude: str = "", **env: str) -> dict:
    """The PROBE's answer in a fresh interpreter with `env`. OpenBLAS unless `env` names another
    MLXLAB_BLAS ("" for the default's choice): with the optional mkl package installed, an Intel
    CPU's default is whichever measured faster (tests/test_blas_mkl.py)."""
    env = {"MLXLAB_BLAS": "openblas", **env}
    # 1 thread: stable on busy CPUs (and no thread-count timing, runtime/compute/small_gemm.py)
    run_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    if "OPENBLAS_CORETYPE" not in env:  # a machine's own setting (some images set it) is not
        run_env.pop("OPENBLAS_CORETYPE", None)  # the default's
    proc = subprocess.run(
        [sys.executable, "-c", prelude + PROBE],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


@pytest.fixture(scope="module")
def default() -> dict:
    return probe()


@pytest.fixture(scope="module")
def opted_out() -> dict:
    return probe(MLXLAB_BLAS="off")


def test_default_loads_openblas_and_gemm_matches_numpy(default):
    assert default["status"] == "loaded", default
    assert default["fast"]
    assert default["library"].endswith("libscipy_openblas.so")  # scipy-openblas32's
    assert "libgfortran" not in default["stderr"]
    assert default["openblas_mapped"]
    assert default["max_rel_err"] < 1e-4
    assert "reference BLAS" not in default["stderr"]
    assert default["threads"] == [1, 2]  # OPENBLAS_NUM_THREADS=1 honoured, then set_blas_threads(2)


def test_openblas_stays_out_of_the_global_symbol_scope(default):
    # Libraries loaded later (PyTorch's libtorch_cpu calls its own sgemm_ through its PLT) must
    # not resolve their BLAS names into mlxlab's OpenBLAS: only libmlx is rebound.
    assert default["global_blas"] == []


def test_openblas_runs_the_kernels_measured_fastest_on_this_cpu(default):
    # An x86-64-v3 CPU without AVX-512 runs OpenBLAS's AVX2 kernels, whose products have the same
    # bits with B transposed or copied (what the fused kernels' contiguous heads change). An
    # AVX-512 CPU runs the AVX-512 kernels where the first import measured them >= 1.1x faster
    # (scipy-openblas32 picks its AVX2 ones on a Zen 5, whose AVX-512 sgemm is ~2x faster), and
    # says so in the detail line.
    if cpu.isa_level() != cpu.X86_64_V3:
        pytest.skip("not an x86-64-v3 CPU: OpenBLAS keeps its own choice")
    assert default["coretype_env"] is None  # set for OpenBLAS's load only
    if not blas_kernels.has_avx512():
        assert "Haswell" in default["detail"] and "no AVX-512" in default["detail"], default
        assert default["nt_equals_nn"]
        return
    verdict = default["verdict"]  # this CPU and library's, measured once
    # the median of the interleaved rounds' ratios (older verdicts: the ratio of the two times)
    speedup = verdict.get("speedup", verdict["avx2_s"] / verdict["avx512_s"])
    core = "SkylakeX" if speedup >= blas_kernels.MARGIN else "Haswell"
    assert core in default["detail"] and f"{speedup:.2f}x" in default["detail"], default["detail"]
    if core == "Haswell":
        assert default["nt_equals_nn"]


def test_the_kernels_verdict_is_cached_per_machine(default, tmp_path):
    # The second process on the machine reads the verdict instead of timing again, so a run and
    # its resume run the same kernels: its cache file is not rewritten, and a verdict put there
    # decides. A verdict with the AVX-512 kernels slower keeps the AVX2 ones.
    if cpu.isa_level() != cpu.X86_64_V3 or not blas_kernels.has_avx512():
        pytest.skip("no AVX-512 on this CPU: nothing is measured")
    cache = tmp_path / "kernels"
    first = probe(MLXLAB_KERNELS_CACHE=str(cache))
    path = cache / blas_kernels.CACHE_FILE
    written = path.stat().st_mtime_ns
    again = probe(MLXLAB_KERNELS_CACHE=str(cache))
    assert path.stat().st_mtime_ns == written
    assert again["detail"] == first["detail"]
    key = next(iter(json.loads(path.read_text())))
    path.write_text(json.dumps({key: {"avx2_s": 1.0, "avx512_s": 1.05, "measured": 0}}))
    slower = probe(MLXLAB_KERNELS_CACHE=str(cache))
    assert "Haswell" in slower["detail"] and "0.95x" in slower["detail"], slower["detail"]
    assert slower["nt_equals_nn"]


def test_a_users_openblas_coretype_wins():
    result = probe(OPENBLAS_CORETYPE="Sandybridge")
    assert "Sandybridge" in result["detail"], result["detail"]
    assert result["coretype_env"] == "Sandybridge"
    assert result["max_rel_err"] < 1e-4


def test_opt_out_keeps_the_reference_blas(opted_out):
    assert opted_out["status"] == "off"
    assert not opted_out["fast"]
    assert not opted_out["openblas_mapped"]
    assert opted_out["max_rel_err"] < 1e-4
    assert opted_out["threads"] == [None, False]


def test_loaded_blas_is_much_faster_than_the_reference(default, opted_out):
    # Measured ~20x (single thread, 512^2 fp32); 4x leaves room for a noisy shared CPU.
    assert opted_out["gemm_s"] > 4 * default["gemm_s"], (default["gemm_s"], opted_out["gemm_s"])


def test_user_library_path_is_loaded(default):
    result = probe(MLXLAB_BLAS=default["library"])
    assert result["status"] == "user"
    assert result["library"] == default["library"]
    assert result["max_rel_err"] < 1e-4


def test_mkl_named_without_the_package_is_a_clear_error(monkeypatch):
    from mlxlab.runtime.compute import mkl

    monkeypatch.setattr(mkl, "mkl_directory", lambda: None)  # as where `mkl` is not installed
    with pytest.raises(FileNotFoundError, match=r"MLXLAB_BLAS=mkl but the mkl package is not "
                                                r"installed: `pip install 'mlxlab\[mkl\]'`"):
        mkl.forced()


def test_missing_user_library_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-c", "import mlxlab"],
        env={**os.environ, "MLXLAB_BLAS": "/no/such/libblas.so"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "FileNotFoundError: MLXLAB_BLAS=/no/such/libblas.so is not a file" in proc.stderr


def test_mlx_imported_first_still_gets_openblas(default):
    # libmlx's slots are rebound after the fact, so the import order no longer matters.
    result = probe(prelude="import mlx.core\n")
    assert result["status"] == "loaded"
    assert result["fast"] and result["openblas_mapped"]
    assert result["max_rel_err"] < 1e-4
    assert result["gemm_s"] < 4 * default["gemm_s"]


# CPU time of the process while its main thread sleeps after some two-thread matrix products:
# what OpenBLAS's idle worker spends waiting for more work.
IDLE_PROBE = textwrap.dedent(
    """
    import json, os, time
    import mlxlab
    import mlx.core as mx

    x = mx.random.normal((512, 512))
    for _ in range(5):
        mx.eval(x @ x)
    started = time.process_time()
    time.sleep(0.4)
    print(json.dumps({"idle_cpu_s": time.process_time() - started,
                      "environment": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}))
    """
)


@pytest.mark.parametrize("timeout", [None, "30"])
def test_idle_blas_threads_sleep_instead_of_spinning(timeout):
    # OpenBLAS spins 2**28 cycles (~0.1 s) after each product unless told otherwise; mlxlab sets
    # OPENBLAS_THREAD_TIMEOUT=4 (runtime/compute/blas.py: the step's other work needs that core). A
    # user's value wins: 30 spins ~0.4 s, so the spinning worker's CPU shows during the sleep.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    env["MLXLAB_BLAS"] = "openblas"  # the default's, also where an installed MKL measured faster
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    if timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = timeout
    proc = subprocess.run([sys.executable, "-c", IDLE_PROBE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    idle = result["idle_cpu_s"]
    # set for OpenBLAS's load only: numpy's OpenBLAS and child processes keep their default
    assert result["environment"] == timeout
    if timeout is None:
        assert idle < 0.03, f"OpenBLAS's idle thread used {idle:.3f} s of CPU in a 0.4 s sleep"
    else:
        assert idle > 0.06, f"OPENBLAS_THREAD_TIMEOUT={timeout} was not honoured ({idle:.3f} s)"


def test_device_helpers_on_this_cpu_machine():
    import mlx.core as mx

    from mlxlab.runtime.compute import device

    assert device.backend() == "cpu"
    assert device.default_compute_dtype() == mx.float32
    device.reset_peak_memory()
    before = device.active_memory_mb()
    x = mx.zeros((1024, 1024))  # 4 MiB
    mx.eval(x)
    assert device.active_memory_mb() - before >= 3.9
    assert device.peak_memory_mb() >= device.active_memory_mb()


# ---- no side effects on other libraries in the same process -----------------------------------

ORDERS = {"mlxlab first": "import mlxlab\nimport torch\n", "torch first": "import torch\nimport mlxlab\n"}


# The library each MLXLAB_BLAS choice gives MLX's cblas_sgemm (mkl: runtime/compute/mkl.py).
SERVES = {"openblas": "libscipy_openblas.so", "mkl": "libmkl_intel_lp64.so.3"}


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("library", ["openblas", pytest.param("mkl", marks=pytest.mark.slow)])
def test_torch_keeps_its_own_blas_next_to_mlxlab(order, library):
    pytest.importorskip("torch")
    if library == "mkl" and not _has_mkl():
        pytest.skip("the optional mkl package is not installed (pip install 'mlxlab[mkl]')")
    code = ORDERS[order] + textwrap.dedent(
        """
        import json
        import mlx.core as mx
        import numpy as np
        import torch
        from mlxlab.runtime.compute.blas import calls_into, loaded_path, mlx_gemm_library
        a = np.random.default_rng(0).standard_normal((300, 200), dtype=np.float32)
        want = a.astype(np.float64) @ a.T.astype(np.float64)
        errors = {"mlx": np.array(mx.array(a) @ mx.array(a).T),
                  "torch": (torch.from_numpy(a) @ torch.from_numpy(a).T).numpy()}
        torch_lib, mlx_lib = loaded_path("libtorch_cpu.so"), loaded_path("libmlx.so")
        print(json.dumps({
            "torch": {s: calls_into(torch_lib, s) for s in ("sgemm_", "cblas_sgemm_batch", "sgetrf_")},
            "mlx": mlx_gemm_library(), "torch_lib": torch_lib,
            "openmp": sorted({line.split()[-1] for line in open("/proc/self/maps")
                              if "libgomp" in line or "libiomp" in line}),
            "errors": {k: float(np.abs(v - want).max() / np.abs(want).max()) for k, v in errors.items()},
        }))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                               "MLXLAB_BLAS": library})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # PyTorch's BLAS calls land in its own libtorch_cpu (MKL inside), not in an OpenBLAS or MKL
    # that mlxlab put into the global scope; both compute right, each on its own BLAS.
    assert got["torch"] == {s: got["torch_lib"] for s in got["torch"]}, got
    assert got["mlx"].endswith(SERVES[library]), got
    assert max(got["errors"].values()) < 1e-4, got
    # one OpenMP runtime in the process: MKL's GNU layer uses the libgomp.so.1 PyTorch loaded,
    # or PyTorch the one MKL's layer loaded (runtime/compute/mkl.py)
    assert len(got["openmp"]) == 1, got


def _has_mkl() -> bool:
    from mlxlab.runtime.compute import mkl

    return mkl.mkl_directory() is not None


@pytest.mark.slow
def test_torch_training_speed_is_the_same_with_and_without_mlxlab():
    """A real PyTorch decoder training step (benchmarks/speed/torch_plain.py) in a process that imports
    mlxlab (either order, and runs an MLX matmul) vs one that does not: interleaved rounds,
    median tokens/s within noise (an OpenBLAS in the global scope made it 3.7x slower on a Xeon)."""
    pytest.importorskip("torch")
    from conftest import REPO

    run = (
        "import runpy, sys\nsys.argv = ['torch_plain.py', *sys.argv[1:]]\n"
        f"runpy.run_path({str(REPO / 'benchmarks' / 'speed' / 'torch_plain.py')!r}, run_name='__main__')\n"
    )
    mlx = "import mlx.core as mx\nmx.eval(mx.random.normal((256, 256)) @ mx.random.normal((256, 256)))\n"
    preludes = {"plain": "", **{k: v + mlx for k, v in ORDERS.items()}}
    args = ["--vocab", "2048", "--dim", "128", "--layers", "2", "--heads", "4", "--batch", "8",
            "--seq", "128", "--warmup", "2", "--steps", "8", "--threads", "2"]
    rates: dict[str, list[float]] = {k: [] for k in preludes}
    for r in range(5):
        for name in sorted(preludes, reverse=bool(r % 2)):  # ABBA: drift hits all alike
            proc = subprocess.run([sys.executable, "-c", preludes[name] + run, *args],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            rates[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"])
    # Per-round ratios (processes minutes apart on a shared box differ by far more than that).
    for name in ORDERS:
        ratios = sorted(a / b for a, b in zip(rates[name], rates["plain"]))
        assert 0.8 < ratios[len(ratios) // 2] < 1.25, rates


def _library():
    import mlxlab

    if cpu.isa_level() != cpu.X86_64_V3 or not blas_kernels.has_avx512() or not mlxlab.blas.library:
        pytest.skip("no AVX-512 OpenBLAS to choose kernels for on this CPU")
    from pathlib import Path

    return Path(mlxlab.blas.library)


def test_a_kernel_verdict_taken_on_a_busy_machine_is_the_quiet_one_or_deferred():
    """Both cores kept busy by two other processes: the measurement sees that its rounds waited,
    and its verdict is the one a quiet measurement gives, or it is deferred (not cached)."""
    library = _library()
    quiet = blas_kernels.measure(library)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = blas_kernels.measure(library)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert quiet is not None and busy is not None
    assert busy["waited_rounds"] > 0, busy  # the load was there, and seen
    if busy["decided"] and quiet["decided"]:
        assert (busy["speedup"] >= blas_kernels.MARGIN) == (quiet["speedup"] >= blas_kernels.MARGIN), (
            quiet, busy)


def test_an_unsettled_verdict_is_not_kept_and_says_why(tmp_path, monkeypatch):
    """Rounds that straddle MARGIN while most of them waited for a core: AVX2 for this process,
    nothing cached, the next start measures again. Wall-clock timings a load inflated on one
    side do not decide: the verdict reads the threads' own clocks."""
    sample = lambda cpu_s, wall: {"cpu": cpu_s, "wall": wall}  # noqa: E731
    # wall time says AVX-512 is 2x faster (the AVX2 rounds waited); the CPU clocks say 1.0x
    steady = blas_kernels.verdict_of([sample(1.0, 2.0)] * 6, [sample(1.0, 1.0)] * 6)
    assert steady["decided"] and abs(steady["speedup"] - 1.0) < 1e-9
    straddle = blas_kernels.verdict_of(
        [sample(1.0 + 0.1 * i, 3.0) for i in range(6)], [sample(1.0, 3.0)] * 6)
    assert not straddle["decided"] and straddle["waited_rounds"] == 12
    library = _library()
    monkeypatch.setenv("MLXLAB_KERNELS_CACHE", str(tmp_path))
    from mlxlab.runtime import settings

    settings.reload()
    try:
        monkeypatch.setattr(blas_kernels, "measure", lambda _: straddle)
        core, why = blas_kernels.choose_core(library)
        assert core == blas_kernels.AVX2_CORE and "measured again at the next start" in why
        assert not (tmp_path / blas_kernels.CACHE_FILE).exists()
    finally:
        monkeypatch.undo()
        settings.reload()


def test_a_race_per_product_counts_each_shape_by_its_time_per_multiply_add():
    """per_product (MKL's race): a round is the sum of each shape's seconds per multiply-add
    (x 1e9), so a 32^3 product counts as much as a 512^3 one; without it, the shapes' seconds."""
    from mlxlab.runtime.compute.blas import _bundled_openblas

    library = _bundled_openblas()
    if library is None:
        pytest.skip("scipy-openblas32 is not installed here")
    side = blas_kernels.Contender("a", library, {"OPENBLAS_NUM_THREADS": "1"})
    other = blas_kernels.Contender("b", library, {"OPENBLAS_NUM_THREADS": "1"})
    shapes = ((32, 32, 32),)
    keep = lambda a, b, names: {"a": a, "b": b}  # noqa: E731  (the raw samples)
    plain = blas_kernels.race(side, other, shapes, repeats=2, rounds=2, judge=keep)
    weighted = blas_kernels.race(side, other, shapes, repeats=2, rounds=2, judge=keep,
                                 per_product=True)
    # a 32^3 product takes microseconds: 32,768 multiply-adds at 1-1000 per nanosecond
    assert all(1e-8 < s["cpu"] < 1e-3 for s in plain["a"] + plain["b"]), plain
    assert all(1e-3 < s["cpu"] < 10.0 for s in weighted["a"] + weighted["b"]), weighted
