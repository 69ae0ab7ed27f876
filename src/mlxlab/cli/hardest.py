"""`mlxlab runs hardest RUN [-n 20] [--epoch E] [--uri URI]`: a run's hardest training examples.

RUN is a run folder (its per_example/*.parquet, written by callbacks=per_example_losses) or an
MLflow run id, whose per_example artifacts are read from the store (every epoch of a run that was
resumed into other folders).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def parquet_files(run: str, uri: str | None, into: Path) -> list[Path]:
    folder = Path(run).expanduser()
    if folder.is_dir():
        for sub in ("per_example", "tracking/artifacts/per_example"):
            files = sorted((folder / sub).glob("epoch_*.parquet"))
            if files:
                return files
        raise FileNotFoundError(f"{folder} has no per_example/epoch_*.parquet: train it with "
                                "callbacks=per_example_losses")
    from mlflow.artifacts import download_artifacts

    from mlxlab.tracking.mlflow import resolve_uri

    try:
        local = download_artifacts(run_id=run, artifact_path="per_example", dst_path=str(into),
                                   tracking_uri=resolve_uri(uri))
    except Exception as e:  # no such run, or no such artifacts
        raise FileNotFoundError(f"{run!r} is no run folder, and the MLflow store has no "
                                f"per_example artifacts for it ({type(e).__name__})") from None
    return sorted(Path(local).glob("epoch_*.parquet"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlxlab runs hardest", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run folder or MLflow run id")
    parser.add_argument("-n", type=int, default=20, help="how many examples (default 20)")
    parser.add_argument("--epoch", type=int, default=None, help="rank by this epoch (default: last)")
    parser.add_argument("--uri", default=None, help="MLflow store (default: the project's)")
    args = parser.parse_args(argv)
    from mlxlab.training.per_example import hardest, read_losses

    with tempfile.TemporaryDirectory() as tmp:
        try:
            table = hardest(read_losses(parquet_files(args.run, args.uri, Path(tmp))), args.n,
                            args.epoch)
        except (FileNotFoundError, ValueError) as e:
            print(f"mlxlab runs hardest: {e}", file=sys.stderr)
            return 2
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return 0
