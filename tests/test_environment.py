"""The environment is read in one place: runtime/settings.py reads every variable mlxlab
interprets, once; the few modules that read or set a library's own variables are listed (and
said why) in its docstring. A fresh process still obeys each variable."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON
from mlxlab.runtime import settings

SRC = Path(__file__).resolve().parents[1] / "src" / "mlxlab"

# The modules that may touch os.environ besides settings.py (settings.py's docstring says why).
LIBRARY_ENVIRONMENT = {
    "tracking/mlflow/environment.py",  # MLflow's own variables
    "tracking/wandb_tracker.py",  # wandb's
    "checkpoint/remote.py",  # the object-store clients'
    "data/streaming/prefetch.py",  # tokenizers'
    "tracking/mlflow/background.py",  # a child process's copy of the environment
    "cli/serve.py",  # likewise
    "objectives/rl/tool_processes.py",  # likewise: the tool workers'
    "runtime/supervision/supervise.py",  # likewise: the supervised training child's
    "runtime/compute/blas.py",  # OpenBLAS's, set while it loads
    "runtime/compute/blas_kernels.py",  # OpenBLAS's, for the child processes that time its kernels
    "runtime/compute/mkl.py",  # OpenBLAS's and MKL's, for the children that time one against the other
    "runtime/compute/device.py",  # MLX's MLX_PTX_CACHE_DIR, set before a run compiles CUDA kernels
    "runtime/compute/jit_header.py",  # libstdc++'s TMPDIR..TEMPDIR: where MLX keeps its CPU kernels
    "launch/composing.py",  # Hydra's HYDRA_FULL_ERROR, set while Hydra composes the config
    "models/sources/ollama.py",  # Ollama's OLLAMA_MODELS (where its store is)
}


def environment_uses(path: Path) -> list[int]:
    """Lines where `path` touches the environment: os.environ / os.getenv / os.putenv /
    os.unsetenv, or those names imported from os."""
    tree = ast.parse(path.read_text(), str(path))
    names = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}
    def touches(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return (node.attr in names and isinstance(node.value, ast.Name)
                    and node.value.id == "os")
        if isinstance(node, ast.ImportFrom):
            return node.module == "os" and any(alias.name in names for alias in node.names)
        return False

    return [node.lineno for node in ast.walk(tree) if touches(node)]


def test_only_settings_and_the_listed_library_modules_touch_the_environment():
    found = {str(p.relative_to(SRC)): environment_uses(p) for p in sorted(SRC.rglob("*.py"))}
    found = {module: lines for module, lines in found.items() if lines}
    outside = {m: lines for m, lines in found.items()
               if m not in LIBRARY_ENVIRONMENT | {"runtime/settings.py"}}
    assert not outside, (
        f"os.environ used outside runtime/settings.py: {outside}; read mlxlab's variables "
        "through settings.current(), or list a library's variable in settings.py's docstring")
    assert set(found) == LIBRARY_ENVIRONMENT | {"runtime/settings.py"}  # no stale entries
    for module in LIBRARY_ENVIRONMENT:
        assert module in settings.__doc__, f"{module} is not listed in runtime/settings.py"


def test_settings_and_the_kernel_build_load_without_mlxlab():
    """hatch_build.py loads both files on their own in pip's build environment."""
    for path in (SRC / "runtime" / "settings.py", SRC / "kernels" / "build.py"):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m and m.startswith("mlxlab")], path


# One value for each variable of the docstring's table (and what it must come out as).
SAMPLES = {
    "MLXLAB_ROOT": ("~/proj", ("root", Path("~/proj").expanduser())),
    "MLXLAB_BLAS": (" off ", ("blas", "off")),
    "MLXLAB_MALLOC": ("Default", ("keep_freed_memory", False)),
    "MALLOC_ARENA_MAX": ("1", ("malloc_arena_max", True)),
    "MLXLAB_FUSED_KERNELS": ("OFF", ("fused_kernels", "off")),
    "MLXLAB_FUSED_KERNELS_SKIP": ("rms_norm, rope,", ("fused_kernels_skip",
                                                       frozenset({"rms_norm", "rope"}))),
    "MLXLAB_KERNEL_THREADS": ("0", ("kernel_threads", 1)),
    "MLXLAB_KERNEL_SPIN_US": ("0", ("kernel_spin_us", 0)),
    "MLXLAB_KERNELS_CACHE": ("/k", ("kernels_cache", Path("/k"))),
    "MLXLAB_SKIP_KERNEL_BUILD": ("1", ("skip_kernel_build", True)),
    "MLXLAB_CACHE_DIR": ("/c", ("cache_dir", Path("/c"))),
    "XDG_CACHE_HOME": ("/x", ("cache_dir", Path("/x/mlxlab"))),
    "SLURM_JOB_ID": ("4242", ("slurm_job_id", "4242")),
    "SLURM_RESTART_COUNT": ("2", ("slurm_restart_count", 2)),
    "MLX_RANK": ("1", ("launched_rank", 1)),
    "OMPI_COMM_WORLD_RANK": ("3", ("launched_rank", 3)),
    "PMI_RANK": ("5", ("launched_rank", 5)),
    "SLURM_STEP_ID": ("0", ("slurm_step", True)),
    "MLXLAB_SUPERVISE": ("off", ("supervise", False)),
    "MLXLAB_SUPERVISOR": ("/s", ("supervisor", "/s")),
    "MLXLAB_SUPERVISOR_PID": ("77", ("supervisor_pid", "77")),
    "MLXLAB_ARGV0": ("mlxlab-train", ("argv0", "mlxlab-train")),
    "MLXLAB_API_KEY": ("s3cret", ("api_key", "s3cret")),
}


def documented_variables() -> list[str]:
    """The variables of settings.py's first table (its rows up to the blank line after it)."""
    table = settings.__doc__.split("| variable |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    return [name.strip() for row in rows for name in row.split("|")[1].split(",")]


def test_every_documented_variable_is_read_and_parsed():
    assert sorted(documented_variables()) == sorted(SAMPLES)
    unset = settings.read({})
    assert (unset.root, unset.blas, unset.keep_freed_memory, unset.fused_kernels) == (
        None, "", True, "auto")
    assert unset.kernels_cache == Path.home() / ".cache" / "mlxlab" / "kernels"
    assert unset.kernel_spin_us == settings.KERNEL_SPIN_US > 0
    assert (unset.launched, unset.launched_rank, unset.slurm_restart_count) == (False, None, 0)
    for name, (value, (field, expected)) in SAMPLES.items():
        assert getattr(settings.read({name: value}), field) == expected, name
    assert settings.read({"XDG_CACHE_HOME": "/x"}).kernels_cache == Path("/x/mlxlab/kernels")
    assert "s3cret" not in repr(settings.read({"MLXLAB_API_KEY": "s3cret"}))  # a secret
    # a launcher's variable that is not a number still says "launched"
    odd = settings.read({"PMI_RANK": "x"})
    assert (odd.launched, odd.launched_rank) == (True, None)
    with pytest.raises(ValueError, match="MLXLAB_KERNEL_THREADS='many' is not a whole number"):
        settings.read({"MLXLAB_KERNEL_THREADS": "many"})


def test_settings_are_read_once_until_reloaded(monkeypatch, tmp_path):
    from mlxlab.config import project_root

    monkeypatch.setenv("MLXLAB_ROOT", str(tmp_path / "a"))
    settings.reload()
    assert project_root() == tmp_path / "a"
    monkeypatch.setenv("MLXLAB_ROOT", str(tmp_path / "b"))
    assert project_root() == tmp_path / "a"  # what the process read, not the changed variable
    settings.reload()
    assert project_root() == tmp_path / "b"


PROBE = """
import json
import mlxlab
from mlxlab import kernels
from mlxlab.config import project_root
from mlxlab.runtime.cluster import distributed, slurm
from mlxlab.runtime.memory import allocator
print(json.dumps({
    "blas": mlxlab.blas.status, "root": str(project_root()), "mode": kernels.mode(),
    "skip": sorted(kernels.skipped()), "threads": kernels.threads(), "job": slurm.job_id(),
    "restarted": slurm.restarted(), "rank": distributed.launched_rank(),
    "malloc": allocator.keep_freed_memory(),
}))
"""


def test_each_variable_takes_effect_in_a_fresh_process(tmp_path):
    env = {**os.environ, "MLXLAB_BLAS": "off", "MLXLAB_ROOT": str(tmp_path),
           "MLXLAB_FUSED_KERNELS": "off", "MLXLAB_FUSED_KERNELS_SKIP": "rope,nosuch",
           "MLXLAB_KERNEL_THREADS": "3", "MLXLAB_MALLOC": "default", "SLURM_JOB_ID": "77",
           "SLURM_RESTART_COUNT": "1", "PMI_RANK": "4"}
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        env.pop(name, None)
    out = subprocess.run([PYTHON, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "blas": "off", "root": str(tmp_path.resolve()), "mode": "off", "skip": ["nosuch", "rope"],
        "threads": 3, "job": "77", "restarted": True, "rank": 4, "malloc": False}
    assert re.search(r"MLXLAB_FUSED_KERNELS_SKIP: unknown op\(s\) nosuch ignored", out.stderr)
