"""The process mlxlab runs in, a folder per concern: compute/ (the MLX backend, device, CPU
level, BLAS and the header MLX's compiled CPU kernels read), memory/ (the allocator, the limits
on the process, MLX's file-reading pool under them), cluster/ (the process group across ranks,
Slurm), files/ (locks, the writer of a record, checksums, the user cache) and supervision/ (the
supervising parent and the failures it answers); beside them the environment read once
(settings.py) and progress lines of long verbs (progress.py). Code run confined is its own
room (sandbox/).

Imports nothing here: mlxlab/__init__.py runs compute/blas.py first (it imports mlx.core
itself).
"""
