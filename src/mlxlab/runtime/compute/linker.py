"""Small shared libraries mlxlab links for itself at first use (MKL's layers in one scope,
mkl.py; the small-product sgemm wrapper, small_gemm.py), with the machine's C compiler: the one
the fused kernels are built with. Kept in the kernels cache, named by what they are made of."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlxlab.runtime import settings


def compiler() -> str:
    """The C compiler's path; OSError where there is none."""
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if found is None:
        raise OSError("no C compiler (cc)")
    return found


def cached_name(stem: str, ident: str) -> Path:
    """Where the library `stem` made from `ident` (its sources, inputs, flags) is kept."""
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return settings.current().kernels_cache.expanduser() / f"libmlxlab-{stem}-{digest}.so"


def link(source: str, out: Path, args: list[str]) -> Path:
    """Compile and link C `source` into the shared library `out` with `args` (libraries, run
    path), unless it is there already; written beside `out`, then renamed (a reader never sees
    half a file). OSError with the compiler's last line where it fails."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        code, built = Path(work) / "source.c", Path(work) / out.name
        code.write_text(source)
        command = [compiler(), "-O2", "-fPIC", "-shared", "-o", str(built), str(code), *args]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError((proc.stderr.strip().splitlines() or ["the linker failed"])[-1])
        os.replace(built, out)
    return out
