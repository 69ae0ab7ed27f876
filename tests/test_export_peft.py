"""`mlxlab export --format peft`: a LoRA / DoRA run's adapters alone, loaded by PEFT itself onto
the base model in transformers, give the merged export's logits (and mlxlab's), and the export
checked that itself as it was made; what PEFT cannot
carry exactly is refused in one line, exit 2, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import mlx_logits, save_tiny_model, torch_logits
from mlxlab.export import export_run
from mlxlab.export.proof import TOLERANCE
from mlxlab.runs import load_run_model
from test_mlx_lm_decoders import IDS, train_chat


def peft_logits(base: Path, adapter: Path) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return torch_logits(model.eval(), IDS)


@pytest.mark.parametrize("kind, lora, targets", [
    ("qwen3", "lora", "[query,key,value,out,gate_proj,up_proj,down_proj]"),
    ("llama", "dora", "[query,value]"),
    pytest.param("deepseek_v3", "lora", "[q_a_proj,q_b_proj,kv_a_proj_with_mqa,o_proj]",
                 marks=pytest.mark.slow),  # its latent attention's projections
])
def test_the_adapters_load_in_peft_with_the_merged_exports_logits(kind, lora, targets, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(kind, tmp_path / f"tiny-{kind}", chat="chatml")
    _, run = train_chat(folder, tmp_path, f"model.lora.kind={lora}",
                        f"model.lora.targets={targets}")
    model, _ = load_run_model(run)
    ours = mlx_logits(model, IDS)
    report = export_run(run, tmp_path / "peft", "peft", "float32")
    assert report["lora"] == lora
    # checked as it was made: PEFT put the written adapters on the base in transformers
    assert report["check"]["checker"].endswith(" + peft")
    assert report["check"]["max_abs_logit_gap"] <= 1e-5 * report["check"]["logit_scale"]
    assert report["check"]["tolerance"] == TOLERANCE
    out = tmp_path / "peft"
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)
    assert config["use_dora"] is (lora == "dora") and config["peft_type"] == "LORA"
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "## Export check" in card  # scores, the check
    # the adapters sit on every module of those names: PEFT's (and vLLM's) plain name list
    assert config["target_modules"] == sorted(
        {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}.get(t, t)
        for t in targets.strip("[]").split(","))
    export_run(run, tmp_path / "merged", "hf", "float32")
    merged = torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), IDS)
    theirs = peft_logits(folder, out)
    assert np.abs(theirs - merged).max() <= 1e-4
    assert np.abs(theirs - ours).max() <= 1e-4
    base = torch_logits(AutoModelForCausalLM.from_pretrained(folder).eval(), IDS)
    assert np.abs(base - theirs).max() > 1e-3  # the adapters are there and change the model


@pytest.mark.parametrize("case", ["full", pytest.param("quantized", marks=pytest.mark.slow),
                                  pytest.param("extra_trainable", marks=pytest.mark.slow)])
def test_what_peft_cannot_carry_is_refused_before_writing(case, tmp_path, capsys):
    from mlxlab.cli.export import main

    folder = save_tiny_model("llama", tmp_path / "tiny-llama", chat="chatml")
    overrides, expect = {
        "full": (["model.lora.rank=0"], "this run fine-tuned every weight"),
        "quantized": (["model.quantize=8"], "trained on a quantized base"),
        "extra_trainable": (["model.lora.extra_trainable=[lm_head]"], "trained in full beside"),
    }[case]
    _, run = train_chat(folder, tmp_path, *overrides)
    capsys.readouterr()
    out = tmp_path / "peft"
    assert main([str(run), "--format", "peft", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob(".peft*"))
