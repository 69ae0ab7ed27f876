"""Which of its kernels MLX's OpenBLAS runs on this CPU: measured once per machine, then cached.

A DYNAMIC_ARCH OpenBLAS picks its kernels ("core") by CPU model, and its table lags the CPUs:
scipy-openblas32 0.3.34 runs its AVX2 ("Haswell") kernels on an AMD Zen 5, whose full-width
AVX-512 units run its AVX-512 ("SkylakeX") sgemm 1.8-1.9x faster at the shapes mlxlab trains
(docs/benchmarks.md, "Small decoders on an AMD Zen 5"), while on a Zen 4 (AVX-512 split into two 256-bit halves) the
AVX-512 kernels were measured no faster. So the choice is made by measurement, not by a table:
on an x86-64-v3 CPU that has AVX-512 (F, DQ, CD, BW, VL: what OpenBLAS's SkylakeX kernels use),
the first `import mlxlab` on the machine times a few single-threaded sgemm calls at a small
model's shapes in two child processes (one per kernel set; OpenBLAS reads OPENBLAS_CORETYPE
only when it loads), in ROUNDS interleaved rounds on each thread's own CPU clock (a busy
machine makes a round wait, not run slower on that clock), about a second, and keeps the AVX-512
kernels when the median round has them at least MARGIN faster. A measurement whose rounds
disagree across MARGIN while most of them waited for a core (taken under load) is not kept:
that process runs the AVX2 kernels and says so, and the next start measures again. A kept
verdict records its rounds and is cached per CPU and library file, beside the fused kernels' builds
(`<kernels cache>/blas-kernels.json`: machine-level, made at first use as those are),
so every later process on the machine runs the same kernels: a run and its resume compute the
same bits. Every other CPU runs the AVX2 kernels (the same bits on every x86-64-v3 CPU).

What the AVX-512 kernels give up: a product's last bits differ from an AVX2 CPU's, and differ
with the layout MLX hands OpenBLAS (B transposed or copied), which the fused kernels' contiguous
attention heads change (runtime/compute/blas.py). A user who wants the AVX2 bits everywhere sets
OPENBLAS_CORETYPE=Haswell; any OPENBLAS_CORETYPE the user sets wins and nothing is measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxlab.runtime import settings
from mlxlab.runtime.compute import cpu

AVX2_CORE, AVX512_CORE = "Haswell", "SkylakeX"
AVX512_FLAGS = frozenset({"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"})
# The AVX-512 kernels must beat the AVX2 ones by this much, so that a noisy measurement on a
# busy machine does not trade the AVX2 kernels' portable bits for nothing.
MARGIN = 1.10
CACHE_FILE = "blas-kernels.json"
# (M, N, K) of the products timed: a small decoder's projection, MLP and output head at
# 2,048 tokens (the nano preset's batch) and a skinny one (an adapter's width).
SHAPES = ((2048, 256, 768), (2048, 704, 256), (2048, 3776, 256), (512, 128, 512))

# The child: load a BLAS library with its environment (an OpenBLAS reads the core named there),
# say which core it runs ({"core": ...}, "" for a library that is not OpenBLAS), then on each
# "go" line time each shape (best of REPEATS) and print {"cpu": ..., "wall": ...}: the seconds on
# this thread's clock (what another busy process on the machine cannot add to) and on the wall's
# (how much of them it was kept waiting), each shape's seconds times its weight (argv[4]).
# Standard library only.
_CHILD = r"""
import ctypes, json, sys, time
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)
prefix = next(p for p in ("", "scipy_") if hasattr(lib, p + "cblas_sgemm"))
core = getattr(lib, prefix + "openblas_get_corename", None)
if core is not None:
    core.restype = ctypes.c_char_p
gemm = getattr(lib, prefix + "cblas_sgemm")
I, F, P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
gemm.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
shapes = json.loads(sys.argv[2])
weights = json.loads(sys.argv[4])
buffers = []
for m, n, k in shapes:
    a, b, c = ((ctypes.c_float * size)() for size in (m * k, k * n, m * n))
    for buf in (a, b):
        ctypes.memset(buf, 0x3F, ctypes.sizeof(buf))  # every float 0.747: no zeros, no denormals
    buffers.append((a, b, c))
print(json.dumps({"core": core().decode() if core is not None else ""}), flush=True)
for line in sys.stdin:
    cpu = wall = 0.0
    for (m, n, k), (a, b, c), weight in zip(shapes, buffers, weights):
        best_cpu = best_wall = float("inf")
        for _ in range(int(sys.argv[3])):
            c0, w0 = time.thread_time(), time.perf_counter()
            gemm(101, 111, 111, m, n, k, 1.0, a, k, b, n, 0.0, c, n)
            best_cpu = min(best_cpu, time.thread_time() - c0)
            best_wall = min(best_wall, time.perf_counter() - w0)
        cpu, wall = cpu + weight * best_cpu, wall + weight * best_wall
    print(json.dumps({"cpu": cpu, "wall": wall}), flush=True)
"""
REPEATS = 3
# Rounds of the two kernel sets, interleaved (A B, B A, ...) so that a load that comes and goes
# meets both alike; the verdict is the median of the rounds' ratios.
ROUNDS = 6
# A round whose wall time exceeds its CPU time by this much was kept waiting (another process
# had the core): such rounds are counted, and a verdict taken mostly under them, or whose
# rounds disagree across MARGIN, is deferred to the next start instead of cached.
WAITED = 1.25
SPREAD = 0.25  # the rounds' ratios may differ by this share of their median and still decide


def has_avx512(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU has the AVX-512 subsets OpenBLAS's SkylakeX kernels run on."""
    return (flags if flags is not None else cpu.cpu_flags()) >= AVX512_FLAGS


def choose_core(library: Path) -> tuple[str | None, str]:
    """The OPENBLAS_CORETYPE to load `library` with on this CPU (None: leave OpenBLAS its own
    choice) and one line on why. The user's OPENBLAS_CORETYPE is handled by the caller."""
    if cpu.isa_level() != cpu.X86_64_V3:
        return None, "not an x86-64-v3 CPU: OpenBLAS's own choice"
    flags = cpu.cpu_flags()
    if not has_avx512(flags):
        return AVX2_CORE, "AVX2 kernels (no AVX-512)"
    cached = verdict(cache_key(library, flags), lambda: measure(library))
    if cached is None:
        return AVX2_CORE, "AVX2 kernels (the AVX-512 ones could not be timed)"
    speedup = cached.get("speedup", cached["avx2_s"] / cached["avx512_s"])
    if not cached.get("decided", True):  # measured again at the next start
        return AVX2_CORE, f"AVX2 kernels for now: the AVX-512 ones measured {unsettled(cached)}"
    if speedup >= MARGIN:
        return AVX512_CORE, (f"AVX-512 kernels: {speedup:.2f}x the AVX2 ones' speed on this CPU"
                             f"{_how(cached)}")
    return AVX2_CORE, f"AVX2 kernels: the AVX-512 ones measured {speedup:.2f}x on this CPU{_how(cached)}"


def verdict(key: str, take: Callable[[], dict | None], retry_after: float | None = None
            ) -> dict | None:
    """The verdict cached under `key`, else the one `take()` measures (None: it could not),
    kept in the cache when decided; an unsettled one is measured again at the next start, or,
    with `retry_after` (seconds), kept too and measured again at the first start after that."""
    cached = _read_cache().get(key)
    stale = (cached is not None and not cached.get("decided", True) and retry_after is not None
             and time.time() - cached.get("measured", 0) > retry_after)
    if cached is None or stale:
        cached = take()
        if cached is not None and (cached["decided"] or retry_after is not None):
            _write_cache(key, {"measured": time.time(), **cached})
    return cached


def unsettled(verdict: dict) -> str:
    """The speed an undecided verdict measured and why it is not kept, for the device line."""
    return (f"{verdict['speedup']:.2f}x, unsettled ({verdict['waited_rounds']} of "
            f"{2 * verdict['rounds']} timings waited for a busy core); measured again at the "
            "next start")


def _how(verdict: dict) -> str:
    """How a verdict was taken, for the device line (older cached verdicts do not say)."""
    if "rounds" not in verdict:
        return ""
    return f" (median of {verdict['rounds']} interleaved rounds on the threads' own clocks)"


@dataclass(frozen=True)
class Contender:
    """One side of a timing race: a BLAS library file, the variables it loads with, and the
    OpenBLAS core it must report running (None: not checked, a library that is not OpenBLAS)."""

    name: str
    library: Path
    env: dict[str, str]
    core: str | None = None


def measure(library: Path, repeats: int = REPEATS, rounds: int = ROUNDS) -> dict | None:
    """Time SHAPES under each core, in one child process a core (OpenBLAS reads its core when it
    loads), `rounds` times interleaved, on the threads' own clocks. Returns the medians, each
    round's ratio, how many rounds waited for the core, and whether the verdict is `decided`
    (settled enough to keep); None when either child fails or runs other kernels than asked (a
    library built without them)."""
    one = {"OPENBLAS_NUM_THREADS": "1"}
    return race(Contender("avx2", library, {"OPENBLAS_CORETYPE": AVX2_CORE, **one}, AVX2_CORE),
                Contender("avx512", library, {"OPENBLAS_CORETYPE": AVX512_CORE, **one}, AVX512_CORE),
                SHAPES, repeats, rounds)


def race(base: Contender, other: Contender, shapes=SHAPES, repeats: int = REPEATS,
         rounds: int = ROUNDS, judge: Callable[..., dict] | None = None,
         per_product: bool = False) -> dict | None:
    """Time `shapes` in one child process per contender (the threads its environment gives it),
    `rounds` times interleaved (A B, B A, ...), on the calling thread's own clock and the wall's:
    a round is the shapes' total time, or with `per_product` the sum of each shape's time per
    multiply-add (every shape counts alike, a small product as much as a large one);
    `judge`'s record of the two sides' samples (default verdict_of: `other`'s speed over `base`'s
    on the thread clocks); None when a child fails or runs another core than its contender
    names."""
    children = {}
    weights = [1e9 / (m * n * k) if per_product else 1.0 for m, n, k in shapes]
    try:
        for side in (base, other):
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD, str(side.library), json.dumps(shapes),
                 str(repeats), json.dumps(weights)], env={**os.environ, **side.env}, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            children[side.name] = child
            core = json.loads(_line(child))["core"]
            if side.core is not None and core.lower() != side.core.lower():
                return None
        samples: dict[str, list[dict]] = {base.name: [], other.name: []}
        for r in range(rounds):
            for name in ((base.name, other.name) if r % 2 == 0 else (other.name, base.name)):
                children[name].stdin.write("go\n")
                children[name].stdin.flush()
                samples[name].append(json.loads(_line(children[name])))
    except (OSError, ValueError, KeyError, TimeoutError):
        return None
    finally:
        for child in children.values():
            with contextlib.suppress(OSError):
                child.kill()
                child.wait(timeout=10)
    return (judge or verdict_of)(samples[base.name], samples[other.name], (base.name, other.name))


def verdict_of(avx2: list[dict], avx512: list[dict], names=("avx2", "avx512"),
               margin: float = MARGIN) -> dict:
    """The record of interleaved rounds (module docstring): medians (under `names`), ratios
    (the second side's speed over the first's), waits, decided (against `margin`, the speedup
    that decides)."""
    ratios = sorted(a["cpu"] / b["cpu"] for a, b in zip(avx2, avx512))
    speedup = ratios[len(ratios) // 2]
    spread = (ratios[-1] - ratios[0]) / speedup
    waited = sum(s["wall"] > WAITED * s["cpu"] for s in (*avx2, *avx512))
    mostly_waited = waited > len(ratios)  # over half of the 2 x rounds samples
    # decided: the rounds agree, or all of them fall on one side of the margin
    one_side = ratios[0] >= margin or ratios[-1] < margin
    decided = (spread <= SPREAD or one_side) and not (mostly_waited and not one_side)
    return {f"{names[0]}_s": _median([s["cpu"] for s in avx2]),
            f"{names[1]}_s": _median([s["cpu"] for s in avx512]), "speedup": speedup,
            "ratios": [round(r, 4) for r in ratios], "waited_rounds": waited,
            "rounds": len(ratios), "decided": decided, "measured": time.time()}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _line(child: subprocess.Popen, timeout: float = 60) -> str:
    """The child's next line, or TimeoutError (a child that hangs never holds the import)."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("the kernel timing child did not answer")
    line = child.stdout.readline()
    if not line:
        raise ValueError("the kernel timing child ended")
    return line


def cache_key(library: Path, flags: frozenset[str]) -> str:
    """This CPU (model name and flags) and this library file (path, size, modification time)."""
    model = next((line.partition(":")[2].strip() for line in _cpuinfo().splitlines()
                  if line.startswith("model name")), "")
    stat = library.stat()
    ident = f"{model}|{' '.join(sorted(flags))}|{library.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cache_path() -> Path:
    return settings.current().kernels_cache.expanduser() / CACHE_FILE


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, verdict: dict) -> None:
    """Add `verdict` under `key` (write a temporary file, then rename: a reader never sees half a
    file; two first imports at once both measure and the last rename wins). An unwritable cache
    only costs the next process the measurement again."""
    path = cache_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read_cache(), key: verdict}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)
