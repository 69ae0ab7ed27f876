"""The trainer's compiled LoRA step on bench_lora.py's random Llama, timed in one process, for
whichever decoder path the imported mlxlab has: run it with PYTHONPATH at two checkouts to compare
them (issue 54: the pretrained Llama through mlx-lm's model code, models/mlx_lm_decoder.py,
against mlxlab's own Transformer(pretrained=) before it).

    PYTHONPATH=<checkout>/src python benchmarks/speed/bench_lora_step.py [--steps 10] [--work DIR]

The model: hidden 512, 8 layers, 4 query / 2 key-value heads, N(0, 0.2) weights (bench_lora.py
`prepare`; pass the same --work to both runs so they read one folder), LoRA rank 8 (alpha 16) on
q/k/v/o, batch 4 x 512 positions of random ids, AdamW; fused kernels and denormal flushing as the
loop sets them. Prints the path, the first (compiling) step's seconds and the median of the
steps after it, and the tokens/s that median gives.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: the fast BLAS
import mlx.core as mx

# isort: on
from mlxlab import kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmarks.common import add_smoke  # noqa: E402
from benchmarks.speed.bench_lora import BATCH, RANK, SEQ, prepare  # noqa: E402
from benchmarks.speed.bench_mlx_lm_fused import time_steps  # noqa: E402

LORA = {"rank": RANK, "alpha": 16.0, "targets": ["query", "key", "value", "out"]}


def build(folder: Path):
    """(what the path is, the LoRA model) for this checkout's decoder path."""
    try:
        from mlxlab.models.mlx_lm_decoder import MLXLMDecoder
    except ImportError:  # a checkout before issue 54
        from mlxlab.models.transformer import Transformer

        return "mlxlab Transformer(pretrained=)", Transformer(
            vocab_size=0, pretrained=str(folder), lora=LORA)
    return "mlx-lm llama (MLXLMDecoder)", MLXLMDecoder(vocab_size=0, pretrained=str(folder),
                                                        lora=LORA)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--work", default=None)
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:  # the compiling step and one more
        args.steps = 1
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_lora_step_"))
    folder, _ = prepare(work)
    kernels.set_mode("auto")
    kernels.flush_denormals(True)
    mx.random.seed(0)
    path, model = build(folder)
    median, _, first = time_steps(model, args.steps)  # the same timing as the fused bench
    print(f"{path}: first step {first:.2f} s, then {median * 1000:.0f} ms/step "
          f"({BATCH * SEQ / median:,.0f} tokens/s, median of {args.steps})")


if __name__ == "__main__":
    main()
