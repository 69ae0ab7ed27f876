"""The retention lines every `mlxlab export` format prints (cli/export.py,
cli/export_whisper_cpp.py)."""

from __future__ import annotations


def print_retention(report: dict) -> None:
    """What the written model kept of the fine-tune's gain, a line per measure."""
    entry = report.get("retention")
    if not entry:
        return
    print(f"retention, read back from what was written"
          f"{' by ' + entry['checker'] if entry.get('checker') else ''} (base: {entry['base']}):")
    for measure in entry["measures"]:
        print(f"  {measure['line']}")
    if entry["accepted_loss"]:
        print(f"written with --accept-loss although it lost on {', '.join(entry['lost'])}")
    print(f"retention recorded: {entry.get('recorded', 'no')}")
