"""`mlxlab export RUN --format hf|mlx-lm|mlx-vlm|peft|gguf|mlx-whisper --out DIR`: a finished run for
transformers, mlx-lm, PEFT, llama.cpp / Ollama or mlx-whisper.

    mlxlab export outputs/finetune_completions/<time> --format mlx-lm --out exported/ft
        [--dtype float16|bfloat16|float32] [--quantize 4|8] [--fuse-lora | --adapters]

Decoders open with transformers.AutoModelForCausalLM.from_pretrained(DIR) and mlx_lm.load(DIR);
BERT classifiers with AutoModelForSequenceClassification. --adapters (mlx-lm) writes the base
model to DIR and the LoRA adapters to DIR/adapters (mlx_lm.generate --adapter-path DIR/adapters).
--quantize writes mlx-lm's quantized layout and reports the perplexity it costs. A
data.vocab_remap run exports its small model with a tokenizer.json remapped to the model's ids
(kept tokens, <|unk|>, BPE intermediates; see docs/guide/training.md, Vocabulary remapping).

    mlxlab export outputs/finetune_chat/<time> --format peft --out exported/adapter

--format peft writes a LoRA / DoRA run's adapters alone (adapter_config.json,
adapter_model.safetensors on the base's Hugging Face names): PeftModel.from_pretrained(base, DIR),
vLLM's LoRA, llama.cpp's convert_lora_to_gguf.py and Ollama's ADAPTER read it.

    mlxlab export outputs/finetune_chat/<time> --format gguf --quant q8_0 --out exported/ft.gguf
    mlxlab export /path/to/float/hf/folder --format gguf --quant f16 --out model.gguf

--format mlx-vlm writes a vision-language run (model=vision_language) as an mlx-vlm folder, its
adapters fused, checked by loading it in mlx-vlm; --format hf writes one (SmolVLM / Idefics3,
Gemma 3) in transformers' layout, checked in transformers.
--format gguf writes one GGUF file (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_m, q5_k_m, q6_k) that
llama.cpp, Ollama and LM Studio load, and an Ollama Modelfile beside it named after it (ft.gguf: ft.Modelfile;
`ollama create NAME -f exported/ft.Modelfile`).

    mlxlab export RUN --format gguf --adapters [--quant q4_0] --out exported/ft.gguf

--adapters (gguf): a LoRA run without re-quantizing what was trained (a LoRA update is about a
4-bit rounding step): ft.base.gguf, the base as pretrained (not fused) at --quant, and
ft.lora.gguf, the adapters as a GGUF LoRA adapter (llama.cpp's convert_lora_to_gguf.py layout,
F32); ft.Modelfile (FROM the base, ADAPTER ./ft.lora.gguf) and ft.llama-server.sh (llama-server
-m ft.base.gguf --lora ft.lora.gguf). A run whose model.pretrained is a GGUF file uses that file
as the base, untouched and named by its absolute path (no --quant). LM Studio takes one file:
llama-export-lora -m ft.base.gguf --lora ft.lora.gguf -o merged.gguf. DoRA and MoE experts have
no GGUF adapter form (export those fused).

    mlxlab export RUN --format gguf --draft DRAFT_RUN [--num-draft-tokens 3] --out exported/ft.gguf

--draft (gguf): the run with a draft model for speculative decoding (e.g. a run of
experiment=draft_model), checked as `mlxlab generate --draft` checks it before a file is written:
ft.gguf, ft.draft.gguf in the same --quant, and ft.llama-server.sh, which runs `llama-server -m
ft.gguf -md ft.draft.gguf --draft-max K`; LM Studio pairs the two files in its Speculative
Decoding panel. Ollama has no draft models: ft.Modelfile serves the run alone.

--quantize-method gptq|awq (with --quantize): mlx_lm.quant's calibrated quantizers, run on the
run's own training rows. --format gguf --quant q4_k_m|q5_k_m|q6_k: llama-quantize's K-quant
mixtures, quantized by llama.cpp's own code (the xllamacpp wheel), weighted by an importance
matrix of the fine-tune on its first --imatrix-rows training rows.

Every export that changes the weights (--quantize, a --dtype that does not hold the run's
values, a GGUF --quant other than f32, the base of --adapters at any type but f32) is read back
from what it wrote (a file that does not read back is refused) and scored on the run's
validation rows and task files (eval.tasks, or --tasks FILES) beside the run and its base: it
prints the share of the fine-tune's gain it kept with the paired verdict (Holm-adjusted over
the measures), records it on the run's MLflow run, and is refused (nothing written) when it is
significantly worse than the run and keeps under 95 % of the gain, unless --accept-loss; with
--draft, the run's file and a draft run's alike, the pair moved into place once both pass.

    mlxlab export path/to/embedder --format sentence-transformers --out exported/embedder
    mlxlab export path/to/bert-embedder --format gguf --quant f16 --out embedder.gguf

A text embedder (a sentence-transformers folder: BERT, RoBERTa / XLM-R or a decoder such as
Qwen3-Embedding) exports as a sentence-transformers folder written from the model (float32
safetensors in Hugging Face names, the tokenizer, Pooling, Dense, Normalize, the prompts), read
back by mlxlab and sentence-transformers and refused unless both give its vectors within 1e-5;
a BERT embedder with one pooling and no Dense as GGUF for llama.cpp's embedding mode: f32 or
f16, refused unless llama.cpp's vectors have cosine >= 1 - 1e-4 with mlxlab's; or quantized
(q8_0, q5_1, q5_0, q4_1, q4_0: gguf-py's types; it has no K-quants), judged by its retention
measured in llama.cpp: the mean and min cosine of its vectors to the source's on probe texts
(refused under a mean of 0.99) and, for an embedder run with a retrieval set (data.eval_dir),
each held-out query's nDCG@10 against the run and its base, as a decoder's; --accept-loss
writes a loss anyway. RUN may be the embedder run itself (its sentence_transformer/ folder).

    mlxlab export outputs/finetune_speech/<time> --format hf --out exported/whisper-ft
    mlxlab export outputs/finetune_speech/<time> --format mlx-whisper [--quantize 4|8] --out DIR

A Whisper (a run of model=whisper, or a Whisper folder) exports as transformers'
WhisperForConditionalGeneration folder (--format hf: LoRA fused, the base's config, generation
config, tokenizer and feature-extractor files), proved in transformers (its logits on a probe
and its greedy transcript of a probe audio are mlxlab's), or as mlx-whisper's folder (--format
mlx-whisper: float16 as mlx-whisper's convert.py writes it, --quantize 2|3|4|5|6|8 as it
quantizes, group size 64),
read back by mlxlab and by mlx-whisper (mlx_whisper.transcribe gives mlxlab's transcript).

--format hf (and peft, and gguf from a run, through its float hf folder) is checked where it is
made: transformers loads what was written and must give the fine-tune's logits on a 2x16-token
probe (max gap 1e-3 of the logits' scale), else the export is refused with the gap; the model
card records the gap, the probe and transformers' version. Without PyTorch a type mlxlab's
tests prove is written unchecked (the card says so) and another refused; --no-check writes it
unchecked.
"""

from __future__ import annotations

import argparse
import json
import sys

from mlxlab.cli.common import RUN_HELP
from mlxlab.cli.export_retention_lines import print_retention

# the formats only a Whisper exports as (export/speech/pipeline.py FORMATS has every Whisper one)
SPEECH_ONLY = ("mlx-whisper",)
TEXT_BITS = (4, 8)  # what --quantize takes for mlx-lm


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mlxlab export", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("run", help=RUN_HELP)
    parser.add_argument("--format", choices=["hf", "mlx-lm", "mlx-vlm", "peft", "gguf",
                                             "sentence-transformers", *SPEECH_ONLY,
                                             "whisper.cpp"],
                        default="hf", dest="fmt")
    parser.add_argument("--out", required=True,
                        help="folder to write (new or empty); --format gguf: the .gguf file")
    parser.add_argument("--quant", default=None,
                        help="--format gguf: f32, f16 (default), bf16, q8_0, q4_0, q4_1, or "
                        "llama.cpp's K-quant mixtures q4_k_m, q5_k_m, q6_k")
    parser.add_argument("--imatrix-rows", type=int, default=None, metavar="N",
                        help="--format gguf K-quants of a run: the importance matrix's training "
                        "rows (default 128; 0: quantize without one)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="weights dtype (default: the pretrained checkpoint's, else float32; "
                        "--format mlx-whisper: float16)")
    parser.add_argument("--quantize", type=int, default=None, metavar="BITS",
                        help="bits, group size 64: --format mlx-lm 4|8 (as mlx_lm.convert -q), "
                        "--format mlx-whisper 2|3|4|5|6|8 (as mlx-whisper's convert.py)")
    parser.add_argument("--quantize-method", choices=["rtn", "gptq", "awq"], default=None,
                        help="--quantize: rtn rounds each weight to its nearest level (mlx_lm."
                        "convert -q; the default); gptq and awq are mlx_lm.quant's calibrated "
                        "quantizers, run on the run's own training rows")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--fuse-lora", dest="lora", action="store_const", const="fuse",
                      help="LoRA runs: merge the adapters into the weights (default)")
    lora.add_argument("--adapters", dest="lora", action="store_const", const="adapters",
                      help="LoRA runs: base model + mlx-lm adapters in OUT/adapters; --format "
                      "gguf: OUT's .base.gguf + .lora.gguf (a GGUF LoRA adapter)")
    parser.add_argument("--draft", default=None, metavar="DRAFT",
                        help="--format gguf: also the draft model DRAFT (a run or a folder) as "
                        "OUT's .draft.gguf, and the llama-server command pairing them")
    parser.add_argument("--num-draft-tokens", type=int, default=3,
                        help="--draft: the tokens the draft proposes a pass (llama-server's "
                        "--draft-max)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--tasks", default=None, metavar="FILES",
                        help="comma-separated tasks the written model is judged on beside the "
                        "run's validation rows: mlxlab's jsonl task files, lm-eval task names "
                        "or task YAMLs (default: the run's eval.tasks)")
    parser.add_argument("--accept-loss", action="store_true",
                        help="write an export that loses a significant part of the fine-tune's "
                        "gain (its retention is still measured and recorded)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="--format hf and gguf from a run: write without loading the folder "
                             "in transformers and comparing its logits with the fine-tune's "
                             "(the model card says unchecked)")
    parser.add_argument("--probe", default=None, metavar="TASK",
                        help="--format whisper.cpp: the transcription task (audio/text rows) "
                        "the file is checked and judged on (default: the run's eval.tasks)")
    parser.set_defaults(lora="fuse")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.fmt == "whisper.cpp" or args.probe is not None:
        from mlxlab.cli.export_whisper_cpp import export_whisper_cpp_verb

        return export_whisper_cpp_verb(args)
    if args.fmt in SPEECH_ONLY or _is_whisper(args):
        return _speech(args)
    if args.quantize is not None and args.quantize not in TEXT_BITS:
        print(f"mlxlab export: error: --quantize {args.quantize}: --format mlx-lm takes 4 or 8 "
              "bits", file=sys.stderr)
        return 2
    if args.fmt == "sentence-transformers" or _is_embedder(args):
        return _embedder(args)
    if args.fmt == "gguf":
        return _gguf(args)
    if args.quant is not None:
        print("mlxlab export: error: --quant is for --format gguf (mlx-lm takes --quantize 4|8)",
              file=sys.stderr)
        return 2
    if args.draft is not None:
        print("mlxlab export: error: --draft pairs GGUF files for llama.cpp and LM Studio: add "
              "--format gguf (mlxlab generate and serve take --draft as it is)", file=sys.stderr)
        return 2
    from mlxlab.export import export_run

    try:
        report = export_run(args.run, args.out, args.fmt, args.dtype, quantize=args.quantize,
                            lora=args.lora, overwrite=args.overwrite, check=args.check,
                            retention=_retention(args),
                            quantize_method=args.quantize_method or "rtn")
    except (FileNotFoundError, ValueError) as err:  # ExportError and ConfigError are ValueErrors
        print(f"mlxlab export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {report['checkpoint']} -> {args.out} ({args.fmt}, {report['dtype']})")
    _print_check(report)
    if report.get("vocab_remap"):
        v = report["vocab_remap"]
        print(f"data.vocab_remap run: tokenizer.json on the model's ids: {v['kept_tokens']} kept "
              f"tokens, {v['unk_token']} = {v['unk_id']}, {v['intermediate_tokens']} BPE "
              "intermediates (read as UNK); see docs/guide/training.md on text that needs dropped "
              "tokens")
    if report.get("adapter_path"):
        print(f"adapters: {report['adapter_path']}")
    if args.quantize:
        b, a = report["before"], report["after"]
        print(f"{args.quantize}-bit quantization on {int(b['tokens'])} validation tokens: "
              f"perplexity {b['perplexity']:.4f} -> {a['perplexity']:.4f} "
              f"({100 * report['perplexity_increase']:+.2f}%), next-token accuracy "
              f"{b['accuracy']:.4f} -> {a['accuracy']:.4f}")
    print_retention(report)
    print(json.dumps({k: report[k] for k in ("format", "dtype", "quantize", "lora")}))
    return 0


def _retention(args: argparse.Namespace):
    from mlxlab.export.retention import Retention

    tasks = [t for t in (args.tasks or "").split(",") if t]
    return Retention(tasks=tasks, accept_loss=args.accept_loss)


def _print_check(report: dict) -> None:
    """The export's check (export/proof.py) in one line."""
    check = report.get("check")
    if check and check["status"] == "checked":
        print(f"checked in {check['checker']}: max |logit gap| {check['max_abs_logit_gap']:.3g} "
              f"<= {check['allowed_gap']:.3g} on a {len(check['probe'])}x{len(check['probe'][0])}"
              "-token probe")
    elif check:
        print(f"unchecked: {check['why']}")


def _print_file_check(report: dict) -> None:
    """The GGUF read back: its logits against the fine-tune's."""
    check = report.get("file_check")
    if not check:
        return
    if check["status"] == "checked":
        print(f"read back from the .gguf: max |logit gap| {check['max_abs_logit_gap']:.3g} "
              f"<= {check['allowed_gap']:.3g}")
    else:
        print(f"read back from the .gguf: max |logit gap| {check['max_abs_logit_gap']:.3g} "
              f"(logit scale {check['logit_scale']:.3g}): the quantization's own error; its "
              "retention below judges it")


def _print_imatrix(report: dict) -> None:
    """The importance matrix a K-quant was weighted by: its rows, and the tensors llama.cpp
    quantized that it weighted (the others named)."""
    im = report.get("imatrix")
    if not im or "weighted" not in im:
        return
    line = (f"importance matrix on {im['rows']} training rows: weighted {im['weighted']} of the "
            f"{im['quantized']} tensors llama.cpp quantized")
    if im["unweighted"]:
        line += f"; unweighted: {', '.join(im['unweighted'])}"
    print(line)


def _gguf(args: argparse.Namespace) -> int:
    """--format gguf: the options the other formats take are refused, not ignored."""
    from mlxlab.export import export_gguf

    ignored = [flag for flag, given in (("--dtype", args.dtype), ("--quantize", args.quantize),
                                        ("--quantize-method", args.quantize_method)) if given]
    if ignored:
        print(f"mlxlab export: error: {', '.join(ignored)} do not apply to --format gguf "
              "(pick the weights' type with --quant)", file=sys.stderr)
        return 2
    if args.imatrix_rows is not None and (args.lora == "adapters" or (args.quant or "f16") not in
                                          ("q4_k_m", "q5_k_m", "q6_k")):
        print("mlxlab export: error: --imatrix-rows weighs llama.cpp's K-quants of a fused run "
              "(--quant q4_k_m, q5_k_m or q6_k, without --adapters); drop it", file=sys.stderr)
        return 2
    if args.lora == "adapters":
        return _gguf_adapters(args)
    try:
        if args.draft is None:
            report = export_gguf(args.run, args.out, args.quant or "f16",
                                 overwrite=args.overwrite, check=args.check,
                                 retention=_retention(args),
                                 imatrix_rows=128 if args.imatrix_rows is None else args.imatrix_rows)
        else:
            from mlxlab.export.speculative import export_gguf_with_draft

            report = export_gguf_with_draft(args.run, args.draft, args.out, args.quant or "f16",
                                            overwrite=args.overwrite, check=args.check,
                                            num_draft_tokens=args.num_draft_tokens,
                                            retention=_retention(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"mlxlab export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {report.get('checkpoint', report.get('source'))} -> {report['gguf']} "
          f"({report['architecture']}, {report['quant']}, {report['bytes'] / 2**20:.1f} MiB)")
    _print_check(report)
    _print_file_check(report)
    _print_imatrix(report)
    print_retention(report)
    style = report["chat_style"] or "none recognised: the GGUF's own template"
    print(f"Ollama: {report['modelfile']} (chat template: {style}); "
          f"ollama create NAME -f {report['modelfile']}")
    if "draft" in report:
        draft = report["draft"]
        print(f"draft: {draft.get('checkpoint', draft.get('source'))} -> {draft['gguf']} "
              f"({draft['bytes'] / 2**20:.1f} MiB); llama.cpp: {report['command']} "
              "(llama-server -m ... -md ...); Ollama has no draft models")
    return 0


def _gguf_adapters(args: argparse.Namespace) -> int:
    """--format gguf --adapters: the base and a GGUF LoRA adapter beside it."""
    from mlxlab.export.gguf_adapters import export_gguf_adapters

    if args.draft is not None or not args.check:
        flag = "--draft" if args.draft is not None else "--no-check"
        print(f"mlxlab export: error: {flag} does not apply to --format gguf --adapters (the "
              "base ships as pretrained and the adapters as trained: nothing goes through "
              "transformers)", file=sys.stderr)
        return 2
    try:
        report = export_gguf_adapters(args.run, args.out, args.quant, overwrite=args.overwrite,
                                      retention=_retention(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"mlxlab export: error: {err}", file=sys.stderr)
        return 2
    base, adapter = report["base"], report["adapter"]
    print_retention(report)  # the pair as read back from its two files
    if base["written"]:
        print(f"exported {report['checkpoint']}: base -> {base['gguf']} ({base['architecture']}, "
              f"{base['quant']}, {base['bytes'] / 2**20:.1f} MiB; pretrained weights, not fused)")
    else:
        print(f"exported {report['checkpoint']}: base = {base['gguf']} (the run's own GGUF, "
              "left as it is and named by its path)")
    print(f"LoRA adapter -> {adapter['gguf']} (rank {adapter['rank']}, alpha {adapter['alpha']:g}"
          f", {adapter['pairs']} weights, F32, {adapter['bytes'] / 2**10:.1f} KiB)")
    style = report["chat_style"] or "none recognised: the GGUF's own template"
    print(f"Ollama: {report['modelfile']} (FROM the base, ADAPTER the adapter; chat template: "
          f"{style}); ollama create NAME -f {report['modelfile']}")
    print(f"llama.cpp: {report['command']} (llama-server -m BASE --lora ADAPTER)")
    return 0


def _is_embedder(args: argparse.Namespace) -> bool:
    """Whether RUN is a sentence-transformers folder or an embedder run (an embedder, whatever
    --format says)."""
    from pathlib import Path

    from mlxlab.export.embedder import is_embedder_run
    from mlxlab.models.embedders.sentence_folder import is_sentence_folder

    path = Path(args.run).expanduser()
    return is_sentence_folder(path) or is_embedder_run(path)


def _embedder(args: argparse.Namespace) -> int:
    """A text embedder: --format sentence-transformers, or gguf (a BERT embedder); the options
    of the other exports are refused, not ignored."""
    given = [flag for flag, value in (
        ("--dtype", args.dtype), ("--quantize", args.quantize),
        ("--quantize-method", args.quantize_method), ("--imatrix-rows", args.imatrix_rows),
        ("--draft", args.draft), ("--tasks", args.tasks),
        ("--adapters", args.lora == "adapters")) if value]
    if args.fmt == "sentence-transformers":
        given = [*(["--quant"] if args.quant is not None else []), *given,
                 *(["--accept-loss"] if args.accept_loss else [])]
    if given or args.fmt not in ("sentence-transformers", "gguf"):
        what = (f"--format {args.fmt} does not" if not given else
                f"{given[0]} does not" if len(given) == 1 else f"{', '.join(given)} do not")
        what += " apply"
        print(f"mlxlab export: error: {what} to a text embedder: it exports as --format "
              "sentence-transformers, or --format gguf --quant f32|f16|q8_0|q5_1|q5_0|q4_1|q4_0 "
              "[--accept-loss] (a BERT embedder)", file=sys.stderr)
        return 2
    try:
        if args.fmt == "gguf":
            from mlxlab.export.gguf_embedder import export_embedder_gguf

            report = export_embedder_gguf(args.run, args.out, args.quant or "f16",
                                          overwrite=args.overwrite, check=args.check,
                                          accept_loss=args.accept_loss)
        else:
            from mlxlab.export.embedder import export_embedder

            report = export_embedder(args.run, args.out, overwrite=args.overwrite,
                                     check=args.check)
    except (FileNotFoundError, ValueError) as err:
        print(f"mlxlab export: error: {err}", file=sys.stderr)
        return 2
    check = report["check"]
    if args.fmt == "gguf":
        print(f"exported {report['source']} -> {report['gguf']} (bert, {report['quant']}, "
              f"{report['pooling']} pooling, {report['bytes'] / 2**20:.1f} MiB)")
        if check["status"] != "measured":
            print(f"checked in {check['checker']}: min cosine {check['min_cosine']:.7f} over "
                  f"{check['texts']} texts" if check["status"] == "checked"
                  else f"unchecked: {check['why']}")
        print_retention(report)
        return 0
    print(f"exported {report['source']} -> {args.out} (sentence-transformers, float32, "
          f"{report['dimension']}-dim vectors)")
    gaps = ", ".join(f"{who} {gap:.2g}" for who, gap in check["max_abs_gap"].items())
    print(f"read back: max |vector gap| {gaps} <= {check['allowed_gap']:g} on {check['texts']} "
          "texts" + (f" and prompts {', '.join(check['prompts'])}" if check["prompts"] else ""))
    return 0


def _is_whisper(args: argparse.Namespace) -> bool:
    """Whether RUN is a Whisper folder or a speech run (model=whisper), whatever --format says."""
    from mlxlab.export.speech.source import is_whisper_source

    return is_whisper_source(args.run)


def _speech(args: argparse.Namespace) -> int:
    """A Whisper: --format hf or mlx-whisper (export/speech/); the options of the text exports
    are refused, not ignored."""
    from mlxlab.export.speech import FORMATS

    given = [flag for flag, value in (
        ("--quant", args.quant), ("--quantize-method", args.quantize_method),
        ("--imatrix-rows", args.imatrix_rows), ("--draft", args.draft), ("--tasks", args.tasks),
        ("--accept-loss", args.accept_loss and not (args.fmt == "mlx-whisper" and args.quantize)),
        ("--adapters", args.lora == "adapters")) if value]
    if args.fmt in SPEECH_ONLY and not _is_whisper(args):
        from pathlib import Path

        what = ("does not exist" if not Path(args.run).expanduser().exists() else
                "is not a Whisper model (a run of model=whisper or a Whisper folder)")
        print(f"mlxlab export: error: {args.run} {what}: --format {args.fmt} writes Whisper "
              "models only", file=sys.stderr)
        return 2
    if args.fmt not in FORMATS:
        print(f"mlxlab export: error: --format {args.fmt} does not take a Whisper model: a "
              f"Whisper exports as --format {' | '.join(FORMATS)} | whisper.cpp",
              file=sys.stderr)
        return 2
    if given:
        print(f"mlxlab export: error: {', '.join(given)} "
              f"{'does' if len(given) == 1 else 'do'} not apply to a Whisper export (--format "
              f"{' | '.join(FORMATS)}, --dtype, --quantize [--accept-loss] with mlx-whisper, "
              "--no-check)",
              file=sys.stderr)
        return 2
    return _speech_export(args)


def _speech_export(args: argparse.Namespace) -> int:
    from mlxlab.export.speech import export_whisper

    try:
        report = export_whisper(args.run, args.out, args.fmt, args.dtype, quantize=args.quantize,
                                overwrite=args.overwrite, check=args.check,
                                accept_loss=args.accept_loss)
    except (FileNotFoundError, ValueError) as err:
        print(f"mlxlab export: error: {err}", file=sys.stderr)
        return 2
    bits = f", {report['quantize']}-bit" if report["quantize"] else ""
    print(f"exported {report['checkpoint'] or report['source']} -> {args.out} ({args.fmt}, "
          f"{report['dtype']}{bits}{', LoRA fused' if report['lora'] else ''})")
    if report.get("read_back"):
        gap = report["read_back"]
        print(f"read back by mlxlab: max |logit gap| {gap['max_abs_logit_gap']:.3g} <= "
              f"{gap['allowed_gap']:.3g}")
    check = report["check"]
    if check["status"] == "checked":
        print(f"checked in {check['checker']}: max |logit gap| {check['max_abs_logit_gap']:.3g} "
              f"<= {check['allowed_gap']:.3g}; probe audio transcribed as mlxlab does: "
              f"{check['transcript']['text']!r}")
    elif check["status"] == "read back":
        print(f"read back by {check['checker']}: probe audio transcribed as "
              f"{check['transcript']['text']!r}")
    else:
        print(f"unchecked: {check['why']}")
    if report.get("retention"):
        print(f"retention: {report['retention']['status']} ({report['retention']['why']})")
    return 0
