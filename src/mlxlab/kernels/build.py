"""Build the fused CPU kernels (csrc/) once per ISA level and load them.

The extension is compiled with CMake + Ninja against the CMake configs the installed wheels ship:
MLX's (headers, libmlx) and nanobind's (the binding library MLX's own Python module is built
with, so both share mx.array's type), for one fixed instruction-set level that the caller names
(runtime/compute/cpu.py: x86-64-v3 on x86-64, armv8-a on ARM64), never for the building machine's CPU
(-march=native would make the kernels a different program, with different last bits, on each
kind of CPU). The cache key holds that level next to the sources', MLX's, nanobind's and
Python's versions: every machine at that level uses the same build, and a home directory shared
by different machines gets one build per level.

Where: the `cache` folder its caller passes: $MLXLAB_KERNELS_CACHE, else
$XDG_CACHE_HOME/mlxlab/kernels, else ~/.cache/mlxlab/kernels (runtime/settings.py reads them).
`pip install` builds it there (hatch_build.py, which loads this file and settings.py on their own:
it imports nothing of mlxlab); again by hand (e.g. in a Docker image whose install skipped it):
`python -m mlxlab.kernels build`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import ModuleType

SRC = Path(__file__).parent / "csrc"
MODULE = "_mlxlab_kernels"
BUILD_TIMEOUT_S = 900


class KernelBuildError(RuntimeError):
    """The extension could not be built or loaded here; the message says why in one line."""


def unsupported_reason() -> str | None:
    """Why this platform gets no build (None: try). The kernels are CPU code for Linux and macOS
    on x86-64 and ARM64; elsewhere the pure-MLX path runs. (An x86-64 CPU below x86-64-v3 has no
    level to build for: the caller finds that with runtime/compute/cpu.py.)"""
    machine = platform.machine().lower()
    if sys.platform not in ("linux", "darwin"):
        return f"platform {sys.platform} (fused kernels build on Linux and macOS)"
    if machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"CPU architecture {machine} (fused kernels build for x86-64 and ARM64)"
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (install it, e.g. apt-get install cmake ninja-build)"
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def build_key(isa: str) -> str:
    """The cache folder's name for a build of these sources for the level `isa`, against this
    MLX, nanobind and Python: the same on every machine at that level."""
    import mlx.core as mx

    digest = hashlib.sha256()
    for path in sorted(SRC.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    for part in (mx.__version__, _version("nanobind"), sys.version, platform.machine(), isa):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _module_file(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{MODULE}*.so")) if directory.is_dir() else []
    return found[0] if found else None


def build(cache: Path, isa: str, log=None, rpath: bool = True) -> Path:
    """Path of the compiled module for the level `isa` (runtime/compute/cpu.py's isa_level()), building
    it first when the folder `cache` has none.
    rpath=False leaves MLX's library folder out of the module (the install-time build runs in
    pip's temporary build environment; at import, mlx.core has already loaded libmlx).

    Concurrent processes (a sweep's jobs, distributed ranks) take a file lock: one builds, the
    others wait and load its result. A failed build raises KernelBuildError naming the log."""
    reason = unsupported_reason()
    if reason:
        raise KernelBuildError(reason)
    root = Path(cache)
    target = root / build_key(isa)
    existing = _module_file(target)
    if existing:
        return existing
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = _module_file(target)
        if existing:
            return existing
        if log:
            log(f"mlxlab.kernels: compiling the fused CPU kernels once for {isa} into {target}")
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        log_file = root / "last-build.log"
        try:
            _cmake(work, log_file, isa, rpath)
            built = _module_file(work)
            if built is None:
                raise KernelBuildError(f"the build produced no {MODULE} module; see {log_file}")
            staged = root / f".staged-{os.getpid()}"
            staged.mkdir(exist_ok=True)
            shutil.copy2(built, staged / built.name)
            os.replace(staged, target)  # atomic: readers see the whole directory or none
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if log:
            log(f"mlxlab.kernels: built in {time.perf_counter() - started:.0f} s")
    return _module_file(target)


def _cmake(work: Path, log_file: Path, isa: str, rpath: bool = True) -> None:
    import mlx.core as mx

    try:
        import nanobind
    except ImportError as exc:
        raise KernelBuildError("nanobind is not installed (pip install nanobind)") from exc
    mlx_prefix = Path(mx.__file__).parent  # holds share/cmake/MLX, include/, lib/libmlx
    configure = [
        "cmake", "-G", "Ninja", "-S", str(SRC), "-B", str(work),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dnanobind_DIR={nanobind.cmake_dir()}",
        f"-DCMAKE_PREFIX_PATH={mlx_prefix}",
        f"-DMLXLAB_RPATH={'ON' if rpath else 'OFF'}",
        f"-DMLXLAB_ISA={isa}",
    ]
    with open(log_file, "w") as out:
        # --verbose: the log keeps every compiler command line (the flags the build used)
        for cmd in (configure, ["cmake", "--build", str(work), "--verbose"]):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            try:
                done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=BUILD_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired as exc:
                raise KernelBuildError(f"the build ran past {BUILD_TIMEOUT_S} s; see {log_file}") from exc
            if done.returncode != 0:
                raise KernelBuildError(f"`{cmd[0]} {cmd[1]}` failed; see {log_file}")


def load(cache: Path, isa: str, log=None) -> ModuleType:
    """Build for the level `isa` into `cache` if needed and import the compiled module."""
    path = build(cache, isa, log)
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise KernelBuildError(f"cannot import {path}: {exc}") from exc
    return module
