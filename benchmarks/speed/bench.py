"""Training speed of the mlxlab stack beside a minimal MLX loop and the same model in PyTorch
eager, plus fp32 GEMM beside numpy and MFU. Each row runs in its own fresh process (`--worker`)
on the batches the mlxlab row trained on, in --repeats alternating rounds; a row shows its median
round, a ratio is the median of per-round ratios. The PyTorch row (bench_torch.py, a process
without mlxlab or MLX) is checked against torch_plain.py; when they disagree beyond the noise, no
PyTorch ratio is given and the exit code is 1. --variants: `bare` (tracking=none, no progress
bar), `replay` (saved batches, not the data pipeline), `nokernels` (trainer.fused_kernels=off).

    python benchmarks/speed/bench.py --models nano,tiny,bert --repeats 3
    python benchmarks/speed/bench.py --gemm-table --threads 2    (GEMM only: OpenBLAS vs MKL in MLX)
    python benchmarks/speed/bench.py --bf16 --threads 2          (trainer.precision=bf16's products)
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import mlxlab  # first: loads the fast BLAS before anything imports mlx.core
import mlx.core as mx

# isort: on
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
import benchmarks.harness as h
from mlxlab import kernels as mlxlab_kernels
from mlxlab.runtime.compute.blas import blas_threads, set_blas_threads

# name -> (experiment preset, what one example is, default timed steps). The step counts give
# each row ~15 s of timed steps, long enough to average over the host's slow spells.
MODELS = {
    "nano": ("tinystories_nano", "tokens", 20),
    "tiny": ("tinystories_tiny", "tokens", 20),
    "bert": ("titanic_bert", "samples", 200),
}
VARIANTS = ("bare", "replay", "nokernels")

NUMPY_SPIN_S = 0.2  # gemm_pair: longer than numpy's OpenBLAS threads spin after a product
BURST = 5  # gemm_pair: products of one library back to back


def gemm_pair(n: int, repeats: int) -> tuple[float, float]:
    """Best fp32 n x n x n GFLOP/s of (MLX, numpy) on the same operands over `repeats` rounds,
    each a burst of BURST products of one library then of the other, so a busy machine slows
    both alike. After numpy's burst a pause longer than its OpenBLAS's threads spin (2^28 cycles,
    ~0.1 s, numpy's default): spinning on the cores, they took half of MLX's next threaded product
    (1024: 130 GFLOP/s against 200); the burst's first product wakes MLX's threads again."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    am, bm = mx.array(a), mx.array(b)
    mx.eval(am @ bm)
    a @ b
    best_mlx = best_np = float("inf")
    for _ in range(repeats):
        for _ in range(BURST):
            start = time.perf_counter()
            mx.eval(am @ bm)
            best_mlx = min(best_mlx, time.perf_counter() - start)
        for _ in range(BURST):
            start = time.perf_counter()
            a @ b
            best_np = min(best_np, time.perf_counter() - start)
        time.sleep(NUMPY_SPIN_S)
    return 2 * n**3 / best_mlx / 1e9, 2 * n**3 / best_np / 1e9


GEMM_BLAS = ("openblas", "mkl")  # MLXLAB_BLAS values: one worker process each (a process has one)
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "MLXLAB_KERNEL_THREADS")
TORCH_GEMM = """import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
out = {}
for n in json.loads(sys.argv[2]):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(int(sys.argv[3])):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    out[n] = 2 * n**3 / best / 1e9
print(json.dumps({"torch": out}))"""
# --bf16: a process's rows {name: {n: GFLOP/s}}: trainer.precision=bf16's products on a CPU with
# bf16 units (MKL's cblas_gemm_bf16bf16f32 on float32 operands rounded to bf16), MLX's own bf16
# matmul (a scalar loop, ~4 GFLOP/s: up to 512 only) and fp32; PyTorch's bf16 (on bf16 tensors
# made before) and fp32. argv: mlx|torch, sizes, repeats, threads
BF16_WORKER = """import json, sys, time
kind, sizes, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
if kind == "mlx":
    import mlxlab, mlx.core as mx
    from mlxlab import kernels
    rows = {"mlxlab bf16": (None, kernels.bf16_matmul), "MLX fp32": (None, mx.matmul),
            "MLX bf16": (lambda x: x.astype(mx.bfloat16), mx.matmul)}
    make, run = (lambda n: mx.random.normal((n, n))), (lambda f, a, b: mx.eval(f(a, b)))
else:
    import torch
    torch.set_num_threads(int(sys.argv[4]))
    rows = {"PyTorch bf16": (torch.Tensor.bfloat16, torch.matmul), "PyTorch fp32": (None, torch.matmul)}
    make, run = (lambda n: torch.randn(n, n)), (lambda f, a, b: f(a, b))
out = {}
for name, (prepare, f) in rows.items():
    for n in sizes:
        a, b = (x if prepare is None else prepare(x) for x in (make(n), make(n)))
        if name == "MLX bf16" and n > 512 or name == "mlxlab bf16" and f(a, b) is None:
            continue  # MLX's loop: too slow; mlxlab's: no bf16 units or no MKL here
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            run(f, a, b)
            times.append(time.perf_counter() - start)
        out.setdefault(name, {})[n] = 2 * n**3 / min(times[1:]) / 1e9
print(json.dumps(out))"""


def gemm_worker(sizes: list[int], repeats: int) -> None:
    """One process's row: MLX (its MLXLAB_BLAS; the kernels loaded, as a run loads them) and numpy."""
    mlxlab_kernels.extension()  # with MKL they take its large products, as in a run
    pairs = {n: gemm_pair(n, repeats) for n in sizes}
    print(json.dumps({"blas": mlxlab.blas.detail or mlxlab.blas.status, "library": mlxlab.blas.library,
                      "mlx": {n: m for n, (m, _) in pairs.items()},
                      "numpy": {n: p for n, (_, p) in pairs.items()}}))


def gemm_table(sizes: list[int], threads: int, repeats: int, rounds: int, smoke: bool,
               bf16: bool = False) -> None:
    """fp32 n x n GFLOP/s of MLX+OpenBLAS, MLX+MKL, PyTorch (its own process, without mlxlab) and
    numpy, or (`bf16`) BF16_WORKER's rows, at `threads` threads, in `rounds` interleaved rounds
    (ABBA), each cell its median."""
    env = {**os.environ, **dict.fromkeys(THREAD_VARS, str(threads))}
    if bf16:
        commands = {kind: ([sys.executable, "-c", BF16_WORKER, kind, json.dumps(sizes), str(repeats),
                            str(threads)], env) for kind in ("mlx", "torch")}
    else:
        commands = {f"MLX+{b}": ([sys.executable, __file__, "--gemm-worker", "--gemm",
                                  ",".join(map(str, sizes)), "--repeats", str(repeats)],
                                 {**env, "MLXLAB_BLAS": b}) for b in GEMM_BLAS}
        if importlib.util.find_spec("torch"):
            commands["PyTorch"] = ([sys.executable, "-c", TORCH_GEMM, str(threads), json.dumps(sizes),
                                    str(repeats)], env)
    runs: dict[str, list] = {name: [] for name in commands}
    for r in range(rounds):
        for name in h.in_round(list(commands), r):
            proc = subprocess.run(commands[name][0], env=commands[name][1], capture_output=True,
                                  text=True, timeout=1800)
            runs[name].append(json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0
                              else {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
    if bf16:  # a column a row name, in the workers' order
        if failed := [r["error"] for rs in runs.values() for r in rs if "error" in r]:
            sys.exit(f"bench.py --bf16: a worker failed: {failed[0]}")
        cells = {name: (rows, name) for rows in runs.values() for name in rows[0]}
    else:
        cells = {**{name: (runs[name], "mlx") for name in commands if name.startswith("MLX")},
                 "PyTorch": (runs.get("PyTorch", []), "torch"), "numpy": (runs["MLX+openblas"], "numpy")}
    shown = {"head": ["n (GFLOP/s)", *cells],
             "rows": [[n, *(_median_cell(rows, key, n) for rows, key in cells.values())] for n in sizes]}
    h.print_table(shown)
    h.write_record("gemm-bf16" if bf16 else "gemm-blas", {"threads": threads, "sizes": sizes,
                   "rounds": runs, "table": shown}, question="speed-pytorch", smoke=smoke)


def _median_cell(rows: list[dict], key: str, n: int) -> str:
    """The rounds' median GFLOP/s at n; "-" where none ran (a failed round's error is recorded)."""
    values = [row[key][str(n)] for row in rows if str(n) in row.get(key, {})]
    return f"{statistics.median(values):.0f}" if values else "-"


def step_seconds(times: list, skip: set[int], warmup: int, steps: int) -> dict[int, tuple]:
    """times[k] = clock() when step k finished (times[0]: before step 1) -> {step: (wall, CPU)
    seconds} for steps warmup+1 .. warmup+steps not in `skip`."""
    last = min(warmup + steps, len(times) - 1)
    return {k: (times[k][0] - times[k - 1][0], times[k][1] - times[k - 1][1])
            for k in range(warmup + 1, last + 1) if k not in skip}


def compile_steps(shapes: list[tuple]) -> set[int]:
    """1-based steps whose batch shape had not been seen before (they trace and compile)."""
    return {k for k, shape in enumerate(shapes, start=1) if shape not in shapes[:k - 1]}


def matmul_params(model, task: str) -> tuple[int, int, int, int]:
    """(params used per token, per sample, layers, dim) for the FLOP count of a step."""
    import mlx.nn as nn

    per_token, per_sample = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            n = module.weight.size + (module.bias.size if "bias" in module else 0)
            if name.split(".")[0] in ("pooler", "classifier"):
                per_sample += n  # BERT's head runs on [CLS] only
            else:
                per_token += n
    if task == "lm":
        if getattr(model, "tie_embeddings", False):
            per_token += model.embed_tokens.weight.size  # the tied output projection
        layers, dim = len(model.layers), model.embed_tokens.weight.shape[1]
    else:
        layers = len(model.encoder.layers)
        dim = model.encoder.embeddings.word_embeddings.weight.shape[1]
    return per_token, per_sample, layers, dim


def step_flops(meta: dict, shape: tuple) -> float:
    b, t = shape
    return (6 * meta["params_per_token"] * b * t + 6 * meta["params_per_sample"] * b
            + 12 * meta["layers"] * meta["dim"] * t * b * t)


def compose(root: Path, overrides: list[str]):
    """The real train.yaml composed with Hydra's compose API, rooted in `root` (as in tests)."""
    from omegaconf import open_dict

    from mlxlab.config import compose_config

    cfg = compose_config(root, overrides)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(root / "cache")
    return cfg


def worker_mlxlab(spec: dict) -> dict:
    """A worker: the mlxlab stack, train(cfg), its steps timed by benchmarks.callbacks."""
    from omegaconf import OmegaConf

    from benchmarks.callbacks import HOOKS, OVERRIDE, RECORD
    from mlxlab.train import train
    from mlxlab.training.trainer import Trainer

    warmup, steps = spec["warmup"], spec["steps"]
    root = Path(spec["root"])
    overrides = [*spec["overrides"], OVERRIDE]  # the step clock, as a callback of the run's config
    if spec["variant"] == "bare":
        overrides += ["tracking=none", "callbacks.progress.enabled=false"]
    if spec["variant"] == "nokernels":
        overrides += ["trainer.fused_kernels=off"]
    cfg = compose(root, overrides)
    RECORD["clock"] = h.clock
    rec: dict = {"times": RECORD["times"], "evals": RECORD["evals"], "shapes": [], "batches": []}

    def on_step(step: int) -> None:
        if step == warmup:
            mx.reset_peak_memory()
            h.reset_peak_rss()
        if step == warmup + steps:
            rec["mx_peak_mb"] = mx.get_peak_memory() / 2**20
            rec["rss_peak_mb"] = h.peak_rss_mb()

    HOOKS["on_step"] = on_step

    def replay(batching, epoch):
        batches = [{k: mx.array(v) for k, v in b.items()} for b in h.load_batches(spec["batches"])]
        mx.eval(batches)
        yield from batches

    original_fit = Trainer.fit

    def fit(self, model, data, *args, **kwargs):
        if self.settings.grad_accum != 1:
            raise ValueError("bench.py times one batch per step: use trainer.grad_accum=1")
        rec["rss_base_mb"] = h.rss_mb()
        rec["params"] = sum(v.size for _, v in tree_flatten(model.parameters()))
        rec["flops"] = dict(zip(("params_per_token", "params_per_sample", "layers", "dim"),
                                matmul_params(model, data.task)))
        rec["meta"] = {"task": data.task, "vocab_size": data.vocab_size,
                       "num_labels": data.num_labels}
        live = replay if spec["variant"] == "replay" else data.train_batches

        def recorded(batching, epoch):
            for batch in live(batching, epoch):
                rec["shapes"].append(tuple(batch["input_ids"].shape))
                if len(rec["batches"]) < warmup + steps:
                    rec["batches"].append(batch)
                yield batch

        data.train_batches = recorded
        return original_fit(self, model, data, *args, **kwargs)

    Trainer.fit = fit
    train(cfg)
    if spec["variant"] == "full" and spec.get("save_batches"):
        h.save_batches(Path(spec["batches"]), rec["batches"])
    return {
        "times": rec["times"], "evals": rec["evals"], "shapes": rec["shapes"][: warmup + steps],
        "mx_peak_mb": rec.get("mx_peak_mb"),
        "rss_mb": rec.get("rss_peak_mb", float("nan")) - rec["rss_base_mb"],
        "params": rec["params"], "flops": rec["flops"], "meta": rec["meta"],
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
        "trainer": {"learning_rate": cfg.optimizer.learning_rate,
                    "weight_decay": cfg.optimizer.weight_decay, "grad_clip": cfg.trainer.grad_clip},
    }


def worker_mlx(spec: dict) -> dict:
    """A worker: the minimal MLX loop on the mlxlab row's model, settings and saved batches."""
    from functools import partial

    import mlx.nn as nn
    import mlx.optimizers as optim
    from hydra.utils import instantiate

    from mlxlab.objectives.losses import task_loss

    ref = spec["reference"]  # what the mlxlab worker recorded
    meta, hp = ref["meta"], ref["trainer"]
    batches = [{k: mx.array(v) for k, v in b.items()} for b in h.load_batches(spec["batches"])]
    mx.eval(batches)
    base = h.rss_mb()
    mx.random.seed(0)
    model = instantiate(ref["model_cfg"], _convert_="all", vocab_size=meta["vocab_size"],
                        num_labels=meta["num_labels"])
    model.train()
    optimizer = optim.AdamW(learning_rate=hp["learning_rate"], weight_decay=hp["weight_decay"])
    loss_and_grad = nn.value_and_grad(model, task_loss(meta["task"]))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (loss, _), grads = loss_and_grad(model, batch)
        grads, _ = optim.clip_grad_norm(grads, hp["grad_clip"])
        optimizer.update(model, grads)
        return loss

    times = [h.clock()]
    for k, batch in enumerate(batches, start=1):
        loss = step(batch)
        mx.eval(loss, state)
        times.append(h.clock())
        if k == spec["warmup"]:
            mx.reset_peak_memory()
            h.reset_peak_rss()
    return {
        "times": times, "mx_peak_mb": mx.get_peak_memory() / 2**20, "rss_mb": h.peak_rss_mb() - base,
        "params": sum(v.size for _, v in tree_flatten(model.parameters())),
    }


WORKERS = {"mlxlab": worker_mlxlab, "mlx": worker_mlx}


def worker_main(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    set_blas_threads(spec["threads"])
    result = WORKERS[kind](spec)
    Path(spec["result"]).write_text(json.dumps(result))


SCRIPTS = Path(__file__).resolve().parent


def worker_command(kind: str, spec: dict, spec_path: Path) -> list[str]:
    """The worker's command line. The PyTorch ones run scripts that never import mlxlab."""
    if kind == "torch":
        return [sys.executable, str(SCRIPTS / "bench_torch.py"), "--spec", str(spec_path)]
    if kind == "plain":
        ref = spec["reference"]
        cfg, (batch, seq) = ref["model_cfg"], common_shape(ref["shapes"])
        return [
            sys.executable, str(SCRIPTS / "torch_plain.py"), "--vocab", str(ref["meta"]["vocab_size"]),
            "--dim", str(cfg["dim"]), "--layers", str(cfg["num_layers"]),
            "--heads", str(cfg["num_heads"]), "--rope-theta", str(cfg.get("rope_theta", 1e4)),
            "--batch", str(batch), "--seq", str(seq), "--warmup", str(spec["warmup"]),
            "--steps", str(spec["steps"]), "--threads", str(spec["threads"]),
        ] + (["--mlp-dim", str(cfg["mlp_dim"])] if cfg.get("mlp_dim") else [])
    return [sys.executable, __file__, "--worker", kind, "--spec", str(spec_path)]


def common_shape(shapes: list) -> tuple[int, int]:
    """The batch shape most steps had (the plain PyTorch script trains on that one)."""
    return collections.Counter(tuple(s) for s in shapes).most_common(1)[0][0]


def run_worker(kind: str, spec: dict, tmp: Path, label: str) -> dict:
    spec_path, log_path = tmp / f"{label}.spec.json", tmp / f"{label}.log"
    spec = {**spec, "result": str(tmp / f"{label}.result.json")}
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the temporary sqlite store under spec["root"]
    threads = str(spec["threads"])
    env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(worker_command(kind, spec, spec_path), stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=SCRIPTS.parent)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"worker {label} failed (exit {proc.returncode}); log tail:\n{tail}")
    if kind == "plain":  # its last output line is its JSON result
        return json.loads(log_path.read_text().strip().splitlines()[-1])
    return json.loads(Path(spec["result"]).read_text())


def model_overrides(name: str, args) -> list[str]:
    experiment, *_ = MODELS[name]
    total = args.warmup + args.steps
    # evaluated at epoch ends only (BERT) and after the run
    overrides = [f"experiment={experiment}", f"trainer.max_steps={total}",
                 "trainer.eval_every_steps=null", "checkpoint.save_every_minutes=null",
                 "callbacks.early_stopping.patience=0", "trainer.grad_accum=1"]
    if name == "bert":
        overrides.append("trainer.max_epochs=1000")  # max_steps ends it
    if args.batch_size:
        overrides.append(f"trainer.batch_size={args.batch_size}")
    return overrides + list(args.override)


def summarize(label: str, impl: str, res: dict, ref: dict, skip: set[int], args, unit: str,
              peak: float) -> dict:
    """One table row. Step k trained on batch k-1, the same batch in every row."""
    seconds = step_seconds(res["times"], skip, args.warmup, args.steps)
    if not seconds:
        raise RuntimeError(f"{label} {impl}: no steady-state steps left; raise --steps")
    shapes = [tuple(ref["shapes"][k - 1]) for k in seconds]
    tokens, samples = sum(b * t for b, t in shapes), sum(b for b, _ in shapes)
    flops = sum(step_flops(ref["flops"], s) for s in shapes)
    total = sum(wall for wall, _ in seconds.values())
    return {
        "model": label, "impl": impl, "steps": len(seconds),
        "step_ms": 1e3 * total / len(seconds),
        "median_ms": 1e3 * statistics.median(wall for wall, _ in seconds.values()),
        "cpu_ms": 1e3 * sum(cpu for _, cpu in seconds.values()) / len(seconds),
        "rate": (tokens if unit == "tokens" else samples) / total, "unit": unit,
        "gflops": flops / total / 1e9, "mfu": flops / total / 1e9 / peak,
        "mx_peak_mb": res.get("mx_peak_mb"), "rss_mb": res.get("rss_mb"),
        "params": res.get("params"),
    }


def bench_round(name: str, spec: dict, args, tmp: Path, r: int) -> dict[str, dict]:
    """One result per row. Round 0 starts with the full mlxlab row, whose batches and step
    numbering every other row reuses; later rounds alternate the row order (ABBA) so a slow
    drift of the machine does not always land on the same row."""
    order = ["mlxlab", *(f"mlxlab:{v}" for v in args.variants), "mlx"]
    plain = MODELS[name][1] == "tokens"  # torch_plain.py implements the decoders
    order += [] if args.no_torch else ["torch", *(["torch:plain"] if plain else [])]
    order = h.in_round(order, r)
    results = {}
    for impl in order:
        kind, _, variant = impl.partition(":")
        kind = "plain" if impl == "torch:plain" else kind
        label = f"{name}-{impl.replace(':', '-')}-r{r}"
        results[impl] = run_worker(kind, {**spec, "variant": variant or "full",
                                          "save_batches": r == 0}, tmp, label)
        if impl == "mlxlab" and r == 0:
            spec["reference"] = results[impl]
    return results


def baseline_check(name: str, rows: list[float], plain: list[float]) -> dict:
    """Does the PyTorch row (bench_torch.py on the replayed batches) run at the speed of a plain
    PyTorch script of the same model in its own process? Noise: the larger relative spread over
    the rounds of either, at least 10%. A harness that slowed its baseline (3.7x) fails
    this, and then no PyTorch ratio is printed."""
    per_round = [r / p for r, p in zip(rows, plain)]
    spread = max(max(v) / min(v) - 1 for v in (rows, plain))
    tolerance = max(0.10, spread)
    ratio = statistics.median(per_round)
    return {
        "model": name, "row": statistics.median(rows), "plain": statistics.median(plain),
        "ratio": ratio, "low": min(per_round), "high": max(per_round), "tolerance": tolerance,
        "ok": abs(ratio - 1) <= tolerance,
    }


def bench_model(name: str, args, tmp: Path, peak: float) -> tuple[list[dict], list[tuple], dict]:
    """(table rows: each row's median round, ratios: median over rounds of the per-round
    ratio, with its range, the PyTorch baseline check or None). Every ratio compares two rows
    of the same round."""
    _, unit, default_steps = MODELS[name]
    args = argparse.Namespace(**{**vars(args), "steps": args.steps or default_steps})
    root = tmp / name
    spec = {"root": str(root), "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "overrides": model_overrides(name, args), "batches": str(root / "batches.npz")}
    rounds = [bench_round(name, spec, args, tmp, r) for r in range(args.repeats)]
    plain = [results.pop("torch:plain")["tokens_per_s"] for results in rounds
             if "torch:plain" in results]
    ref = spec["reference"]
    # Timed in every row: the same steps. Left out: compiling steps (a new batch shape) and
    # steps after an evaluation/checkpoint in any mlxlab row (it lands in the next step's time).
    skip = compile_steps([tuple(s) for s in ref["shapes"]])
    for impl, res in ((impl, res) for results in rounds for impl, res in results.items()):
        skip |= {k + 1 for k in res.get("evals", [])}
        if res.get("params") != ref["params"]:
            print(f"  warning: {name} {impl} has {res['params']} params, mlxlab {ref['params']}",
                  file=sys.stderr)
    summaries = [{impl: summarize(name, impl, res, ref, skip, args, unit, peak)
                  for impl, res in results.items()} for results in rounds]
    rows = []
    for impl in summaries[0]:
        runs = sorted((s[impl] for s in summaries), key=lambda row: row["rate"])
        row = dict(runs[(len(runs) - 1) // 2])  # the median round (the lower one for even counts)
        row["rate_range"] = (runs[0]["rate"], runs[-1]["rate"])
        rows.append(row)
    per_round = [ratios(list(s.values())) for s in summaries]
    combined = []
    for k, (what, _, _, target) in enumerate(per_round[0]):
        values = [round_ratios[k][1] for round_ratios in per_round]
        by_median = statistics.median(round_ratios[k][2] for round_ratios in per_round)
        combined.append((what, statistics.median(values), target, min(values), max(values),
                         by_median))
    check = None
    if plain:
        check = baseline_check(name, [s["torch"]["rate"] for s in summaries], plain)
        if not check["ok"]:
            combined = [c for c in combined if "PyTorch" not in c[0]]
    return rows, combined, check


def ratios(rows: list[dict]) -> list[tuple[str, float, float, float | None]]:
    """(what, throughput ratio, median-step-time ratio, target) for one round's rows. The second
    ratio compares the rows' median step times (the same steps in both): a slow spell of the host
    that covers a minority of one row's steps moves the first and not the second; an overhead in
    every step moves both."""
    out = []
    by = {(r["model"], r["impl"]): r for r in rows}

    def pair(what, a, b, target=None):
        out.append((what, a["rate"] / b["rate"], b["median_ms"] / a["median_ms"], target))

    for model in dict.fromkeys(r["model"] for r in rows):
        stack, minimal, torch = (by.get((model, i)) for i in ("mlxlab", "mlx", "torch"))
        if stack and minimal:
            pair(f"{model}: mlxlab / minimal MLX loop", stack, minimal, 0.95)
        for variant in VARIANTS:
            if (v := by.get((model, f"mlxlab:{variant}"))) and minimal:
                pair(f"{model}: mlxlab:{variant} / minimal MLX loop", v, minimal)
        if (plain := by.get((model, "mlxlab:nokernels"))) and stack:
            pair(f"{model}: mlxlab / mlxlab:nokernels (fused kernels' effect)", stack, plain)
        if plain and torch:
            pair(f"{model}: mlxlab:nokernels / PyTorch eager", plain, torch)
        if minimal and torch:
            pair(f"{model}: minimal MLX loop / PyTorch eager", minimal, torch)
        if stack and torch:
            target = 1.0 if model in ("nano", "tiny") else None
            pair(f"{model}: mlxlab / PyTorch eager", stack, torch, target)
    return out


def table(rows: list[dict], ratio_rows: list[tuple]) -> dict:
    """The record's table: one line per row (its median round), then one per ratio."""
    def f(x, spec):
        return "-" if x is None or x != x else format(x, spec)
    rows_out = [[r["model"], r["impl"], f"{r['median_ms']:.1f}", f"{r['rate']:,.0f} {r['unit']}/s",
                 f"{r['rate_range'][0]:,.0f}-{r['rate_range'][1]:,.0f}", f"{r['mfu']:.1%}",
                 f(r["mx_peak_mb"], ".0f"), f(r["rss_mb"], ".0f")] for r in rows]
    rows_out += [[what, "ratio", f"{by_median:.2f}", f"{value:.2f}", f"{low:.2f}-{high:.2f}",
                  f(target, ".2f"), "", ""] for what, value, target, low, high, by_median in ratio_rows]
    return {"head": ["model", "row", "median ms/step (ratio: by median step)", "throughput",
                     "range", "MFU (ratio: target)", "mx peak MB", "RSS MB"], "rows": rows_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_options(parser, quick=(False, "validation settings: GEMM 512, warmup 2, 4 timed steps, batch 4"),
                  models="nano,tiny,bert", warmup=(None, "steps skipped (default 3)", int),
                  steps=(None, "steps timed (default: 20 for nano and tiny, 200 for bert)", int),
                  batch_size=(None, "trainer.batch_size (default: the experiment's)", int),
                  threads=(None, "BLAS and torch threads (default: OPENBLAS_NUM_THREADS, else cores)", int),
                  gemm=(None, "GEMM sizes (default 1024,2048)"),
                  variants=(None, f"extra mlxlab rows: comma list of {','.join(VARIANTS)} (default: "
                            "all; --quick: none)"),
                  repeats=(None, "interleaved rounds of every row; the table shows medians (default "
                           "3; --quick: 1)", int), no_torch=False, spec=(None, argparse.SUPPRESS))
    parser.add_argument("--override", action="append", default=[],
                        help="extra Hydra override for every row (repeatable)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--gemm-table", action="store_true",
                        help="only the GEMM table: MLX under each BLAS (OpenBLAS, MKL), PyTorch, numpy")
    parser.add_argument("--bf16", action="store_true", help="only the bf16 product table: "
                        "trainer.precision=bf16's (MKL), MLX's bf16 and fp32, PyTorch's bf16 and fp32")
    parser.add_argument("--gemm-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.spec)
    if args.gemm_worker or args.gemm_table or args.bf16:
        sizes = [int(n) for n in (args.gemm or ("64" if args.smoke else
                                                "64,128,256,512,1024,2048")).split(",")]
        repeats = args.repeats or (2 if args.smoke else 10 if args.bf16 else 4)
        if args.gemm_worker:
            return gemm_worker(sizes, repeats)
        threads = args.threads or int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1)
        return gemm_table(sizes, threads, repeats, 1 if args.smoke else 5, args.smoke, args.bf16)
    if args.smoke:  # --quick on nano, 1 + 2 steps, every worker (PyTorch's when installed)
        args.quick, args.models, args.warmup, args.steps = True, "nano", 1, 2
        args.gemm = "64"

    quick = args.quick
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    args.steps = args.steps or (4 if quick else None)  # None: each model's default
    args.repeats = max(1, args.repeats or (1 if quick else 3))
    args.batch_size = args.batch_size or (4 if quick else None)
    gemm_sizes = [int(n) for n in (args.gemm or ("512" if quick else "1024,2048")).split(",")]
    variants = args.variants if args.variants is not None else ("" if quick else ",".join(VARIANTS))
    args.variants = [v for v in variants.split(",") if v]
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    models = args.models.split(",")
    if unknown := set(models) - set(MODELS):
        parser.error(f"unknown --models {sorted(unknown)}; choose from {sorted(MODELS)}")
    if args.threads is None:
        args.threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1)
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            parser.error("PyTorch is not installed: pip install -e '.[bench]', or pass --no-torch")

    from threadpoolctl import threadpool_limits

    set_blas_threads(args.threads)
    mlxlab_kernels.set_threads(args.threads)
    os.environ["MLXLAB_KERNEL_THREADS"] = str(args.threads)  # the workers' fused kernels too
    with threadpool_limits(limits=args.threads):  # numpy's own OpenBLAS too
        info = {"mlx": mx.__version__, "threads": args.threads, "kernels": mlxlab_kernels.status(),
                "blas": f"{mlxlab.blas.status}: {mlxlab.blas.library} ({mlxlab.blas.detail})",
                "torch": next((d.version for d in importlib.metadata.distributions(name="torch")), None)}
        print(f"BLAS threads: mlx {blas_threads()}, requested {args.threads}", file=sys.stderr)
        gemm = [{"n": n, "mlx": m, "numpy": p, "ratio": m / p}
                for n in gemm_sizes for m, p in [gemm_pair(n, repeats=2 if quick else 4)]]
    peak = max(max(g["mlx"], g["numpy"]) for g in gemm)
    rows, ratio_rows, checks = [], [], []
    with tempfile.TemporaryDirectory(prefix="mlxlab-bench-") as tmp:
        for name in models:
            model_rows, model_ratios, check = bench_model(name, args, Path(tmp), peak)
            rows += model_rows
            ratio_rows += model_ratios
            checks += [check] if check else []
    shown = table(rows, ratio_rows)
    h.print_table(shown)
    pytorch = next((c for c in ratio_rows if c[0].endswith(": mlxlab / PyTorch eager")), None)
    h.write_record("-".join(models) + "-vs-pytorch", {
        "machine": info, "gemm": gemm, "rows": rows, "checks": checks, "table": shown,
        "ratios": [dict(zip(("what", "median", "target", "low", "high", "by_median_step"), c))
                   for c in ratio_rows]},
        question="speed-pytorch", reference=pytorch and "PyTorch eager (bench_torch.py, its own process)",
        ratio=pytorch and round(pytorch[1], 2), summary=pytorch and f"{pytorch[0]}, throughput (higher is better)",
        smoke=args.smoke or args.quick)
    if (refused := [c["model"] for c in checks if not c["ok"]]) and not args.smoke:
        sys.exit(f"bench.py: the PyTorch row of {refused} disagrees with the plain PyTorch script "
                 "beyond the noise; its PyTorch ratios were not printed (see the check table)")


if __name__ == "__main__":
    main()
