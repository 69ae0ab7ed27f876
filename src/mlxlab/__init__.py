"""mlxlab: Hydra-composed MLX training with one MLflow store."""

import sys

from mlxlab.runtime.compute.backend import MissingBackend, one_line_hook, require_backend
from mlxlab.runtime.compute.blas import setup_blas

try:
    # pip installed MLX without a backend (Linux without an extra, or a second backend
    # uninstalled, which deletes the first one's libmlx.so too): one line naming the extras, not
    # the loader's "libmlx.so: cannot open shared object file" from inside mlx.core.
    require_backend()
except MissingBackend:
    sys.excepthook = one_line_hook(sys.excepthook)
    raise

# On Linux CPU this points MLX's BLAS calls (and nothing else's) at OpenBLAS; MLX already loaded
# changes nothing there (runtime/compute/blas.py rebinds libmlx's own symbol slots).
blas = setup_blas()

__version__ = "0.1.0"


def load_model(name: str, uri: str | None = None):
    """A registered model, e.g. `mlxlab.load_model("titanic-bert@champion")`, from the project's
    MLflow store (see mlxlab.serving.registry.load_registered); `.predict(frame)` on it."""
    from mlxlab.serving.registry import load_registered

    return load_registered(name, uri)
