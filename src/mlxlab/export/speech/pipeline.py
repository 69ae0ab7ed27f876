"""`export_whisper`: a Whisper run (or folder) written for another tool, one pipeline.

    (1) the request checked before anything is loaded or written (format, --quantize bits,
        --dtype, --out), then against the loaded model (its vocabulary and shape for the
        format): one ExportError line;
    (2) the model (source.py: LoRA fused, float32) rounded to the export's dtype, its probe made
        (probe.py), and the format's writer run into a staged folder beside --out;
    (3) the format's proof on what was written (the tool loads it and computes mlxlab's logits
        and transcript) and, where the weights changed (--quantize), the judgement
        (judgement.py); a refusal leaves nothing;
    (4) export_report.json and the model card (README.md: a run's task scores, its word error
        rates among them, and how the export was checked) written, the staged folder renamed
        into --out.

FORMATS maps each format to its writer-and-proof: `hf` (hf_folder.py, hf_proof.py),
`mlx-whisper` (mlx_whisper_folder.py, mlx_whisper_proof.py); another format plugs in as one
more entry (and its name in BITS_OF where it quantizes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxlab.export.hf import DTYPES, ExportError
from mlxlab.export.proof import checker_version, unchecked
from mlxlab.export.speech.hf_folder import write_hf_folder, write_processor_files
from mlxlab.export.speech.hf_proof import prove_hf_folder
from mlxlab.export.speech.judgement import Written, judge_written, needs_judgement
from mlxlab.export.speech.mlx_whisper_folder import (
    BITS,
    check_mlx_whisper,
    write_mlx_whisper_folder,
)
from mlxlab.export.speech.mlx_whisper_proof import (
    mlx_whisper_version,
    prove_in_mlx_whisper,
    prove_in_mlxlab,
    transcriber,
)
from mlxlab.export.speech.probe import Probe, make_probe
from mlxlab.export.speech.source import WhisperSource, whisper_source
from mlxlab.runtime.files.staging import staged_folder


@dataclass(frozen=True)
class SpeechRequest:
    """What was asked: the format, --out, the weights' dtype, --quantize bits (None: float),
    --overwrite, and whether the tools are asked (--no-check: False)."""

    fmt: str
    out: Path
    dtype: str = "float32"
    bits: int | None = None
    overwrite: bool = False
    check: bool = True
    accept_loss: bool = False


Writer = Callable[[WhisperSource, Probe, Path, SpeechRequest], dict]


def _hf(source: WhisperSource, probe: Probe, tmp: Path, request: SpeechRequest) -> dict:
    """transformers' folder, proved in transformers (where it loads models: PyTorch)."""
    write_hf_folder(source, tmp, request.dtype)
    name = checker_version()
    if not request.check:
        return {"check": unchecked("--no-check")}
    if name is None:
        return {"check": unchecked("PyTorch is not installed: transformers loads no model")}
    return {"check": prove_hf_folder(source.model, probe, tmp, name)}


def _mlx_whisper(source: WhisperSource, probe: Probe, tmp: Path, request: SpeechRequest) -> dict:
    """mlx-whisper's folder (and the tokenizer, feature-extractor and generation files mlxlab
    transcribes it with), read back by mlxlab (float) and by mlx-whisper where installed."""
    check_mlx_whisper(source.model, source.tokenizer)
    model = source.model
    write_processor_files(source.base_folder, tmp, source.tokenizer,
                          int(model.config["num_mel_bins"]))
    _generation_file(source, tmp)
    write_mlx_whisper_folder(model, source.base_folder, tmp, request.dtype, request.bits)
    report = {"read_back": None if request.bits else prove_in_mlxlab(model, probe, tmp)}
    if not request.check:
        report["check"] = unchecked("--no-check")
    elif mlx_whisper_version() is None:
        report["check"] = unchecked("mlx-whisper is not installed (pip install mlx-whisper)")
    else:
        report["check"] = prove_in_mlx_whisper(model, source.tokenizer, probe, tmp,
                                               quantized=request.bits)
    return report


def _generation_file(source: WhisperSource, tmp: Path) -> None:
    from mlxlab.export.speech.hf_folder import generation_config

    path = source.base_folder / "generation_config.json"
    config = (json.loads(path.read_text()) if path.is_file()
              else generation_config(source.model, source.tokenizer))
    (tmp / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


FORMATS: dict[str, Writer] = {"hf": _hf, "mlx-whisper": _mlx_whisper}
# the weights' dtype without --dtype: mlx-whisper's convert.py writes float16, which
# mlx_whisper.transcribe's defaults (fp16=True) require; transformers' folder float32
DEFAULT_DTYPE = {"hf": "float32", "mlx-whisper": "float16"}
# the formats that quantize, and the bits each takes
BITS_OF: dict[str, tuple[int, ...]] = {"mlx-whisper": BITS}


def check_request(request: SpeechRequest) -> None:
    """(1), before anything is loaded: one ExportError line."""
    if request.fmt not in FORMATS:
        raise ExportError(f"--format {request.fmt} does not take a Whisper model: it exports "
                          f"as --format {' | '.join(FORMATS)}")
    if request.bits is not None:
        takes = BITS_OF.get(request.fmt)
        if takes is None:
            raise ExportError(f"--quantize does not apply to --format {request.fmt} (float "
                              f"weights); --format {' | '.join(BITS_OF)} quantizes")
        if request.bits not in takes:
            raise ExportError(f"--quantize {request.bits}: --format {request.fmt} takes "
                              f"{', '.join(map(str, takes))} bits")
    if request.dtype not in DTYPES:
        raise ExportError(f"--dtype {request.dtype}: one of {', '.join(DTYPES)}")
    out = request.out
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: --format {request.fmt} writes a folder")
    if out.exists() and any(out.iterdir()) and not request.overwrite:
        raise ExportError(f"{out} exists and is not empty: pick a new --out or pass --overwrite")


def export_whisper(source: str | Path, out: str | Path, fmt: str = "hf", dtype: str | None = None,
                   quantize: int | None = None, overwrite: bool = False,
                   check: bool = True, accept_loss: bool = False) -> dict:
    """Write the Whisper `source` names (a speech run: its best checkpoint; or a Whisper
    folder) to `out` in `fmt`; returns the report also saved as out/export_report.json."""
    request = SpeechRequest(fmt, Path(out).expanduser(), dtype or DEFAULT_DTYPE.get(fmt, "float32"),
                            quantize, overwrite, check, accept_loss)
    check_request(request)
    with whisper_source(source) as loaded:
        return _export(loaded, request)


def _export(source: WhisperSource, request: SpeechRequest) -> dict:
    """(2)-(4) for the loaded model."""
    import mlx.core as mx

    model = source.model
    model.set_dtype(DTYPES[request.dtype])  # the values written, computed in float32 below
    model.set_dtype(mx.float32)
    probe = make_probe(model, source.tokenizer)
    report: dict = {"source": str(source.path), "checkpoint": str(source.checkpoint or ""),
                    "step": source.step, "format": request.fmt, "dtype": request.dtype,
                    "quantize": request.bits, "lora": "fuse" if source.lora else None,
                    "unfinished": source.note,
                    "probe": {"transcript": probe.text, "tokens": len(probe.ids)}}
    with staged_folder(request.out) as tmp:
        report.update(FORMATS[request.fmt](source, probe, tmp, request))
        if needs_judgement(request.bits):
            tool = (transcriber(tmp, probe.language, None) if request.fmt == "mlx-whisper"
                    and request.check and mlx_whisper_version() else None)
            report["retention"] = judge_written(
                source, Written(tmp, request.fmt, request.bits, tool), request.accept_loss)
        _write_card(source, request, report, tmp)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# the model card's library_name per format (the hub's "use this model" snippet)
LIBRARY = {"hf": "transformers", "mlx-whisper": "mlx"}


def _write_card(source: WhisperSource, request: SpeechRequest, report: dict, tmp: Path) -> None:
    """README.md: the run's scores (export/model_card.py; a folder's card has none), an
    unfinished run's warning, the check in words and the probe audio's transcript."""
    from mlxlab.export.model_card import bare_card, check_section, model_card, unfinished_card

    name, library = request.out.name, LIBRARY.get(request.fmt, "transformers")
    card = (model_card(source.path, name, source.config, source.run_id, source.step)
            if source.checkpoint is not None else None)
    if card is not None:
        card = card.replace("library_name: transformers", f"library_name: {library}", 1)
    if source.note is not None:
        card = unfinished_card(card, name, source.note)
    card = (card or bare_card(name, library)) + check_section(report["check"], request.dtype)
    transcript = (report["check"].get("transcript") or {}).get("text")
    if transcript is not None:
        card += (f"\nThe probe audio (3 s of synthesized tones, the same for every export) "
                 f"transcribed by {report['check']['checker']} from this export: "
                 f"{transcript!r}.\n")
    (tmp / "README.md").write_text(card)
    report["model_card"] = str(request.out / "README.md")
