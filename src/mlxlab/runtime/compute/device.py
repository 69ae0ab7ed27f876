"""Small device helpers: which backend runs the ops, memory counters, the compute dtype, what
the start-up line says about the device, and where MLX keeps its compiled CUDA kernels."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

_MB = 1024 * 1024


def backend() -> str:
    """Where mx ops run by default: "cpu", "cuda" or "metal"."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "metal"


def _memory_fn(name: str):
    # mx.get_*_memory since mlx 0.24; mx.metal.get_*_memory before (Metal only).
    fn = getattr(mx, name, None) or getattr(getattr(mx, "metal", None), name, None)
    return fn


def active_memory_mb() -> float:
    """Memory held by live arrays, in MiB (0.0 where this MLX build does not count it)."""
    fn = _memory_fn("get_active_memory")
    return fn() / _MB if fn else 0.0


def peak_memory_mb() -> float:
    """Peak of active memory since start or the last reset_peak_memory(), in MiB."""
    fn = _memory_fn("get_peak_memory")
    return fn() / _MB if fn else 0.0


def reset_peak_memory() -> None:
    fn = _memory_fn("reset_peak_memory")
    if fn:
        fn()


def default_compute_dtype() -> mx.Dtype:
    """fp32 on CPU (MLX's CPU bf16 matmul does not use BLAS: ~40x slower than fp32; bf16 there is
    asked for by name: training/step.py's cpu_bf16), bf16 on GPUs."""
    return mx.float32 if backend() == "cpu" else mx.bfloat16



# --- what a run runs on (the start-up line) -------------------------------------------------


@dataclass(frozen=True)
class Description:
    """The default device as the start-up line names it."""

    backend: str  # cpu | cuda | metal
    name: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC"
    memory_gib: float | None  # the GPU's memory; None on the CPU
    architecture: str | None  # "sm_90" (CUDA), "x86_64"
    isa: str | None  # the CPU's widest vector extension: "AVX-512", "AVX2", "NEON"
    cores: int  # the cores this process may use
    mlx: str  # "0.32.4 (mlx-cuda-13)"
    cuda: str | None  # "CUDA 13, driver 580.159.04"


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_isa(cpuinfo: str | None = None) -> str | None:
    """The widest SIMD extension the CPU reports (what the fused kernels' build targets)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = _cpu_flags(cpuinfo)
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"),
                       ("asimd", "NEON"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # taskset/cpusets, unlike os.cpu_count()
    except AttributeError:
        return os.cpu_count() or 1


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version (what `nvidia-smi` shows), without running it."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]+)", text)
    return found.group(1) if found else None


def describe() -> Description:
    """The default device, its memory and the MLX build that drives it."""
    from mlxlab.runtime.compute.backend import live_backend

    kind = backend()
    info = mx.device_info(mx.default_device())
    wheels = live_backend()
    mlx = mx.__version__ + (f" ({wheels.live})" if wheels.live else "")
    memory = info.get("total_memory") or info.get("memory_size")
    cuda = None
    if kind == "cuda":
        major = (wheels.live or "").rsplit("-", 1)[-1]
        driver = nvidia_driver()
        cuda = ", ".join(x for x in (f"CUDA {major}" if major.isdigit() else "CUDA",
                                     f"driver {driver}" if driver else "") if x)
    return Description(
        backend=kind, name=str(info.get("device_name", "unknown")),
        memory_gib=int(memory) / 2**30 if memory and kind != "cpu" else None,
        architecture=str(info["architecture"]) if "architecture" in info else None,
        isa=cpu_isa() if kind == "cpu" else None, cores=usable_cores(), mlx=mlx, cuda=cuda)


def device_line(d: Description, cpu_parts: list[str]) -> str:
    """One line: the device, its memory, the MLX build; on the CPU `cpu_parts` (what the CPU
    path uses: BLAS, fused kernels, heap), elsewhere which of those are off."""
    if d.backend == "cpu":
        isa = f", {d.isa}" if d.isa else ""
        return (f"device: cpu, {d.name} ({d.cores} cores{isa}); MLX {d.mlx}; "
                + "; ".join(cpu_parts))
    memory = f"{d.memory_gib:.1f} GiB" if d.memory_gib else "memory unknown"
    arch = f", {d.architecture}" if d.architecture else ""
    build = f"; {d.cuda}" if d.cuda else ""
    return (f"device: gpu, {d.name} ({memory}{arch}); MLX {d.mlx}{build}; off on the GPU: "
            "MLX's OpenBLAS, the fused CPU kernels")


# --- MLX's CUDA kernel cache ----------------------------------------------------------------

PTX_CACHE_ENV = "MLX_PTX_CACHE_DIR"
# The first run on a machine waits while NVRTC compiles MLX's CUDA kernels: 184 s in the first
# step of the default experiment on an H100 (the history record in benchmarks/results/history/, "GPU: first
# contact").
FIRST_COMPILE_S = 184


_set_by_us: str | None = None  # the value use_kernel_cache put in the environment


@dataclass(frozen=True)
class KernelCache:
    path: Path
    chosen_by: str  # "MLX_PTX_CACHE_DIR" (the user's) | "mlxlab" (the project cache)
    files: int  # compiled kernels already there
    copied: int  # of them, copied from MLX's default folder just now


def mlx_default_kernel_cache() -> Path:
    """Where MLX keeps compiled CUDA kernels unless MLX_PTX_CACHE_DIR says otherwise."""
    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"


def use_kernel_cache(project_cache: Path) -> KernelCache:
    """Point MLX's CUDA kernel cache at `<project_cache>/mlx/<version>/ptx` unless the user set
    MLX_PTX_CACHE_DIR: MLX's default under $TMPDIR is lost with a cleaned /tmp or a fresh
    container, and then the first run waits minutes again. MLX reads the variable when it first
    compiles a kernel, so this runs before anything is evaluated on the GPU. Kernels already in
    MLX's default folder are copied over once (they are the same compiles)."""
    global _set_by_us
    user = os.environ.get(PTX_CACHE_ENV)
    if user and user != _set_by_us:
        path = Path(user).expanduser()
        return KernelCache(path, PTX_CACHE_ENV, _count_files(path), 0)
    if user:  # an earlier run of this process (a sweep's trials) chose it: MLX keeps the first
        path = Path(user)
        return KernelCache(path, "mlxlab", _count_files(path), 0)
    path = project_cache / "mlx" / mx.__version__ / "ptx"
    copied = 0
    default = mlx_default_kernel_cache()
    if _count_files(path) == 0 and _count_files(default) > 0:
        try:
            shutil.copytree(default, path, dirs_exist_ok=True)
            copied = _count_files(path)
        except OSError:  # a cache is an optimisation: a copy that fails costs a compile
            copied = 0
    os.environ[PTX_CACHE_ENV] = _set_by_us = str(path)
    return KernelCache(path, "mlxlab", _count_files(path), copied)


def _count_files(folder: Path) -> int:
    try:
        return sum(1 for p in folder.rglob("*") if p.is_file())
    except OSError:
        return 0


def compile_notice(cache: KernelCache) -> str:
    """The line a GPU run whose kernel cache is empty logs before its first step."""
    return (f"MLX compiles its CUDA kernels on this machine's first run: the first steps take "
            f"~{FIRST_COMPILE_S // 60} minutes once ({FIRST_COMPILE_S} s measured on an H100); "
            f"they are kept in {cache.path} ({cache.chosen_by}) for later runs")
