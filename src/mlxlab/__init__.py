"""mlxlab: Hydra-composed MLX training with one MLflow store."""

# First: on Linux CPU this points MLX's BLAS calls (and nothing else's) at OpenBLAS; it imports
# mlx.core itself (see runtime/blas.py).
from mlxlab.runtime.blas import setup_blas

blas = setup_blas()

__version__ = "0.1.0"


def load_model(name: str, uri: str | None = None):
    """A registered model, e.g. `mlxlab.load_model("titanic-bert@champion")`, from the project's
    MLflow store (see mlxlab.serving.registry.load_registered); `.predict(frame)` on it."""
    from mlxlab.serving.registry import load_registered

    return load_registered(name, uri)
