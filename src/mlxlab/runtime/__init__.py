"""Process-level setup: BLAS loading (blas.py) and device helpers (device.py).

Imports nothing here: mlxlab/__init__.py loads blas.py before anything may import mlx.core.
"""
