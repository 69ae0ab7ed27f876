"""Export a finished run for other tools: a Hugging Face folder (transformers) or mlx-lm's layout.

    export_run(run, out, fmt="hf" | "mlx-lm" | "peft", dtype=None | "float16" | ...,
               quantize=None | 4 | 8, lora="fuse" | "adapters")

    export_gguf(run_or_folder, "model.gguf", quant="f16" | "bf16" | "q8_0" | "q4_0" | "q4_1"
                | "q4_k_m" | "q5_k_m" | "q6_k")

Decoders open with transformers.AutoModelForCausalLM and mlx_lm.load (GGUF: llama.cpp, Ollama,
LM Studio; gguf.py); BERT classifiers with
AutoModelForSequenceClassification. LoRA runs are fused into the weights, or (mlx-lm) kept as
adapters beside the base model, or (peft) exported alone as a PEFT adapter folder
(peft_adapter.py), or (GGUF) as a base GGUF and a GGUF LoRA adapter (gguf_adapters.py). A transformers export (`hf`) proves itself where it is made: transformers
loads the written folder and must give the fine-tune's logits on a short probe, else it is
refused with the measured gap (proof.py; `check=False` writes it unchecked); the gap, the probe
and transformers' version go into its model card. `quantize` writes mlx-lm's quantized layout and measures the
perplexity and next-token accuracy it costs on the run's validation data (export_report.json).
A run that scored evaluation tasks (eval.tasks) gets a README.md model card with their scores
(model_card.py); a checked (or unchecked) export, a card saying so. Every export that changes a
decoder's weights is read back from what it wrote and judged against the run and its base
(retention.py): the share of the fine-tune's gain it keeps, refused when it loses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import Tokenizer

from mlxlab.evaluation.file_metrics import lm_metrics
from mlxlab.export.architectures import TESTED, layout_of
from mlxlab.export.gguf_kquants import MIXTURES
from mlxlab.export.hf import (
    DTYPES,
    ExportError,
    bert_config,
    decoder_config,
    hf_weights,
    save_weights,
    write_generation_config,
    write_tokenizer,
)
from mlxlab.export.mlx_lm import quantize as quantize_model
from mlxlab.export.mlx_lm import split_adapters, write_adapters
from mlxlab.export.model_card import bare_card, check_section, model_card, unfinished_card
from mlxlab.export.peft_adapter import check_peft, peft_files, write_peft
from mlxlab.export.pin import pinned_checkpoint, unfinished_note
from mlxlab.export.proof import (
    checker_version,
    compare,
    mlxlab_logits,
    peft_available,
    peft_base,
    probe_ids,
    round_adapters,
    transformers_logits,
    unchecked,
)
from mlxlab.export.quality import calibration_tokens, validation_batches
from mlxlab.export.remapped import add_unk_rows, write_remapped_tokenizer
from mlxlab.export.retention import Retention, build_reference, judge_export, read_folder, record
from mlxlab.export.vision import check_vision_options, export_vision
from mlxlab.models.adapter_layer import AdapterLayer
from mlxlab.models.bert import BertClassifier
from mlxlab.models.lora import fuse_lora, has_adapters, unwrap_lora
from mlxlab.models.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.remapped import RemappedLM
from mlxlab.models.routed_experts import dora_on_experts
from mlxlab.models.transformer import Transformer
from mlxlab.models.vision_language import VisionLanguageModel
from mlxlab.runs import load_run_model, require_run_tokenizer
from mlxlab.runtime.files.staging import staged_folder

__all__ = ["ExportError", "export_gguf", "export_run"]
log = logging.getLogger(__name__)
FORMATS = ("hf", "mlx-lm", "peft")


def _check_options(model, fmt: str, dtype: str, quantize: int | None, lora: str) -> None:
    if isinstance(model, VisionLanguageModel):
        check_vision_options(fmt, quantize, lora, model.hf_config.get("model_type"))
        if dtype not in DTYPES:
            raise ExportError(f"--dtype {dtype!r}: use one of {list(DTYPES)}")
        return
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {list(DTYPES)}")
    if lora not in ("fuse", "adapters"):
        raise ExportError(f"lora={lora!r}: use --fuse-lora or --adapters")
    if isinstance(model, MLXLMDecoder) and model.head == "score":
        raise ExportError("this run is a reward model (model.head=score): mlxlab exports "
                          "next-token decoders only, so its scores stay in mlxlab (a GRPO "
                          "reward: objectives.rewards.learned_reward)")
    if isinstance(model, BertClassifier):
        if fmt != "hf" or quantize or lora == "adapters":
            raise ExportError(
                "a BERT classifier exports only as --format hf (fused LoRA, no quantization): "
                "mlx-lm has no sequence classifiers"
            )
    elif not isinstance(model, (Transformer, MLXLMDecoder)):
        raise ExportError(f"a {type(model).__name__} run has no Hugging Face equivalent")
    elif isinstance(model, MLXLMDecoder) and model.quantized and quantize:
        raise ExportError(f"the model is already {model.quantized_bits()}-bit quantized: export "
                          "it without --quantize (it stays quantized in --format mlx-lm)")
    elif fmt == "mlx-lm" and isinstance(model, Transformer) and model.architecture["mlp"] != "swiglu":
        # mlx-lm's llama/qwen2/mistral MLP is silu(gate) * up whatever config.json says
        raise ExportError(f"mlp={model.architecture['mlp']} has no mlx-lm equivalent (its Llama "
                          "MLP is always swiglu): export it with --format hf")
    if fmt in ("hf", "peft") and (quantize or lora == "adapters"):
        raise ExportError(
            "--quantize and --adapters write mlx-lm's layouts: use --format mlx-lm "
            "(transformers cannot read mlx quantization)"
        )


def export_run(
    run: str | Path,
    out: str | Path,
    fmt: str = "hf",
    dtype: str | None = None,
    quantize: int | None = None,
    lora: str = "fuse",
    overwrite: bool = False,
    check: bool = True,
    retention: Retention | None = None,
    quantize_method: str = "rtn",
    refuse: Callable[[object, object], None] | None = None,
) -> dict:
    """Write the run's model (best checkpoint, else newest) to `out`; returns the report that is
    also saved as out/export_report.json. `check=False` writes a transformers export without
    loading it in transformers (its card says unchecked). An export that changes a decoder's
    weights (a quantization, a narrower dtype) is read back and judged against the run and its
    base (retention.py; `retention`: its task files and --accept-loss). `quantize_method`:
    rtn (mlx_lm.convert's), gptq or awq (mlx_lm.quant's, calibrated on the run's own rows).
    `refuse(model, state)`: a caller's own refusals (raising ExportError), on the loaded run
    before anything is written."""
    retention = Retention() if retention is None else retention
    retention.check()
    run, out = Path(run).expanduser(), Path(out).expanduser()
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist: pass a run directory (outputs/<task>/<time>)")
    tokenizer_path = require_run_tokenizer(run, "finished")
    # a run still training deletes old checkpoints: the chosen one is pinned while it is read
    with pinned_checkpoint(run) as (chosen, copy):
        model, state = load_run_model(copy)
        run_folder = chosen.parent.parent if chosen.parent.name == "checkpoints" else run
        note = unfinished_note(run_folder, state.step, state.config)
        return _export_loaded(model, state, chosen, note, run, out, tokenizer_path, fmt, dtype,
                              (quantize, quantize_method), lora, overwrite, check, retention,
                              refuse)


def _checker(model, state, fmt: str, check: bool) -> dict | None:
    """None when the export will be checked (transformers can load it here), else the record
    of why it is written unchecked; a model type no test proves is refused when nothing here
    can check it."""
    if fmt == "mlx-vlm" or isinstance(model, VisionLanguageModel):
        return None  # checked where it is written (export/vision.py)
    if fmt == "mlx-lm":
        if not check:
            raise ExportError("--no-check is for --format hf, peft and gguf: --format mlx-lm is "
                              "mlx-lm's own layout, which is not loaded in transformers")
        return None
    if not check:
        return unchecked("written with --no-check, not loaded in transformers")
    version = checker_version()
    if fmt == "peft":
        base = peft_base(state.config.get("model") or {})
        why = ("PyTorch is not installed, so transformers could not load it here"
               if version is None else "peft is not installed" if not peft_available()
               else None if base is not None
               else "its base is not a Hugging Face folder transformers loads here")
        return None if why is None else unchecked(why)
    if version is not None:
        return None
    kind = model.architecture.get("model_type") if isinstance(model, MLXLMDecoder) else None
    if kind is not None and kind not in TESTED:
        raise ExportError(
            f"model_type={kind!r} is checked as it is exported, by loading it in transformers, "
            "which needs PyTorch (not installed here), and no mlxlab test proves its export: "
            "pip install torch, or pass --no-check to write it unchecked")
    return unchecked("PyTorch is not installed, so transformers could not load it here"
                     + (f"; model_type={kind!r} is one mlxlab's tests export and check"
                        if kind else ""))


def _export_loaded(model, state, chosen: Path, note: str | None, run: Path, out: Path,
                   tokenizer_path: Path, fmt: str, dtype: str | None,
                   quantize: int | None | tuple[int | None, str], lora: str, overwrite: bool,
                   check: bool = True, retention: Retention | None = None,
                   refuse: Callable[[object, object], None] | None = None) -> dict:
    """`quantize`: bits, or (bits, method)."""
    quantize, method = quantize if isinstance(quantize, tuple) else (quantize, "rtn")
    if method != "rtn" and (not quantize or fmt != "mlx-lm"):
        raise ExportError(f"--quantize-method {method} calibrates mlx-lm's quantization: add "
                          "--format mlx-lm --quantize 4 (or 8)")
    remapped = None
    if isinstance(model, RemappedLM):  # the small model + a tokenizer on its ids (remapped.py)
        remapped, model = model, model.inner
    if dtype is None:  # the pretrained checkpoint's own dtype, else what mlxlab trained in
        source_config = model.hf_config or {}
        source = source_config.get("torch_dtype", source_config.get("dtype"))
        dtype = source if source in DTYPES else "float32"
    _check_options(model, fmt, dtype, quantize, lora)
    not_checked = _checker(model, state, fmt, check)
    if refuse is not None:
        refuse(model, state)
    if fmt == "peft":
        check_peft(state.config.get("model") or {},
                   isinstance(model, MLXLMDecoder) and bool(model.quantized), has_adapters(model),
                   dora_on_experts(model))
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: pick a new --out or pass --overwrite")
    run_dir = tokenizer_path.parent
    report: dict = {"run": str(run), "checkpoint": str(chosen), "step": state.step,
                    "format": fmt, "dtype": dtype, "quantize": quantize, "unfinished": note}
    if note is not None:
        log.warning("mlxlab export: %s", note)
    staging = Path(tempfile.mkdtemp(prefix="mlxlab-export-"))
    try:
        if remapped is not None:
            keep = state.data["vocab_map"]["keep"]
            tokenizer_path, report["vocab_remap"] = write_remapped_tokenizer(
                tokenizer_path, keep, staging)
            run_dir = staging  # the run's side files hold the full vocabulary's ids
            add_unk_rows(model, report["vocab_remap"]["intermediate_tokens"])
        card = model_card(tokenizer_path.parent, out.name, state.config, state.run_id,
                          state.step)  # the run's task scores; None when it scored none
        if note is not None:
            card = unfinished_card(card, out.name, note)
        if not_checked is not None:
            report["check"] = not_checked
        _export(model, state, run_dir, tokenizer_path, out, fmt, dtype, quantize, lora, report,
                card, retention, method)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if report.get("retention"):
        why = record(state, out.name, report["retention"])
        report["retention"]["recorded"] = why or "on the run's MLflow run"
    return report


def _changes_weights(model, dtype: str, quantize: int | None, fmt: str, lora: str) -> bool:
    """Whether the written weights differ from the run's: a quantization, a float type that
    does not hold every value of the one the model holds (narrower, or as wide with another
    range and precision: bfloat16 <-> float16; only float32 holds both), or adapters fused into
    a quantized base that stays quantized (mlx-lm's layout: the fused weight is quantized
    again)."""
    from mlx.utils import tree_flatten

    target = DTYPES[dtype]
    floats = {v.dtype for _, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating)}
    requantized = fmt == "mlx-lm" and lora == "fuse" and any(
        isinstance(m, AdapterLayer) and isinstance(m.linear, nn.QuantizedLinear)
        for m in model.modules())
    return bool(quantize) or requantized or any(
        t != target and target != mx.float32 for t in floats)


FLOAT16_MAX = 65504.0  # float16's largest finite value: anything above it becomes inf


def _refuse_overflow(model, dtype: str) -> None:
    """--dtype float16 of weights float16 cannot hold (a bfloat16 or float32 run can hold
    values past 65,504) is refused, naming the largest; the cast would write inf."""
    from mlx.utils import tree_flatten

    if DTYPES[dtype] != mx.float16:
        return
    for name, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.float16 and v.size:
            peak = float(mx.abs(v.astype(mx.float32)).max())
            if peak > FLOAT16_MAX:
                raise ExportError(f"--dtype float16: {name} holds {peak:.6g}, past float16's "
                                  f"largest value {FLOAT16_MAX:,.0f} (it would be written as "
                                  "inf): export --dtype bfloat16 or float32")


def _export(model, state, run_dir: Path, tokenizer_path: Path, out: Path, fmt: str, dtype: str,
            quantize: int | None, lora: str, report: dict, card: str | None = None,
            retention: Retention | None = None, method: str = "rtn") -> None:
    if isinstance(model, VisionLanguageModel):
        report["lora"] = "fuse" if has_adapters(model) else None
        with staged_folder(out) as tmp:
            report.update(export_vision(model, out, dtype, tmp, fmt))
            _write_report(tmp, out, report, card)
        return
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    if isinstance(model, BertClassifier):
        labels = (state.encoding or {}).get("label_values")
        if not labels:
            raise ExportError(f"{state.path} records no label values: retrain it")
        config = bert_config(model, labels)
    else:  # a quantized base stays quantized in mlx-lm's layout, float for transformers
        config = decoder_config(model, tokenizer, dtype, keep_quantization=fmt == "mlx-lm")
        if fmt == "hf" and isinstance(model, MLXLMDecoder):
            config = layout_of(config["model_type"]).hf_config(config)
    if fmt == "peft":
        _export_peft(model, state, out, dtype, report, card)
        return
    has_lora = has_adapters(model)
    if lora == "adapters" and not has_lora:
        raise ExportError("--adapters needs a LoRA run (model.lora.rank > 0); this run has none")
    judged = retention is not None and isinstance(model, (MLXLMDecoder, Transformer)) and (
        retention.later or _changes_weights(model, dtype, quantize, fmt, lora))
    if retention is not None and retention.tasks and not judged:
        raise ExportError("--tasks judges an export that changes the weights (--quantize, a "
                          "narrower --dtype, a GGUF quant other than f32); this one writes the "
                          "run's weights as they are: drop --tasks")
    if judged and retention.reference is None:  # the run and its base, before any change
        retention.reference = build_reference(model, state, tokenizer_path,
                                              validation_batches(state, tokenizer_path),
                                              retention)
    if has_lora and lora == "fuse":
        fuse_lora(model, dequantize=fmt == "hf")
    if fmt == "hf" and isinstance(model, MLXLMDecoder) and model.quantized:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model.lm)  # transformers reads float weights only
    _refuse_overflow(model, dtype)
    model.set_dtype(DTYPES[dtype])
    adapters = split_adapters(model) if has_lora and lora == "adapters" else None
    report["lora"] = lora if has_lora else None
    if quantize:  # measured as shipped: adapters (if any) on the quantized base
        batches = validation_batches(state, tokenizer_path)
        report["before"] = lm_metrics(model, batches)
        calibration = (None if method == "rtn"
                       else calibration_tokens(state, tokenizer_path))
        config["quantization"] = quantize_model(model, quantize, method=method,
                                                calibration=calibration)
        report["quantize_method"] = method
        config["quantization_config"] = dict(config["quantization"])
        report["after"] = lm_metrics(model, batches)
        report["perplexity_increase"] = report["after"]["perplexity"] / report["before"]["perplexity"] - 1
        report["accuracy_drop"] = report["before"]["accuracy"] - report["after"]["accuracy"]
    if adapters is not None:
        unwrap_lora(model)  # the base model; the adapters go apart

    with staged_folder(out) as tmp:
        save_weights(hf_weights(model, dtype, fmt), tmp, "mlx" if fmt == "mlx-lm" else "pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_tokenizer(run_dir, tokenizer_path, tmp, model)
        write_generation_config(config, tmp, tokenizer, run_dir)
        if adapters is not None:
            write_adapters(*adapters, tmp / "adapters", DTYPES[dtype])
            report["adapter_path"] = str(out / "adapters")
        if fmt == "hf" and "check" not in report:  # refused here: the folder is not moved in
            report["check"] = _prove(model, tmp)
        if judged and not retention.later:  # refused here too: the folder is not moved in
            exported = read_folder(tmp, tmp / "adapters" if adapters is not None else None)
            report["retention"] = judge_export(retention, exported, str(out), _instead(fmt, lora))
        _write_report(tmp, out, report, card)


def _instead(fmt: str, lora: str, quant: str | None = None) -> str:
    """What keeps the gain, for the refusal of an export that lost it."""
    if fmt == "gguf":
        return ("export --format gguf --adapters (the base as it is and the LoRA as a GGUF "
                "adapter) or --quant q8_0")
    if lora == "fuse":
        return ("export with --adapters (the quantized base plus the adapters as trained), "
                "or --quantize 8, or no --quantize")
    return "export with --quantize 8, or without --quantize"


def _export_peft(model, state, out: Path, dtype: str, report: dict, card: str | None) -> None:
    """The adapters alone, on the base checkpoint's Hugging Face names (peft_adapter.py);
    checked (unless report["check"] says why not) by PEFT putting them on the base in
    transformers, against the fine-tune with its adapters rounded to `dtype` as written."""
    base_folder = peft_base(state.config["model"])
    checked = "check" not in report and base_folder is not None
    if checked:
        ids = probe_ids(int(model.architecture["vocab_size"]))
        ours = mlxlab_logits(round_adapters(model, DTYPES[dtype]), ids)
    adapters, settings = split_adapters(model)
    unwrap_lora(model)  # the base, whose Hugging Face names the adapters must land on
    base_names = hf_weights(model, dtype, "hf").keys()
    base = state.config["model"]["pretrained"]
    tensors, config = peft_files(adapters, settings, base_names, str(base), DTYPES[dtype],
                                 model.architecture.get("model_type"))
    report["lora"] = settings["fine_tune_type"]
    if card is not None:  # the hub reads an adapter folder's card as PEFT's
        card = card.replace("library_name: transformers", "library_name: peft", 1)
    with staged_folder(out) as tmp:
        write_peft(tensors, config, tmp)
        if checked:  # refused here: the folder is not moved in
            theirs = transformers_logits(base_folder, ids, classifier=False, adapter=tmp)
            report["check"] = compare(ours, theirs, f"{checker_version()} + peft", ids)
        _write_report(tmp, out, report, card)


def _prove(model, folder: Path) -> dict:
    """The written folder in transformers against mlxlab's forward of the same weights."""
    ids = probe_ids(int(model.architecture["vocab_size"]))
    theirs = transformers_logits(folder, ids, classifier=isinstance(model, BertClassifier))
    return compare(mlxlab_logits(model, ids), theirs, checker_version() or "transformers", ids)


def _write_report(tmp: Path, out: Path, report: dict, card: str | None) -> None:
    (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if "check" in report:  # how the export was checked (or why not): on every card
        library = "peft" if report["format"] == "peft" else "transformers"
        card = (card or bare_card(out.name, library)) + check_section(report["check"],
                                                                       report["dtype"])
    if card is not None:  # the model card: task scores with intervals (model_card.py)
        (tmp / "README.md").write_text(card)
        report["model_card"] = str(out / "README.md")


def export_gguf(source: str | Path, out: str | Path, quant: str = "f16",
                overwrite: bool = False, check: bool = True,
                retention: Retention | None = None, imatrix_rows: int = 128) -> dict:
    """A finished decoder run (LoRA fused, best checkpoint) or a float pretrained folder as one
    GGUF file, with an Ollama Modelfile beside it named after it. A run goes through the float
    Hugging Face folder `export_run` writes (a temporary one, checked in transformers as every
    such folder is), so the GGUF holds exactly the weights and tokenizer that folder holds; the
    run's model card (task scores, the check) becomes its description. The file is then read
    back: its logits on the probe against the fine-tune's (refused past the check's tolerance
    at f32), and, for every other type, its retention of the fine-tune's gain (retention.py),
    before it is renamed into place. A K-quant of a run is weighted by an importance matrix of
    the fine-tune on its first `imatrix_rows` training rows (0: none; imatrix.py)."""
    from mlxlab.export.gguf import GGUFExportError, write_gguf
    from mlxlab.export.ollama import modelfile_path, write_modelfile

    source, out = Path(source).expanduser(), Path(out).expanduser()
    if out.suffix != ".gguf":
        raise GGUFExportError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    for existing in (out, modelfile_path(out)):
        if existing.exists() and not overwrite:
            raise GGUFExportError(f"{existing} exists: pick a new --out or pass --overwrite")
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a run directory or a model folder")
    request = Retention(*(retention.tasks, retention.accept_loss) if retention else (),
                        later=True)
    request.check()
    if imatrix_rows < 0:
        raise GGUFExportError(f"--imatrix-rows {imatrix_rows}: give the number of training rows "
                              "(0: no importance matrix)")
    if request.tasks and quant == "f32":
        raise GGUFExportError("--tasks judges an export that changes the weights; --quant f32 "
                              "writes the run's weights as they are: drop --tasks")
    staging = Path(tempfile.mkdtemp(prefix="mlxlab-gguf-"))
    pending = out.with_name(f".{out.stem}.pending-{os.getpid()}.gguf")
    try:
        if is_model_folder(source):
            if not check:
                raise GGUFExportError("--no-check is for a run's export (checked in "
                                      "transformers on its way to GGUF); a model folder goes "
                                      "to GGUF as it is")
            if request.tasks or request.accept_loss:
                raise GGUFExportError("--tasks and --accept-loss judge a run's export against "
                                      "the run and its base; a model folder goes to GGUF as it "
                                      "is: drop them")
            folder, report = source, {"source": str(source)}  # a pretrained folder
        else:
            folder = staging / source.name
            report = export_run(source, folder, fmt="hf", dtype="float32", lora="fuse",
                                check=check, retention=request, refuse=_refuse_non_decoder)
        card = report.get("model_card")  # a run's task scores (a folder's README is not ours)
        description = _card_text(folder / "README.md") if card else None
        importance = None
        if quant in MIXTURES and request.reference is not None and imatrix_rows > 0:
            importance, report["imatrix"] = _importance(folder, request.reference.state,
                                                        imatrix_rows)
        report.update(write_gguf(folder, pending, quant, description=description,
                                 name=source.name, importance=importance))
        if request.reference is not None:
            _judge_gguf(request, (pending, folder), quant, staging / "read-back", report, out)
        os.replace(pending, out)
        report["gguf"] = str(out)
        report.update(write_modelfile(folder, out))
    finally:
        pending.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    if report.get("retention"):
        why = record(request.reference.state, out.name, report["retention"])
        report["retention"]["recorded"] = why or "on the run's MLflow run"
    return report


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
    rows, and its record."""
    from mlxlab.export.imatrix import importance
    from mlxlab.export.quality import training_batches

    batches = training_batches(state, folder / "tokenizer.json", rows)
    matrices = importance(read_folder(folder), batches)
    used = sum(int(b["input_ids"].shape[0]) for b in batches)
    return matrices, {"rows": used, "matrices": len(matrices),
                      "data": "the run's training rows, its first epoch's order"}


def _judge_gguf(request: Retention, written: tuple[Path, Path], quant: str, work: Path,
                report: dict, out: Path) -> None:
    """The written GGUF (`written`: the file and the float folder it was written from) read
    back: its logits on the probe against the fine-tune's (the check at f32; the quantization's
    own gap otherwise), and its retention unless it is f32. A file that does not read back is
    refused (GGUFExportError): it would go out unjudged."""
    from mlxlab.export.gguf import GGUFExportError
    from mlxlab.export.gguf_readback import read_written_gguf
    from mlxlab.export.proof import mlxlab_logits

    reference = request.reference
    try:
        exported = read_written_gguf(*written, work)
    except ValueError as err:  # GGUFExportError and the reader's ConfigError
        raise GGUFExportError(f"refused: the written GGUF was not read back, so it cannot be "
                              f"judged ({err}); export --format hf or mlx-lm") from None
    logits = mlxlab_logits(exported, reference.ids)
    if quant == "f32":  # the same weights: the layout's check, on the file
        report["file_check"] = compare(
            reference.probe, logits, "mlxlab's GGUF reader", reference.ids,
            differs="the GGUF's tensors or metadata for this model type are not what mlxlab "
            "wrote them from: export --format hf or mlx-lm")
        return
    scale = max(1.0, float(np.abs(reference.probe).max()))
    gap = float(np.abs(logits - reference.probe).max())
    report["file_check"] = {"status": "measured", "max_abs_logit_gap": gap,
                            "logit_scale": scale, "read_back": "the .gguf as written, "
                            "dequantized by mlxlab's GGUF reader"}
    try:
        report["retention"] = judge_export(request, exported, str(out), _instead("gguf", "fuse"))
    except ExportError as err:
        raise GGUFExportError(str(err)) from None


def _card_text(card: Path) -> str:
    """The model card without its YAML front matter: GGUF's general.description."""
    text = card.read_text()
    if text.startswith("---"):
        text = text.split("---", 2)[-1]
    return text.strip()
