"""Process-level setup: BLAS loading (blas.py), device helpers (device.py), the allocator
setting for training (memory.py).

Imports nothing here: mlxlab/__init__.py runs blas.py first (it imports mlx.core itself).
"""
