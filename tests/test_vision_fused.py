"""Vision-language models on the CPU's fused paths: a Qwen2.5-VL folder in the hub's layout (text
settings at the top of config.json) passes the checks and rebuilds from a checkpoint's config;
its quantized language model multiplies through the fused CPU product
(models/quantized/quantized_cpu.py) with the logits of MLX's own quantized layers; SmolVLM's SigLIP
tower attends through kernels.attention with the logits of mlx-vlm's own attention."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from vision_models import tiny_vlm

pytest.importorskip("mlx_vlm", reason="the [vision] extra (mlx-vlm), which [dev] installs")

LORA = {"rank": 8, "alpha": 16.0, "targets": ["query", "key", "value", "out"]}


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory) -> Path:
    return tiny_vlm("smolvlm", tmp_path_factory.mktemp("vlm") / "smolvlm")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("vlm") / "qwen2_5_vl")


def test_a_hub_layout_qwen_folder_passes_the_checks_and_rebuilds(qwen):
    from mlxlab.models.hf import read_config
    from mlxlab.models.vision.vision_language import VisionLanguageModel, build

    VisionLanguageModel.check_config({"pretrained": str(qwen), "lora": dict(LORA)})
    loaded = VisionLanguageModel(0, pretrained=str(qwen))
    rebuilt = build(read_config(qwen))
    shapes = {k: v.shape for k, v in nn.utils.tree_flatten(rebuilt.parameters())}
    want = {k.removeprefix("vlm."): v.shape for k, v in
            nn.utils.tree_flatten(loaded.parameters())}
    assert len(rebuilt.language_model.layers) == len(loaded.layers) == 2
    assert {k: shapes.get(k) for k in want} == want


def test_quantized_layers_take_the_fused_cpu_product(qwen):
    from mlxlab.models.quantized.quantized_cpu import CpuQuantizedEmbedding, CpuQuantizedLinear
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    model = VisionLanguageModel(0, pretrained=str(qwen), quantize=4, lora=dict(LORA))
    rebuilt = VisionLanguageModel(0, **model.checkpoint_init)
    for m in (model, rebuilt):
        quantized = [x for _, x in m.named_modules() if "scales" in x]
        assert len(quantized) == len(m._quantized_layers) > 10
        assert all(isinstance(x, CpuQuantizedLinear | CpuQuantizedEmbedding)
                   for x in quantized)
    ids = mx.array(np.random.default_rng(0).integers(0, 300, (2, 12)), mx.int32)
    fused = model(ids)
    for _, x in model.named_modules():  # back to MLX's own quantized layers
        if isinstance(x, CpuQuantizedLinear):
            x.__class__ = nn.QuantizedLinear
        elif isinstance(x, CpuQuantizedEmbedding):
            x.__class__ = nn.QuantizedEmbedding
    plain = model(ids)
    scale = float(mx.abs(plain).max())
    assert float(mx.abs(fused - plain).max()) <= 1e-4 * scale


def test_the_vision_towers_attention_is_fused_with_mlx_vlms_results(smolvlm):
    from mlx_vlm.models.attention import VisionAttention

    from mlxlab.data.vision_chat import load_processor
    from mlxlab.models.vision.vision_language import VisionLanguageModel
    from vision_models import picture

    model = VisionLanguageModel(0, pretrained=str(smolvlm), lora=dict(LORA))
    attention = [m for _, m in model.named_modules() if isinstance(m, VisionAttention)]
    assert len(attention) == 2 and all(type(m) is not VisionAttention for m in attention)
    text = "<|im_start|>User:<image>What is it?<end_of_utterance>\nAssistant: A cat."
    out = load_processor(smolvlm)(text=[text], images=[[picture(0)]], return_tensors="np")
    inputs = {k: mx.array(np.asarray(v)) for k, v in out.items() if k != "attention_mask"}
    fused = model(**inputs)
    for m in attention:  # back to mlx-vlm's own attention
        m.__class__ = VisionAttention
    plain = model(**inputs)
    assert inputs["input_ids"].shape[1] > 8
    scale = float(mx.abs(plain).max())
    assert float(mx.abs(fused - plain).max()) <= 1e-5 * scale
