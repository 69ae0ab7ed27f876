"""Quantization-aware LoRA (model.lora.qat_bits): the adapted layer computes with the fused
weight as the quantized export will hold it, its gradient reaches the adapters, and a QLoRA run
trained that way ships a fused 4-bit file that scores as the run did."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import PYTHON, config_refusal
from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import apply_lora, check_lora
from mlxlab.models.adapters.lora_qat import QATLoRALinear


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(128, 64)
        self.other = nn.Linear(64, 64)

    def __call__(self, x: mx.array) -> mx.array:
        return self.other(self.query(x))


def test_the_forward_is_the_fused_weight_on_the_export_grid_and_the_adapters_learn():
    mx.random.seed(0)
    model = Two()
    apply_lora(model, rank=4, targets=["query"], qat=(4, 64))
    layer = model.query
    assert isinstance(layer, QATLoRALinear)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    x = mx.random.normal((3, 128))
    fused = layer.fuse()  # what `mlxlab export` fuses, then quantizes as --quantize 4 does
    shipped = nn.QuantizedLinear.from_linear(fused, group_size=64, bits=4)
    assert mx.allclose(layer(x), shipped(x), atol=1e-5).item()
    assert not mx.allclose(layer(x), fused(x), atol=1e-3).item()  # the rounding is in it
    loss, grads = nn.value_and_grad(model, lambda m, x: (m(x) ** 2).mean())(model, x)
    g = dict(tree_flatten(grads["query"]))
    assert set(g) == {"lora_a", "lora_b"}  # the base stays frozen
    assert float(mx.abs(g["lora_a"]).sum()) > 0 and float(mx.abs(g["lora_b"]).sum()) > 0
    layer.adapter_on = False
    assert mx.array_equal(layer(x), layer.linear(x)).item()


@pytest.mark.parametrize("lora, message", [
    ({"rank": 8, "qat_bits": 3}, r"qat_bits=3: use 4 or 8"),
    ({"rank": 8, "qat_bits": 4, "qat_group_size": 48}, r"qat_group_size=48: use 64"),
    ({"rank": 8, "qat_bits": 4, "kind": "dora"}, r"kind=dora has no such form: use kind=lora"),
    ({"rank": 8, "qat_bits": 4, "dropout": 0.1}, r"set model.lora.dropout=0"),
])
def test_settings_qat_cannot_use_are_one_line(lora, message):
    with pytest.raises(ConfigError, match=message):
        check_lora(lora)


def test_a_layer_whose_inputs_are_not_whole_groups_is_one_line():
    model = Two()
    with pytest.raises(ConfigError, match=r"qat_group_size=128: a targeted layer has 64 inputs"):
        apply_lora(model, rank=4, targets=["other"], qat=(4, 128))


@pytest.mark.slow  # trains a QLoRA run (~20 s on 2 cores); the forward test above is the layer's
def test_a_qat_qlora_run_ships_a_fused_4bit_file_that_scores_as_the_run(tmp_path):
    """model.quantize=4 (the base as the export holds it) and qat_bits=4 at group 64: the fused
    mlx-lm export is the run's forward, bit for bit in its quantized layers, so the file read
    back scores the run's validation loss and keeps all of its gain."""
    from hf_helpers import save_tiny_model
    from mlxlab.config import asset_path
    from mlxlab.export import export_run

    base = save_tiny_model("llama", tmp_path / "tiny-llama")
    lines = Path(asset_path("tinystories/pairs.jsonl")).read_text().splitlines()[:48]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.cli.main", "train", "experiment=finetune_completions",
         f"model.pretrained={base}", f"data.train_file={tmp_path / 'pairs.jsonl'}",
         "data.max_length=64", "tracking=none", "callbacks.progress.enabled=false",
         "trainer.max_steps=12", "trainer.eval_every_steps=12", "trainer.batch_size=8",
         "optimizer.learning_rate=3e-3", "model.quantize=4", "model.lora.qat_bits=4",
         "model.lora.qat_group_size=64", f"paths.root_dir={tmp_path}",
         f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = export_run(run, tmp_path / "q4", "mlx-lm", "float32")
    loss = next(m for m in report["retention"]["measures"] if m["measure"] == "val/loss")
    assert loss["export"] == pytest.approx(loss["run"], rel=1e-4)
    assert loss["base"] > loss["run"] and loss["kept"] == pytest.approx(1.0, abs=1e-3)
    assert report["retention"]["verdict"] == "kept"
    assert np.isfinite(loss["p"])


@pytest.mark.parametrize("experiment", ["tinystories_nano", "titanic_bert"])
def test_qat_with_adapter_dropout_is_refused_before_a_run_folder(tmp_path, experiment):
    """Models whose own check does not read the lora node (mlxlab's Transformer, BERT) are
    asked too: the dropout QAT would leave unused is one line before anything exists."""
    line = config_refusal(tmp_path, [f"experiment={experiment}", "model.lora.rank=4",
                                     "model.lora.qat_bits=4", "model.lora.dropout=0.1"])
    assert line is not None and "qat_bits=4 " in line and "set model.lora.dropout=0" in line


def test_apply_lora_refuses_qat_with_dropout():
    with pytest.raises(ConfigError, match=r"set model.lora.dropout=0"):
        apply_lora(Two(), rank=4, dropout=0.1, targets=["other"], qat=(4, 64))
