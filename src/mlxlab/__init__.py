"""mlxlab: Hydra-composed MLX training with one MLflow store."""

__version__ = "0.1.0"
