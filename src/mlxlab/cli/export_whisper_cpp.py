"""`mlxlab export RUN --format whisper.cpp --out FILE.bin [--quant f16|f32|q8_0|q5_0|q5_1|q4_0]
[--probe TASK.jsonl] [--accept-loss] [--overwrite]`: a Whisper run as whisper.cpp's model file
(export/speech/whisper_cpp.py), the options of the other formats refused, not ignored."""

from __future__ import annotations

import argparse
import sys


def export_whisper_cpp_verb(args: argparse.Namespace) -> int:
    """The verb's whisper.cpp branch: one line and exit 2 for bad input or a refusal."""
    given = [flag for flag, value in (
        ("--dtype", args.dtype), ("--quantize", args.quantize),
        ("--quantize-method", args.quantize_method), ("--imatrix-rows", args.imatrix_rows),
        ("--draft", args.draft), ("--tasks", args.tasks),
        ("--adapters", args.lora == "adapters"), ("--no-check", not args.check)) if value]
    if args.fmt != "whisper.cpp":
        given.insert(0, "--probe")
    if given:
        what = f"{given[0]} does not" if len(given) == 1 else f"{', '.join(given)} do not"
        print(f"mlxlab export: error: {what} apply to --format whisper.cpp: it takes --quant "
              "f16|f32|q8_0|q5_0|q5_1|q4_0, --probe TASK.jsonl, --accept-loss and --overwrite"
              if args.fmt == "whisper.cpp" else
              "mlxlab export: error: --probe is for --format whisper.cpp (the utterances its "
              "file is checked on); the other formats take --tasks", file=sys.stderr)
        return 2
    from mlxlab.export.speech.whisper_cpp import export_whisper_cpp

    try:
        report = export_whisper_cpp(args.run, args.out, args.quant or "f16",
                                    overwrite=args.overwrite, probe=args.probe,
                                    accept_loss=args.accept_loss)
    except (FileNotFoundError, ValueError) as err:  # ExportError and ConfigError too
        print(f"mlxlab export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {report['source']} -> {report['out']} (whisper.cpp, {report['quant']}, "
          f"{report['bytes'] / 2**20:.1f} MiB)")
    check = report.get("check")
    if check:
        print(f"checked in {check['checker']}: the run's tokens through every decisive step "
              f"({check['decisive_tokens']} of {check['tokens']}: a lead of {check['margin']} "
              f"logits or more) on {check['utterances']} probe utterances ({check['probe']}); "
              f"{check['equal_transcripts']} of {check['utterances']} transcripts equal in full")
    if report.get("retention"):
        from mlxlab.cli.export_retention_lines import print_retention

        entry = report["retention"]
        entry["checker"] = f"whisper.cpp on {entry['utterances']} utterances ({report['probe']})"
        print_retention(report)
    print(f"whisper.cpp: whisper-cli -m {report['out']} -f AUDIO.wav")
    return 0
