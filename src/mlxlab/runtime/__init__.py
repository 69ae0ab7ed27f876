"""Process-level setup: BLAS loading (blas.py) and device helpers (device.py).

Imports nothing here: mlxlab/__init__.py runs blas.py first (it imports mlx.core itself).
"""
