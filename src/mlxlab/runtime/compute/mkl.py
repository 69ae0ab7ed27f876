"""Intel MKL for MLX on an Intel CPU, where it measures faster than OpenBLAS here.

On a 2-core Xeon, MLX's fp32 products at n=128 ran at 34 GFLOP/s on two OpenBLAS threads and
176-191 on MKL's: most of that gap is how OpenBLAS threads a small product (small_gemm.py
settles that for both), the rest is the kernels, which this module compares. With the
optional `mkl` package installed
(`pip install 'mlxlab[mkl]'`, x86-64 Linux) and a GenuineIntel CPU, the first import on the
machine times both, single-threaded, at SHAPES (blas_kernels.race: a child process each,
interleaved rounds on each thread's own CPU clock, so a busy machine does not decide), and MLX
gets MKL where it is at least MARGIN faster. The verdict is cached per CPU and library files
beside the OpenBLAS kernels' one (blas_kernels.verdict), so every later process on the machine
runs the same BLAS; an unsettled one (taken under load) keeps OpenBLAS for that process and is
measured again at the next start. AMD CPUs keep OpenBLAS unmeasured: MKL runs its generic
kernels there.

How MKL is loaded so that nothing but MLX sees it: the wheel's `libmkl_rt.so.3` finds its
sibling libraries by itself (no LD_LIBRARY_PATH needed) but dlopens them RTLD_GLOBAL, which
would put `cblas_sgemm`, `sgemm_` and an OpenMP runtime into the process's global scope, where
every library loaded later (PyTorch's libtorch_cpu) would bind its own BLAS and OpenMP calls to
them. So mlxlab does not load libmkl_rt: it links, once per machine, an empty library whose
dependencies are MKL's three layers (libmkl_intel_lp64: the 32-bit-integer interface MLX calls;
libmkl_gnu_thread: GNU OpenMP threads; libmkl_core), with the wheel's folder as its run path,
and loads that RTLD_LOCAL: the layers resolve each other inside its own scope, and libmlx's GOT
slots are pointed at their functions (blas.py) as they are for OpenBLAS. This needs the C
compiler the fused kernels are built with; without one, MLX keeps OpenBLAS and says why.

Threads: MKL's GNU OpenMP layer, never Intel's libiomp5, a second OpenMP runtime whose idle
threads spin 200 ms by default. The layer needs libgomp.so.1, and a process holds one library of
that name: PyTorch's CPU wheel bundles its own under the same name, so whichever of the two is
imported first loads its libgomp and the other uses it (tests/test_blas.py): MLX's MKL and
PyTorch share one OpenMP runtime, and neither's threads spin against a second runtime's. libgomp
reads its settings once, as it loads; by default an idle thread spins (300,000 rounds) before it
sleeps, and between the products of a small model's step, where MLX's own ops and the fused
kernels need both cores, those spins took most of a 2-core Xeon's CPU time. So where MLX's MKL
loads libgomp (PyTorch not imported yet) and the user set neither OMP_WAIT_POLICY nor
GOMP_SPINCOUNT, it loads with OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once, as OpenBLAS's
do: blas.SPIN_EXPONENT), taken out of the environment again afterwards; a PyTorch imported later
in that process shares that runtime, its threads sleeping at once too. Where PyTorch loaded
libgomp first, its settings stand. MLX's small products run on one thread anyway (small_gemm.py).
Where libgomp cannot be linked, MKL's sequential layer (one thread) is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
from functools import partial
from pathlib import Path

from mlxlab.runtime.compute import blas_kernels, cpu, linker

DIST = "mkl"
INTEL = "GenuineIntel"
CORE = "libmkl_core.so.3"
INTERFACE = "libmkl_intel_lp64.so.3"  # MKL_INT = 32-bit int: the cblas ABI MLX is built against
# Threading layers, best first: (MKL's layer library, the OpenMP runtime linked with it).
LAYERS = (("libmkl_gnu_thread.so.3", "-lgomp"), ("libmkl_sequential.so.3", None))
# What MKL gave where it was measured: the device line's hint where it is not installed.
WHY_MKL = "on a 2-core Xeon the default run's training loop took 0.85-0.93x OpenBLAS's time"
# MKL must beat OpenBLAS by this much to serve MLX. Lower than the AVX-512 kernels' margin
# (blas_kernels.MARGIN): the race is single-threaded, and a run's products on two or more threads
# gain more from MKL than that (MKL threads a middling product better): on a 2-core Xeon the race
# measured 1.10-1.14x while the default run's loop took 0.85-0.93x OpenBLAS's time, nano's 0.90x.
MARGIN = 1.05
# (M, N, K) timed: blas_kernels.SHAPES (a small decoder's products at 2,048 tokens), the default
# BERT's step at 1,024 tokens (its projections, MLP, and a weight's gradient, K the tokens) and
# square products at the sizes a tiny model's step is made of, where the two libraries differ
# most. Each counts alike (blas_kernels.race's per_product): a small model's step is many
# products of these middling sizes, and the largest must not decide alone.
SHAPES = (*blas_kernels.SHAPES, (1024, 128, 128), (1024, 512, 128), (1024, 128, 512),
          (128, 128, 1024), (128, 128, 128), (256, 256, 256))
GROUP_SOURCE = "/* MKL's layers, linked for mlxlab (runtime/compute/mkl.py) */\n"


def load_environment() -> dict[str, str]:
    """The variables MKL's layers load with (blas._load sets them for the load only): libgomp's
    passive wait (module docstring) where it is not loaded yet and the user set no wait of
    their own."""
    if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        return {}
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)  # loaded already (PyTorch's)
    except OSError:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}


def mkl_directory() -> Path | None:
    """The folder holding the `mkl` wheel's libraries (the environment's lib/), or None when the
    package is not installed."""
    try:
        files = importlib.metadata.distribution(DIST).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == CORE:
            located = Path(str(file.locate())).resolve()
            if located.is_file():
                return located.parent
    return None


def mkl_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def is_intel(vendor: str | None = None) -> bool:
    return (vendor if vendor is not None else cpu.cpu_vendor()) == INTEL


def link_group(directory: Path) -> tuple[Path, str]:
    """The library that loads MKL's layers from `directory` in its own scope (module docstring):
    (its path, its threading layer's name). Linked once per MKL install into the kernels cache,
    with the first layer of LAYERS that links. OSError when none links (no C compiler)."""
    stat = (directory / CORE).stat()
    errors = []
    for layer, runtime in LAYERS:
        out = linker.cached_name("mkl", f"{directory}|{stat.st_size}|{stat.st_mtime_ns}|{layer}")
        args = ["-Wl,--no-as-needed", f"-L{directory}", f"-l:{INTERFACE}", f"-l:{layer}",
                f"-l:{CORE}", *([runtime] if runtime else []), f"-Wl,-rpath,{directory}"]
        try:
            return linker.link(GROUP_SOURCE, out, args), layer
        except OSError as e:
            errors.append(f"{layer}: {e}")
    raise OSError("could not link MKL's layers (" + "; ".join(errors) + ")")


def choose(openblas: Path | None, openblas_env: dict[str, str]) -> tuple[tuple[Path, str] | None, str]:
    """Whether MLX gets MKL instead of `openblas` (loaded with `openblas_env`): ((the linked MKL,
    its layer), why) where MKL measured faster on this Intel CPU; (None, why) otherwise, `why`
    empty where MKL is not installed and the CPU is not Intel's (nothing to say)."""
    directory = mkl_directory()
    if directory is None:  # on an Intel CPU, said: the user may not know MKL is one install away
        return None, (f"OpenBLAS: on this Intel CPU `pip install 'mlxlab[mkl]'` adds MKL, raced "
                      f"against it at the first import ({WHY_MKL})") if is_intel() else ""
    if not is_intel():
        return None, f"OpenBLAS: MKL is not used on a {cpu.cpu_vendor() or 'non-Intel'} CPU"
    try:
        group, layer = link_group(directory)
    except OSError as e:
        return None, f"OpenBLAS: MKL could not be loaded alone ({e})"
    if openblas is None:
        return (group, layer), "MKL (no OpenBLAS to compare it with)"
    record = blas_kernels.verdict(cache_key(openblas, openblas_env, directory),
                                  lambda: measure(openblas, openblas_env, group))
    if record is None:
        return None, "OpenBLAS: MKL could not be timed"
    if not record["decided"]:
        return None, f"OpenBLAS for now: MKL measured {blas_kernels.unsettled(record)}"
    how = (f"{record['speedup']:.2f}x OpenBLAS's speed on this CPU (median of "
           f"{record['rounds']} interleaved rounds on the threads' own clocks)")
    if record["speedup"] >= MARGIN:
        return (group, layer), how
    return None, f"OpenBLAS: MKL measured {how}"


def measure(openblas: Path, openblas_env: dict[str, str], group: Path) -> dict | None:
    """OpenBLAS (its kernels as it will load) against MKL, one thread each (blas_kernels.race)."""
    one = {"OPENBLAS_NUM_THREADS": "1"}
    return blas_kernels.race(
        blas_kernels.Contender("openblas", openblas, {**openblas_env, **one}, _core(openblas_env)),
        blas_kernels.Contender("mkl", group, {"MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}),
        SHAPES, judge=partial(blas_kernels.verdict_of, margin=MARGIN), per_product=True)


def cache_key(openblas: Path, openblas_env: dict[str, str], directory: Path) -> str:
    """This CPU, this OpenBLAS and the kernels it runs, this MKL install, and what is timed (a
    verdict taken at other shapes is measured again)."""
    stat = (directory / CORE).stat()
    ident = (f"mkl|{blas_kernels.cache_key(openblas, cpu.cpu_flags())}|"
             f"{_core(openblas_env) or ''}|{directory}|{stat.st_size}|{stat.st_mtime_ns}|"
             f"{SHAPES}|per_product")
    return "mkl-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


def _core(openblas_env: dict[str, str]) -> str | None:
    """The kernels OpenBLAS runs: the core setup_blas loads it with, else the user's."""
    return openblas_env.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_CORETYPE")


def forced() -> tuple[tuple[Path, str], str]:
    """MKL for MLX without measuring (MLXLAB_BLAS=mkl): (the linked MKL, its layer), why.
    OSError naming the fix where it cannot be had: the user asked for it by name."""
    directory = mkl_directory()
    if directory is None:
        raise FileNotFoundError("MLXLAB_BLAS=mkl but the mkl package is not installed: "
                                "`pip install 'mlxlab[mkl]'` (x86-64 Linux), or unset MLXLAB_BLAS")
    try:
        return link_group(directory), "MLXLAB_BLAS=mkl (the user's choice)"
    except OSError as e:
        raise OSError(f"MLXLAB_BLAS=mkl: {e}; unset MLXLAB_BLAS to keep OpenBLAS") from None
