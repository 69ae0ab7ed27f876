"""`mlxlab export`: runs trained here open in transformers and mlx-lm with the same outputs.

A tiny language model trained a few steps in mlxlab gives the same logits and the same greedy
continuation in mlxlab, transformers and mlx-lm; a BERT classifier gives the same class
probabilities in transformers; quantized exports report what they cost; bad requests fail with
one clear line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST, PYTHON, compose_cfg
from hf_helpers import mlx_logits, torch_logits
from mlxlab.config import asset_path
from mlxlab.export import ExportError, export_run
from mlxlab.runs import load_run_model
from mlxlab.runs.inference import load_run, sample_ids
from mlxlab.train import train

LM = [
    "experiment=tinystories_nano", "tracking=none", "callbacks.progress.enabled=false",
    "model.dim=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.max_seq_len=64", "data.packing.seq_len=64", "data.tokenizer.max_vocab=512",
    "data.tokenizer_sample=300", "data.splits.val_examples=20", "trainer.batch_size=8",
    "trainer.max_steps=20", "trainer.eval_every_steps=20", "trainer.schedule.warmup_steps=2",
]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    cfg = compose_cfg(root, LM)
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir)


@pytest.fixture(scope="module")
def lm_export(lm_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.cli.main", "export", str(lm_run), "--format", "hf",
         "--dtype", "float32", "--out", str(out)], capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"-> {out} (hf, float32)" in done.stdout
    assert "checked in transformers " in done.stdout  # the export checked itself
    return out


def test_decoder_export_has_the_hf_files(lm_export):
    names = {p.name for p in lm_export.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((lm_export / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2


def test_decoder_export_same_logits_in_transformers_and_mlx_lm(lm_run, lm_export):
    import mlx_lm
    from transformers import AutoModelForCausalLM

    model, _ = load_run_model(lm_run)
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=(2, 48))
    ours = mlx_logits(model, ids)
    hf = AutoModelForCausalLM.from_pretrained(lm_export).eval()
    theirs, _ = mlx_lm.load(str(lm_export))
    assert np.abs(torch_logits(hf, ids) - ours).max() <= 1e-4
    assert np.abs(np.array(theirs(mx.array(ids))) - ours).max() <= 1e-4


def test_decoder_export_same_greedy_continuation(lm_run, lm_export):
    """mlxlab's generate (temperature 0), transformers' generate(do_sample=False) and mlx-lm's
    generate give the same text for the same prompt: the exported tokenizer starts prompts with
    end-of-text as mlxlab does."""
    import mlx_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = load_run(lm_run)
    tok = run.tokenizer
    ours = list(sample_ids(run, PROMPT, max_tokens=20, temperature=0.0))
    hf_tok = AutoTokenizer.from_pretrained(lm_export)
    prompt_ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    assert prompt_ids[0].tolist() == [tok.token_to_id("<|endoftext|>"), *tok.encode(PROMPT).ids]
    hf = AutoModelForCausalLM.from_pretrained(lm_export).eval()
    out = hf.generate(prompt_ids, max_new_tokens=20, do_sample=False,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    hf_ids = out[0, prompt_ids.shape[1]:].tolist()
    eot = tok.token_to_id("<|endoftext|>")
    hf_ids = hf_ids[: hf_ids.index(eot)] if eot in hf_ids else hf_ids
    assert hf_ids == ours and len(ours) > 3
    mlx_model, mlx_tok = mlx_lm.load(str(lm_export))
    text = mlx_lm.generate(mlx_model, mlx_tok, PROMPT, max_tokens=20)  # greedy by default
    assert text == tok.decode(ours)


def test_geglu_decoder_exports_to_hf_as_gelu_llama_and_mlx_lm_refuses_it(tmp_path):
    """model.mlp=geglu is a Llama with hidden_act=gelu: transformers gives the same logits; mlx-lm
    (whose Llama MLP is always silu) is refused with one line; the plain MLPs have no Llama form."""
    from transformers import AutoModelForCausalLM

    from mlxlab.export.hf import decoder_config
    from mlxlab.models.decoders.transformer import Transformer

    cfg = compose_cfg(tmp_path, [*LM, "model.mlp=geglu", "trainer.max_steps=4",
                                 "trainer.eval_every_steps=4"])
    train(cfg)
    GlobalHydra.instance().clear()
    run = Path(cfg.paths.output_dir)
    report = export_run(run, tmp_path / "hf", "hf", dtype="float32")
    assert report["format"] == "hf"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "gelu"
    model, _ = load_run_model(run)
    assert model.architecture["mlp"] == "geglu"
    ids = np.random.default_rng(1).integers(0, model.vocab_size, size=(2, 32))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(torch_logits(hf, ids) - mlx_logits(model, ids)).max() <= 1e-4
    with pytest.raises(ExportError, match=r"^mlp=geglu has no mlx-lm equivalent .*--format hf$"):
        export_run(run, tmp_path / "mlx", "mlx-lm")
    assert not (tmp_path / "mlx").exists()
    for kind in ("relu", "silu", "gelu"):
        with pytest.raises(ExportError, match=f"mlp={kind}, .*no Llama equivalent.*gated MLP"):
            decoder_config(Transformer(vocab_size=64, dim=32, num_layers=1, mlp=kind), None,
                           "float32")


def test_quantized_export_loads_in_mlx_lm_and_reports_the_cost(lm_run, lm_export, tmp_path):
    """--quantize 4 writes what mlx_lm.convert -q writes (same tensors); the perplexity it
    reports is what mlx-lm's own forward of the folder gives on the run's validation data."""
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.convert import convert

    from mlxlab.evaluation.file_metrics import lm_metrics
    from mlxlab.export.quality import validation_batches

    out = tmp_path / "q4"
    report = export_run(lm_run, out, "mlx-lm", "float32", quantize=4)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    before, after = report["before"], report["after"]
    assert before["tokens"] > 100 and after["perplexity"] != before["perplexity"]
    assert json.loads((out / "export_report.json").read_text())["after"] == after
    model, _ = mlx_lm.load(str(out))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    _, state = load_run_model(lm_run)
    theirs = lm_metrics(model, validation_batches(state, lm_run / "tokenizer.json"))
    assert theirs["perplexity"] == pytest.approx(after["perplexity"], rel=1e-4)
    convert(str(lm_export), str(tmp_path / "converted"), quantize=True, q_bits=4, dtype="float32")
    ours, converted = (mx.load(str(p / "model.safetensors")) for p in (out, tmp_path / "converted"))
    assert ours.keys() == converted.keys()
    assert all(mx.array_equal(ours[k], converted[k]).item() for k in ours)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bert")
    cfg = compose_cfg(root, [*FAST, "tracking=none", "trainer.max_steps=10",
                             "model.norm_position=post", "model.pooler=true", f"data.path={asset_path('titanic/train.csv')}"])
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir)


def test_bert_export_same_class_probabilities(bert_run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "bert"
    check = export_run(bert_run, out, "hf", "float32")["check"]  # a classifier's logits too
    assert check["status"] == "checked" and np.shape(check["probe"]) == (2, 16)
    run = load_run(bert_run)
    model, data = run.model, run.encoding
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "0", 1: "1"}
    rows = pd.read_csv(asset_path("titanic/train.csv")).head(40)
    for batch in data.encode_frame(rows, batch_size=20):
        ours = np.array(mx.softmax(model(batch["input_ids"], batch["attention_mask"]), axis=-1))
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(np.array(batch["input_ids"]), dtype=torch.long),
                        attention_mask=torch.tensor(np.array(batch["attention_mask"]))).logits
        assert np.abs(torch.softmax(logits, -1).numpy() - ours).max() <= 1e-5
    text = data.texts(rows)[0]
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == data.tokenizer.encode(text).ids


def test_bad_requests_fail_with_one_clear_line(lm_run, bert_run, tmp_path):
    with pytest.raises(ExportError, match="--format mlx-lm"):
        export_run(lm_run, tmp_path / "a", "hf", quantize=4)
    with pytest.raises(ExportError, match="mlx-lm has no sequence classifiers"):
        export_run(bert_run, tmp_path / "b", "mlx-lm")
    with pytest.raises(ValueError, match="LoRA run"):
        export_run(lm_run, tmp_path / "c", "mlx-lm", lora="adapters")
    # GGUF holds decoders: a BERT run is refused with the export it has, nothing written
    from mlxlab.export import export_gguf
    with pytest.raises(ExportError, match="GGUF holds decoders .* exports only as --format hf"):
        export_gguf(bert_run, tmp_path / "bert.gguf")
    assert not (tmp_path / "bert.gguf").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.cli.main", "export", str(lm_run), "--out", str(tmp_path / "full")],
        capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("mlxlab export: error:")
    assert "not empty" in done.stderr and (tmp_path / "full" / "x").read_text() == "keep"
