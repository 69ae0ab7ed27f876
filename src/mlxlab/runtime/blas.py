"""Give MLX an optimized BLAS on Linux CPU, loaded before anything imports mlx.core.

MLX's Linux CPU wheel (mlx-cpu) links a bundled reference BLAS: fp32 matmul runs at ~5 GFLOP/s
where OpenBLAS gets ~200 on the same cores. libmlx is opened with RTLD_NOW and looks its
`cblas_sgemm` up in the global symbol scope before its own dependencies, so a BLAS loaded
RTLD_GLOBAL *before* `import mlx.core` takes over every matmul; after that import it is too late.

The OpenBLAS comes from the `ngsolve-openblas` wheel (x86_64 Linux): plain `cblas_*` names,
DYNAMIC_ARCH (safe on any x86-64 CPU), 13 MB. Other wheels were worse: `scipy-openblas32`
prefixes its symbols (`scipy_cblas_sgemm`), `cmeel-openblas` is built for AVX-512 only,
`mkl` is ~800 MB and runs its generic kernels on AMD. The wheel needs libgfortran.so.5 (two
string helpers of its LAPACK part), which fresh machines lack; mlx-cpu bundles one under a
hashed file and soname, so we load that copy under the standard soname, patched in memory.

MLXLAB_BLAS=off keeps MLX's reference BLAS; MLXLAB_BLAS=/path/to/libblas.so loads that library.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import struct
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ENV = "MLXLAB_BLAS"
FIX = (
    "fix: `pip install ngsolve-openblas` (x86_64) or set MLXLAB_BLAS=/path/to/libopenblas.so, "
    "and import mlxlab before mlx"
)


@dataclass(frozen=True)
class BlasInfo:
    """What setup_blas() did. `library` is the file that serves `cblas_sgemm` to MLX."""

    status: str  # loaded | user | off | skipped | too-late | missing | failed
    library: str | None = None
    detail: str = ""

    @property
    def fast(self) -> bool:
        return self.status in ("loaded", "user") and self.library is not None


_info: BlasInfo | None = None
_lib: ctypes.CDLL | None = None  # the library we loaded, for its thread-count controls


def setup_blas() -> BlasInfo:
    """Load the fast BLAS once per process (idempotent); warn once with the fix when it fails."""
    global _info
    if _info is None:
        _info = _setup()
        if _info.status in ("too-late", "missing", "failed"):
            warnings.warn(
                f"mlxlab: MLX matmuls use the slow reference BLAS ({_info.detail}); {FIX}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _info


def _setup() -> BlasInfo:
    choice = os.environ.get(ENV, "").strip()
    if not sys.platform.startswith("linux"):
        return BlasInfo("skipped", detail="not Linux: MLX uses Accelerate/Metal")
    if choice.lower() == "off":
        return BlasInfo("off", detail=f"{ENV}=off")
    reference = _mlx_reference_blas()
    if reference is None and not choice:
        return BlasInfo("skipped", detail="this MLX build bundles no reference BLAS (CUDA?)")
    if "mlx.core" in sys.modules:
        return BlasInfo("too-late", detail="mlx.core was imported before mlxlab")
    if choice:
        if not Path(choice).is_file():
            raise FileNotFoundError(
                f"{ENV}={choice} is not a file: point it at a shared library exporting "
                f"cblas_sgemm, or unset it, or set {ENV}=off"
            )
        path, status = Path(choice), "user"
    else:
        path, status = _bundled_openblas(), "loaded"
        if path is None:
            return BlasInfo("missing", detail="the ngsolve-openblas package is not installed")
    try:
        try:
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            if "libgfortran.so.5" not in str(e) or reference is None:
                raise
            _load_gfortran(reference.parent)
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return BlasInfo("failed", detail=f"could not load {path}: {e}")
    global _lib
    _lib = lib
    provider = _global_provider("cblas_sgemm")
    if provider is None or (reference is not None and Path(provider) == reference):
        return BlasInfo("failed", detail=f"{path} does not export cblas_sgemm")
    return BlasInfo(status, provider, _openblas_config(lib))


def _mlx_reference_blas() -> Path | None:
    """The reference libblas that mlx-cpu bundles next to the mlx package, found without import."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted((Path(location).parent / "mlx_cpu.libs").glob("libblas*.so*"))
        if found:
            return found[0]
    return None


def _bundled_openblas() -> Path | None:
    # find_spec, not import: the package's __init__ loads the library itself and prints errors.
    spec = importlib.util.find_spec("ngsolve_openblas")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("libopenblas*.so*"))
    return found[0] if found else None


def _load_gfortran(libs_dir: Path) -> None:
    """Make mlx-cpu's libgfortran copy resident under the soname libgfortran.so.5.

    Called when the system has none: the loader then reuses this copy for OpenBLAS's dependency.
    """
    copies = sorted(libs_dir.glob("libgfortran*.so.5*"))
    if not copies:
        raise OSError(f"no libgfortran.so.5 on the system nor in {libs_dir}")
    data = bytearray(copies[0].read_bytes())
    soname_at, needed = _elf_dynamic(data)
    for name in needed:  # its hashed siblings (libquadmath-*.so): load them by path first
        if (libs_dir / name).is_file():
            ctypes.CDLL(str(libs_dir / name), mode=ctypes.RTLD_GLOBAL)
    new = b"libgfortran.so.5\0"
    if data.index(b"\0", soname_at) - soname_at < len(new) - 1:
        raise OSError(f"cannot rename the soname of {copies[0]}")
    data[soname_at : soname_at + len(new)] = new
    fd = os.memfd_create("libgfortran.so.5")
    try:
        os.write(fd, data)
        ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
    finally:
        os.close(fd)  # the loader keeps its own mapping


def _elf_dynamic(elf: bytes) -> tuple[int, list[str]]:
    """File offset of DT_SONAME's string and the DT_NEEDED names of a little-endian ELF64 .so."""
    if elf[:6] != b"\x7fELF\x02\x01":
        raise OSError("not a little-endian ELF64 file")
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, offset, vaddr, _, filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append((vaddr, offset, filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (offset, filesz)
    if dynamic is None:
        raise OSError("no dynamic section")
    tags: dict[int, list[int]] = {}
    for at in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", elf, at)
        if tag == 0:
            break
        tags.setdefault(tag, []).append(value)
    strtab_vaddr = tags[5][0]  # DT_STRTAB
    strtab = next(
        off + strtab_vaddr - va for va, off, size in loads if va <= strtab_vaddr < va + size
    )

    def string(at: int) -> str:
        return elf[strtab + at : elf.index(b"\0", strtab + at)].decode()

    if 14 not in tags:  # DT_SONAME
        raise OSError("no soname")
    return strtab + tags[14][0], [string(v) for v in tags.get(1, [])]  # DT_NEEDED


def _global_provider(symbol: str) -> str | None:
    """The file whose `symbol` the dynamic loader hands to libraries loaded from now on."""
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except AttributeError:
        return None
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5].strip() if len(fields) == 6 else None
    return None


def _openblas_config(lib: ctypes.CDLL) -> str:
    try:
        get_config = lib.openblas_get_config
    except AttributeError:
        return ""
    get_config.restype = ctypes.c_char_p
    return get_config().decode()


def set_blas_threads(n: int) -> bool:
    """Set OpenBLAS's thread count; False when the loaded BLAS has no such control.

    Default: OPENBLAS_NUM_THREADS, else one per core. Use 1 when several processes share the
    cores (parallel sweeps, test runs): OpenBLAS's threads spin-wait on busy cores, and measured
    GEMM speed then falls from ~100 GFLOP/s at 1 thread to 1-30 at 2 threads on 2 cores.
    """
    if n < 1:
        raise ValueError(f"BLAS threads must be >= 1, got {n}")
    fn = getattr(_lib, "openblas_set_num_threads", None) if _lib is not None else None
    if fn is None:
        return False
    fn(int(n))
    return True


def blas_threads() -> int | None:
    """OpenBLAS's current thread count, or None when no OpenBLAS was loaded by setup_blas()."""
    fn = getattr(_lib, "openblas_get_num_threads", None) if _lib is not None else None
    return int(fn()) if fn is not None else None


def gemm_gflops(n: int = 512, repeats: int = 5) -> float:
    """fp32 n x n matmul speed inside MLX on the CPU (best of `repeats`), in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n), stream=mx.cpu)
    b = mx.random.normal((n, n), stream=mx.cpu)
    mx.eval(a, b, mx.matmul(a, b, stream=mx.cpu))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
