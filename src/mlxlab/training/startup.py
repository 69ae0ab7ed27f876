"""What a run says about where it runs, before its first step (train.py calls `prepare_device`).

One line names the device (GPU name, memory, MLX build, CUDA version and driver; on the CPU its
model, cores and vector extension, the BLAS MLX uses, whether the fused CPU kernels run and
whether freed memory stays in the heap) and, on a GPU, that the CPU-only parts are off. On a GPU
whose kernel cache is empty, a second line says that MLX is about to compile its CUDA kernels
(minutes, once) and where they are kept; the cache is pointed at the project's cache folder
first (runtime/compute/device.py `use_kernel_cache`). On the CPU, the header MLX's compiled kernels
read is precompiled beside the setup when the machine has none (runtime/compute/jit_header.py). MLX's
kept file-reading pool starts here too, before memory is tight (runtime/memory/io_threads.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlxlab import kernels
from mlxlab.runtime import settings
from mlxlab.runtime.compute import backend, blas, device, jit_header
from mlxlab.runtime.memory.io_threads import start_io_threads

log = logging.getLogger("mlxlab")


def cpu_parts(fused_mode: str) -> list[str]:
    """What the CPU path runs with: the BLAS MLX calls, the fused kernels, the heap."""
    info = blas.setup_blas()
    if info.fast:
        gemm = f"BLAS {info.detail.split(' DYNAMIC_ARCH')[0] or info.library}"
    else:
        gemm = f"BLAS: MLX's reference BLAS ({info.status}{': ' + info.detail if info.detail else ''})"
    kernels.set_mode(fused_mode)
    status = kernels.status()  # builds them now when the cache lacks them (else the first step would)
    fused = {"fused": "fused CPU kernels on", "off": "fused CPU kernels off"}.get(
        status, "fused CPU kernels unavailable")
    heap = ("freed memory kept in the heap" if settings.current().keep_freed_memory
            else "freed memory returned (MLXLAB_MALLOC=default)")
    return [gemm, fused, heap]


def prepare_device(cache_dir: str | Path, fused_mode: str = "auto") -> device.Description:
    """Before anything is evaluated: MLX's CUDA kernel cache in `cache_dir` (paths.cache_dir,
    beside the tokenizer cache) unless MLX_PTX_CACHE_DIR is set, then the device line and, on a
    GPU with an empty kernel cache, the compile notice. Returns what it described."""
    cache = device.use_kernel_cache(Path(cache_dir))
    # MLX's kept file-reading pool, while the process has room for its threads: made late, under
    # an address-space limit, they cannot start and MLX hangs in mx.load; mlxlab's own loads then
    # read on this pool and start none (runtime/memory/io_threads.py load_arrays)
    start_io_threads()
    described = device.describe()
    if described.backend == "cpu":
        jit_header.start_building()  # beside the setup: the first step's kernels read it
    parts = cpu_parts(fused_mode) if described.backend == "cpu" else []
    log.info("%s", device.device_line(described, parts))
    wheels = backend.live_backend()
    if wheels.conflict:
        log.warning("several MLX backends are installed (%s) and share one library file; the one "
                    "that loads is %s. Keep one: %s", ", ".join(wheels.installed),
                    wheels.live or "unknown", wheels.repair())
    if described.backend == "cuda":
        if cache.copied:
            log.info("MLX's CUDA kernel cache: %d compiled kernels copied from %s to %s",
                     cache.copied, device.mlx_default_kernel_cache(), cache.path)
        if cache.files == 0:
            log.info("%s", device.compile_notice(cache))
    return described


def setup_data(data: Any, world: Any, run_dir: Path) -> None:
    """`data.setup` on every rank of `world` (runtime/cluster/distributed.py): rank 0 first, writing the
    tokenizer and data caches into `run_dir`, then the others, which read what it wrote (these
    waits get the allowance of a first, compiling step); all ranks must end with one tokenizer."""
    if world.is_main:
        data.setup(run_dir)
    world.barrier("waiting for rank 0's data setup", scale=10.0)
    if not world.is_main:
        data.setup(None)
    world.check_same(str(data.tokenizer_hash), "the tokenizer",  # after the others' setup
                     "train it once (rank 0) and pass data.tokenizer.path=<its tokenizer.json>",
                     scale=10.0)
