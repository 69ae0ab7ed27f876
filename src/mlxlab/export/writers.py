"""The writers of a run's export: the model's weights as they are written (fused, cast, quantized:
`shape_weights`), a Hugging Face or mlx-lm folder (`write_folder`), a PEFT adapter folder
(`write_peft_folder`, checked by PEFT in transformers as it is written), and the report and
model card every folder carries. Each writes into the staged folder only; the pipeline moves it
into --out once it is judged (export/pipeline.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from mlxlab.evaluation.file_metrics import lm_metrics
from mlxlab.export.architectures import layout_of
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
from mlxlab.export.judgement import refuse_overflow
from mlxlab.export.mlx_lm import quantize as quantize_model
from mlxlab.export.mlx_lm import split_adapters, write_adapters
from mlxlab.export.model_card import bare_card, check_section
from mlxlab.export.peft_adapter import peft_files, write_peft
from mlxlab.export.proof import (
    Checker,
    checker_version,
    compare,
    mlxlab_logits,
    peft_base,
    probe_ids,
    round_adapters,
    transformers_logits,
)
from mlxlab.export.quality import calibration_tokens, validation_batches
from mlxlab.export.request import ExportRequest
from mlxlab.models.adapters.lora import fuse_lora, has_adapters, unwrap_lora
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.encoders.bert import BertClassifier
from mlxlab.models.hf_normalise import mlx_lm_folder_config
from mlxlab.runtime.files.staging import staged_folder


@dataclass(frozen=True)
class Sources:
    """Where the written folder's files come from: the run's checkpoint state, the
    tokenizer.json (a vocab-remapped run's: remapped to the small model's ids) and the folder
    of the side files (tokenizer_config.json, generation_config.json, ...)."""

    state: object
    tokenizer_path: Path
    side_files: Path


@dataclass(frozen=True)
class Shaped:
    """The weights as they will be written: config.json's content and, with --adapters, the
    adapters split off the base (mlx_lm.py split_adapters)."""

    config: dict
    adapters: tuple | None


def shape_weights(request: ExportRequest, model, sources: Sources, report: dict) -> Shaped:
    """The model made what is written, in place: LoRA fused (or split off with --adapters), a
    quantized base dequantized for transformers, cast to the dtype (refused where float16
    overflows), quantized with --quantize (its cost on the run's validation rows into
    `report`)."""
    config = _config(request, model, sources)
    has_lora = has_adapters(model)
    if has_lora and request.lora == "fuse":
        fuse_lora(model, dequantize=request.fmt == "hf")
    if request.fmt == "hf" and isinstance(model, MLXLMDecoder) and model.quantized:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model.lm)  # transformers reads float weights only
    refuse_overflow(model, request.dtype)
    model.set_dtype(DTYPES[request.dtype])
    adapters = split_adapters(model) if has_lora and request.lora == "adapters" else None
    report["lora"] = request.lora if has_lora else None
    if request.quantization:  # measured as shipped: adapters (if any) on the quantized base
        _quantize(request, model, sources, config, report)
    if adapters is not None:
        unwrap_lora(model)  # the base model; the adapters go apart
    return Shaped(config, adapters)


def _config(request: ExportRequest, model, sources: Sources) -> dict:
    """config.json: a BERT classifier's with its labels, a decoder's (a quantized base stays
    quantized in mlx-lm's layout, float for transformers)."""
    if isinstance(model, BertClassifier):
        labels = (sources.state.encoding or {}).get("label_values")
        if not labels:
            raise ExportError(f"{sources.state.path} records no label values: retrain it")
        return bert_config(model, labels)
    tokenizer = Tokenizer.from_file(str(sources.tokenizer_path))
    config = decoder_config(model, tokenizer, request.dtype,
                            keep_quantization=request.fmt == "mlx-lm")
    if request.fmt == "hf" and isinstance(model, MLXLMDecoder):
        config = layout_of(config["model_type"]).hf_config(config)
    elif isinstance(model, MLXLMDecoder):  # mlx-lm's module for the model_type
        config = mlx_lm_folder_config(config)
    return config


def _quantize(request: ExportRequest, model, sources: Sources, config: dict,
              report: dict) -> None:
    """mlx-lm's quantization of the model in place, and what it costs on the validation rows."""
    method = request.quantization.method
    batches = validation_batches(sources.state, sources.tokenizer_path)
    report["before"] = lm_metrics(model, batches)
    calibration = (None if method == "rtn"
                   else calibration_tokens(sources.state, sources.tokenizer_path))
    config["quantization"] = quantize_model(model, request.quantization.bits, method=method,
                                            calibration=calibration)
    report["quantize_method"] = method
    config["quantization_config"] = dict(config["quantization"])
    report["after"] = lm_metrics(model, batches)
    report["perplexity_increase"] = report["after"]["perplexity"] / report["before"]["perplexity"] - 1
    report["accuracy_drop"] = report["before"]["accuracy"] - report["after"]["accuracy"]


def write_folder(request: ExportRequest, model, sources: Sources, shaped: Shaped, tmp: Path,
                 report: dict) -> None:
    """The weights, config.json, tokenizer, generation config and (--adapters) the adapters
    into the staged folder `tmp`."""
    fmt, out = request.fmt, request.out
    save_weights(hf_weights(model, request.dtype, fmt), tmp, "mlx" if fmt == "mlx-lm" else "pt")
    (tmp / "config.json").write_text(json.dumps(shaped.config, indent=2, sort_keys=True) + "\n")
    write_tokenizer(sources.side_files, sources.tokenizer_path, tmp, model)
    write_generation_config(shaped.config, tmp, Tokenizer.from_file(str(sources.tokenizer_path)),
                            sources.side_files)
    if shaped.adapters is not None:
        write_adapters(*shaped.adapters, tmp / "adapters", DTYPES[request.dtype])
        report["adapter_path"] = str(out / "adapters")


def write_peft_folder(model, state, out: Path, dtype: str, report: dict, card: str | None) -> None:
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
            report["check"] = compare(ours, theirs, ids, Checker(f"{checker_version()} + peft"))
        write_report(tmp, out, report, card)


def write_report(tmp: Path, out: Path, report: dict, card: str | None) -> None:
    """export_report.json and the model card (the run's task scores, how the export was
    checked) into the staged folder."""
    (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if "check" in report:  # how the export was checked (or why not): on every card
        library = "peft" if report["format"] == "peft" else "transformers"
        card = (card or bare_card(out.name, library)) + check_section(report["check"],
                                                                       report["dtype"])
    if card is not None:  # the model card: task scores with intervals (model_card.py)
        (tmp / "README.md").write_text(card)
        report["model_card"] = str(out / "README.md")
