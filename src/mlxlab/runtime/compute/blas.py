"""Give MLX an optimized BLAS on Linux CPU, without changing any other library's BLAS.

MLX's Linux CPU wheel (mlx-cpu) links a bundled reference BLAS: fp32 matmul runs at ~5 GFLOP/s
where OpenBLAS gets ~200 on the same cores.

How MLX gets OpenBLAS and nothing else does: OpenBLAS is loaded RTLD_LOCAL (out of
the global symbol scope), `mlx.core` is imported, and the slots of libmlx's own symbol table
(its GOT entries for `cblas_sgemm`, `sgetrf_`, ...) that the loader bound to the reference
BLAS/LAPACK are rewritten to OpenBLAS's functions. Only libmlx's calls change. Loaded
RTLD_GLOBAL instead, every library loaded later would resolve its BLAS names there too:
PyTorch's libtorch_cpu exports MKL's `sgemm_` and 105 other BLAS/LAPACK names and calls them
through its PLT, so `import mlxlab` before `import torch` would move all of PyTorch's GEMMs into
OpenBLAS, whose own thread pool then fights PyTorch's OpenMP pool (3.7x slower training measured
on a Xeon). Binding per library also makes the import order irrelevant: MLX imported before
mlxlab gets OpenBLAS all the same.

The OpenBLAS comes from the `scipy-openblas32` wheel (x86_64 Linux): the OpenBLAS its own
maintainers build for NumPy and SciPy, DYNAMIC_ARCH (safe on any x86-64 CPU), 25 MB, needing
nothing beyond glibc (its LAPACK's Fortran runtime is inside). Its names carry a `scipy_` prefix
(`scipy_cblas_sgemm`), which the rebinding maps (PREFIXES). `ngsolve-openblas` (a wheel made
for NGSolve) runs the same kernels at the same speed and gives the same bits, but needs
libgfortran.so.5, which fresh machines lack (the history record in benchmarks/results/history/, "BLAS wheels"). Others: `cmeel-openblas` is built for AVX-512 only.
On an Intel CPU with the optional `mkl` package (~310 MB download, ~800 MB installed; it runs
its generic kernels on AMD) MLX gets MKL instead where the first import measured it faster
(runtime/compute/mkl.py, which also says how it is kept out of the global scope).

MLXLAB_BLAS=off keeps MLX's reference BLAS; MLXLAB_BLAS=/path/to/libblas.so loads that library;
MLXLAB_BLAS=openblas or mkl makes the default's choice by hand (nothing measured).
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlxlab.runtime import settings
from mlxlab.runtime.compute import blas_kernels, mkl, small_gemm

ENV = "MLXLAB_BLAS"
FIX = "fix: `pip install scipy-openblas32` (x86_64) or set MLXLAB_BLAS=/path/to/libopenblas.so"
RTLD_NOLOAD = getattr(os, "RTLD_NOLOAD", 4)
# How long an idle OpenBLAS thread spins before it sleeps: 2**N CPU cycles (OpenBLAS takes 4-30,
# default 28, ~0.1 s). A small model's step is dozens of small products with element-wise ops
# and fused kernels between them: at 28 the worker never sleeps, and spins on a core that the
# kernels' own threads, the data pipeline and the tracking process need. At 4 it sleeps at once
# and is woken for the next product. Measured on the default experiment (2-core EPYC,
# the history record in benchmarks/results/history/ "OpenBLAS's idle threads sleep"): steps ~4 % faster, the same
# results to the bit (scheduling only), LM presets unchanged. A user's OPENBLAS_THREAD_TIMEOUT
# wins.
THREAD_TIMEOUT, SPIN_EXPONENT = "OPENBLAS_THREAD_TIMEOUT", 4
# Which of its kernels a DYNAMIC_ARCH OpenBLAS runs (OPENBLAS_CORETYPE): on an x86-64-v3 CPU its
# AVX2 ones ("Haswell"), or its AVX-512 ones where this CPU has AVX-512 and they measured faster
# here (runtime/compute/blas_kernels.py: measured once per machine, cached). The AVX2 kernels give the
# same bits on every x86-64-v3 CPU and whether MLX hands them B transposed or copied; the
# AVX-512 ones give other last bits, and the fused kernels' contiguous attention heads
# (kernels.split_heads) then change the attention's products in the last bit.
CORETYPE = "OPENBLAS_CORETYPE"
# ELF e_machine -> (GLOB_DAT, JUMP_SLOT) relocation types: the GOT entries of called functions.
GOT_RELOCATIONS = {62: (6, 7), 183: (1025, 1026)}  # x86-64, AArch64


@dataclass(frozen=True)
class BlasInfo:
    """What setup_blas() did. `library` is the file that serves `cblas_sgemm` to MLX."""

    status: str  # loaded | user | off | skipped | missing | failed
    library: str | None = None
    detail: str = ""

    @property
    def fast(self) -> bool:
        return self.status in ("loaded", "user") and self.library is not None


_info: BlasInfo | None = None
_lib: ctypes.CDLL | None = None  # the library we loaded, for its thread-count controls
_core_reason = ""  # why it runs the kernels it runs (load_environment)
_prefix = ""  # what its names carry before the standard ones (scipy-openblas32: "scipy_")
_mkl_layer = ""  # MKL's threading layer where MKL serves MLX (runtime/compute/mkl.py), else ""
_mkl_reason = ""  # why MKL serves MLX, or why it does not (on an Intel CPU with mkl installed)
_load_env: dict[str, str] = {}  # the variables setup_blas loaded it with (for timing children)
_wrapper: small_gemm.Wrapper | None = None  # libmlx's cblas_sgemm (small_gemm.py), where built
_threads_reason = ""  # how MLX's products are threaded (small_gemm.threshold)
# MLXLAB_BLAS values that name a library instead of a file: the default's choice made by hand.
KEYWORDS = ("openblas", "mkl")
# Prefixes a BLAS library's names may carry: none (reference BLAS, most OpenBLAS builds) and
# "scipy_" (scipy-openblas32, whose names are scipy_cblas_sgemm, scipy_sgetrf_, ...).
PREFIXES = ("", "scipy_")


def setup_blas() -> BlasInfo:
    """Load the fast BLAS once per process (idempotent); warn once with the fix when it fails."""
    global _info
    if _info is None:
        _info = _setup()
        if _info.status in ("missing", "failed"):
            warnings.warn(
                f"mlxlab: MLX matmuls use the slow reference BLAS ({_info.detail}); {FIX}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _info


def _setup() -> BlasInfo:
    choice = settings.current().blas
    if not sys.platform.startswith("linux"):
        return BlasInfo("skipped", detail="not Linux: MLX uses Accelerate/Metal")
    if choice.lower() == "off":
        return BlasInfo("off", detail=f"{ENV}=off")
    reference = _mlx_reference_blas()
    if reference is None and not choice:
        return BlasInfo("skipped", detail="this MLX build bundles no reference BLAS (CUDA?)")
    if choice and choice.lower() not in KEYWORDS:
        if not Path(choice).is_file():
            raise FileNotFoundError(
                f"{ENV}={choice} is not a file: point it at a shared library exporting "
                f"cblas_sgemm, or set it to openblas, mkl or off, or unset it"
            )
        path, status = Path(choice), "user"
        try:
            lib = _load(path, load_environment(path))
        except OSError as e:
            return BlasInfo("failed", detail=f"could not load {path}: {e}")
    else:
        loaded = _load_default(choice.lower())
        if isinstance(loaded, BlasInfo):
            return loaded
        path, lib, status = *loaded, "loaded"
    global _lib, _prefix
    _lib, _prefix = lib, _symbol_prefix(lib)
    import mlx.core  # noqa: F401  (loads libmlx, bound to the reference BLAS; rebound below)

    try:
        bound = _rebind(loaded_path("libmlx.so"), lib, _prefix)
    except OSError as e:
        return BlasInfo("failed", detail=f"could not point MLX at {path}: {e}")
    if "cblas_sgemm" not in bound:
        return BlasInfo("failed", detail=f"{path} does not export cblas_sgemm")
    if status == "loaded":
        _wrap_small_products(loaded_path("libmlx.so"), path)
    detail = _mkl_config() if _mkl_layer else _openblas_config()
    return BlasInfo(status, _mapped_file(bound["cblas_sgemm"]), detail)


def _load_default(choice: str) -> tuple[Path, ctypes.CDLL] | BlasInfo:
    """The bundled OpenBLAS, or MKL where mkl.choose measured it faster on this Intel CPU
    (MLXLAB_BLAS=openblas or mkl decides without measuring): (path, library) or why neither."""
    global _mkl_reason, _mkl_layer
    openblas = _bundled_openblas()
    env = load_environment(openblas) if openblas is not None and choice != "mkl" else {}
    if choice == "openblas":
        picked = None
    elif choice == "mkl":
        picked, _mkl_reason = mkl.forced()
    else:
        picked, _mkl_reason = mkl.choose(openblas, env)
    if picked is not None:
        group, layer = picked
        try:
            lib = _load(group, mkl.load_environment())  # libgomp's wait (mkl.py)
        except OSError as e:
            return BlasInfo("failed", detail=f"could not load MKL ({group}): {e}")
        _mkl_layer = layer
        return group, lib
    if openblas is None:
        return BlasInfo("missing", detail="the scipy-openblas32 package is not installed")
    _load_env.update(env)
    try:
        return openblas, _load(openblas, env)
    except OSError as e:
        return BlasInfo("failed", detail=f"could not load {openblas}: {e}")


def _wrap_small_products(mlx_path: str, library: Path) -> None:
    """Point libmlx's cblas_sgemm slot at small_gemm's wrapper: MLX's products below this
    machine's measured size run on one thread of the library (`library`: the file setup_blas
    loaded), the larger ones on all of them. Without a C compiler MLX calls the library itself."""
    global _wrapper, _threads_reason
    kind = "mkl" if _mkl_layer else "openblas"
    threads = blas_threads() or 1
    try:
        if threads > 1:
            below, _threads_reason = small_gemm.threshold(library, _load_env, kind, threads)
        else:
            below = small_gemm.DEFAULT_BELOW  # until set_blas_threads gives it more
        wrapper = small_gemm.Wrapper(_lib, _prefix, kind, below)
        wrapper.set_threads(threads)
        _write_pointer(got_slots(mlx_path)["cblas_sgemm"], wrapper.address)
    except (OSError, AttributeError) as e:  # no C compiler; a library without thread controls
        _threads_reason = f"small products threaded as the library chooses ({e})"
        return
    _wrapper = wrapper


def load_environment(library: Path) -> dict[str, str]:
    """The OpenBLAS variables setup_blas sets while `library` loads as MLX's OpenBLAS, where the
    user set none: its idle threads sleep at once (SPIN_EXPONENT), and on an x86-64-v3 CPU it
    runs the kernels blas_kernels.choose_core picks (AVX2, or AVX-512 where measured faster)."""
    global _core_reason
    defaults = {THREAD_TIMEOUT: str(SPIN_EXPONENT)}
    if CORETYPE in os.environ:
        _core_reason = f"{CORETYPE}={os.environ[CORETYPE]} (the user's)"
    else:
        core, _core_reason = blas_kernels.choose_core(library)
        if core is not None:
            defaults[CORETYPE] = core
    return {name: value for name, value in defaults.items() if name not in os.environ}


def _load(path: Path, added: dict[str, str]) -> ctypes.CDLL:
    """Load the BLAS library out of the global symbol scope with the variables its
    load_environment() gives (`added`: this module's for OpenBLAS, mkl.py's for MKL's libgomp).
    The library reads them while it loads; they are taken out again afterwards, so that no other
    library's OpenBLAS in this process (numpy's), nor any child process, runs with them."""
    os.environ.update(added)
    try:
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    finally:
        for name in added:
            del os.environ[name]


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
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("lib/libscipy_openblas*.so*"))
    return found[0] if found else None


def _elf_tables(elf: bytes) -> tuple[list[tuple[int, int, int]], dict[int, list[int]]]:
    """(PT_LOAD (vaddr, offset, size) list, dynamic tags) of a little-endian ELF64 .so."""
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
    return loads, tags


def _file_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int:
    return next(off + vaddr - va for va, off, size in loads if va <= vaddr < va + size)


def _is_blas_name(name: str) -> bool:
    """BLAS/LAPACK entry points: cblas_*, LAPACKE_*, Fortran names (lower case, trailing _)."""
    return name.startswith(("cblas_", "LAPACKE_")) or (
        name.endswith("_") and name[:-1].isalnum() and name.islower()
    )


def got_slots(path: str) -> dict[str, int]:
    """{symbol: address of its GOT slot} for the external functions a loaded library calls
    (its JUMP_SLOT and GLOB_DAT relocations). Reading a slot tells where calls really go."""
    elf = Path(path).read_bytes()
    loads, tags = _elf_tables(elf)
    strtab, symtab = _file_offset(loads, tags[5][0]), _file_offset(loads, tags[6][0])
    syment = tags.get(11, [24])[0]
    tables = []  # (file offset, size) of DT_RELA and DT_JMPREL
    if 7 in tags:
        tables.append((_file_offset(loads, tags[7][0]), tags[8][0]))
    if 23 in tags:
        tables.append((_file_offset(loads, tags[23][0]), tags[2][0]))
    base = _load_base(path)
    machine = struct.unpack_from("<H", elf, 0x12)[0]
    kinds = GOT_RELOCATIONS.get(machine)
    if kinds is None:
        raise OSError(f"no GOT relocation types known for ELF machine {machine}")
    slots: dict[str, int] = {}
    for start, size in tables:
        for at in range(start, start + size, 24):
            r_offset, r_info, _ = struct.unpack_from("<QQq", elf, at)
            if r_info & 0xFFFFFFFF not in kinds:
                continue
            name_at = strtab + struct.unpack_from("<I", elf, symtab + (r_info >> 32) * syment)[0]
            slots[elf[name_at : elf.index(b"\0", name_at)].decode()] = base + r_offset
    return slots


def calls_into(path: str, symbol: str) -> str | None:
    """The file that a loaded library's calls to `symbol` land in (None: it does not call it)."""
    slot = got_slots(path).get(symbol)
    return None if slot is None else _mapped_file(ctypes.c_void_p.from_address(slot).value or 0)


_sgemm_slot: list[int | None] = []  # libmlx's cblas_sgemm GOT slot, found once


def mlx_sgemm() -> int | None:
    """The address of the cblas_sgemm MLX's own matmul calls now (OpenBLAS's once setup_blas
    rebound libmlx, else MLX's bundled BLAS), read from libmlx's GOT slot; None where libmlx is
    not loaded as an ELF library that calls it (macOS, a CUDA build). The fused quantized
    product (kernels.quantized_matmul) calls the same function, so both run one GEMM."""
    if not _sgemm_slot:
        try:
            _sgemm_slot.append(got_slots(loaded_path("libmlx.so")).get("cblas_sgemm"))
        except OSError:
            _sgemm_slot.append(None)
    slot = _sgemm_slot[0]
    return None if slot is None else ctypes.c_void_p.from_address(slot).value


def mlx_gemm_target() -> int | None:
    """The library function MLX's cblas_sgemm calls end in: the one small_gemm's wrapper calls
    where libmlx's slot points at the wrapper, else the slot's own."""
    address = mlx_sgemm()
    if _wrapper is not None and address == _wrapper.address:
        return _wrapper.sgemm
    return address


def mlx_gemm_library() -> str | None:
    """The file MLX's products are computed in (through the wrapper, where there is one)."""
    target = mlx_gemm_target()
    return None if target is None else _mapped_file(target)


def mlx_sgemm_batch() -> int | None:
    """The address of cblas_sgemm_batch_strided in the BLAS that serves MLX's cblas_sgemm
    (setup_blas's: OpenBLAS >= 0.3.27, or MKL, whose LP64 function takes the same arguments),
    for the fused attention's batched products (kernels.batched_matmul); None where MLX calls
    another BLAS or this one has none."""
    ours, batch = _blas("cblas_sgemm"), _blas("cblas_sgemm_batch_strided")
    if ours is None or batch is None:
        return None
    if ctypes.cast(ours, ctypes.c_void_p).value != mlx_gemm_target():
        return None
    return ctypes.cast(batch, ctypes.c_void_p).value


def mlx_blas_local_threads() -> int | None:
    """The address of MKL_Set_Num_Threads_Local (mkl_set_num_threads_local by value) where MKL
    serves MLX: a thread that calls it with 1 runs its next products alone (the fused blocked
    attention's threads); else None."""
    fn = _blas("MKL_Set_Num_Threads_Local") if _mkl_layer else None
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


def _symbol_prefix(lib: ctypes.CDLL) -> str:
    """The prefix of `lib`'s BLAS names (PREFIXES), found by its cblas_sgemm."""
    return next((p for p in PREFIXES if hasattr(lib, p + "cblas_sgemm")), "")


def _rebind(path: str, blas: ctypes.CDLL, prefix: str = "") -> dict[str, int]:
    """Point `path`'s (already loaded, already bound) BLAS/LAPACK slots at `blas`'s functions.

    For each BLAS-named symbol the library calls and `blas` defines (as `prefix` + the name),
    writes that function's address into the library's GOT slot. Returns {symbol: new address}.
    Nothing outside `path` changes: other libraries keep whatever they were bound to.
    """
    bound: dict[str, int] = {}
    for name, slot in got_slots(path).items():
        if not _is_blas_name(name):
            continue
        try:
            target = ctypes.cast(getattr(blas, prefix + name), ctypes.c_void_p).value
        except AttributeError:
            continue
        _write_pointer(slot, target)
        bound[name] = target
    return bound


def _load_base(path: str) -> int:
    """Where the loader mapped `path` (link_map.l_addr), via dlinfo on a no-load handle."""
    libdl = ctypes.CDLL(None)
    if not hasattr(libdl, "dlinfo"):  # glibc < 2.34 keeps it in libdl
        libdl = ctypes.CDLL("libdl.so.2")
    handle = ctypes.CDLL(path, mode=RTLD_NOLOAD | ctypes.RTLD_LOCAL)._handle
    link_map = ctypes.c_void_p()
    if libdl.dlinfo(ctypes.c_void_p(handle), 2, ctypes.byref(link_map)) != 0:  # RTLD_DI_LINKMAP
        raise OSError(f"dlinfo failed for {path}")
    return ctypes.c_size_t.from_address(link_map.value).value  # l_addr: the first field


def _write_pointer(address: int, value: int) -> None:
    """Store a pointer into a GOT slot, lifting RELRO's read-only protection for the write."""
    page = address & ~(mmap.PAGESIZE - 1)
    prot = _protection(address)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if "w" not in prot and libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE):
        raise OSError(ctypes.get_errno(), f"mprotect failed at {address:#x}")
    ctypes.c_void_p.from_address(address).value = value
    if "w" not in prot:
        libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ)


def _protection(address: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[1]
    raise OSError(f"{address:#x} is not mapped")


def loaded_path(suffix: str) -> str:
    """The file of a loaded library whose path ends with `suffix` (e.g. libmlx.so)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip().endswith("/" + suffix):
            return fields[5].strip()
    raise OSError(f"{suffix} is not loaded")


def _mapped_file(address: int) -> str | None:
    """The file mapped at `address` (which library a function pointer lands in)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5].strip() if len(fields) == 6 else None
    return None


def _blas(name: str):
    """The loaded BLAS's function `name` (its prefix added), or None."""
    return getattr(_lib, _prefix + name, None) if _lib is not None else None


def _openblas(name: str):
    """The loaded OpenBLAS's function `name`, or None (also where MKL serves MLX)."""
    return None if _mkl_layer else _blas(name)


def _mkl_config() -> str:
    """MKL's version and threading layer, and why it serves MLX (mkl.choose)."""
    layer = "GNU OpenMP threads" if "gnu_thread" in _mkl_layer else "one thread (sequential)"
    threads = f"; {_threads_reason}" if _threads_reason else ""
    return f"Intel MKL {mkl.mkl_version()} ({layer}): {_mkl_reason}{threads}"


def _openblas_config() -> str:
    """OpenBLAS's one-line build description, with the kernels it runs here (its core)."""
    get_config, get_core = _openblas("openblas_get_config"), _openblas("openblas_get_corename")
    if get_config is None:
        return ""
    get_config.restype = ctypes.c_char_p
    config = get_config().decode()
    if get_core is not None:
        get_core.restype = ctypes.c_char_p
        core = get_core().decode()
        if core.lower() not in config.lower():
            config = f"{config} (running {core})"
    reasons = "; ".join(r for r in (_core_reason, _mkl_reason, _threads_reason) if r)
    return f"{config}; {reasons}" if reasons else config


def set_blas_threads(n: int) -> bool:
    """Set the thread count of the BLAS serving MLX (OpenBLAS's, or MKL's); False when the loaded
    BLAS has no such control.

    Default: OPENBLAS_NUM_THREADS, else one per core. Use 1 when several processes share the
    cores (parallel sweeps, test runs): OpenBLAS's threads spin-wait on busy cores, and measured
    GEMM speed then falls from ~100 GFLOP/s at 1 thread to 1-30 at 2 threads on 2 cores.
    """
    if n < 1:
        raise ValueError(f"BLAS threads must be >= 1, got {n}")
    fn = _blas("MKL_Set_Num_Threads") if _mkl_layer else _openblas("openblas_set_num_threads")
    if fn is None:
        return False
    fn(int(n))
    if _wrapper is not None:
        _wrapper.set_threads(n)
    return True


def blas_threads() -> int | None:
    """The BLAS's current thread count (OpenBLAS's, or MKL's most), or None when setup_blas()
    loaded neither."""
    fn = _blas("MKL_Get_Max_Threads") if _mkl_layer else _openblas("openblas_get_num_threads")
    return int(fn()) if fn is not None else None


def split_products(address: int | None) -> bool:
    """MLX's products from the small-product threshold up go to the splitter at `address` (the
    fused kernels' `mlxlab_split_sgemm`: their rows over the kernels' thread pool, each part on
    one thread of the library) instead of the library's own threads; None puts them back. MKL
    only (its per-thread thread count keeps each part on its calling thread); False where there
    is no wrapper or the library is OpenBLAS."""
    if _wrapper is None or not _mkl_layer:
        return False
    _wrapper.set_split(address)
    return True
