"""How much memory this process may still use: the limits set on it, not the machine's RAM.

A process can be held to less than the machine has, and MLX knows none of it (its CPU backend
asks for memory until an allocation fails, and a failed allocation is a segmentation fault):

- an address-space limit (RLIMIT_AS, what `ulimit -v` sets): every mapping counts, not only what
  is resident: the interpreter, the libraries, thread stacks, malloc's per-thread arenas;
- a cgroup's memory limit (v2 `memory.max`, v1 `memory.limit_in_bytes`: a container, a systemd
  unit, a Slurm job): what the group's processes hold resident, page cache that cannot be
  dropped included.

`budgets(held)` turns each set limit into the bytes MLX's arrays may take at their peak (what
`mx.get_peak_memory` reports, the figure trainer.micro_batch=auto measures), given `held`, the
bytes MLX holds now (its active memory and its cache: counted in the process's size already,
and by the peak again): the limit, less what the process uses beside MLX, less headroom for what
a run maps after its micro-batch is chosen (threads it starts later: the checkpoint writer,
tracking, the failure watchdog, each a stack and possibly a malloc arena; libraries imported at
the end, matplotlib for the plots; the heap's slack). Nothing set: no budget here, and the
caller keeps MLX's own limit (Metal's recommended working set; on the CPU, a share of RAM).
"""

from __future__ import annotations

import dataclasses
import os
import resource
from pathlib import Path

from mlxlab.runtime.memory import allocator

# What a run maps after its micro-batch is chosen, beyond MLX's peak (threads, libraries it
# imports at the end, the heap's slack): measured on the tinystories_nano preset under `ulimit
# -v` (its VmPeak less its size before the search and MLX's measured peak) 0.17 GB with few
# malloc arenas (runtime/memory/allocator.py limits them under such a limit), 0.31 GB with glibc's
# default arenas (MLXLAB_MALLOC=default). A run the headroom misjudges still ends well: the
# supervising parent restarts it at half the micro-batch.
ADDRESS_HEADROOM = 192 * 2**20
ADDRESS_HEADROOM_ARENAS = 320 * 2**20  # glibc's default arenas: a thread may map 64 MiB more
RESIDENT_HEADROOM = 256 * 2**20  # a cgroup counts pages touched, not mappings
UNLIMITED = 2**60  # a cgroup v1 "no limit" reads 9223372036854771712; v2 "max"
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclasses.dataclass(frozen=True)
class Budget:
    """One limit on this process, as the bytes MLX's peak may reach under it."""

    bytes: float  # for MLX's arrays at their peak (may be <= 0: nothing fits)
    what: str  # the limit and how the budget came from it, for the log line


def budgets(held: float) -> list[Budget]:
    """A Budget for each limit set on this process (none: an empty list). `held`: the bytes
    MLX holds now (active and cached), which its measured peaks count again."""
    found = []
    address = address_space_limit()
    size = vm_size()
    if address is not None and size is not None:
        beside = max(0.0, size - held)
        headroom = ADDRESS_HEADROOM if allocator.arenas_limited() else ADDRESS_HEADROOM_ARENAS
        found.append(Budget(address - beside - headroom,
                            f"RLIMIT_AS {_gb(address)} less {_gb(beside)} mapped beside MLX and "
                            f"{_gb(headroom)} headroom"))
    group = cgroup_limit()
    if group is not None:
        limit, used, where = group
        beside = max(0.0, used - held)
        found.append(Budget(limit - beside - RESIDENT_HEADROOM,
                            f"cgroup {where} {_gb(limit)} less {_gb(beside)} in use beside MLX "
                            f"and {_gb(RESIDENT_HEADROOM)} headroom"))
    return found


def address_space_limit() -> int | None:
    """The soft RLIMIT_AS in bytes (None: unlimited, or no such limit here)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (AttributeError, ValueError, OSError):
        return None
    return None if soft in (resource.RLIM_INFINITY, -1) or soft >= UNLIMITED else int(soft)


def vm_size() -> int | None:
    """This process's address space in bytes (Linux's /proc; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                 root: Path = CGROUP_ROOT) -> tuple[int, int, str] | None:
    """(the tightest memory limit of this process's cgroup and its ancestors, what that group
    uses now less reclaimable page cache, the group's folder), None: no limit set (or not
    Linux)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2's unified hierarchy
            found += _limits(root, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1's memory controller
            found += _limits(root / "memory", path, "memory.limit_in_bytes",
                             "memory.usage_in_bytes", "total_inactive_file")
    return min(found) if found else None


def _limits(mount: Path, path: str, limit_file: str, usage_file: str,
            cache_key: str) -> list[tuple[int, int, str]]:
    """The set limits of the group at `path` and each group above it that this mount shows (a
    container sees its own group as the mount's root)."""
    found = []
    parts = [p for p in path.strip("/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        folder = mount.joinpath(*parts[:depth])
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= UNLIMITED:
            continue
        used = _read_int(folder / usage_file) or 0
        found.append((limit, max(0, used - _stat(folder / "memory.stat", cache_key)),
                      str(folder)))
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return UNLIMITED if text == "max" else int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def total_memory() -> float:
    """The machine's RAM in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
