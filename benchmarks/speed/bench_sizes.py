"""Fine-tuning at the sizes people fine-tune: trained tokens/s, peak memory and first-step seconds
of mlxlab (unpacked, packed) beside mlx_lm.lora and PyTorch + PEFT, SmolLM2-135M to Llama-3.1-8B.

    python benchmarks/speed/bench_sizes.py [--sizes llama-3b --modes lora --work DIR]  (--help)
    python benchmarks/speed/bench_sizes.py --sharded --sizes llama-1b --steps 4 [--threads N]

Models: the packaged SmolLM2 GGUF, random weights in the published configs (CONFIGS, Qwen3.5-0.8B
a hybrid; float32 on the CPU, bf16 on a GPU; 4-bit group 64 for QLoRA), SmolLM2's tokenizer. The
shipped one-reply chats, LoRA rank 8 (alpha 16) on q/k/v/o, Adam at 1e-4; unpacked batch 4 (padded
as mlxlab pads by default; mlxlab-b128: to multiples of 128), packed 1 x 256; each tool in its own
process at equal BLAS. results.json under --work keeps every stage; the equal-count table gives
every run at mlxlab's count of trained tokens."""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from benchmarks.harness import add_options, in_round, print_table, run_with_peak_rss, write_record  # noqa: E402
from benchmarks.memory.bench_hybrid_memory import SHAPES  # noqa: E402
from benchmarks.speed import bench_lora  # noqa: E402

SEQ, BATCH, RANK, ALPHA, LR = 256, 4, 8, 16.0, 1e-4
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The published config.json values of each model (architecture keys only).
CONFIGS = {
    "llama-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
                 "rope_theta": 500000.0, "rope_scaling": LLAMA32_ROPE, "rms_norm_eps": 1e-5,
                 "max_position_embeddings": 131072},
    "qwen3-1.7b": {"model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960},
    # --smoke: the same path on a toy of the Llama shape
    "toy": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 49152, "tie_word_embeddings": True,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
}
# Llama-3.2-3B and Llama-3.1-8B: Llama-3.2-1B's keys at their widths
CONFIGS["llama-3b"] = {**CONFIGS["llama-1b"], "hidden_size": 3072, "num_hidden_layers": 28,
                       "num_attention_heads": 24, "head_dim": 128}
CONFIGS["llama-8b"] = {**CONFIGS["llama-3b"], "hidden_size": 4096, "intermediate_size": 14336,
                       "num_hidden_layers": 32, "num_attention_heads": 32,
                       "tie_word_embeddings": False, "rope_scaling": {**LLAMA32_ROPE, "factor": 8.0}}
CONFIGS["qwen3.5-0.8b"] = SHAPES["qwen3.5-0.8b"]["families"]["hybrid"]  # a gated-delta hybrid
SIZES = ("smollm2", "llama-1b", "qwen3-1.7b", "llama-3b", "llama-8b")
TOOLS = ("mlxlab", "mlxlab-packed", "mlx-lm", "torch-peft")  # and mlxlab-b128, on request
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def env(threads: int = 1) -> dict:
    # one BLAS thread a process by default: on cores other processes share, OpenBLAS's threads
    # spin-wait on descheduled ones (runtime/compute/blas.py set_blas_threads); --threads N
    # splits N cores between a run's ranks
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OPENBLAS_NUM_THREADS": str(threads)}


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def smollm2_folders(work: Path) -> dict[str, Path]:
    """{mode: folder} of the real SmolLM2: the GGUF as mlxlab converts it (4-bit) and float32."""
    from benchmarks.quality.real_model_finetune import float_folder
    from mlxlab.models.sources import model_folder
    from real_models import packaged_model

    quantized = model_folder(str(packaged_model()))
    return {"qlora": quantized, "lora": float_folder(quantized, "float32", work / "smollm2-float32")}


def write_random(config: dict, tokenizer_from: Path, out: Path, bits: int | None,
                 dtype: str = "float32") -> Path:
    """A model folder of `config` with mlx-lm's own random initialization in `dtype`, or
    quantized to `bits` (group 64) from it, written a tensor at a time (an 8B model never
    whole in float)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxlab.models.mlx_lm_classes import model_classes

    if (out / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model_class, args_class = model_classes(config, out)
    model = model_class(args_class.from_dict(dict(config)))  # lazy: nothing computed yet
    model.set_dtype(getattr(mx, dtype))
    config = dict(config, torch_dtype=dtype)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        config["quantization"] = {"group_size": 64, "bits": bits}
    shard, size, index = {}, 0, {}
    names = [n for n, _ in tree_flatten(model.parameters())]

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
            mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
            index.update({k: name for k in shard})
        shard, size = {}, 0

    params = dict(tree_flatten(model.parameters()))
    for name in names:
        value = params[name]
        mx.eval(value)
        shard[name] = value
        size += value.nbytes
        if size > 2 << 30:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": index}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for file in TOKENIZER_FILES:
        if (tokenizer_from / file).is_file():
            shutil.copy(tokenizer_from / file, out / file)
    return out


def data_folder(work: Path, n_val: int = 8) -> Path:
    """train.jsonl / valid.jsonl (mlx-lm's names, read by every tool): the shipped chats with one
    reply (so mlxlab's mask, every reply, and mlx-lm's --mask-prompt, the last, train the same
    tokens)."""
    from mlxlab.config import asset_path

    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for line in Path(asset_path("tinystories/chats.jsonl")).read_text().splitlines()
             if sum(m["role"] == "assistant" for m in json.loads(line)["messages"]) == 1]
    (folder / "train.jsonl").write_text("\n".join(lines[n_val:]) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(lines[:n_val]) + "\n")
    return folder


def run_mlxlab(model: Path, data: Path, steps: int, out: Path, packed: bool,
               bucket_multiple: int | None = None) -> dict:
    return bench_lora.run_mlxlab(out, [
        "experiment=finetune_chat",
        *bench_lora.lora_overrides(model, data, steps, batch=1 if packed else BATCH, lr=LR),
        f"data.max_length={SEQ}", f"data.pack={'true' if packed else 'false'}",
        f"data.pack_length={SEQ}", f"trainer.eval_every_steps={10 * steps}", "eval.tasks=[]",
        *([f"trainer.batching.bucket_multiple={bucket_multiple}"] if bucket_multiple else [])],
        env())


def run_mlx_lm(model: Path, data: Path, steps: int, out: Path) -> dict:
    # mlxlab's OpenBLAS for MLX's CPU matmuls; a GPU has none
    return bench_lora.run_mlx_lm(model, data, steps, out, openblas=not on_gpu(), seq=SEQ,
                                 lr=LR, env=env())


# PyTorch + PEFT on the same folder and chats (real_model_torch_peft.py's LoRA and steps): batch
# 4 rows in order, the loss on the last reply (as mlx-lm's --mask-prompt); float32 on the CPU,
# the folder's dtype on CUDA. argv: folder train.jsonl steps report.jsonl
TORCH_PEFT_WORKER = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from benchmarks.quality.real_model_torch_peft import peft_lora, train_steps
folder, train, steps, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cuda = torch.cuda.is_available()
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto" if cuda else torch.float32)
model = peft_lora(model.to("cuda" if cuda else "cpu"))
rows = train_steps(model, tok, [json.loads(line)["messages"] for line in open(train)], steps, 4, 1e-4)
with open(report, "w") as f:
    f.write("".join(json.dumps(r) + "\\n" for r in rows))
"""


def run_torch_peft(model: Path, data: Path, steps: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.jsonl"
    report.unlink(missing_ok=True)
    proc, rss = run_with_peak_rss([sys.executable, "-c", TORCH_PEFT_WORKER, str(model),
                                   str(data / "train.jsonl"), str(steps), str(report)],
                                  what="torch + peft", cwd=REPO, env={
                                      **env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                      "MKL_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return {"steps": rows, "rss_mb": rss, "first_step_s": rows[0]["seconds"], "compiles": None,
            "wall_s": proc.wall_s}


def chat_module(data: Path, tokenizer: Path, **kwargs):
    """mlxlab's data module of the chats in `data` (data=chat's PromptCompletion), set up."""
    from mlxlab.data.completions import PromptCompletion

    module = PromptCompletion(train_file=str(data / "train.jsonl"), val_file=str(data / "valid.jsonl"),
                              max_length=SEQ, tokenizer={"path": str(tokenizer / "tokenizer.json")},
                              **kwargs)
    module.setup()
    return module


def mlxlab_steps(data: Path, tokenizer: Path, packed: bool, steps: int, seed: int = 42,
                 rows: int = BATCH) -> list[tuple[int, float]]:
    """(chats, trained tokens) of each of a bench_sizes mlxlab run's first `steps` steps."""
    from mlxlab.data.batching import Batching

    module = chat_module(data, tokenizer, pack=packed, seed=seed, pack_length=SEQ if packed else None)
    out = []
    for _, batch in zip(range(steps), module.train_batches(Batching(1 if packed else rows), 0)):
        chats = int(batch["segment_ids"].max(axis=1).sum()) if packed else batch["input_ids"].shape[0]
        out.append((chats, float(batch["loss_mask"].sum())))
    return out


def count_differences(data: Path, tokenizer: Path) -> dict[str, int]:
    """Per chat, how many more tokens mlx-lm's and PEFT's counts score than mlxlab's: one
    constant each, or the script stops (no per-step correction would be exact)."""
    from transformers import AutoTokenizer

    from benchmarks.quality.real_model_torch_peft import encode_chat

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    ours = {tuple(ids): int(sum(mask[1:])) for ids, mask in zip(*chat_module(data, tokenizer).train)}
    seen: dict[str, set[int]] = {"mlx-lm": set(), "torch-peft": set()}
    for line in (data / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        full = tok.apply_chat_template(messages, return_dict=False)
        offset = len(tok.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                             return_dict=False))
        mine = ours[tuple(full)]
        seen["mlx-lm"].add(len(full) - offset + 1 - mine)
        ids, labels = encode_chat(tok, messages)
        seen["torch-peft"].add(sum(label != -100 for label in labels[1:]) - mine)
    if any(len(v) != 1 for v in seen.values()):
        sys.exit(f"the counts differ by no constant per chat: {seen}")
    return {tool: v.pop() for tool, v in seen.items()}


def run_steps(run: Path, tool: str, mlxlab_rows: dict, differences: dict
              ) -> list[tuple[int, float, float]] | None:
    """(chats, trained tokens at mlxlab's count, seconds) per step of one run's folder."""
    report = run / "report.jsonl"
    rows = [json.loads(line) for line in report.read_text().splitlines()] if report.is_file() else []
    if tool == "mlx-lm" and rows:
        before = [0] + [r["trained_tokens"] for r in rows]
        return [(4, r["trained_tokens"] - b - 4 * differences["mlx-lm"],
                 1 / r["iterations_per_second"]) for r, b in zip(rows, before)]
    if tool == "torch-peft" and rows:
        return [(4, r["tokens_per_sec"] * r["seconds"] - 4 * differences["torch-peft"],
                 r["seconds"]) for r in rows]
    if tool.startswith("mlxlab") and any((run / d / "metrics.csv").is_file() for d in ("tracking", ".")):
        rates = {s: m["train/tokens_per_sec"] for s, m in bench_lora.csv_metrics(run).items()
                 if "train/tokens_per_sec" in m}
        drawn = mlxlab_rows[tool == "mlxlab-packed"]  # (mlxlab-b128: the same rows, wider)
        return [(chats, tokens, tokens / rates[s]) for s, (chats, tokens) in
                enumerate(drawn[:len(rates)], 1)]
    return None


def equal_count(runs: Path, data: Path, tokenizer: Path, skip: int, steps: int = 64) -> str:
    """Every run of `runs` at mlxlab's count of trained tokens (mlx-lm and PEFT score a constant
    one or two tokens a chat more: the template's newline after `<|im_end|>`, a padding position)."""
    differences = count_differences(data, tokenizer)
    mlxlab_rows = {p: mlxlab_steps(data, tokenizer, p, steps) for p in (False, True)}
    found: dict[tuple[str, str], dict[str, list]] = collections.defaultdict(dict)
    tools = ("mlx-lm", "mlxlab", "mlxlab-b128", "mlxlab-packed", "torch-peft")
    for run in sorted(runs.iterdir()):
        tool = next((t for t in sorted(tools, key=len, reverse=True)
                     if f"-{t}-" in run.name), None)
        if tool is None:
            continue
        size_mode = run.name[:run.name.index(f"-{tool}-")]
        got = run_steps(run, tool, mlxlab_rows, differences)
        if got:
            found[tuple(size_mode.rsplit("-", 1))].setdefault(tool, []).append(got[skip:])
    rows = []
    for (size, mode), by_tool in found.items():
        rate = {t: sum(s[1] for r in rs for s in r) / sum(s[2] for r in rs for s in r)
                for t, rs in by_tool.items()}
        for tool in (t for t in tools if t in by_tool):
            steps_ = [s for r in by_tool[tool] for s in r]
            rows.append([size, mode, tool, f"{rate[tool]:.{0 if rate[tool] >= 100 else 2}f}",
                         f"{rate[tool] / rate['mlx-lm']:.2f}x" if "mlx-lm" in rate else "-",
                         f"{sum(s[0] for s in steps_) / sum(s[2] for s in steps_):.2f}",
                         f"{1000 * statistics.median(s[2] for s in steps_):.1f}"])
    return {"head": ["model", "mode", "tool", "tokens/s (mlxlab's count)", "vs mlx_lm.lora",
                     "chats/s", "ms a step (median)"], "rows": rows, "differences": differences}


# --sharded: full fine-tuning of one shape at a global batch of SHARDED_BATCH rows, the
# embeddings frozen in every run (mlx_lm.lora's full mode trains the blocks alone): mlxlab in one
# process, fsdp and tensor over 2 ranks, and mlx_lm.lora's data parallelism over 2 ranks
# (bench_lora's worker, each rank's report to report.<rank>.jsonl)
SHARDED_BATCH = 4
SHARDED = {"mlxlab-1": (1, None), "mlxlab-fsdp-2": (2, "fsdp"),
           "mlx-lm-dp-2": (2, None), "mlxlab-tensor-2": (2, "tensor")}


def run_sharded(name: str, folder: Path, data: Path, steps: int, out: Path, cores: int) -> dict:
    """One SHARDED run: each rank's MLX peak (MB) and its median seconds a step after the first,
    `cores` BLAS threads shared by its ranks."""
    ranks, mode = SHARDED[name]
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    launch = [launcher, "-n", "2", "--"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if name.startswith("mlx-lm"):
        (out / "args.json").write_text(json.dumps({
            "model": str(folder), "train": True, "data": str(data), "iters": steps,
            "batch_size": SHARDED_BATCH, "fine_tune_type": "full", "num_layers": -1,
            "max_seq_length": SEQ + 1, "learning_rate": LR, "steps_per_report": 1,
            "steps_per_eval": 10 * steps, "val_batches": 1, "save_every": 10 * steps,
            "adapter_path": str(out / "adapters"), "mask_prompt": True}))
        cmd = [*launch, sys.executable, "-c", bench_lora.MLX_LM_WORKER, str(out / "args.json"),
               str(out / "report.{rank}.jsonl"), "1"]
    else:
        rows = SHARDED_BATCH // ranks if mode == "fsdp" else SHARDED_BATCH
        cmd = [*(launch if ranks > 1 else []), sys.executable, "-m", "mlxlab.train",
               "experiment=finetune_chat", f"model.pretrained={folder}",
               "model.lora.rank=0", "model.freeze_embeddings=true",
               f"data.train_file={data / 'train.jsonl'}",
               f"data.val_file={data / 'valid.jsonl'}", f"data.max_length={SEQ}",
               f"trainer.batch_size={rows}", f"trainer.max_steps={steps}",
               f"trainer.eval_every_steps={10 * steps}", "eval.tasks=[]",
               f"optimizer.learning_rate={LR}", "trainer.schedule.warmup_steps=0",
               "trainer.log_every_steps=1", "tracking=csv", "callbacks.progress.enabled=false",
               f"trainer.distributed.mode={mode or 'auto'}", f"hydra.run.dir={out}"]
    proc, rss = run_with_peak_rss(cmd, cwd=REPO, env=env(max(1, cores // ranks)))
    log = proc.stdout + proc.stderr
    (out / "run.log").write_text(log)
    if proc.returncode or "Traceback" in log:  # mlx.launch exits 0 when a rank failed
        raise RuntimeError(f"{name} failed:\n{log[-3000:]}")
    if name.startswith("mlx-lm"):
        reports = [[json.loads(x) for x in (out / f"report.{r}.jsonl").read_text().splitlines()]
                   for r in range(ranks)]
        peaks = [max(x["peak_memory"] for x in rows) * 1e9 / 2**20 for rows in reports]
        seconds = [1 / x["iterations_per_second"] for x in reports[0][1:]]
    else:
        line = log[log.rindex("MLX peak over the steps, per rank: "):].split(": ", 1)[1]
        peaks = [float(x) for x in line.split(" MB")[0].split(",")]
        rates = {s: m["train/tokens_per_sec"] for s, m in bench_lora.csv_metrics(out).items()
                 if "train/tokens_per_sec" in m}
        tokens = [t for _, t in mlxlab_steps(data, folder, False, steps, rows=SHARDED_BATCH)]
        seconds = [tokens[s - 1] / rates[s] for s in sorted(rates)[1:]]
    # a 1B run's checkpoints and their tracked copy are ~23 GB: four runs fill a 64 GB disk
    for heavy in ("checkpoints", "tracking/artifacts", "adapters"):
        shutil.rmtree(out / heavy, ignore_errors=True)
    got = {"ranks": ranks, "peak_mb_per_rank": peaks, "rss_mb": rss,
           "step_s": statistics.median(seconds), "wall_s": proc.wall_s}
    print(json.dumps({"run": name, **got}), flush=True)
    return got


def sharded(size: str, work: Path, data: Path, tokenizer: Path, steps: int, dtype: str,
            cores: int) -> dict:
    """Every SHARDED run of `size` (random weights in `dtype`) and its table."""
    folder = write_random(CONFIGS[size], tokenizer, work / f"{size}-full-{dtype}", None, dtype)
    runs = {name: run_sharded(name, folder, data, steps, work / "sharded" / name, cores)
            for name in SHARDED}
    one = runs["mlxlab-1"]
    rows = [[size, name, str(r["ranks"]), " / ".join(f"{p:.0f}" for p in r["peak_mb_per_rank"]),
             f"{max(r['peak_mb_per_rank']) / max(one['peak_mb_per_rank']):.2f}",
             f"{r['step_s']:.2f}", f"{one['step_s'] / r['step_s']:.2f}x"]
            for name, r in runs.items()]
    return {"runs": runs, "cores": cores, "table": {"head": [
        "model", "run", "ranks", "MLX peak MB per rank", "peak / one process", "s a step",
        "speed vs one process"], "rows": rows}}


def table(results: dict, sizes: list[str], modes: list[str], tools: list[str]) -> dict:
    rows = []
    for size, mode in ((s, m) for s in sizes for m in modes):
        runs = {t: [v for k, v in results.items() if k.startswith(f"{size}/{mode}/{t}/")]
                for t in tools}
        ref = runs.get("mlx-lm")
        for tool in (t for t in tools if runs[t]):
            med = {k: statistics.median(r[k] for r in runs[tool])
                   for k in ("tokens_per_sec", "peak_mb", "rss_mb", "first_step_s")}
            compiles = runs[tool][0]["compiles"]
            rows.append([size, mode, tool, f"{med['tokens_per_sec']:.1f}",
                         f"{med['tokens_per_sec'] / statistics.median(r['tokens_per_sec'] for r in ref):.2f}x"
                         if ref and tool != "mlx-lm" else "-", f"{med['peak_mb']:.0f}",
                         f"{med['rss_mb']:.0f}", f"{med['first_step_s']:.1f}",
                         "-" if compiles is None else compiles,
                         ",".join(str(r["load_1min"]) for r in runs[tool])])
    return {"head": ["model", "mode", "tool", "tokens/s", "vs mlx_lm.lora", "MLX peak MB",
                     "peak RSS MB", "first step s", "compiles", "load"], "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the random bases' dtype (auto: float32 on the CPU, bfloat16 on a GPU)")
    add_options(p, sizes=",".join(SIZES), modes="lora,qlora", tools=",".join(TOOLS), steps=4,
                skip=(1, "first steps left out (compiling)"), rounds=1, work=None,
                tokenizer=(None, "a folder of SmolLM2's tokenizer files (else the packaged GGUF's)"),
                table_only=(False, "print the table of results.json"),
                sharded=(False, "full fine-tuning of the first of --sizes: one process, fsdp and "
                         "tensor over 2 ranks, mlx_lm.lora data parallel"),
                threads=(1, "--sharded: BLAS threads of a run, split between its ranks"))
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.steps, args.skip, args.rounds = "toy", 2, 0, 1
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_sizes_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    data = data_folder(work)
    sizes, modes, tools = args.sizes.split(","), args.modes.split(","), args.tools.split(",")
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if on_gpu() else "float32"
    failed = False
    smollm2 = (smollm2_folders(work) if "smollm2" in sizes or not args.tokenizer
               else {"qlora": Path(args.tokenizer)})
    if args.sharded:  # its own record
        figures = sharded(sizes[0], work, data, smollm2["qlora"], max(args.steps, 3), dtype,
                          args.threads)
        print_table(figures["table"])
        write_record("sharded-full-fine-tuning", figures, question="memory", smoke=args.smoke)
        return figures
    # llama-8b's float32 copy (32 GB) would not fit the 24 GB box
    pairs = [(s, m) for s in sizes for m in modes if not args.table_only
             and not (s == "llama-8b" and m == "lora" and dtype == "float32")]
    for size, mode in pairs:
        suffix = "" if dtype == "float32" else f"-{dtype}"
        folder = smollm2[mode] if size == "smollm2" else write_random(
            CONFIGS[size], smollm2["qlora"], work / f"{size}-{mode}{suffix}",
            4 if mode == "qlora" else None, dtype)
        # no torch-peft QLoRA row: PEFT's 4-bit bases are bitsandbytes'
        for rnd, tool in ((r, t) for r in range(args.rounds) for t in in_round(tools, r)
                          if not (t == "torch-peft" and mode == "qlora")):
            key = f"{size}/{mode}/{tool}/{rnd}"
            if key in results:
                continue
            before = round(os.getloadavg()[0], 2)
            out = work / "runs" / key.replace("/", "-")
            try:
                run = (run_mlx_lm(folder, data, args.steps, out) if tool == "mlx-lm"
                       else run_torch_peft(folder, data, args.steps, out) if tool == "torch-peft"
                       else run_mlxlab(folder, data, args.steps, out, tool == "mlxlab-packed",
                                       128 if tool == "mlxlab-b128" else None))
            except RuntimeError as error:  # the other tools' rows still come out
                print(f"{key} failed: {str(error)[-2000:]}", flush=True)
                failed = True
                continue
            results[key] = {**bench_lora.summary(run, args.skip), "load_1min": before,
                            "dtype": dtype if size != "smollm2" else None}
            store.write_text(json.dumps(results, indent=1))
            print(json.dumps({"stage": key, **results[key]}), flush=True)
    figures = {"results": results, "table": table(results, sizes, modes, tools)}
    print_table(figures["table"])
    if (work / "runs").is_dir():  # the same runs at equal work (one count of trained tokens)
        figures["equal_count"] = equal_count(work / "runs", data, smollm2["qlora"], args.skip)
        print(f"equal count, steps after {args.skip}:")
        print_table(figures["equal_count"])
    write_record("sizes", figures, question="speed-mlx", smoke=args.smoke, raw=str(store))
    if failed:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
