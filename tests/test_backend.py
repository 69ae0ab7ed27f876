"""Which MLX backend an environment has (runtime/compute/backend.py): none installed gives one line that
names the extras; two installed are told apart by whose libmlx is on disk. Real MLX packages,
real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import mlx

from conftest import PYTHON, REPO
from mlxlab.runtime.compute import backend


def test_mlx_without_a_backend_fails_with_one_line_naming_the_extras(tmp_path: Path):
    # What `pip install mlx` (or mlxlab without an extra) leaves on Linux: MLX's Python package
    # without mlx/lib/libmlx.so. A copy of the installed package less its library, and mlxlab's
    # source, as the only paths (-S: no site-packages) are that environment.
    shutil.copytree(Path(next(iter(mlx.__path__))), tmp_path / "mlx",
                    ignore=shutil.ignore_patterns("lib", "include", "share", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO / 'src'}"}
    out = subprocess.run([PYTHON, "-S", "-c", "import mlxlab"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mlxlab: error: MLX has no backend in this environment")
    assert "'mlxlab[cpu]'" in lines[0] and "'mlxlab[cuda13]'" in lines[0]


def test_the_live_backend_is_the_wheel_whose_library_is_on_disk():
    installed = backend.installed_backends()
    assert installed == ("mlx-cpu",)  # what the dev extra installs here
    assert backend.live_backend() == backend.Backends(("mlx-cpu",), "mlx-cpu")
    # Two names listed (as after `pip install mlxlab[cuda13]` over mlxlab[cpu]): the library on
    # disk is hashed against each wheel's RECORD; here it is mlx-cpu's.
    both = backend.live_backend(("mlx-cpu", "mlx-cuda-13"))
    assert both.live == "mlx-cpu" and both.conflict
    assert both.repair().startswith("pip uninstall -y mlx-cuda-13 && pip install "
                                    "--force-reinstall --no-deps mlx-cpu==")
