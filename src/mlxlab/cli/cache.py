"""`mlxlab cache list|clear`: what mlxlab keeps in its user-level cache, and removing it.

    mlxlab cache list [--json]          each entry: what it is, its size, what made it, when
    mlxlab cache clear ENTRY [ENTRY...]  remove entries, named as `list` names them
    mlxlab cache clear --all            remove every entry but the kernels this install loads

The cache is $MLXLAB_CACHE_DIR (else $XDG_CACHE_HOME/mlxlab, else ~/.cache/mlxlab): GGUF files
converted to mlx-lm folders (models/gguf/<sha256 prefix>, one per file content) and unfinished
conversions, the sha256 of pretrained bases' files (file_sha256/: what checkpoints of the
trained parameters prove their base with; hashed again when removed), the fused CPU kernels'
builds (kernels/, where $MLXLAB_KERNELS_CACHE does not put them elsewhere) and MLflow's
empty-store template. Everything can be made again: a removed
conversion is converted again by the next run that names its GGUF file, removed kernels are
compiled again at their next use (`python -m mlxlab.kernels build`). An unfinished conversion
whose writer may still run is never removed; one whose writer is dead is removed by the next
conversion anyway.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mlxlab.cli.common import parser_for
from mlxlab.runtime import settings
from mlxlab.runtime.files.cache import CacheEntry, disk_size, remove


def entries(root: Path) -> list[CacheEntry]:
    """Everything mlxlab keeps under the cache root `root`, by the rooms that write it."""
    from mlxlab.cli.mine_negatives import cached_results
    from mlxlab.models.sources.conversions import entries as conversions
    from mlxlab.models.sources.fingerprint import hashes_dir
    from mlxlab.tracking.mlflow.store import store_templates

    found = [*conversions(), *_kernel_builds(root), *_blas_verdicts(root), *cached_results(root)]
    hashes = hashes_dir()
    if hashes.is_dir() and hashes.resolve().is_relative_to(root.resolve()):
        count = sum(1 for p in hashes.iterdir() if not p.name.startswith("."))
        found.append(CacheEntry(hashes, "file hashes", disk_size(hashes),
                                f"the sha256 of {count} pretrained base files (checkpoint "
                                "fingerprints)", hashes.stat().st_mtime))
    for template in store_templates(root):
        found.append(CacheEntry(template, "MLflow empty-store template", disk_size(template),
                                f"MLflow {template.name.split('-')[1]} (copied into new stores)",
                                template.stat().st_mtime))
    return found


def _kernel_builds(root: Path) -> list[CacheEntry]:
    """The fused kernels' builds, where their cache lies under the root."""
    kernels = settings.read().kernels_cache.expanduser()
    if not kernels.resolve().is_relative_to(root.resolve()) or not kernels.is_dir():
        return []
    try:  # the build this install loads (MLX imported: only `cache list|clear` pays for it)
        from mlxlab.kernels.build import build_key
        from mlxlab.runtime.compute.cpu import isa_level

        level = isa_level()
        current = build_key(level) if level else None
    except Exception:  # noqa: BLE001 - no MLX or no level here: no build is this install's
        current = None
    found = []
    for build in sorted(p for p in kernels.iterdir() if p.is_dir() and any(p.glob("*.so"))):
        ours = build.name == current
        found.append(CacheEntry(
            build, "fused CPU kernels", disk_size(build),
            "this install's build" if ours else "another build (other sources, MLX or Python)",
            build.stat().st_mtime, kept_by_all="this install loads it" if ours else ""))
    return found


def _blas_verdicts(root: Path) -> list[CacheEntry]:
    """Which OpenBLAS kernels this machine's CPUs run (runtime/compute/blas_kernels.py), where measured
    and where the kernels' cache lies under the root."""
    from mlxlab.runtime.compute.blas_kernels import CACHE_FILE

    path = settings.read().kernels_cache.expanduser() / CACHE_FILE
    if not path.resolve().is_relative_to(root.resolve()) or not path.is_file():
        return []
    return [CacheEntry(path, "OpenBLAS kernel choice", disk_size(path),
                       "timed at the first import on this machine (half a second to remake)",
                       path.stat().st_mtime)]


def _name(entry: CacheEntry, root: Path) -> str:
    try:
        return str(entry.path.relative_to(root))
    except ValueError:
        return str(entry.path)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def list_cache(root: Path, as_json: bool) -> int:
    found = entries(root)
    if as_json:
        print(json.dumps([{"entry": _name(e, root), "path": str(e.path), "kind": e.kind,
                           "bytes": e.size, "source": e.source, "when": e.when,
                           "kept_by_all": e.kept_by_all, "busy": e.busy} for e in found],
                         indent=2))
        return 0
    total = sum(e.size for e in found)
    print(f"cache {root}: {len(found)} entries, {_size(total)}")
    if not found:
        return 0
    rows = [("ENTRY", "KIND", "SIZE", "WHEN", "MADE BY")]
    rows += [(_name(e, root), e.kind, _size(e.size), _when(e.when), e.source) for e in found]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return 0


def clear_cache(root: Path, names: list[str], everything: bool) -> int:
    found = entries(root)
    if everything:
        chosen = found
    else:
        by_name = {}
        for entry in found:
            by_name[_name(entry, root)] = entry
            by_name.setdefault(entry.path.name, entry)
        unknown = [name for name in names if name.rstrip("/") not in by_name]
        if unknown:
            print(f"mlxlab cache: error: no cache entry {unknown[0]!r} in {root}; `mlxlab cache "
                  "list` names them", file=sys.stderr)
            return 2
        chosen = [by_name[name.rstrip("/")] for name in names]
    freed = 0
    for entry in chosen:
        why = entry.busy or (entry.kept_by_all if everything else "")
        if why:
            print(f"kept {_name(entry, root)}: {why}")
            continue
        remove(entry.path)
        freed += entry.size
        print(f"removed {_name(entry, root)} ({entry.kind}, {_size(entry.size)})")
    print(f"freed {_size(freed)}")
    return 0


def main(argv: list[str]) -> int:
    parser = parser_for("cache", __doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="what the cache holds")
    listing.add_argument("--json", action="store_true", help="one JSON list")
    clear = actions.add_parser("clear", help="remove entries (or --all)")
    clear.add_argument("entries", nargs="*", help="entries as `mlxlab cache list` names them")
    clear.add_argument("--all", action="store_true", dest="everything",
                       help="every entry but the kernels this install loads")
    args = parser.parse_args(argv)
    root = settings.read().cache_dir.expanduser()
    if args.action == "list":
        return list_cache(root, args.json)
    if args.everything == bool(args.entries):
        print("mlxlab cache: error: name the entries to remove, or --all (not both); `mlxlab "
              "cache list` names them", file=sys.stderr)
        return 2
    return clear_cache(root, args.entries, args.everything)
