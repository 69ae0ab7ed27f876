"""The process mlxlab runs in: the environment read once (settings.py), the MLX backend
(backend.py), BLAS loading and which of its kernels this CPU runs (blas.py, blas_kernels.py),
device and CPU level (device.py, cpu.py), the header MLX's compiled CPU kernels read
(jit_header.py), memory (memory.py: the allocator setting; memory_limits.py: the limits on the
process; io_threads.py: MLX's file-reading pool under them), the supervising parent and the
failures it answers (supervision/), Slurm (slurm.py), the process group (distributed.py), locks,
the writer of a record (processes.py), the user cache (cache.py), progress lines (progress.py)
and a file's sha256 (checksum.py). Code run confined is its own room (sandbox/).

Imports nothing here: mlxlab/__init__.py runs blas.py first (it imports mlx.core itself).
"""
