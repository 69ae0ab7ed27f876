"""MLX's CPU compiles made cheap on a machine's first run: one precompiled header for the
kernels `mx.compile` generates.

On the CPU, `mx.compile` fuses a step's elementwise chains into C++ kernels that MLX compiles
with g++ the first time it meets each one and keeps in `<temp dir>/mlx/<version>/cpu`
(mlx/backend/cpu/compiled.cpp): later processes on the machine load them, but a fresh machine,
a cleaned /tmp or a Slurm job's own $TMPDIR compiles them all again, ~16 for the default
experiment or tinystories_nano, ~1 s each on 2 cores. Each kernel's source includes MLX's
preamble first (`mlx/backend/cpu/compiled_preamble.h`, the simd headers behind it), and reading
it is ~90 % of a kernel's compile. A quoted #include searches the source's own folder first,
and GCC takes a precompiled header it finds there before the real header further on: so this
builds `<that folder>/mlx/backend/cpu/compiled_preamble.h.gch` once per folder, with the flags
MLX compiles with, and each kernel then compiles in ~0.1 s. The header is built in a thread
while the run sets up (its data, model, tracking), and the first step waits for it (`ready`).

A header g++ would not take (another compiler or other flags than MLX_FLAGS) is not kept: g++
is asked once before it is put in place, and where it refuses, a mark says so and no later run
builds it again; MLX's compiles then read the real header as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)

PREAMBLE = "mlx/backend/cpu/compiled_preamble.h"
# MLX 0.32's command for a kernel (mlx/backend/cpu/jit_compiler.cpp build_command): g++ with
# these, `-shared`, `-I <its include folder>` (and -mavx2 -mfma -mf16c in a build made with
# AVX2, which the PyPI wheels are not: their header would not be taken, nothing else changes)
MLX_FLAGS = ("-std=c++17", "-O3", "-Wall", "-fPIC")
# where std::filesystem::temp_directory_path() looks (libstdc++), in its order
TEMP_VARIABLES = ("TMPDIR", "TMP", "TEMP", "TEMPDIR")
STAGE = ".header-"  # a build's own folder beside the kernels, until its header is moved in

_building: threading.Thread | None = None


def kernel_folder() -> Path:
    """The folder MLX keeps its compiled CPU kernels in: `<temp dir>/mlx/<version>/cpu`."""
    temp = next((os.environ[v] for v in TEMP_VARIABLES if os.environ.get(v)), "/tmp")
    return Path(temp) / "mlx" / mx.__version__ / "cpu"


def include_folder() -> Path:
    """MLX's headers, where its kernel compiles find the preamble (`-I`)."""
    return Path(mx.__file__).parent / "include"


def header_path(folder: Path | None = None) -> Path:
    """Where g++ finds the precompiled preamble when it compiles a kernel in `folder`."""
    return (folder or kernel_folder()) / f"{PREAMBLE}.gch"


def refused_path(folder: Path | None = None) -> Path:
    """The mark left where g++ did not take the header: no later run builds it again."""
    return (folder or kernel_folder()) / f"{PREAMBLE}.gch-refused"


def settled(folder: Path | None = None) -> bool:
    """Whether the folder has its header, or g++ refused one there."""
    return header_path(folder).is_file() or refused_path(folder).is_file()


def build_header(folder: Path | None = None) -> Path | None:
    """The precompiled preamble in MLX's kernel folder, built when it is not there yet (and
    g++ takes it); None where none can be (no g++, MLX without its headers, a folder this
    process cannot write). A cache: any failure leaves MLX's compiles as they were."""
    folder = folder or kernel_folder()
    target = header_path(folder)
    preamble = include_folder() / PREAMBLE
    if settled(folder):
        return target if target.is_file() else None
    if shutil.which("g++") is None or not preamble.is_file():
        return None
    flags = [*MLX_FLAGS, "-I", str(include_folder())]
    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(folder)
        with tempfile.TemporaryDirectory(dir=folder, prefix=STAGE) as stage:
            staged = Path(stage) / f"{PREAMBLE}.gch"
            staged.parent.mkdir(parents=True)
            subprocess.run(["g++", *flags, "-x", "c++-header", str(preamble), "-o", str(staged)],
                           check=True, capture_output=True, timeout=300)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not takes_header(Path(stage), flags):
                log.debug("g++ does not take the precompiled MLX kernel header: not kept")
                refused_path(folder).touch()
                return None
            os.replace(staged, target)  # whole or not at all: a kernel compiling now reads either
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("no precompiled MLX kernel header in %s: %s", folder, e)
        return None
    log.info("MLX's CPU kernels: their header precompiled in %.1f s (%s); each kernel a first "
             "step compiles reads it", time.perf_counter() - started, target)
    return target


def remove_stale_stages(folder: Path, older_than_s: float = 3600.0) -> None:
    """Folders a build left behind (its process ended while g++ ran): ~50 MB each."""
    for stage in folder.glob(f"{STAGE}*"):
        try:
            if time.time() - stage.stat().st_mtime > older_than_s:
                shutil.rmtree(stage, ignore_errors=True)
        except OSError:
            continue


def takes_header(folder: Path, flags: list[str]) -> bool:
    """Whether g++, compiling a source in `folder` as MLX compiles a kernel, takes the
    precompiled preamble there (`-H` marks a header it takes with `!`)."""
    source = folder / "probe.cpp"
    source.write_text(f'#include "{PREAMBLE}"\n')
    done = subprocess.run(["g++", *flags, "-H", "-fsyntax-only", str(source)],
                          capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and any(line.startswith("! ") and line.endswith(".gch")
                                        for line in done.stderr.splitlines())


def start_building() -> None:
    """build_header in a thread (g++ runs beside the run's setup); `ready` waits for it."""
    global _building
    if _building is None and not settled():
        _building = threading.Thread(target=build_header, name="mlx-kernel-header", daemon=True)
        _building.start()


def ready(timeout_s: float = 300.0) -> None:
    """Wait for a header start_building began, so the first step's kernels read it."""
    if _building is not None:
        _building.join(timeout_s)
