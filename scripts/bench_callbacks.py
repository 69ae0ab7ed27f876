"""Step-time cost of an optional callback: the same training run with and without it,
alternating in one process (so a busy machine slows both alike), the median step time of each.

    python scripts/bench_callbacks.py --with callbacks=per_example_losses --rounds 4
    python scripts/bench_callbacks.py --with callbacks=analysis --rounds 4

Steps followed by an evaluation or a checkpoint are left out (StepTimer restarts after them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mlxlab.training.callbacks import Callback


class StepTimer(Callback):
    """Wall time between consecutive on_step calls, evaluation and checkpoint steps excluded."""

    last_run: StepTimer | None = None

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last: float | None = None
        StepTimer.last_run = self

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.last = None


BASE = ["tracking=none", "trainer.progress=false", "trainer.max_epochs=2",
        "trainer.early_stopping.patience=0", "trainer.checkpoint.save_every_minutes=null"]


def run_once(root: Path, name: str, overrides: list[str]) -> float:
    from mlxlab.config import compose_config
    from mlxlab.train import train

    timer = "+callbacks.step_timer._target_=__main__.StepTimer"
    cfg = compose_config(root, [*BASE, *overrides, timer], output_dir=root / name)
    train(cfg)
    return statistics.median(StepTimer.last_run.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--with", dest="feature", nargs="+", required=True,
                        help="the overrides that switch the feature on")
    parser.add_argument("--base", nargs="*", default=[], help="overrides for both")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]  # alternate who goes first
            times = {}
            for mode in order:
                extra = args.feature if mode == "on" else []
                times[mode] = run_once(root, f"r{r}-{mode}", [*args.base, *extra])
            ratios.append(times["on"] / times["off"])
            print(f"round {r}: step median off {times['off'] * 1e3:.2f} ms  on "
                  f"{times['on'] * 1e3:.2f} ms  on/off {ratios[-1]:.3f}", flush=True)
    print(f"on/off step time: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
