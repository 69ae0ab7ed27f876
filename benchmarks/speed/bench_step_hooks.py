"""Step-time cost of per-example loss recording and of background analysis, interleaved in one
process so that a busy machine slows both sides alike.

    python benchmarks/speed/bench_step_hooks.py per_example [--steps 400]
    python benchmarks/speed/bench_step_hooks.py analysis [--steps 400] [--every 10]

per_example: two compiled steps on the same model, one with the loss's per-example output fed to
PerExampleLosses (its background thread running), one plain; they alternate step by step.
analysis: blocks of 2 x `every` steps alternate between BackgroundAnalysis on (an analysis every
`every` steps, the worker computing beside the step) and off. Both print the median and mean wall
time per step of each side, their ratio, and for analysis the time on_step holds the training
thread (the snapshot and hand-off: the stall).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# isort: off
import mlxlab  # noqa: F401  first: loads the fast BLAS before anything imports mlx.core

# isort: on
import mlx.core as mx

from mlxlab.config import compose_config, instantiate
from mlxlab.objectives import losses
from mlxlab.runtime.distributed import World
from mlxlab.tracking.base import NullTracker
from mlxlab.training.optim import LRSchedule, build_optimizer, default_optimizer
from mlxlab.training.plan import plan
from mlxlab.training.step import make_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402


def setup(root: Path, overrides: list[str]):
    cfg = compose_config(root, ["tracking=none", *overrides])
    data = instantiate(cfg.data)
    data.setup(root)
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    return data, model, instantiate(cfg.trainer)  # TrainerSettings


def batches_forever(data, settings):
    epoch = 0
    while True:
        yield from data.train_batches(settings.data_batching(), epoch)
        epoch += 1


def new_step(settings, model, loss_fn):
    opt = build_optimizer(default_optimizer(), LRSchedule("constant"), 10_000)
    opt.init(model.trainable_parameters())
    return make_step(model, opt, loss_fn, settings)


def summary(name: str, times: list[float]) -> tuple[float, float]:
    med, mean = statistics.median(times), statistics.fmean(times)
    print(f"  {name:<4} median {med * 1e3:8.2f} ms  mean {mean * 1e3:8.2f} ms  ({len(times)} steps)")
    return med, mean


def per_example(root: Path, steps: int, overrides: list[str]) -> None:
    from mlxlab.training.per_example import PerExampleLosses

    data, model, settings = setup(root, overrides)
    step_on = new_step(settings, model, losses.task_loss(data.task, per_example=True))
    step_off = new_step(settings, model, losses.task_loss(data.task))
    cb = PerExampleLosses(log_artifacts=False)
    cb.setup(SimpleNamespace(steps_per_epoch=plan(data, settings, settings.data_batching()).steps_per_epoch, world=World(),
                             tracker=NullTracker(), run_dir=root / "run"), model, data)
    times: dict[str, list[float]] = {"on": [], "off": []}
    batches = batches_forever(data, settings)
    for i in range(steps + 20):
        batch = next(batches)
        side = "on" if i % 2 else "off"
        t0 = time.perf_counter()
        if side == "on":
            _, _, aux = step_on([batch])
            cb.on_batch_outputs(i // 2 + 1, [batch], losses.pop_example_outputs(aux))
            cb.on_step(i // 2 + 1, {})
        else:
            step_off([batch])
        if i >= 20:  # the first steps compile
            times[side].append(time.perf_counter() - t0)
    cb.on_train_end()
    print(f"per_example: {sorted(p.name for p in (root / 'run' / 'per_example').glob('*'))[:3]}...")
    report(times)


def analysis(root: Path, steps: int, every: int, overrides: list[str]) -> None:
    from mlxlab.training.analysis import BackgroundAnalysis

    data, model, settings = setup(root, overrides)
    step = new_step(settings, model, losses.task_loss(data.task))
    cb = BackgroundAnalysis(every_steps=every)
    cb.setup(SimpleNamespace(world=World(), tracker=NullTracker(), run_dir=root / "run",
                             probe_loss=losses.task_loss(data.task)), model, data)
    times: dict[str, list[float]] = {"on": [], "off": []}
    stalls: list[float] = []
    batches = batches_forever(data, settings)
    for i in range(steps + 20):
        side = "on" if (i // (2 * every)) % 2 else "off"
        t0 = time.perf_counter()
        step([next(batches)])
        if side == "on":
            s0 = time.perf_counter()
            cb.on_step(i + 1, {})
            stalls.append(time.perf_counter() - s0)
        if i >= 20:
            times[side].append(time.perf_counter() - t0)
    cb.on_train_end()
    print(f"analysis: {len(cb.done)} analyses done, {cb.skipped} skipped (worker busy)")
    report(times)
    print(f"  on_step on the training thread: median {statistics.median(stalls) * 1e6:.0f} us, "
          f"max {max(stalls) * 1e3:.2f} ms")


def report(times: dict[str, list[float]]) -> None:
    med_on, mean_on = summary("on", times["on"])
    med_off, mean_off = summary("off", times["off"])
    print(f"  on/off: median {med_on / med_off:.3f}, mean {mean_on / mean_off:.3f}")
    n_on, n_off = len(times["on"]) // 2, len(times["off"]) // 2  # the spread: each half alone
    halves = [statistics.median(times["on"][a:b]) / statistics.median(times["off"][c:d])
              for (a, b), (c, d) in (((0, n_on), (0, n_off)), ((n_on, None), (n_off, None)))]
    print(f"  on/off median, first half {halves[0]:.3f}, second half {halves[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("feature", nargs="?", choices=["per_example", "analysis"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="config overrides (model, data, trainer)")
    add_smoke(parser)
    args = parser.parse_args()
    if not args.feature and not args.smoke:
        parser.error("the following arguments are required: feature")
    features = ["per_example", "analysis"] if args.smoke else [args.feature]
    if args.smoke:  # both features; 8 timed steps: a block of 4 with analysis, 4 without
        args.steps, args.every = 8, 2
    mx.random.seed(0)
    for feature in features:
        with tempfile.TemporaryDirectory() as tmp:
            if feature == "per_example":
                per_example(Path(tmp), args.steps, args.overrides)
            else:
                analysis(Path(tmp), args.steps, args.every, args.overrides)


if __name__ == "__main__":
    main()
