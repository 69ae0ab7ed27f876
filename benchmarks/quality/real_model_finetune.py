"""A real pretrained model fine-tuned with proof: SmolLM2-135M-Instruct from its Q4_1 GGUF taught
a task it fails (a date in words -> its ISO form, exact match), scored before and after, beside
mlx_lm.lora (and PyTorch + PEFT: real_model_torch_peft.py), and run in llama.cpp.

    python benchmarks/quality/real_model_finetune.py --work DIR    (--help: the options)

Stages (each kept under <work>/stages; a later call runs only what is missing): `base` (`mlxlab
eval` of the GGUF), `train_mlxlab_<round>` (LoRA rank 8 on q/k/v/o of the 4-bit base) and
`mlxlab` (its eval), `paired` (McNemar's exact test, base vs fine-tune), `export` (GGUF Q8_0) and
`llama.cpp` (its accuracy there), mlx_lm.lora with the same settings on the same folder, its
adapters fused and scored by the same eval: as shipped (`--mlx-lm-as-shipped`: MLX's scalar CPU
quantized matmul, hours on a CPU) and on mlxlab's quantized product (`mlx-lm-fast`).
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import benchmarks.harness as h  # noqa: E402
from benchmarks.harness import write_jsonl  # noqa: E402
from benchmarks.speed import bench_lora  # noqa: E402

MONTHS = list(calendar.month_name)[1:]
_UNITS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
          "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
          "sixteenth", "seventeenth", "eighteenth", "nineteenth"]
PHRASES = ("the {day} of {month}, {year}", "{month} the {day}, {year}",
           "the {day} day of {month} in {year}")
INSTRUCTION = "Write this date as YYYY-MM-DD, nothing else: "
MAX_NEW_TOKENS = 16


def ordinal(n: int) -> str:
    """1 -> "first", 21 -> "twenty-first", 30 -> "thirtieth"."""
    if n < 20:
        return _UNITS[n]
    tens = {2: "twenty", 3: "thirty"}[n // 10]
    return f"{tens}-{_UNITS[n % 10]}" if n % 10 else tens[:-1] + "ieth"


def date_rows(n_train: int, n_val: int, n_heldout: int, seed: int = 0
              ) -> tuple[list[dict], list[dict], list[dict]]:
    """Distinct dates (1900-2099) in words: train and validation chats, held-out task rows."""
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    rows: list[tuple[str, str]] = []
    while len(rows) < n_train + n_val + n_heldout:
        year, month = rng.randint(1900, 2099), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        if (year, month, day) in seen:
            continue
        seen.add((year, month, day))
        phrase = rng.choice(PHRASES).format(day=ordinal(day), month=MONTHS[month - 1], year=year)
        rows.append((INSTRUCTION + phrase, f"{year:04d}-{month:02d}-{day:02d}"))

    def chat(prompt: str, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": answer}]}

    train = [chat(*r) for r in rows[:n_train]]
    val = [chat(*r) for r in rows[n_train:n_train + n_val]]
    heldout = [{"id": f"d{i}", "prompt": p, "answer": a}
               for i, (p, a) in enumerate(rows[n_train + n_val:])]
    return train, val, heldout


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def checked(*cmd: str) -> str:
    """`python CMD` in its own process; its stdout (a failure raises with its stderr's end)."""
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def mlxlab(*argv: str) -> str:
    """`mlxlab ARGV` in its own process; its stdout."""
    return checked("-m", "mlxlab.cli.main", *argv)


def evaluate(model: str | Path, task: Path, uri: str, out: Path) -> dict:
    """`mlxlab eval MODEL TASK --json`: exact-match accuracy, its run id, per-example outputs and
    the seconds it took."""
    started, before = time.perf_counter(), h.load()
    report = json.loads(mlxlab("eval", str(model), str(task), "--json", "--uri", uri,
                               "--max-new-tokens", str(MAX_NEW_TOKENS), "--out", str(out)))
    name = task.name.removesuffix(".jsonl")
    rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    return {"accuracy": report["tasks"][name]["metrics"]["exact_match"]["value"],
            "run_id": report["run_id"], "n": len(rows), "seconds": time.perf_counter() - started,
            "load_1min": [before, h.load()], "outputs": {r["id"]: r["output"] for r in rows}}


def train_mlxlab(model: str | Path, data: Path, args, out: Path) -> dict:
    """`mlxlab train experiment=finetune_chat` at a constant learning rate, no clipping."""
    before = h.load()
    run = bench_lora.run_mlxlab(out, [
        "experiment=finetune_chat",
        *bench_lora.lora_overrides(model, data, args.steps, batch=args.batch, lr=args.lr),
        f"trainer.eval_every_steps={args.steps}", "trainer.grad_clip=0",
        "trainer.schedule.name=constant", f"seed={args.seed}"], env())
    return {**run, "load_1min": [before, h.load()]}


def train_mlx_lm(folder: Path, data: Path, args, out: Path, fast: bool = False) -> dict:
    """mlx_lm.lora with mlxlab's settings on mlxlab's OpenBLAS; `fast`: its loaded model on
    mlxlab's CPU quantized product (mlx-lm's loop on mlxlab's kernel)."""
    before = h.load()
    run = bench_lora.run_mlx_lm(folder, data, args.steps, out, openblas=True, fast_quantized=fast,
                                seq=2047, batch=args.batch, lr=args.lr, env=env())
    return {**run, "load_1min": [before, h.load()]}


def fuse(folder: Path, adapters: str, out: Path) -> Path:
    """mlx-lm's adapters fused into a float copy of the base (`mlx_lm.fuse --dequantize`): the
    base's 4-bit weights dequantized exactly, the LoRA product added."""
    shutil.rmtree(out, ignore_errors=True)
    checked("-m", "mlx_lm", "fuse", "--model", str(folder), "--adapter-path", adapters,
            "--save-path", str(out), "--dequantize")
    return out


def float_folder(folder: Path, dtype: str, out: Path) -> Path:
    """`mlx_lm.convert --dequantize --dtype DTYPE` of a quantized folder, once."""
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        checked("-m", "mlx_lm", "convert", "--hf-path", str(folder), "--mlx-path", str(out),
                "--dequantize", "--dtype", dtype)
    return out


def llama_cpp_accuracy(gguf: Path, folder: Path, heldout: list[dict]) -> dict:
    """The held-out prompts, rendered by the model's chat template (mlxlab eval's prompts),
    completed greedily by llama.cpp (xllamacpp) and scored by mlxlab's exact match."""
    import xllamacpp as xlc
    from transformers import AutoTokenizer

    from mlxlab.evaluation.scoring import generation_scores
    from mlxlab.evaluation.tasks import Example

    tok = AutoTokenizer.from_pretrained(folder)
    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 512
    params.n_parallel = 1
    params.cpuparams.n_threads = 1  # a thread that waits on a busy core costs more than it adds
    params.cpuparams_batch.n_threads = 1
    params.warmup = False
    server = xlc.Server(params)
    started, before, right, outputs = time.perf_counter(), h.load(), 0, {}
    for row in heldout:
        prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                         tokenize=False, add_generation_prompt=True)
        reply = server.handle_completions({
            "prompt": prompt, "n_predict": MAX_NEW_TOKENS, "temperature": 0.0, "top_k": 1,
            "stop": ["\n"], "cache_prompt": True})
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(f"llama.cpp: {reply['error']}")
        text = reply["choices"][0]["text"]
        outputs[row["id"]] = text
        right += generation_scores(text, Example(row["id"], prompt=row["prompt"],
                                                 answer=(row["answer"],)))["exact_match"]
    return {"accuracy": right / len(heldout), "n": len(heldout), "outputs": outputs,
            "seconds": time.perf_counter() - started, "load_1min": [before, h.load()]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--float-base", default=None, metavar="DTYPE", help="every tool on the GGUF's "
                   "weights dequantized to DTYPE (mlx_lm.convert): LoRA on a float base, not QLoRA")
    h.add_options(p, work=(None, "folder for data, runs and results (default: a new temporary "
                           "one); a stage already there is not run again"),
                  train=400, heldout=200, steps=80, batch=4, lr=1e-3,
                  skip=(2, "first steps left out of tokens/s"), rounds=1, seed=0,
                  mlx_lm_as_shipped=(False, "also mlx_lm.lora on MLX's own CPU quantized matmul "
                                     "(stages train_mlx_lm_0, mlx-lm): hours here"),
                  stages=(None, "only these stages (comma-separated, as the docstring names them); "
                          "the rest are read from earlier runs when there"))
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.heldout, args.steps, args.batch, args.skip = 8, 4, 2, 2, 0
    # one BLAS thread a process for both tools: on cores other processes share, OpenBLAS's
    # threads spin-wait on descheduled ones (runtime/compute/blas.py set_blas_threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="real_model_finetune_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlruns.db'}"
    from mlxlab.models.sources import model_folder

    if args.smoke:
        # a tiny random llama with a ChatML template: the pipeline's every step in seconds
        model = folder = h.tiny_llama(work / "tiny-llama", hidden=64, layers=2, heads=4, kv_heads=2,
                                      intermediate=None, std=0.02, chat="chatml")
    else:
        from real_models import packaged_model

        model = packaged_model()
        folder = model_folder(model)  # the GGUF converted once, as every mlxlab verb reads it
        if args.float_base:
            model = folder = float_folder(folder, args.float_base, work / f"float-{args.float_base}")
    train, val, heldout = date_rows(args.train, 4 if args.smoke else 32, args.heldout, args.seed)
    data = work / "data"
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "valid.jsonl", val)
    task = write_jsonl(work / "dates.jsonl", heldout)
    # what the stored stages depend on (more --rounds only add stages)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "stages", "rounds", "mlx_lm_as_shipped")}
    stages = work / "stages"  # a file a stage: processes given other --stages run side by side
    stages.mkdir(exist_ok=True)
    saved = stages / "settings.json"
    stored = json.loads(saved.read_text()) if saved.is_file() else settings
    stored.pop("rounds", None)
    if stored != settings:
        shutil.rmtree(stages)  # other settings: nothing of the last run counts
        stages.mkdir()
    saved.write_text(json.dumps(settings))
    result: dict = {"model": str(model), "folder": str(folder),
                    "settings": settings, "blas_threads": os.environ["OPENBLAS_NUM_THREADS"],
                    "load_start": h.load()}
    wanted = set(args.stages.split(",")) if args.stages else None

    def stage(key: str, fn) -> None:
        path = stages / f"{key}.json"
        if not path.is_file() and (wanted is None or key in wanted):
            path.write_text(json.dumps(fn(), indent=1))
        if not path.is_file():
            return
        result[key] = value = json.loads(path.read_text())
        shown = {k: v for k, v in value.items() if k not in ("outputs", "steps")}
        print(json.dumps({key: shown}), flush=True)

    stage("base", lambda: evaluate(model, task, uri, work / "eval" / "base"))
    ft_run = work / "runs" / "mlxlab-0"
    stage("train_mlxlab_0", lambda: train_mlxlab(model, data, args, ft_run))
    stage("mlxlab", lambda: evaluate(ft_run, task, uri, work / "eval" / "mlxlab"))
    stage("paired", lambda: next(
        p for p in json.loads(mlxlab("runs", "compare", result["base"]["run_id"],
                                     result["mlxlab"]["run_id"], "--json", "--uri",
                                     uri))["paired"] if p["metric"] == "exact_match"))
    gguf = work / "export" / "ft-q8_0.gguf"

    def export() -> dict:
        shutil.rmtree(gguf.parent, ignore_errors=True)
        started = time.perf_counter()
        mlxlab("export", str(ft_run), "--format", "gguf", "--quant", "q8_0", "--out", str(gguf))
        return {"seconds": time.perf_counter() - started, "bytes": gguf.stat().st_size}

    stage("export", export)
    if args.mlx_lm_as_shipped or args.smoke:  # hours on a 4-bit base on 2 cores
        lora_out = work / "runs" / "mlx-lm-0"
        stage("train_mlx_lm_0", lambda: train_mlx_lm(folder, data, args, lora_out))
        stage("mlx-lm", lambda: evaluate(
            fuse(folder, result["train_mlx_lm_0"]["adapters"], work / "mlx-lm-fused"), task,
            uri, work / "eval" / "mlx-lm"))
    stage("llama.cpp", lambda: llama_cpp_accuracy(gguf, folder, heldout))
    # mlx-lm as shipped trains a 4-bit base on MLX's scalar CPU quantized matmul (~35x slower:
    # on 2 cores); its loop on mlxlab's product tells the loops apart
    fast_out = work / "runs" / "mlx-lm-fast-0"
    stage("train_mlx_lm_fast_0", lambda: train_mlx_lm(folder, data, args, fast_out, fast=True))
    stage("mlx-lm-fast", lambda: evaluate(
        fuse(folder, result["train_mlx_lm_fast_0"]["adapters"], work / "mlx-lm-fast-fused"),
        task, uri, work / "eval" / "mlx-lm-fast"))
    # more timed rounds, in alternating order: beside mlx-lm as shipped where that is the one
    # timed (a GPU), else beside its loop on mlxlab's CPU product
    other = "mlx-lm" if args.mlx_lm_as_shipped else "mlx-lm-fast"
    for rnd in range(1, args.rounds):
        for tool in h.in_round(["mlxlab", other], rnd):
            out = work / "runs" / f"{tool}-{rnd}"
            stage(f"train_{tool.replace('-', '_')}_{rnd}",
                  lambda tool=tool, out=out: train_mlxlab(model, data, args, out)
                  if tool == "mlxlab" else train_mlx_lm(folder, data, args, out,
                                                        fast=tool == "mlx-lm-fast"))
    for path in sorted(stages.glob("*torch*peft*.json")):  # real_model_torch_peft.py's stages
        result[path.stem] = json.loads(path.read_text())
    result["load_end"] = h.load()
    result["table"] = table(result)
    (work / "results.json").write_text(json.dumps(result, indent=1))
    h.write_record("real-model-finetune", result, question="quality", smoke=args.smoke,
                   raw=str(work / "results.json"))
    h.print_table(result["table"])
    print(json.dumps({"paired": result.get("paired")}))
    return result


def table(r: dict) -> dict:
    """The stages `r` holds, a row a model (a stage not run shows as "-"), then mlxlab's ratios."""
    med = {}
    for tool in ("mlxlab", "mlx_lm", "mlx_lm_fast", "torch_peft"):
        runs = [bench_lora.summary(v, r["settings"]["skip"]) for k, v in r.items()
                if re.fullmatch(rf"train_{tool}_\d+", k)]
        med[tool] = {k: statistics.median(x[k] for x in runs) for k in
                     ("tokens_per_sec", "peak_mb", "rss_mb", "first_step_s")} if runs else None
    rows = []
    for name, key, tool in (("base (`mlxlab eval MODEL`)", "base", None),
                            ("mlxlab LoRA", "mlxlab", "mlxlab"), ("mlx_lm.lora", "mlx-lm", "mlx_lm"),
                            ("mlx_lm.lora on mlxlab's quantized product", "mlx-lm-fast", "mlx_lm_fast"),
                            ("PyTorch + PEFT", "torch-peft", "torch_peft"),
                            ("mlxlab LoRA -> GGUF Q8_0 in llama.cpp", "llama.cpp", None)):
        m = med.get(tool)
        rows.append([name, f"{r[key]['accuracy']:.3f}" if key in r else "-",
                     *([f"{m['tokens_per_sec']:.1f}", f"{m['first_step_s']:.1f}", f"{m['peak_mb']:.0f}",
                        f"{m['rss_mb']:.0f}"] if m else ["-"] * 4),
                     f"{med['mlxlab']['tokens_per_sec'] / m['tokens_per_sec']:.2f}x"
                     if m and med["mlxlab"] and tool != "mlxlab" else "-"])
    return {"head": ["model", "held-out exact match", "trained tokens/s", "first step s",
                     "peak MB (its framework's)", "peak RSS MB", "mlxlab's tokens/s ratio"],
            "rows": rows, "paired": r.get("paired")}

if __name__ == "__main__":
    main()
