"""Every environment variable mlxlab itself interprets, read once into one `Settings`.

`current()` reads the environment on first use and keeps what it read for the process; every
other module takes its value from there (or from an argument its caller took from there), so a
variable means the same everywhere and no module reads the environment on its own. `reload()`
reads it again: for tests that change the environment in-process (a child process reads its
own at start).

| variable | meaning | default |
|---|---|---|
| MLXLAB_ROOT | the project root: `paths.root_dir`, the default store `<root>/mlruns/mlflow.db` | the nearest folder at or above the working directory holding pyproject.toml or .git |
| MLXLAB_BLAS | `off`: MLX keeps its reference BLAS; a path: that BLAS library serves MLX; `openblas` or `mkl`: that one of the two, nothing measured | the bundled OpenBLAS (scipy-openblas32), or on an Intel CPU with the optional `mkl` package the one measured faster (runtime/compute/mkl.py) |
| MLXLAB_MALLOC | `default`: glibc gives freed memory back while training (runtime/memory/allocator.py) | freed memory stays in the heap |
| MALLOC_ARENA_MAX | glibc's own: set, a run under an address-space limit keeps it instead of limiting glibc's malloc arenas itself (runtime/memory/allocator.py) | unset: two arenas under RLIMIT_AS, glibc's default otherwise |
| MLXLAB_FUSED_KERNELS | `auto`, `on` or `off`: the fused CPU kernels, for scripts (`trainer.fused_kernels` sets the mode of a run) | auto |
| MLXLAB_FUSED_KERNELS_SKIP | comma-separated kernel names left to MLX (kernels.OPS) | none |
| MLXLAB_KERNEL_THREADS | threads of the fused kernels | the cores this process may use |
| MLXLAB_KERNEL_SPIN_US | microseconds the fused kernels' threads stay awake (yielding the core) after a job before they sleep; `0`: at once (kernels/csrc/kernels.cpp) | 1000 |
| MLXLAB_KERNELS_CACHE | where the compiled kernels are kept (one build per ISA level, runtime/compute/cpu.py) | `$XDG_CACHE_HOME/mlxlab/kernels`, else `~/.cache/mlxlab/kernels` |
| MLXLAB_SKIP_KERNEL_BUILD | `1`: `pip install` does not compile the kernels (hatch_build.py) | they are compiled |
| MLXLAB_CACHE_DIR | the user-level cache (`mlxlab cache list`): GGUF files converted to mlx-lm folders (models/gguf/), the migrated empty MLflow store new stores are copied from | `$XDG_CACHE_HOME/mlxlab`, else `~/.cache/mlxlab` |
| MLXLAB_API_KEY | the key every request to `mlxlab serve`'s OpenAI API must carry (`Authorization: Bearer <key>`), when --api-key gives none | none: requests carry no key |
| XDG_CACHE_HOME | where both caches above go when not named | `~/.cache` |
| SLURM_JOB_ID | the Slurm job `trainer.requeue` puts back in the queue | none: not a Slurm job |
| SLURM_RESTART_COUNT | above 0: a requeued start, which `trainer.requeue` resumes (`resume=auto`) | 0 |
| MLX_RANK, OMPI_COMM_WORLD_RANK, PMI_RANK | set by `mlx.launch` / `mpirun`: this process is one rank of a data-parallel run (mx.distributed reads them too) | not launched |
| SLURM_STEP_ID | set inside a Slurm step: `mlxlab-train` runs there without a supervising parent | none |
| MLXLAB_SUPERVISE | `0` (false, off, no): `mlxlab-train` trains in-process, no supervising parent (runtime/supervision/supervise.py) | supervised |
| MLXLAB_SUPERVISOR, MLXLAB_SUPERVISOR_PID, MLXLAB_ARGV0 | set by the supervising parent for its child: the folder they share, the parent's pid (only its own child answers), the command the user typed | none: no parent |

A sweep tells its jobs nothing through the environment: the parent run and the swept keys are
files in the sweep folder (sweeps/folder.py).

Read or set where a library needs them, not here (the modules tests/test_environment.py allows):

| module | variables | why |
|---|---|---|
| tracking/mlflow/environment.py | MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI, MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_ALLOW_FILE_STORE, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR | MLflow's own: its default store (which `mlflow.set_tracking_uri` changes while the process runs, so it is read at each use; conf/tracking/mlflow.yaml reads it too), and settings MLflow takes only from the environment, set for the length of a call |
| tracking/wandb_tracker.py | WANDB_DIR, WANDB_MODE | wandb's own; read at each run's start, as wandb reads them, because wandb's process-wide setup keeps the first run's |
| checkpoint/remote.py | AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST | the object-store clients' own (S3-compatible stores, the GCS emulator), read when a filesystem opens, beside the credential chains (AWS_*, GOOGLE_*, AZURE_*) the clients read themselves |
| data/streaming/prefetch.py | TOKENIZERS_PARALLELISM | set (to false, unless set) for the tokenizers library before its thread pool starts |
| runtime/compute/device.py | MLX_PTX_CACHE_DIR | MLX's own, read when MLX first compiles a CUDA kernel: set (to `<paths.cache_dir>/mlx/<version>/ptx`, unless set) before a run evaluates anything, so the kernels a first run compiles for minutes outlive a cleaned /tmp |
| runtime/compute/jit_header.py | TMPDIR, TMP, TEMP, TEMPDIR | libstdc++'s, read as `std::filesystem::temp_directory_path()` reads them: MLX keeps its compiled CPU kernels under that folder, and the header they read is precompiled there |
| runtime/compute/blas.py | OPENBLAS_THREAD_TIMEOUT, OPENBLAS_CORETYPE | OpenBLAS's own, read once when it loads: set (to 4, and on an x86-64-v3 CPU to Haswell, or SkylakeX on an AVX-512 CPU where runtime/compute/blas_kernels.py measured it faster, each unless set) while setup_blas loads MLX's OpenBLAS and removed again, so its idle threads sleep instead of spinning between a step's matrix products, it runs the same AVX2 kernels on every x86-64-v3 CPU (runtime/compute/cpu.py), and nothing else's BLAS changes |
| runtime/compute/blas_kernels.py | OPENBLAS_CORETYPE, OPENBLAS_NUM_THREADS | OpenBLAS's own: set in the environment of the two child processes that time its AVX2 and AVX-512 kernels on an AVX-512 CPU (once per machine), the rest of the environment copied |
| runtime/compute/mkl.py | OPENBLAS_CORETYPE, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS, OMP_NUM_THREADS | set in the environment of the two child processes that time OpenBLAS against MKL on an Intel CPU (once per machine), one thread each; the user's OPENBLAS_CORETYPE read as the kernels OpenBLAS runs |
| launch/composing.py | HYDRA_FULL_ERROR | Hydra's own: set while Hydra composes the config (so a composition error reaches mlxlab as an exception it turns into one line) and restored to the user's value before the job runs |
| models/sources/ollama.py | OLLAMA_MODELS | Ollama's own: where its model store is (`ollama:NAME` reads the manifest and blob there) |
| tracking/mlflow/background.py, cli/serve.py, runtime/supervision/supervise.py, objectives/rl/tool_processes.py | the whole environment | copied for a child process (the tracking process, MLflow's model server, the supervised training child with the three supervisor variables added, a run's tool workers) |

Standard library only, and no import of mlxlab: hatch_build.py loads this file on its own while
pip builds the wheel (MLXLAB_KERNELS_CACHE, MLXLAB_SKIP_KERNEL_BUILD).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Set by mlx.launch (ring, nccl) and by mpirun (MPI backend), in the order they are looked at.
LAUNCH_RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


@dataclass(frozen=True)
class Settings:
    """What the environment says, parsed (the table in this module's docstring)."""

    root: Path | None  # MLXLAB_ROOT as given (resolved where used: it may be relative)
    blas: str  # MLXLAB_BLAS: "" (the default: OpenBLAS, or MKL measured faster), "off",
    # "openblas", "mkl" or a library's path
    keep_freed_memory: bool  # not MLXLAB_MALLOC=default
    malloc_arena_max: bool  # MALLOC_ARENA_MAX set (glibc reads it; mlxlab leaves it be)
    fused_kernels: str  # MLXLAB_FUSED_KERNELS, lower case, "auto" when unset
    fused_kernels_skip: frozenset[str]  # MLXLAB_FUSED_KERNELS_SKIP
    kernel_threads: int | None  # MLXLAB_KERNEL_THREADS (at least 1); None: the usable cores
    kernel_spin_us: int  # MLXLAB_KERNEL_SPIN_US (at least 0)
    kernels_cache: Path  # MLXLAB_KERNELS_CACHE or its default
    skip_kernel_build: bool  # MLXLAB_SKIP_KERNEL_BUILD=1
    cache_dir: Path  # MLXLAB_CACHE_DIR or its default
    slurm_job_id: str | None  # SLURM_JOB_ID
    slurm_restart_count: int  # SLURM_RESTART_COUNT
    launched: bool  # a launcher set one of LAUNCH_RANK_VARIABLES
    launched_rank: int | None  # the first of them holding a number
    slurm_step: bool  # SLURM_STEP_ID set: inside a Slurm step
    supervise: bool  # not MLXLAB_SUPERVISE=0 (false, off, no)
    supervisor: str | None  # MLXLAB_SUPERVISOR: the folder a supervising parent shares
    supervisor_pid: str | None  # MLXLAB_SUPERVISOR_PID
    argv0: str | None  # MLXLAB_ARGV0
    api_key: str | None = field(repr=False)  # MLXLAB_API_KEY (a secret: never printed)


def read(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    root = env.get("MLXLAB_ROOT")
    user_cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    ranks = [env[name] for name in LAUNCH_RANK_VARIABLES if env.get(name) is not None]
    numbered = [int(value) for value in ranks if value.strip().isdigit()]
    return Settings(
        root=Path(root).expanduser() if root else None,
        blas=env.get("MLXLAB_BLAS", "").strip(),
        keep_freed_memory=env.get("MLXLAB_MALLOC", "").strip().lower() != "default",
        malloc_arena_max=bool(env.get("MALLOC_ARENA_MAX", "").strip()),
        fused_kernels=env.get("MLXLAB_FUSED_KERNELS", "auto").strip().lower() or "auto",
        fused_kernels_skip=frozenset(
            op.strip() for op in env.get("MLXLAB_FUSED_KERNELS_SKIP", "").split(",") if op.strip()
        ),
        kernel_threads=_whole_number(env, "MLXLAB_KERNEL_THREADS", minimum=1),
        kernel_spin_us=_whole_number(env, "MLXLAB_KERNEL_SPIN_US", minimum=0,
                                     default=KERNEL_SPIN_US),
        kernels_cache=Path(env.get("MLXLAB_KERNELS_CACHE") or user_cache / "mlxlab" / "kernels"
                           ).expanduser(),
        skip_kernel_build=env.get("MLXLAB_SKIP_KERNEL_BUILD") == "1",
        cache_dir=Path(env.get("MLXLAB_CACHE_DIR") or user_cache / "mlxlab"),
        slurm_job_id=env.get("SLURM_JOB_ID") or None,
        slurm_restart_count=_whole_number(env, "SLURM_RESTART_COUNT") or 0,
        launched=bool(ranks),
        launched_rank=numbered[0] if numbered else None,
        slurm_step=bool(env.get("SLURM_STEP_ID")),
        supervise=env.get("MLXLAB_SUPERVISE", "1").strip().lower() not in ("0", "false", "off", "no"),
        supervisor=env.get("MLXLAB_SUPERVISOR") or None,
        supervisor_pid=env.get("MLXLAB_SUPERVISOR_PID") or None,
        argv0=env.get("MLXLAB_ARGV0") or None,
        api_key=env.get("MLXLAB_API_KEY") or None,
    )


def _whole_number(env: Mapping[str, str], name: str, minimum: int | None = None,
                  default: int | None = None) -> int | None:
    """The variable as an int (`default` when unset or blank), raised to `minimum`."""
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number: set a number or unset it") from None
    return number if minimum is None else max(minimum, number)


# The fused kernels' spin before a thread sleeps: a step's calls follow each other within it.
KERNEL_SPIN_US = 1000

_current: Settings | None = None


def current() -> Settings:
    """The process's settings, read from the environment on the first call."""
    global _current
    if _current is None:
        _current = read()
    return _current


def reload() -> Settings:
    """Read the environment again (tests that change it in-process); returns the new settings."""
    global _current
    _current = read()
    return _current
