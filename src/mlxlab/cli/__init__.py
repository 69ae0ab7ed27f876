"""The `mlxlab` command: one entry point, one verb per job (git style)."""
