"""What every verb shares: its argument parser and the one-line error funnel."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# runs.model.CHECKPOINT_CHOICES (not imported: `mlxlab <verb> --help` loads no MLX)
CHECKPOINT_CHOICES = ("best", "last", "quantized")
CHECKPOINT_HELP = ("which checkpoint of a run folder: best (default; the newest if none), last, "
                   "or quantized (the best weights quantized, from trainer.quantize_bits)")


def parser_for(verb: str, doc: str) -> argparse.ArgumentParser:
    """A parser named `mlxlab <verb>` whose --help shows the module docstring's examples."""
    first, _, rest = doc.strip().partition("\n")
    return argparse.ArgumentParser(prog=f"mlxlab {verb}", description=first,
                                   epilog=rest.strip("\n").rstrip() or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (outputs/<task>/<time>) or a checkpoint dir")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help=CHECKPOINT_HELP)


def guarded(verb: str, body: Callable[[], int]) -> int:
    """Run a verb; bad input (a missing file, a wrong kind of run, a bad value) is one line on
    stderr and exit 2. Anything else is a bug and keeps its traceback."""
    try:
        return body()
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"mlxlab {verb}: error: {err}", file=sys.stderr)
        return 2
