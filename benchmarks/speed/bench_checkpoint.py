"""Cost of one checkpoint of transformer_small (weights + AdamW state): ms to save and load, MB.

    python benchmarks/speed/bench_checkpoint.py [--repeats 3] [--vocab 32000]

Builds the real `model=transformer_small` preset, initializes AdamW state for it, then times
`save_checkpoint` (temp dir, checksums, fsync, commit marker, rename) and `load_checkpoint`
(verify + load by name) into a fresh model/optimizer. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from mlxlab.checkpoint import load_checkpoint, save_checkpoint
from mlxlab.config import config_dir, instantiate  # imports mlxlab first: the fast BLAS before mlx
from mlxlab.models import num_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402


def build(vocab: int, preset: str = "transformer_small"):
    import mlx.core as mx
    import mlx.optimizers as optim

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}"])
    mx.random.seed(0)
    model = instantiate(cfg.model, vocab_size=vocab, num_labels=None)
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    return model, opt


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    add_smoke(parser)
    args = parser.parse_args()
    preset = "transformer_small"
    if args.smoke:  # the nano preset, a 256-token vocabulary, one save and load
        preset, args.vocab, args.repeats = "transformer_nano", 256, 1
    import mlx.core as mx

    model, opt = build(args.vocab, preset)
    fresh_model, fresh_opt = build(args.vocab, preset)
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    saves, loads, size = [], [], 0.0
    try:
        for i in range(args.repeats):
            t = time.perf_counter()
            path = save_checkpoint(root, model, opt, {"step": i + 1, "epoch": 0})
            saves.append((time.perf_counter() - t) * 1e3)
            size = folder_mb(path)
            weights = (path / "model.safetensors").stat().st_size / 2**20
            t = time.perf_counter()
            load_checkpoint(path, fresh_model, fresh_opt)
            mx.eval(fresh_model.parameters(), fresh_opt.state)
            loads.append((time.perf_counter() - t) * 1e3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = num_parameters(model) / 1e6
    print(f"{preset}: {params:.1f}M parameters (vocab {args.vocab}), {args.repeats} repeats\n")
    print("| what | median | min | max |")
    print("|---|---:|---:|---:|")
    print(f"| save (ms) | {statistics.median(saves):.0f} | {min(saves):.0f} | {max(saves):.0f} |")
    print(f"| load + verify (ms) | {statistics.median(loads):.0f} | {min(loads):.0f} | {max(loads):.0f} |")
    print(f"| checkpoint size (MB) | {size:.0f} | | |")
    print(f"| of which weights (MB) | {weights:.0f} | | |")


if __name__ == "__main__":
    main()
