"""Process-level setup: the environment read once (settings.py), BLAS loading (blas.py), device
helpers (device.py), the allocator setting for training (memory.py), Slurm (slurm.py), the
process group (distributed.py) and a file's sha256 (checksum.py).

Imports nothing here: mlxlab/__init__.py runs blas.py first (it imports mlx.core itself).
"""
