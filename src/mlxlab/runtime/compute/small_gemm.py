"""One BLAS thread for MLX's small products, all of them for its large ones.

MLX calls `cblas_sgemm` once per product and cannot be told how many threads to use. With two
or more threads, OpenBLAS hands even a 128x128 product to its workers, which sleep between
products (blas.SPIN_EXPONENT) and must be woken for each: on a 2-core Xeon that product ran at
34 GFLOP/s on two threads (MKL: 176-191), and with another process busy one took 4.8 ms on two
threads against 60 us on one. MKL's GNU OpenMP threads sleep likewise (mkl.py). So libmlx's `cblas_sgemm`
slot points at `mlxlab_sgemm` (SOURCE, linked at first use with the C compiler the fused kernels
are built with), which calls the library's sgemm on the calling thread alone when M*N*K is below
a threshold (OpenBLAS: its thread count set to 1 for the call; MKL: mkl_set_num_threads_local, this
thread only) and as the library would otherwise. With MKL and the fused kernels loaded, the
larger products go to the kernels' row splitter instead (blas.split_products,
kernels/csrc/split_gemm.cpp): their rows over the kernels' pool, whose worker stays awake between
a step's calls, each part on one MKL thread; MKL's own OpenMP workers then never wake. The
batched products of the fused attention go to the library directly (one call per attention,
already one thread per matrix).

The threshold is this machine's: the first import with more than one BLAS thread times square
products of SIZES on one thread and on all of them (blas_kernels.race: a child process each,
interleaved rounds), on the wall's clock, since the threaded side's waiting is what is measured,
and keeps it only when the single-threaded rounds show no wait for a core (a quiet machine);
products below the smallest size from which the threaded ones are at least MARGIN faster at
every larger size run on one thread. Unsettled, it uses DEFAULT_BELOW and measures again at a
start an hour later. The verdict is cached with the others (blas_kernels.verdict).
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

from mlxlab.runtime.compute import blas_kernels, cpu, linker

SOURCE = r"""
/* mlxlab's cblas_sgemm for MLX (runtime/compute/small_gemm.py): one thread below a size. */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*set_fn)(int);
typedef int (*local_fn)(int);
static sgemm_fn gemm;
static set_fn set_threads;  /* OpenBLAS: the process's thread count */
static local_fn set_local;  /* MKL: this thread's count; returns the one it replaces */
static long long below;     /* M*N*K under which a product runs on the calling thread alone */
static int threads = 1;
static long long alone;     /* products run on one thread so far */
/* The fused kernels' row splitter (kernels/csrc/split_gemm.cpp): a large product's rows over
   their thread pool, each part on one library thread. */
typedef void (*split_fn)(void *, void *, int, int, int, int, int, int, float, const float *,
                         int, const float *, int, float, float *, int);
static split_fn split;
static long long parted;    /* products handed to the splitter so far */

void mlxlab_sgemm_setup(void *g, void *global, void *local, long long threshold, int n) {
  gemm = (sgemm_fn)g; set_threads = (set_fn)global; set_local = (local_fn)local;
  below = threshold; threads = n;
}
void mlxlab_sgemm_threads(int n) { threads = n; }
void mlxlab_sgemm_split(void *f) { split = (split_fn)f; }
long long mlxlab_sgemm_parted(void) { return parted; }
long long mlxlab_sgemm_alone(void) { return alone; }

void mlxlab_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                  int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (threads > 1 && (long long)m * n * k < below && (set_local || set_threads)) {
    alone++;
    if (set_local) {
      int previous = set_local(1);
      gemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      set_local(previous);
    } else {
      set_threads(1);
      gemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      set_threads(threads);
    }
    return;
  }
  if (split && set_local && threads > 1 && order == 101) {
    parted++;
    split((void *)gemm, (void *)set_local, ta, tb, m, n, k, threads, alpha, a, lda, b, ldb,
          beta, c, ldc);
    return;
  }
  gemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""
SIZES = (64, 128, 256, 512, 1024)
MARGIN = 1.10  # the threaded product must be this much faster to be worth its threads
REPEATS, ROUNDS = 2, 4  # per size: best of REPEATS, median of ROUNDS interleaved rounds
# Unmeasured or unsettled: one thread below 256^3 (on the 2-core Xeon above, two OpenBLAS
# threads lost most at 128 and came out ahead from 256: 144 GFLOP/s against 34 at 128).
DEFAULT_BELOW = 256**3
# An unsettled timing (a busy machine) is kept for this long before a start times again, so that
# a loaded machine's processes do not each pay for it.
RETRY_S = 3600.0
THREAD_VARIABLES = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS"}


def build() -> Path:
    """The wrapper library, linked once per machine into the kernels cache (OSError: no compiler)."""
    return linker.link(SOURCE, linker.cached_name("sgemm", SOURCE), [])


def threshold(library: Path, env: dict[str, str], kind: str, threads: int) -> tuple[int, str]:
    """(M*N*K below which MLX's products run on one thread, why) for `library` (`kind`: openblas
    or mkl, loaded with `env`) at `threads` threads on this machine."""
    record = blas_kernels.verdict(cache_key(library, env, threads),
                                  lambda: measure(library, env, kind, threads), RETRY_S)
    if record is None:
        return DEFAULT_BELOW, "one thread below 256^3 (the thread counts could not be timed)"
    if not record["decided"]:
        return DEFAULT_BELOW, ("one thread below 256^3 for now (the thread counts' timing waited "
                               "for a busy core; measured again an hour later)")
    n = record["from"]
    return n**3, (f"one thread below {n}^3, {threads} from there (measured on this machine)"
                  if n else f"{threads} threads at every size (measured on this machine)")


def cache_key(library: Path, env: dict[str, str], threads: int) -> str:
    """This CPU, this library file, the variables it loads with, the thread count."""
    ident = f"{blas_kernels.cache_key(library, cpu.cpu_flags())}|{sorted(env.items())}|{threads}"
    return "threads-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


def measure(library: Path, env: dict[str, str], kind: str, threads: int) -> dict | None:
    """One thread against `threads` at each of SIZES (module docstring): the per-size records,
    `from` (the smallest size from which threads pay at every larger one; 0: every size; twice
    the largest: none) and `decided`."""
    variable = THREAD_VARIABLES[kind]
    core = env.get("OPENBLAS_CORETYPE") if kind == "openblas" else None
    sizes = {}
    for n in SIZES:
        record = blas_kernels.race(
            blas_kernels.Contender("one", library, {**env, variable: "1"}, core),
            blas_kernels.Contender("many", library, {**env, variable: str(threads)}, core),
            ((n, n, n),), repeats=REPEATS, rounds=ROUNDS, judge=judge)
        if record is None:
            return None
        sizes[n] = record
    pays = [n for n in SIZES if all(sizes[m]["speedup"] >= MARGIN for m in SIZES if m >= n)]
    start = pays[0] if pays else 2 * SIZES[-1]
    return {"sizes": sizes, "from": 0 if start == SIZES[0] else start, "threads": threads,
            "decided": all(r["decided"] for r in sizes.values())}


def judge(one: list[dict], many: list[dict], names=("one", "many")) -> dict:
    """Wall-clock speed of the threaded rounds over the single-threaded ones; decided only where
    no single-threaded round waited for a core (blas_kernels.WAITED): a busy machine's walls
    say nothing about threads."""
    ratios = sorted(a["wall"] / b["wall"] for a, b in zip(one, many))
    waited = sum(s["wall"] > blas_kernels.WAITED * s["cpu"] for s in one)
    return {"speedup": ratios[len(ratios) // 2], "ratios": [round(r, 4) for r in ratios],
            "one_s": sorted(s["wall"] for s in one)[len(one) // 2],
            "many_s": sorted(s["wall"] for s in many)[len(many) // 2],
            "waited_rounds": waited, "rounds": len(ratios), "decided": waited == 0}


class Wrapper:
    """The loaded wrapper, set up for one library's sgemm and thread controls."""

    def __init__(self, blas: ctypes.CDLL, prefix: str, kind: str, below: int) -> None:
        self.lib = ctypes.CDLL(str(build()), mode=ctypes.RTLD_LOCAL)
        address = lambda name: ctypes.cast(getattr(blas, prefix + name), ctypes.c_void_p).value  # noqa: E731
        self.sgemm = address("cblas_sgemm")
        setter = address("openblas_set_num_threads") if kind == "openblas" else None
        local = address("MKL_Set_Num_Threads_Local") if kind == "mkl" else None
        self.lib.mlxlab_sgemm_setup.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong, ctypes.c_int]
        self.lib.mlxlab_sgemm_alone.restype = ctypes.c_longlong
        self.lib.mlxlab_sgemm_parted.restype = ctypes.c_longlong
        self.lib.mlxlab_sgemm_split.argtypes = [ctypes.c_void_p]
        self.lib.mlxlab_sgemm_setup(self.sgemm, setter, local, below, 1)
        self.below = below

    @property
    def address(self) -> int:
        return ctypes.cast(self.lib.mlxlab_sgemm, ctypes.c_void_p).value

    def set_threads(self, n: int) -> None:
        """The thread count the library runs large products on (blas.set_blas_threads)."""
        self.lib.mlxlab_sgemm_threads(int(n))

    def set_split(self, address: int | None) -> None:
        """Large products through the fused kernels' row splitter at `address` (None: the
        library's own threads)."""
        self.lib.mlxlab_sgemm_split(address)

    def alone(self) -> int:
        """How many products ran on one thread so far."""
        return int(self.lib.mlxlab_sgemm_alone())

    def parted(self) -> int:
        """How many products went to the splitter so far."""
        return int(self.lib.mlxlab_sgemm_parted())

