"""Which MLX backend this environment has: none, cpu, cuda12, cuda13 or metal, and which is live.

On Linux, `pip install mlx` installs MLX's Python package without a backend; the backend is a
second wheel (mlx-cpu, mlx-cuda-12 or mlx-cuda-13, what mlxlab's extras `cpu`, `cuda12` and
`cuda13` pull). All three install the same file, `mlx/lib/libmlx.so`, so:

- with none, `import mlx.core` fails with a loader error that does not say what to install:
  `require_backend()` turns that into one line naming the extras;
- with two (e.g. `mlxlab[cpu]` installed, then `mlxlab[cuda13]`), the one installed last owns
  the file and the other is a name in `pip list` only; uninstalling either deletes the file.
  `live_backend()` tells which wheel's library is the one that loads (its RECORD hash), so the
  start-up line can say so and how to repair it.

Standard library only, no import of mlx.core: it runs before MLX loads.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

# wheel (distribution) name -> the backend it provides
BACKEND_WHEELS = {"mlx-cpu": "cpu", "mlx-cuda-12": "cuda12", "mlx-cuda-13": "cuda13",
                  "mlx-metal": "metal"}
FIX = ("install one backend: pip install 'mlxlab[cpu]' (CPU), 'mlxlab[cuda12]' (NVIDIA driver "
       ">= 550) or 'mlxlab[cuda13]' (driver >= 580); README.md, Install")


class MissingBackend(ImportError):
    """MLX's Python package is installed without a backend library (Linux: no extra chosen)."""


@dataclass(frozen=True)
class Backends:
    installed: tuple[str, ...]  # backend wheels pip lists, e.g. ("mlx-cpu", "mlx-cuda-13")
    live: str | None  # the wheel whose libmlx is the file on disk; None: unknown or none

    @property
    def conflict(self) -> bool:
        """Two Linux backends in one environment (only one of them can own libmlx.so)."""
        return len([w for w in self.installed if w != "mlx-metal"]) > 1

    def repair(self) -> str:
        """The commands that leave one backend (the live one, else the CPU one)."""
        keep = self.live or "mlx-cpu"
        others = " ".join(w for w in self.installed if w != keep)
        return (f"pip uninstall -y {others} && pip install --force-reinstall --no-deps "
                f"{keep}=={_version(keep)}")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _library_dir() -> Path | None:
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def installed_backends() -> tuple[str, ...]:
    """The backend wheels installed in this environment, by name."""
    found = []
    for dist in BACKEND_WHEELS:
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return tuple(found)


def _record_hash(dist: str, relative: str) -> str | None:
    """The sha256 (urlsafe base64, as in RECORD) that `dist` installed for the file `relative`."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if str(entry).replace("\\", "/") == relative and entry.hash is not None:
            return entry.hash.value
    return None


def live_backend(installed: tuple[str, ...] | None = None) -> Backends:
    """The installed backends and whose libmlx is on disk. The file is hashed only when more than
    one backend is installed (then ~0.2 s for a 150 MB library); with one, it is that one."""
    installed = installed_backends() if installed is None else installed
    if len(installed) <= 1:
        return Backends(installed, installed[0] if installed else None)
    lib_dir = _library_dir()
    libs = sorted(lib_dir.glob("libmlx.*")) if lib_dir is not None else []
    if not libs:
        return Backends(installed, None)
    digest = hashlib.sha256(libs[0].read_bytes()).digest()
    value = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    relative = f"mlx/lib/{libs[0].name}"
    live = next((d for d in installed if _record_hash(d, relative) == value), None)
    return Backends(installed, live)


def require_backend() -> None:
    """Import mlx.core, or raise MissingBackend with the one line that says what to install."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        if "libmlx" not in str(exc):
            raise
        raise MissingBackend(f"MLX has no backend in this environment ({exc}): {FIX}") from None


def one_line_hook(previous=None):
    """A sys.excepthook that prints a MissingBackend as one `mlxlab: error:` line (console
    scripts and `python -m` alike; the exit status stays Python's 1) and leaves every other
    exception to `previous`."""
    previous = previous or sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, MissingBackend):
            print(f"mlxlab: error: {value}", file=sys.stderr)
            return
        previous(kind, value, tb)

    return hook
