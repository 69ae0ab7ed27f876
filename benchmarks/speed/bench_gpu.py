"""One command for a GPU window: what mlxlab does on the GPU, beside its PyTorch twin.

    python benchmarks/speed/bench_gpu.py [--budget-min 25] [--out gpu-bench] [--parts first,mlx,...]
    python benchmarks/speed/bench_gpu.py --dry-run      # the whole path on the CPU, tiny, ~1 minute

Parts, each within its share of the budget (a row past it is skipped with a note): `first` (the
default run on a fresh machine: MLX's kernel compiles), `mlx` (the device line, best GEMM at fp32
and bf16, the LM presets at fp32 and bf16 through mlxlab's compiled step: tokens/s, MFU over the
data-sheet peak (PEAKS) and over the best GEMM, peak memory), `torch`
(the twin of bench_torch.py, eager and torch.compile, in a process without mlxlab or MLX), `runs`
(the default experiment, LoRA and QLoRA on a random Llama), `pytest` (`-m gpu`). Each call adds
its parts to <out>/bench_gpu.json and writes a record of all so far; gpu_window.sh runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks.*
from benchmarks.harness import add_options, print_table, smoke_dir, tiny_llama, write_record  # noqa: E402

PRESETS = ("nano", "small", "medium", "large")
DTYPES = ("fp32", "bf16")
# Dense peak TFLOP/s (no 2:4 sparsity) from NVIDIA's data sheets: fp32 on CUDA cores, TF32 and
# BF16 on tensor cores. Matched against the device name MLX reports (first match wins).
PEAKS = [
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # SXM5 (HBM3): "H100 80GB HBM3"
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
    ("GH200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
    ("A10G", {"fp32": 31.2, "tf32": 35.0, "bf16": 70.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
    ("RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2}),
    ("T4", {"fp32": 8.1, "tf32": 8.1, "bf16": 0.0}),  # no bf16 tensor cores (SM 7.5)
]
# Each part's share of the window (fractions of --budget-min); the rest is slack.
SHARES = {"gemm": 0.04, "mlx": 0.30, "torch": 0.30, "default": 0.08, "lora": 0.10, "pytest": 0.20}
FULL = {"vocab": 32768, "seq": 1024, "batch": {"nano": 32, "small": 16, "medium": 8, "large": 4},
        "warmup": 3, "steps": 20, "gemm": [2048, 4096, 8192], "lora": (1024, 8)}
DRY = {"vocab": 512, "seq": 32, "batch": {p: 2 for p in PRESETS}, "warmup": 1, "steps": 2,
       "gemm": [64, 128], "lora": (64, 2)}
DRY_MODEL = ["model.dim=32", "model.num_layers=1", "model.num_heads=2"]


def budgeted_rows(keys: list[dict], deadline: float, measure) -> list[dict]:
    """A row a key, with `measure(row)`'s figures, or why not: past `deadline`, or its error (a
    row that fails, e.g. out of memory, is reported)."""
    rows = []
    for key in keys:
        row = dict(key)
        rows.append(row)
        if time.monotonic() > deadline:
            row["skipped"] = "over the part's time budget"
            continue
        try:
            row.update(measure(row))
        except Exception as exc:  # noqa: BLE001  (reported per row)
            row["error"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return rows


def gemm(sizes: list[int], deadline: float) -> dict[str, float]:
    """Best TFLOP/s of an n x n x n product per dtype, 10 timed repeats after 2 warm ones."""
    import mlx.core as mx

    best: dict[str, float] = {}
    for dtype_name, dtype in (("fp32", mx.float32), ("bf16", mx.bfloat16)):
        for n in sizes:
            if time.monotonic() > deadline:
                break
            a, b = mx.random.normal((n, n)).astype(dtype), mx.random.normal((n, n)).astype(dtype)
            for _ in range(2):
                mx.eval(a @ b)
            started = time.perf_counter()
            for _ in range(10):
                c = a @ b
                mx.eval(c)
            tflops = 2 * n**3 * 10 / (time.perf_counter() - started) / 1e12
            best[dtype_name] = max(best.get(dtype_name, 0.0), tflops)
    return best


def lm_rows(spec: dict) -> list[dict]:
    """mlxlab's compiled step (training/step.py make_step: AdamW, clip 1.0, fused kernels auto,
    bf16 compute over fp32 masters for "bf16") on each preset x dtype; a row each (or its error)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    from benchmarks.speed.bench import compose, matmul_params, step_flops
    from mlxlab import kernels
    from mlxlab.config import instantiate
    from mlxlab.objectives import losses
    from mlxlab.training.settings import TrainerSettings
    from mlxlab.training.step import make_step, mixed_precision

    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))

    def measure(row: dict) -> dict:
        preset, dtype = row["preset"], row["dtype"]
        model_cfg = compose(root, [f"model=transformer_{preset}", *spec["model_overrides"]]).model
        mx.random.seed(0)
        model = instantiate(model_cfg, vocab_size=spec["vocab"], num_labels=None)
        model.train()
        settings = TrainerSettings(precision=dtype, grad_clip=1.0, fused_kernels="auto")
        kernels.set_mode(settings.fused_kernels)  # as the loop sets it
        loss_fn = losses.task_loss("lm")
        if dtype == "bf16":
            loss_fn = mixed_precision(loss_fn, mx.bfloat16)
        step = make_step(model, optim.AdamW(learning_rate=1e-4, weight_decay=0.01), loss_fn,
                         settings)
        # nano's positions stop at 256: its rows are that long
        batch_rows, seq = spec["batch"][preset], min(spec["seq"], model_cfg.max_seq_len)
        rng = np.random.default_rng(spec["seed"])
        meta = dict(zip(("params_per_token", "params_per_sample", "layers", "dim"),
                        matmul_params(model, "lm")))
        times = []
        for k in range(spec["warmup"] + spec["steps"]):
            x = mx.array(rng.integers(0, spec["vocab"], (batch_rows, seq + 1), dtype=np.int32))
            batch = {"input_ids": x[:, :-1], "labels": x[:, 1:],
                     "loss_mask": mx.ones((batch_rows, seq), mx.float32)}
            if k == spec["warmup"]:
                mx.reset_peak_memory()
            started = time.perf_counter()
            loss, _, _ = step([batch])
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times[spec["warmup"]:])
        flops = step_flops(meta, (batch_rows, seq))
        return {"params_m": sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6,
                "tokens_per_s": batch_rows * seq / seconds, "step_ms": 1e3 * seconds,
                "first_step_s": times[0], "tflops": flops / seconds / 1e12,
                "peak_gb": mx.get_peak_memory() / 2**30, "loss": float(loss),
                "batch": batch_rows, "seq": seq}

    return budgeted_rows([{"preset": p, "dtype": d} for p in PRESETS for d in DTYPES],
                         spec["deadline"], measure)


def mlx_worker(spec: dict) -> dict:
    import mlxlab  # noqa: F401  (the fast BLAS on CPU, before mlx.core)
    from mlxlab.runtime.compute import device
    from mlxlab.training.startup import prepare_device

    cache = Path(spec["cache_dir"])
    empty = device.use_kernel_cache(cache).files == 0
    described = prepare_device(cache, "auto")
    line = device.device_line(described, [] if described.backend != "cpu" else ["(CPU)"])
    started = time.monotonic()
    best = gemm(spec["gemm"], started + spec["budget"]["gemm"])
    spec["deadline"] = time.monotonic() + spec["budget"]["mlx"]
    rows = lm_rows(spec)
    return {"device": line, "backend": described.backend, "name": described.name,
            "kernel_cache_empty": empty, "gemm_tflops": best, "rows": rows,
            "gemm_s": time.monotonic() - started}


def torch_worker(spec: dict) -> dict:
    """The PyTorch side: a worker process that never imports mlxlab or MLX."""
    try:
        import torch
    except ImportError:
        return {"skipped": "PyTorch is not installed here"}
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not spec["dry_run"]:
        return {"skipped": f"no CUDA PyTorch here (torch {torch.__version__}, "
                           "cuda available: False)"}
    import numpy as np
    import torch.nn.functional as F

    from benchmarks.speed.bench_torch import torch_models

    dev = "cuda" if on_gpu else "cpu"
    Transformer, _ = torch_models()
    models = {item["preset"]: item for item in spec["models"]}

    def measure(row: dict) -> dict:
        item, dtype, mode = models[row["preset"]], row["dtype"], row["mode"]
        torch.manual_seed(0)
        model = Transformer(spec["vocab"], **item["cfg"]).to(dev).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        forward = model if mode == "eager" else torch.compile(
            model, backend="inductor" if on_gpu else "eager")
        rng = np.random.default_rng(spec["seed"])
        b, t = item["batch"], item["seq"]
        times = []
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        for k in range(spec["warmup"] + spec["steps"]):
            ids = torch.from_numpy(rng.integers(0, spec["vocab"], (b, t + 1),
                                                dtype=np.int32)).long().to(dev)
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits = forward(ids[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            if k == spec["warmup"] - 1 and on_gpu:
                torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(times[spec["warmup"]:])
        return {"tokens_per_s": b * t / seconds, "step_ms": 1e3 * seconds, "first_step_s": times[0],
                "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}

    rows = budgeted_rows([{"preset": p, "dtype": d, "mode": m} for p in models for d in DTYPES
                          for m in ("eager", "compile")],
                         time.monotonic() + spec["budget"]["torch"], measure)
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "rows": rows}


def run_train(root: Path, overrides: list[str], timeout: float):
    """`python -m mlxlab.train` rooted in `root`: (its output, {"wall_s"}) or (None, why not)."""
    started = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "mlxlab.train", *overrides], cwd=root,
                             capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "MLXLAB_ROOT": str(root)})
    except subprocess.TimeoutExpired:
        return None, {"skipped": f"over its time budget ({timeout:.0f} s)"}
    if out.returncode != 0:
        return None, {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return out, {"wall_s": time.monotonic() - started}


def default_experiment(dry: bool, root: Path, timeout: float, name: str = "default") -> dict:
    """The README's default run; `name="first"` on a fresh machine is the first run's wait (MLX
    compiles its CUDA kernels): the lines it printed about compiling come back with it."""
    run_dir = root / name
    extra = ["trainer.max_epochs=1", "trainer.max_steps=4", *[o.replace("dim", "hidden_size")
                                                                for o in DRY_MODEL]] if dry else []
    out, res = run_train(root, ["tracking=csv", "callbacks.progress.enabled=false",
                                f"hydra.run.dir={run_dir}", *extra], timeout)
    if out is None:
        return res
    tags = json.loads((run_dir / "tracking" / "tags.json").read_text())
    summary = [line for line in out.stdout.splitlines() if line.startswith("validation")]
    said = [line.strip()[:300] for line in (out.stdout + out.stderr).splitlines()
            if "compile" in line.lower()]
    return {**res, "compile_s": float(tags.get("mlxlab.compile_s", "nan")),
            "summary": summary[0] if summary else "", "compile_lines": said[:4]}


def lora(dry: bool, root: Path, timeout: float, sizes: tuple[int, int]) -> dict:
    """LoRA and 4-bit QLoRA (`model.quantize=4`: the base packed at load) fine-tunes of one random
    Llama written on the spot (no PyTorch needed), through mlx-lm's model code."""
    from benchmarks.speed.bench_lora import csv_metrics

    hidden, layers = sizes
    base = tiny_llama(root / f"llama-{hidden}x{layers}", hidden=hidden, layers=layers,
                      heads=max(2, hidden // 64), kv_heads=max(1, hidden // 256))
    steps = 4 if dry else 100
    res: dict = {}
    for kind, extra in (("lora", []), ("qlora", ["model.quantize=4"])):
        run_dir = root / kind
        out, row = run_train(root, [
            "experiment=finetune_completions", f"model.pretrained={base}", "tracking=csv",
            "callbacks.progress.enabled=false", f"trainer.max_steps={steps}",
            f"trainer.eval_every_steps={steps}", f"trainer.log_every_steps={2 if dry else 10}",
            f"hydra.run.dir={run_dir}", *extra], max(timeout / 2, 150.0))
        if out is not None:
            rates = [m["train/tokens_per_sec"] for _, m in sorted(csv_metrics(run_dir).items())
                     if "train/tokens_per_sec" in m]  # the first window holds the compile
            tags = json.loads((run_dir / "tracking" / "tags.json").read_text())
            row.update({"steps": steps, "hidden": hidden, "layers": layers,
                        "compile_s": float(tags.get("mlxlab.compile_s", "nan")),
                        "tokens_per_s": statistics.median(rates[1:] or rates or [0.0])})
        res[kind] = row
    return res


def gpu_tests(root: Path, timeout: float) -> dict:
    report = root / "gpu_tests.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-m", "gpu",
           "-q", str(REPO / "tests" / "test_gpu.py")]
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "MLXLAB_GPU_REPORT": str(report)})
    except subprocess.TimeoutExpired:
        return {"summary": f"over its time budget ({timeout:.0f} s)"}
    lines = out.stdout.strip().splitlines()
    figures = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    return {"summary": lines[-1] if lines else out.stderr[-300:], "figures": figures}


def table(res: dict) -> dict:
    """The record's table: mlxlab's row of each preset and dtype beside the twin's."""
    mlx = res.get("mlx", {})
    peaks = next(({"gpu": key, **p} for key, p in PEAKS if key.lower() in mlx.get("name", "").lower()),
                 None) if mlx.get("backend") == "cuda" else None
    best = mlx.get("gemm_tflops", {})
    twin = {(r["preset"], r["dtype"], r["mode"]): r for r in res.get("torch", {}).get("rows", [])}

    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    rows = []
    for row in mlx.get("rows", []):
        key = (row["preset"], row["dtype"])
        if "tokens_per_s" not in row:
            rows.append([*key, row.get("error") or row.get("skipped"), *[""] * 7])
            continue
        tf32 = peaks and row["dtype"] == "fp32" and best.get("fp32", 0) > 1.1 * peaks["fp32"]
        peak = peaks and peaks["tf32" if tf32 else row["dtype"]]
        eager, comp = (twin.get((*key, m), {}).get("tokens_per_s") for m in ("eager", "compile"))
        rows.append([*key, f"{row['params_m']:.1f}", f"{row['batch']} x {row['seq']}",
                     f"{row['tokens_per_s']:,.0f}", f(peak and 100 * row["tflops"] / peak),
                     f(best.get(row["dtype"]) and 100 * row["tflops"] / best[row["dtype"]]),
                     f"{row['peak_gb']:.2f}", f(eager, ",.0f"), f(comp and row["tokens_per_s"] / comp, ".2f")])
    return {"head": ["preset", "dtype", "params (M)", "batch x seq", "mlxlab tokens/s", "MFU % (peak)",
                     "MFU % (GEMM)", "MLX peak GB", "torch eager tokens/s", "mlxlab / torch.compile"],
            "rows": rows}


def run_worker(kind: str, spec: dict, tmp: Path, timeout: float, env: dict) -> dict:
    path = tmp / f"{kind}.json"
    path.write_text(json.dumps(spec))
    try:
        out = subprocess.run([sys.executable, __file__, f"--{kind}-worker", str(path)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    results = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(results[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, dry_run=(False, "the whole path on the CPU, tiny"), budget_min=25.0,
                out=("gpu-bench", "folder for the JSON and the runs"),
                parts=("first,mlx,torch,runs,pytest", "comma-separated: first (the default run on "
                       "a fresh machine), mlx (device, GEMM, presets), torch (the twin), runs "
                       "(default experiment, LoRA), pytest (-m gpu); added to <out>/bench_gpu.json"),
                mlx_worker=(None, argparse.SUPPRESS), torch_worker=(None, argparse.SUPPRESS))
    args = parser.parse_args()
    if args.smoke:  # --dry-run: the whole path on the CPU, tiny, into a fresh folder
        args.dry_run, args.out = True, str(smoke_dir("bench_gpu"))
    for kind, worker in (("mlx", mlx_worker), ("torch", torch_worker)):
        spec_path = getattr(args, f"{kind}_worker")
        if spec_path:
            print("RESULT " + json.dumps(worker(json.loads(Path(spec_path).read_text()))), flush=True)
            return
    started = time.monotonic()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - {"first", "mlx", "torch", "runs", "pytest"}:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from first, mlx, torch, runs, pytest")
    sizes = DRY if args.dry_run else FULL
    budget = {part: share * args.budget_min * 60 for part, share in SHARES.items()}
    if args.dry_run:
        budget = {part: max(seconds, 60.0) for part, seconds in budget.items()}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "bench_gpu.json"
    res: dict = json.loads(saved.read_text()) if saved.exists() else {}
    if res.get("dry_run", args.dry_run) != args.dry_run:
        res = {}  # a dry run's figures never mix with a GPU's
    res["dry_run"] = args.dry_run
    model_overrides = DRY_MODEL if args.dry_run else []
    spec = {**sizes, "seed": 0, "budget": budget, "dry_run": args.dry_run,
            "model_overrides": model_overrides, "cache_dir": str(REPO / ".cache" / "mlxlab")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if "first" in parts:  # before anything else on a fresh machine: the kernel compiles' wait
        res["first"] = default_experiment(args.dry_run, out, 600.0, name="first")
    if "mlx" in parts:
        # a first run on a new GPU compiles MLX's kernels (~3 min) inside this part: its timeout allows it
        res["mlx"] = run_worker("mlx", spec, out, budget["gemm"] + budget["mlx"] + 300, env)
        if "error" in res["mlx"]:
            raise SystemExit(f"bench_gpu: the MLX part failed: {res['mlx']['error']}")
    if "torch" in parts:
        from benchmarks.speed.bench import compose

        models = []
        for preset in PRESETS:
            cfg = compose(out / "cfg", [f"model=transformer_{preset}", *model_overrides])
            model_cfg = {k: v for k, v in dict(cfg.model).items()
                         if k not in ("_target_", "lora", "max_seq_len")}
            models.append({"preset": preset, "cfg": model_cfg, "batch": sizes["batch"][preset],
                           "seq": min(sizes["seq"], cfg.model.max_seq_len)})
        res["torch"] = run_worker("torch", {**spec, "models": models}, out, budget["torch"] + 120,
                                  env)
    if "runs" in parts:
        res["default"] = default_experiment(args.dry_run, out, budget["default"])
        res["lora"] = lora(args.dry_run, out, budget["lora"], sizes["lora"])
    if "pytest" in parts:  # its 4 tests took 291 s on an H100 (2026-11-25)
        res["pytest"] = gpu_tests(out, max(budget["pytest"], 420.0))
    res["parts"] = sorted(set(res.get("parts", [])) | set(parts))
    res["total_s"] = res.get("total_s", 0.0) + time.monotonic() - started
    saved.write_text(json.dumps(res, indent=2))
    res["table"] = table(res)
    print_table(res["table"])
    write_record("gpu", res, question="speed-pytorch", smoke=args.dry_run or args.smoke,
                 raw=str(saved))


if __name__ == "__main__":
    main()
