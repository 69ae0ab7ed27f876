"""mlxlab: Hydra-composed MLX training with one MLflow store."""

# First: on Linux CPU this points MLX's BLAS calls (and nothing else's) at OpenBLAS; it imports
# mlx.core itself (see runtime/blas.py).
from mlxlab.runtime.blas import setup_blas

blas = setup_blas()

__version__ = "0.1.0"
