"""`export_run`: a finished run's model written for another tool, one pipeline read top to bottom.

    (1) the request (request.py), checked against the loaded run before anything is written
        (validate.py): one ExportError line for what the run has no such export of;
    (2) the writer of its format (writers.py: a Hugging Face or mlx-lm folder, a PEFT adapter
        folder; vision.py: a vision-language folder), into a staged folder beside --out;
    (3) read-back and judgement of what was written (judgement.py): the transformers check,
        the retention of the fine-tune's gain; a refusal leaves nothing;
    (4) the commit: the staged folder renamed into --out (runtime/files/staging.py), last.

A GGUF goes through (1)-(4) as its float folder, then its own writer and judgement
(gguf_run.py); so does a GGUF base with its LoRA adapter (gguf_adapters.py).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from mlxlab.export.judgement import judge_folder, reference_for
from mlxlab.export.model_card import model_card, unfinished_card
from mlxlab.export.pin import pinned_checkpoint, unfinished_note
from mlxlab.export.remapped import add_unk_rows, write_remapped_tokenizer
from mlxlab.export.request import (
    ExportOptions,
    ExportRequest,
    LoadedRun,
    Quantization,
    known_options,
)
from mlxlab.export.retention import Reference, Retention, record
from mlxlab.export.validate import validated
from mlxlab.export.vision import export_vision
from mlxlab.export.writers import (
    Sources,
    shape_weights,
    write_folder,
    write_peft_folder,
    write_report,
)
from mlxlab.models.adapters.lora import has_adapters
from mlxlab.models.decoders.remapped import RemappedLM
from mlxlab.models.vision.vision_language import VisionLanguageModel
from mlxlab.runs import load_run_model, require_run_tokenizer
from mlxlab.runtime.files.staging import staged_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exported:
    """What an export wrote (its report, also out/export_report.json) and the reference it was
    judged against (None where nothing was judged): a GGUF written next is judged against it."""

    report: dict
    reference: Reference | None


def export_run(run: str | Path, out: str | Path, fmt: str = "hf", dtype: str | None = None,
               **options: Unpack[ExportOptions]) -> dict:
    """Write the run's model (best checkpoint, else newest) to `out`; returns the report that is
    also saved as out/export_report.json. The public call: it and its keywords (ExportOptions) become
    one ExportRequest (request.py says what each is) for `run_export`."""
    given = known_options(options, ExportOptions, "export_run")
    request = ExportRequest(
        Path(run).expanduser(), Path(out).expanduser(), fmt, dtype,
        Quantization.of(given.get("quantize"), given.get("quantize_method", "rtn")),
        given.get("lora", "fuse"), given.get("overwrite", False), given.get("check", True),
        given.get("retention") or Retention(), given.get("refuse"))
    return run_export(request).report


def run_export(request: ExportRequest) -> Exported:
    """The pipeline (module docstring), once per export."""
    request.retention.check()
    if not request.run.exists():
        raise FileNotFoundError(f"{request.run} does not exist: pass a run directory "
                                "(outputs/<task>/<time>)")
    tokenizer_path = require_run_tokenizer(request.run, "finished")
    # a run still training deletes old checkpoints: the chosen one is pinned while it is read
    with pinned_checkpoint(request.run) as (chosen, copy):
        loaded = _load(request.run, chosen, copy, tokenizer_path)
        request, not_checked = validated(request, loaded)  # (1)
        if loaded.note is not None:
            log.warning("mlxlab export: %s", loaded.note)
        with tempfile.TemporaryDirectory(prefix="mlxlab-export-") as staging:
            sources, report, card = _sources(request, loaded, Path(staging), not_checked)
            reference = _write_judge_commit(request, loaded.model, sources, report, card)
    if report.get("retention"):
        why = record(loaded.state, request.out.name, report["retention"])
        report["retention"]["recorded"] = why or "on the run's MLflow run"
    return Exported(report, reference)


def _load(run: Path, chosen: Path, copy: Path, tokenizer_path: Path) -> LoadedRun:
    """The pinned checkpoint's model and state; a vocab-remapped run as its small model."""
    model, state = load_run_model(copy)
    run_folder = chosen.parent.parent if chosen.parent.name == "checkpoints" else run
    note = unfinished_note(run_folder, state.step, state.config)
    remapped = None
    if isinstance(model, RemappedLM):  # the small model + a tokenizer on its ids (remapped.py)
        remapped, model = model, model.inner
    return LoadedRun(model, state, chosen, note, tokenizer_path, remapped)


def _sources(request: ExportRequest, loaded: LoadedRun, staging: Path,
             not_checked: dict | None) -> tuple[Sources, dict, str | None]:
    """Where the written files come from (a vocab-remapped run: its tokenizer remapped into
    `staging`, its model given the remapped tokenizer's extra rows), the report begun, and the
    model card (the run's task scores; None when it scored none)."""
    state, tokenizer_path = loaded.state, loaded.tokenizer_path
    report: dict = {"run": str(request.run), "checkpoint": str(loaded.checkpoint),
                    "step": state.step, "format": request.fmt, "dtype": request.dtype,
                    "quantize": request.bits, "unfinished": loaded.note}
    side_files = tokenizer_path.parent
    if loaded.remapped is not None:
        tokenizer_path, report["vocab_remap"] = write_remapped_tokenizer(
            tokenizer_path, state.data["vocab_map"]["keep"], staging)
        side_files = staging  # the run's side files hold the full vocabulary's ids
        add_unk_rows(loaded.model, report["vocab_remap"]["intermediate_tokens"])
    card = model_card(tokenizer_path.parent, request.out.name, state.config, state.run_id,
                      state.step)
    if loaded.note is not None:
        card = unfinished_card(card, request.out.name, loaded.note)
    if not_checked is not None:
        report["check"] = not_checked
    return Sources(state, tokenizer_path, side_files), report, card


def _write_judge_commit(request: ExportRequest, model, sources: Sources, report: dict,
                        card: str | None) -> Reference | None:
    """(2) write, (3) judge, (4) commit, for the model's kind of folder."""
    out = request.out
    if isinstance(model, VisionLanguageModel):  # written and checked in mlx-vlm / transformers
        report["lora"] = "fuse" if has_adapters(model) else None
        with staged_folder(out) as tmp:
            report.update(export_vision(model, out, request.dtype, tmp, request.fmt))
            write_report(tmp, out, report, card)
        return None
    if request.fmt == "peft":  # written and checked by PEFT in transformers
        write_peft_folder(model, sources.state, out, request.dtype, report, card)
        return None
    reference = reference_for(request, model, sources.state, sources.tokenizer_path)
    shaped = shape_weights(request, model, sources, report)
    with staged_folder(out) as tmp:
        write_folder(request, model, sources, shaped, tmp, report)  # (2)
        judge_folder(request, model, reference, tmp, report)  # (3): a refusal moves nothing
        write_report(tmp, out, report, card)
    return reference  # (4): staged_folder moved it into --out
