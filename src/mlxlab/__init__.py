"""mlxlab: Hydra-composed MLX training with one MLflow store."""

# First, before any module here imports mlx.core: on Linux CPU, MLX only uses a fast BLAS that is
# already loaded when mlx.core is first imported (see runtime/blas.py).
from mlxlab.runtime.blas import setup_blas

blas = setup_blas()

__version__ = "0.1.0"


def load_model(name: str, uri: str | None = None):
    """A registered model, e.g. `mlxlab.load_model("titanic-bert@champion")`, from the project's
    MLflow store (see mlxlab.tracking.registry.load_registered); `.predict(frame)` on it."""
    from mlxlab.tracking.registry import load_registered

    return load_registered(name, uri)
