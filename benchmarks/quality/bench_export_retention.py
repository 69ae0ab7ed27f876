"""What each export keeps of a fine-tune's gain: the real SmolLM2-135M-Instruct (the float folder
its Q4_1 GGUF holds, every weight on Q4_1's grid) LoRA fine-tuned on a task its base fails
(real_model_finetune.py's dates), then written in every format and quant mlxlab offers and
judged as `mlxlab export` judges it: the written file read back, scored on the held-out task
(exact match, paired per prompt) and the validation rows beside the run and its base; each GGUF
also run in llama.cpp itself (xllamacpp, greedy, the model's chat template).

    python benchmarks/quality/bench_export_retention.py [--work DIR] [--steps 40] [--batch 4]
        [--lr 1e-3] [--heldout 100] [--llama-cpp 50] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
from benchmarks.harness import add_smoke, load, print_table, write_jsonl, write_record  # noqa: E402
from benchmarks.quality.real_model_finetune import (  # noqa: E402
    date_rows,
    float_folder,
    llama_cpp_accuracy,
    smoke_model,
    train_mlxlab,
)

# (label, format, options): every weight-changing export mlxlab writes
EXPORTS = [
    ("gguf q8_0", "gguf", {"quant": "q8_0"}),
    ("gguf q4_1", "gguf", {"quant": "q4_1"}),
    ("gguf q4_0", "gguf", {"quant": "q4_0"}),
    ("gguf q6_k", "gguf", {"quant": "q6_k"}),
    ("gguf q5_k_m", "gguf", {"quant": "q5_k_m"}),
    ("gguf q4_k_m", "gguf", {"quant": "q4_k_m"}),
    ("gguf q4_k_m, no imatrix", "gguf", {"quant": "q4_k_m", "imatrix_rows": 0}),
    ("mlx-lm 4-bit, fused", "mlx-lm", {"quantize": 4}),
    ("mlx-lm 4-bit base + adapters", "mlx-lm", {"quantize": 4, "lora": "adapters"}),
    ("mlx-lm 8-bit, fused", "mlx-lm", {"quantize": 8}),
    ("mlx-lm bfloat16, fused", "mlx-lm", {"dtype": "bfloat16"}),
    ("gguf q4_k_m + LoRA adapter", "gguf", {"quant": "q4_k_m", "lora": "adapters"}),
    # a second run: QLoRA on the base quantized at load, LoRA trained through the export's grid
    ("mlx-lm 4-bit, QAT run, fused", "mlx-lm", {"run": "qat"}),
]
QAT_OVERRIDES = ["model.quantize=4", "model.lora.qat_bits=4", "model.lora.qat_group_size=64"]


def export_one(run: Path, fmt: str, options: dict, out: Path, retention) -> dict:
    from mlxlab.export import export_gguf, export_run

    if options.get("lora") == "adapters" and fmt == "gguf":
        return adapter_pair(run, options["quant"], out.with_suffix(".gguf"))
    if fmt == "gguf":
        return export_gguf(run, out.with_suffix(".gguf"), options["quant"], overwrite=True,
                           retention=retention, imatrix_rows=options.get("imatrix_rows", 128))
    return export_run(run, out, "mlx-lm", options.get("dtype", "float32"),
                      options.get("quantize"), options.get("lora", "fuse"), overwrite=True,
                      retention=retention)


def adapter_pair(run: Path, quant: str, out: Path) -> dict:
    """The base at `quant` and the LoRA as a GGUF adapter: no file holds the fine-tune for
    mlxlab's reader, so it is scored in llama.cpp alone (main)."""
    from mlxlab.export.gguf_adapters import export_gguf_adapters

    return export_gguf_adapters(run, out, quant, overwrite=True)


def measure(entry: dict, name: str) -> dict:
    return next(m for m in entry["measures"] if m["measure"] == name)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=None)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--llama-cpp", type=int, default=50, help="held-out prompts run in llama.cpp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exports", default=None, help="only these rows (labels, ';'-separated)")
    add_smoke(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.heldout, args.llama_cpp, args.steps, args.batch = 8, 4, 2, 2, 2
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="export_retention_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from mlxlab.export.retention import Retention
    from mlxlab.models.sources import model_folder

    if args.smoke:
        folder = smoke_model(work)
    else:
        from real_models import packaged_model

        folder = float_folder(model_folder(packaged_model()), "float32", work / "float32")
    train, val, heldout = date_rows(args.train, 4 if args.smoke else 32, args.heldout, args.seed)
    data = work / "data"
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "valid.jsonl", val)
    task = write_jsonl(work / "dates.jsonl", heldout)
    run = work / "runs" / "ft"
    if not (run / "checkpoints").is_dir():
        train_mlxlab(folder, data, args, run)
    wanted = [e for e in EXPORTS if args.exports is None or e[0] in args.exports.split(";")]
    qat_run = work / "runs" / "ft-qat"
    if any(o.get("run") == "qat" for _, _, o in wanted) and not (qat_run / "checkpoints").is_dir():
        train_qat(folder, data, args, qat_run)
    result: dict = {"model": str(folder), "settings": vars(args), "load_start": load(),
                    "exports": {}}
    reference = None
    for label, fmt, options in wanted:  # the GGUFs first: their reference holds the probe
        request = Retention(tasks=[str(task)], accept_loss=True, later=fmt == "gguf",
                            reference=reference if "run" not in options else None)
        source = qat_run if options.get("run") == "qat" else run
        report = export_one(source, fmt, options, work / "export" / label.replace(" ", "_")
                            .replace(",", "").replace("+", "plus"), request)
        if "run" not in options:
            reference = request.reference or reference
        if "retention" not in report:  # the adapter pair: llama.cpp's score only
            cpp = llama_cpp_accuracy(Path(report["base"]["gguf"]), folder,
                                     heldout[:args.llama_cpp],
                                     lora=Path(report["adapter"]["gguf"]))
            result["exports"][label] = {"format": fmt, **options, "llama.cpp": {
                k: v for k, v in cpp.items() if k != "outputs"}}
            print(json.dumps({label: result["exports"][label]}), flush=True)
            continue
        entry = report["retention"]
        row = {"format": fmt, **options, "bytes": report.get("bytes"),
               "verdict": entry["verdict"], "measures": entry["measures"],
               "file_check": report.get("file_check")}
        if fmt == "gguf":
            row["llama.cpp"] = {k: v for k, v in llama_cpp_accuracy(
                Path(report["gguf"]), folder, heldout[:args.llama_cpp]).items() if k != "outputs"}
        result["exports"][label] = row
        print(json.dumps({label: {"verdict": row["verdict"], **{
            m["measure"]: m["line"] for m in entry["measures"]}}}), flush=True)
    result["load_end"] = load()
    result["table"] = table(result)
    (work / "results.json").write_text(json.dumps(result, indent=1, default=str))
    write_record("export-retention", result, question="quality", smoke=args.smoke,
                 raw=str(work / "results.json"))
    print_table(result["table"])
    return result


def train_qat(folder: Path, data: Path, args, out: Path) -> dict:
    """The same fine-tune as QLoRA on the base quantized at load (4-bit, groups of 64), its
    LoRA trained through the grid the fused export quantizes to."""
    from benchmarks.quality.real_model_finetune import env
    from benchmarks.speed import bench_lora

    return bench_lora.run_mlxlab(out, [
        "experiment=finetune_chat",
        *bench_lora.lora_overrides(folder, data, args.steps, batch=args.batch, lr=args.lr),
        f"trainer.eval_every_steps={args.steps}", "trainer.grad_clip=0",
        "trainer.schedule.name=constant", f"seed={args.seed}", *QAT_OVERRIDES], env())


def table(r: dict) -> dict:
    """A row an export: held-out exact match (the run's, the base's, the file's), the share of
    the gain kept with its interval, McNemar's p against the run, llama.cpp's exact match."""
    rows = []
    for label, row in r["exports"].items():
        cpp = row.get("llama.cpp")
        if "measures" not in row:
            rows.append([label, "-", "-", "-", "-", "-", "-",
                         f"{cpp['accuracy']:.2f} ({cpp['n']})"])
            continue
        task = next(m for m in row["measures"] if m["measure"].endswith("/exact_match"))
        kept = "-" if task["kept"] is None else (
            f"{100 * task['kept']:.0f} % [{100 * task['kept_low']:.0f}, "
            f"{100 * task['kept_high']:.0f}]")
        rows.append([label, f"{task['base']:.2f}", f"{task['run']:.2f}", f"{task['export']:.2f}",
                     kept, f"{task['p']:.2g}", row["verdict"],
                     f"{cpp['accuracy']:.2f} ({cpp['n']})" if cpp else "-"])
    return {"head": ["export", "base", "run", "file", "gain kept [95 %]", "p vs run",
                       "verdict", "llama.cpp"], "rows": rows}


if __name__ == "__main__":
    main()
