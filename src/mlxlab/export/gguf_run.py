"""`export_gguf`: a run (or a float model folder) as one GGUF file for llama.cpp, Ollama and LM
Studio, in the export pipeline's order (pipeline.py):

    (1) the request checked (--out, --quant, --tasks, --imatrix-rows) before anything is written;
    (2) a run's float Hugging Face folder (export_run's pipeline, checked in transformers, the
        run and its base scored: the reference), then the GGUF writer (gguf.py) from it;
    (3) the file read back (gguf_readback.py) and judged against the reference (judgement.py):
        the probe's logits (held to the check at f32) and its retention of the fine-tune's gain;
    (4) the commit: the .gguf renamed into place, then its Ollama Modelfile beside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Unpack

from mlxlab.export.gguf import GGUFExportError, write_gguf
from mlxlab.export.gguf_kquants import MIXTURES
from mlxlab.export.hf import ExportError
from mlxlab.export.judgement import judge_gguf
from mlxlab.export.ollama import modelfile_path, write_modelfile
from mlxlab.export.pipeline import Exported, run_export
from mlxlab.export.request import ExportRequest, GGUFOptions, known_options
from mlxlab.export.retention import Retention, read_folder, record
from mlxlab.models.encoders.bert import BertClassifier


def export_gguf(source: str | Path, out: str | Path, quant: str = "f16",
                **options: Unpack[GGUFOptions]) -> dict:
    """A finished decoder run (LoRA fused, best checkpoint) or a float pretrained folder as one
    GGUF file, with an Ollama Modelfile beside it named after it (module docstring). The run's
    model card (task scores, the check) becomes the file's description. A K-quant of a run is
    weighted by an importance matrix of the fine-tune on its first `imatrix_rows` training rows
    (0: none; imatrix.py)."""
    given = known_options(options, GGUFOptions, "export_gguf")
    overwrite, check = given.get("overwrite", False), given.get("check", True)
    retention, imatrix_rows = given.get("retention") or Retention(), given.get("imatrix_rows", 128)
    source, out = Path(source).expanduser(), Path(out).expanduser()
    _check_request(source, out, (quant, imatrix_rows), overwrite, retention)  # (1)
    staging = Path(tempfile.mkdtemp(prefix="mlxlab-gguf-"))
    pending = out.with_name(f".{out.stem}.pending-{os.getpid()}.gguf")
    try:
        folder, exported = _float_folder(source, staging, check, retention)  # (2)
        report, reference = exported.report, exported.reference
        card = report.get("model_card")  # a run's task scores (a folder's README is not ours)
        description = _card_text(folder / "README.md") if card else None
        importance, recorded = None, None
        if quant in MIXTURES and reference is not None and imatrix_rows > 0:
            importance, recorded = _importance(folder, reference.state, imatrix_rows)
        report.update(write_gguf(folder, pending, quant, description=description,
                                 name=source.name, importance=importance))
        if recorded is not None:  # what was recorded, then what of it the file's tensors took
            report["imatrix"] = {**recorded, **report.get("imatrix", {})}
        if reference is not None:  # (3): a refusal leaves no file
            judge_gguf(reference, retention.accept_loss, (pending, folder, out), quant,
                       staging / "read-back", report)
        os.replace(pending, out)  # (4)
        report["gguf"] = str(out)
        report.update(write_modelfile(folder, out))
    finally:
        pending.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    if report.get("retention"):
        why = record(reference.state, out.name, report["retention"])
        report["retention"]["recorded"] = why or "on the run's MLflow run"
    return report


def _check_request(source: Path, out: Path, types: tuple[str, int], overwrite: bool,
                   retention: Retention) -> None:
    """--out, the files beside it, the source, the retention's tasks, and `types` (--quant,
    --imatrix-rows), before anything is read."""
    quant, imatrix_rows = types
    if out.suffix != ".gguf":
        raise GGUFExportError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    for existing in (out, modelfile_path(out)):
        if existing.exists() and not overwrite:
            raise GGUFExportError(f"{existing} exists: pick a new --out or pass --overwrite")
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a run directory or a model folder")
    retention.check()
    if imatrix_rows < 0:
        raise GGUFExportError(f"--imatrix-rows {imatrix_rows}: give the number of training rows "
                              "(0: no importance matrix)")
    if retention.tasks and quant == "f32":
        raise GGUFExportError("--tasks judges an export that changes the weights; --quant f32 "
                              "writes the run's weights as they are: drop --tasks")


def _float_folder(source: Path, staging: Path, check: bool,
                  retention: Retention) -> tuple[Path, Exported]:
    """The float folder the GGUF is written from: a model folder as it is (nothing to judge
    against), or a run's through export_run's pipeline (fused, float32, checked), whose
    reference judges the GGUF."""
    if is_model_folder(source):
        if not check:
            raise GGUFExportError("--no-check is for a run's export (checked in transformers on "
                                  "its way to GGUF); a model folder goes to GGUF as it is")
        if retention.tasks or retention.accept_loss:
            raise GGUFExportError("--tasks and --accept-loss judge a run's export against the "
                                  "run and its base; a model folder goes to GGUF as it is: "
                                  "drop them")
        return source, Exported({"source": str(source)}, None)
    folder = staging / source.name
    return folder, run_export(ExportRequest(source, folder, "hf", "float32", check=check,
                                            retention=retention, refuse=_refuse_non_decoder,
                                            gguf_next=True))


def is_model_folder(source: Path) -> bool:
    """A Hugging Face or mlx-lm model folder (config.json and safetensors), not a run."""
    return (source / "config.json").is_file() and any(source.glob("*.safetensors"))


def _refuse_non_decoder(model: object, state: object) -> None:
    """GGUF holds decoders: a classifier run is refused before anything is written, naming the
    export it has."""
    if isinstance(model, BertClassifier):
        raise ExportError("--format gguf: GGUF holds decoders (llama.cpp has no BERT sequence "
                          "classifier); a BERT classifier exports only as --format hf, trained "
                          "with model.norm_position=post model.pooler=true")


def _importance(folder: Path, state, rows: int) -> tuple[dict, dict]:
    """The importance matrix of the fused float `folder` on the run's first `rows` training
    rows (by mlx-lm weight name), and its record (with the routed experts no token reached,
    by mlx-lm name)."""
    from mlxlab.export.imatrix import importance
    from mlxlab.export.quality import training_batches

    batches = training_batches(state, folder / "tokenizer.json", rows)
    recorded = importance(read_folder(folder), batches)
    used = sum(int(b["input_ids"].shape[0]) for b in batches)
    summary = {"rows": used, "matrices": len(recorded.vectors),
               "data": "the run's training rows, its first epoch's order"}
    if recorded.unreached:  # weighted by ones, as llama-quantize reads an expert of no tokens
        summary["experts_without_tokens"] = recorded.unreached
    return recorded.vectors, summary


def _card_text(card: Path) -> str:
    """The model card without its YAML front matter: GGUF's general.description."""
    text = card.read_text()
    if text.startswith("---"):
        text = text.split("---", 2)[-1]
    return text.strip()
