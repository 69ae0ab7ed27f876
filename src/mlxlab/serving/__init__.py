"""A finished run as an MLflow model: the pyfunc wrapper, registering, loading and serving it."""
