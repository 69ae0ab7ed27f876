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


RUN_HELP = "run directory (outputs/<task>/<time>) or a checkpoint dir"
MODEL_HELP = ("a finished run folder (outputs/<task>/<time>) or one of its checkpoints, or any "
              "model: a model folder (Hugging Face, mlx-lm, `mlxlab export`), a .gguf file, "
              "ollama:NAME[:TAG] or a hub id ORG/NAME")


def add_run_arguments(parser: argparse.ArgumentParser, any_model: bool = False) -> None:
    """The run (or, `any_model`, any model source models/sources resolves) and --checkpoint."""
    parser.add_argument("run", metavar="MODEL" if any_model else "RUN",
                        help=MODEL_HELP if any_model else RUN_HELP)
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
