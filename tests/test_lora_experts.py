"""Adapters on a MoE layer's routed experts (models/adapters/lora_experts.py,
models/adapters/routed_experts.py): tiny random Qwen3-MoE, Mixtral and GraniteMoE folders (and
DeepSeek-V3's, with its dense first layer and shared expert) written by transformers from their
configs (scripts/tiny_hf_model.py), loaded through mlxlab's decoder as a run loads them.

With B at zero the adapted forward is the base's (LoRA and DoRA, float and 4-bit experts); with
B drawn, the gradients of the expert adapters are non-zero for exactly the experts the routers
sent a token to (counted by counting_routes) and the routers get none; the fused model computes
the adapted one. A trained run says which layer kinds its adapters reached, counts each
expert's routed tokens at each evaluation, exports to transformers (checked there), to mlx-lm's
adapters, to PEFT (on transformers 5's expert parameters) and to GGUF (llama.cpp's
log-probabilities beside mlxlab's), packs, fits its micro-batch and is served; targets that
name experts and reach none are one line, exit 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hf_helpers import mlx_logits, save_tiny_model
from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import AdapterLayer, fuse_lora, layer_kinds
from mlxlab.models.adapters.lora_experts import DoRASwitchLinear, LoRASwitchLinear
from mlxlab.models.adapters.routed_experts import (
    counting_routes,
    expert_blocks,
    expert_update_norms,
)
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

KINDS = ("qwen3_moe", "mixtral", "granitemoe")
# 8 experts, 2 a token; every expert's input a multiple of 64, so model.quantize=4 packs them all
SIZES = {"qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 64},
         "mixtral": {"num_local_experts": 8},
         "granitemoe": {"num_local_experts": 8, "intermediate_size": 64},
         "deepseek_v3": {"n_routed_experts": 8, "moe_intermediate_size": 64}}
TARGETS = ["q_proj", "v_proj", "experts"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("moe"), {}

    def folder(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_model(kind, root / kind, chat="chatml", **SIZES[kind])
        return made[kind]

    return folder


def decoder(folder: Path, lora: dict | None = None, quantize: int | None = None) -> MLXLMDecoder:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    mx.random.seed(0)
    return MLXLMDecoder(vocab_size=vocab, pretrained=str(folder), lora=lora, quantize=quantize)


def draw_adapters(model) -> None:
    """B (and DoRA's magnitudes) drawn away from their start, so every factor has a gradient
    and the adapters change the outputs."""
    rng = np.random.default_rng(1)
    for _, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            m.lora_b = mx.array(rng.normal(0, 0.05, m.lora_b.shape).astype(np.float32))
            if "m" in m:
                m.m = m.m * mx.array(rng.uniform(0.9, 1.1, m.m.shape).astype(np.float32))


@pytest.mark.parametrize("quantize", [None, 4], ids=["float", "4bit"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("arch", [*KINDS, "deepseek_v3"])  # (its dense first layer, shared expert)
def test_zero_b_is_the_base_gradients_reach_the_routed_experts_and_fusing_keeps_it(
        arch, kind, quantize, folders):
    folder = folders(arch)
    ids = np.array([[17, 250]])  # two positions: top-k of them leaves experts without a token
    base = mlx_logits(decoder(folder, quantize=quantize), ids)
    model = decoder(folder, {"rank": 4, "alpha": 8, "targets": TARGETS, "kind": kind}, quantize)
    experts = [m for m in model.modules() if isinstance(m, LoRASwitchLinear)]
    moe_layers = sum(1 for n, _ in model.named_modules() if n.endswith(".switch_mlp"))
    assert moe_layers and len(experts) == 3 * moe_layers  # gate, up, down in every MoE layer
    assert all(isinstance(m, DoRASwitchLinear) == (kind == "dora") for m in experts)
    if quantize:  # QLoRA: the experts stay packed under their adapters
        assert all("scales" in m.linear for m in experts)  # (some archs keep down_proj 8-bit)
    scale = np.abs(base).max()
    assert np.abs(mlx_logits(model, ids) - base).max() <= 1e-5 * scale

    draw_adapters(model)
    with counting_routes(model) as counts:
        adapted = mlx_logits(model, ids)
    assert np.abs(adapted - base).max() > 1e-3 * scale  # the drawn adapters change the outputs
    model.train()
    grads = dict(tree_flatten(nn.value_and_grad(
        model, lambda m: m(mx.array(ids)).astype(mx.float32).square().mean())(model)[1]))
    assert not [n for n in grads if ".gate.weight" in n or ".router." in n]  # routers frozen
    routed_some = idle_some = False
    for block in expert_blocks(model):
        routed = counts[block].tokens > 0
        routed_some, idle_some = routed_some or routed.any(), idle_some or not routed.all()
        for name in [n for n, m in model.named_modules()
                     if isinstance(m, LoRASwitchLinear) and n.startswith(f"{block}.")]:
            for leaf in ("lora_a", "lora_b", *(["m"] if kind == "dora" else [])):
                g = np.array(grads[f"{name}.{leaf}"]).reshape(len(routed), -1)
                reached = np.abs(g).max(axis=1) > 0
                assert np.array_equal(reached, routed), (name, leaf, reached, routed)
    assert routed_some and idle_some, "the probe must leave some experts without tokens"

    fuse_lora(model, dequantize=True)  # what the Hugging Face export writes
    assert not [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert np.abs(mlx_logits(model, ids) - adapted).max() <= 1e-5 * scale


def test_targets_pick_projections_experts_and_the_router_only_when_named(folders):
    folder = folders("qwen3_moe")
    model = decoder(folder, {"rank": 4, "targets": ["q_proj", "switch_mlp.gate_proj"]})
    names = {n.split("layers.0.", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, AdapterLayer) and "layers.0." in n}
    assert names == {"self_attn.q_proj", "mlp.switch_mlp.gate_proj"}
    model = decoder(folder, {"rank": 4, "targets": ["experts.down_proj", "gate"]})
    names = {n.split("layers.0.", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, AdapterLayer) and "layers.0." in n}
    assert names == {"mlp.switch_mlp.down_proj", "mlp.gate"}  # the router, as named
    kinds = layer_kinds(model)
    assert {k: len(v) for k, v in kinds.items()} == {"routed experts": 2, "router": 2}


@pytest.mark.parametrize("targets, expect", [
    (["q_proj", "switch_mlp.gate"], "['switch_mlp.gate'] name the routed experts but reach "
                                    "none: this model's experts are ['switch_mlp.down_proj'"),
    (["q_proj", "experts"], "this model has no routed experts"),
])
def test_targets_that_name_experts_and_reach_none_are_one_line_exit_2(targets, expect, folders,
                                                                      tmp_path, cli_env):
    from conftest import mlxlab

    folder = folders("qwen3_moe") if "gate" in targets[1] else save_tiny_model(
        "llama", tmp_path / "llama")
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        decoder(folder, {"rank": 4, "targets": targets})
    if "gate" not in targets[1]:
        return  # the command line once: the same check, before a run folder exists
    out = tmp_path / "out"
    done = mlxlab("train", "experiment=finetune_chat", f"model.pretrained={folder}",
                  f"model.lora.targets=[{','.join(targets)}]", f"hydra.run.dir={out}",
                  env=cli_env)
    lines = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert done.returncode == 2 and len(lines) == 1 and expect in lines[0], done.stderr[-2000:]
    assert not out.exists()


def trained(folder: Path, root: Path, *overrides: str) -> tuple[dict, Path]:
    from test_mlx_lm_decoders import train_chat

    return train_chat(folder, root, f"model.lora.targets=[{','.join(TARGETS)}]", *overrides)


@pytest.mark.parametrize("arch", [  # one in the default run, the others' layouts slow
    "qwen3_moe", *(pytest.param(a, marks=pytest.mark.slow)
                   for a in ("mixtral", "granitemoe", "deepseek_v3"))])
def test_a_run_reports_its_reach_and_exports_with_its_experts(arch, folders, tmp_path, caplog):
    from mlxlab.export import export_gguf, export_run
    from mlxlab.runs import load_run_model
    from test_export_gguf_moe import IDS, compare, llama_cpp_steps, rounding_shift

    with caplog.at_level(logging.INFO):
        _, run = trained(folders(arch), tmp_path)
    said = [r.getMessage() for r in caplog.records if "LoRA adapters on" in r.getMessage()]
    moe = 1 if arch == "deepseek_v3" else 2  # (its first layer is dense; no q_proj / v_proj)
    assert len(said) == 1 and f"switch_mlp.gate_proj x{moe}" in said[0], said
    assert f"routed experts {3 * moe} (8 experts each" in said[0], said
    counted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("experts at")]
    assert counted and "MoE layers" in counted[0], counted
    table = json.loads((run / "tracking" / "artifacts" / "experts" /
                        "step_00000003.json").read_text())
    # the checkpoint holds the adapters alone, the experts' as (experts, ...) 3-D tensors
    saved = mx.load(str(run / "checkpoints" / "best" / "model.safetensors"))
    stacked = {n: v.shape for n, v in saved.items() if ".switch_mlp." in n}
    assert len(stacked) == 6 * moe and all(len(s) == 3 and s[0] == 8 for s in stacked.values())
    model, _ = load_run_model(run)
    trained_norms = {b.removeprefix("lm.model."): n
                     for b, n in expert_update_norms(model).items()}
    for layer, row in table.items():
        assert len(row["tokens"]) == len(row["norms"]) and sum(row["tokens"]) > 0
        assert np.allclose(row["norms"], trained_norms[layer.removeprefix("model.")])
    assert all(max(row["norms"]) > 0 for row in table.values())  # the experts trained

    tuned = mlx_logits(model, np.array([IDS]))
    report = export_run(run, tmp_path / "hf", "hf", "float32")  # checked in transformers
    assert report["check"]["status"] == "checked", report["check"]
    assert report["check"]["max_abs_logit_gap"] <= 1e-4 * np.abs(tuned).max()
    out = tmp_path / "f32.gguf"
    export_gguf(run, out, "f32")
    ours, shift = rounding_shift(lambda: load_run_model(run)[0], "f32", np.array([IDS]))
    theirs, allowed = compare(llama_cpp_steps(out, IDS), ours, shift)
    assert theirs <= 3 * allowed, (theirs, allowed)
    peft_carries_the_experts(run, folders(arch), tmp_path / "peft")


def peft_carries_the_experts(run: Path, base: Path, out: Path) -> None:
    """PEFT puts the run's adapters on transformers 5's expert parameters (target_parameters)
    and computes the fine-tune, which the same model with its expert adapters off is not."""
    from mlxlab.export import export_run
    from mlxlab.runs import load_run_model
    from test_export_peft import peft_logits
    from test_mlx_lm_decoders import IDS

    report = export_run(run, out, "peft", "float32")
    assert report["check"]["checker"].endswith(" + peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    assert config["r"] == 16 and config["lora_alpha"] == 16 * 2.0  # gate and up: rank 2 x 8
    model = load_run_model(run)[0]
    ours = mlx_logits(model, IDS)
    theirs = peft_logits(base, out)
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
    for m in model.modules():
        if isinstance(m, LoRASwitchLinear):
            m.adapter_on = False
    assert np.abs(mlx_logits(model, IDS) - ours).max() > 1e-2 * np.abs(ours).max()


@pytest.mark.slow  # a second process loads the run and serves it (16 s)
def test_a_packed_run_fits_its_micro_batch_serves_and_its_adapters_load_in_mlx_lm(
        folders, tmp_path, cli_env):
    import os
    import re
    import signal
    import subprocess
    import time

    import mlx_lm
    import openai

    from conftest import MLXLAB
    from mlxlab.export import export_run
    from mlxlab.runs import load_run_model
    from mlxlab.runs.inference import complete, load_run

    _, run = trained(folders("qwen3_moe"), tmp_path, "data.pack=true", "trainer.micro_batch=auto")
    model, _ = load_run_model(run)
    assert [m for m in model.modules() if isinstance(m, LoRASwitchLinear)]
    ids = np.array([[5, 17, 99, 3, 250, 31, 7, 8]])
    export_run(run, tmp_path / "mlx", "mlx-lm", "float32", lora="adapters")
    config = json.loads((tmp_path / "mlx" / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and "mlp.switch_mlp.gate_proj" in \
        config["lora_parameters"]["keys"]
    theirs, _ = mlx_lm.load(str(tmp_path / "mlx"), adapter_path=str(tmp_path / "mlx" / "adapters"))
    assert np.abs(np.array(theirs(mx.array(ids))) - mlx_logits(model, ids)).max() <= 1e-4

    prompt, key, log = "Once upon a time", "k-0123", tmp_path / "serve.log"
    expected = complete(load_run(run), prompt, 12, temperature=0)
    with open(log, "w") as out:
        proc = subprocess.Popen([MLXLAB, "serve", str(run), "--port", "0"], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, **cli_env, "MLXLAB_API_KEY": key})
    try:
        deadline = time.monotonic() + 240
        while not (found := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{found.group(1)}/v1", api_key=key,
                               max_retries=0, timeout=120)
        answer = client.completions.create(model=str(run), prompt=prompt, max_tokens=12,
                                           temperature=0)
        # the same tokens; the server holds back a character its last bytes leave unfinished
        assert answer.choices[0].text.rstrip("\ufffd") == expected.rstrip("\ufffd")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_a_run_with_dora_on_the_experts_sigkilled_mid_run_resumes_bitwise(folders, tmp_path,
                                                                          cli_env):
    """DoRA on the experts (and q, v), SIGKILLed after step 4 and resumed: bitwise."""
    from test_mlx_lm_decoders import resumes_bitwise

    resumes_bitwise(folders("qwen3_moe"), tmp_path, cli_env,
                    f"model.lora.targets=[{','.join(TARGETS)}]", "model.lora.kind=dora")


def test_dora_on_the_experts_is_refused_by_peft_and_mlx_lms_adapters_in_one_line(
        folders, tmp_path, capsys):
    from mlxlab.cli.export import main

    _, run = trained(folders("qwen3_moe"), tmp_path, "model.lora.kind=dora")
    for args, expect in ((["--format", "peft"], "DoRA adapters on the routed experts have no "
                                                "PEFT form"),
                         (["--format", "mlx-lm", "--adapters"], "no mlx-lm adapter form")):
        out = tmp_path / "out"
        capsys.readouterr()
        assert main([str(run), *args, "--out", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], lines
        assert not out.exists()
    assert main([str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0  # merged


def test_the_evaluation_line_names_experts_that_received_no_token():
    from mlxlab.training.expert_reach import said

    tokens = {"lm.model.layers.0.mlp": np.array([5, 9, 3, 7]),
              "lm.model.layers.1.mlp": np.array([12, 0, 12, 0])}
    norms = {"lm.model.layers.0.mlp": np.array([0.1, 0.2, 0.1, 0.3]),
             "lm.model.layers.1.mlp": np.array([0.2, 0.0, 0.25, 0.0])}
    line = said(tokens, norms)
    assert line.startswith("2 MoE layers, 6/8 experts received tokens (the fewest 0 positions)")
    assert "no tokens: layers.1.mlp: experts [1, 3] (their adapters' norm at most 0)" in line


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_qlora_and_qdora_on_4bit_experts_train_and_export_checked(kind, folders, tmp_path):
    from mlxlab.export import export_run
    from mlxlab.runs import load_run_model

    _, run = trained(folders("qwen3_moe"), tmp_path, "model.quantize=4", f"model.lora.kind={kind}")
    model, _ = load_run_model(run)
    experts = [m for m in model.modules() if isinstance(m, LoRASwitchLinear)]
    assert experts and all("scales" in m.linear for m in experts)  # still packed
    assert max(float(mx.abs(m.lora_b).max()) for m in experts) > 0  # trained
    report = export_run(run, tmp_path / "hf", "hf", "float32")  # dequantized, fused, checked
    assert report["check"]["status"] == "checked", report["check"]


def tiny_quantized_dora(num_experts: int = 4, in_dims: int = 128, out_dims: int = 32
                        ) -> DoRASwitchLinear:
    """DoRA on 4-bit stacked experts, B and m drawn away from their start."""
    from mlx_lm.models.switch_layers import SwitchLinear

    mx.random.seed(3)
    experts = SwitchLinear(in_dims, out_dims, num_experts).to_quantized(group_size=64, bits=4)
    layer = DoRASwitchLinear.from_base(experts, rank=4, alpha=8.0, dropout=0.0)
    draw_adapters(layer)
    return layer


def dora_reference(layer: DoRASwitchLinear, x: mx.array, indices: mx.array) -> np.ndarray:
    """DoRA's formula with every expert dequantized: m_e / ||W_e + s B_e A_e||_rows *
    (W_e + s B_e A_e) x for each token's experts."""
    from mlxlab.models.adapters.routed_experts import expert_weight

    adapted = np.array(expert_weight(layer.linear).astype(mx.float32) + layer.delta())
    rows = np.array(layer.m) / np.linalg.norm(adapted, axis=-1)
    xs, picks = np.array(x)[:, 0, 0], np.array(indices)
    return np.stack([[rows[e] * (adapted[e] @ xs[t]) for e in picks[t]]
                     for t in range(len(xs))])[:, :, None]


def test_dora_on_quantized_experts_takes_the_base_norms_once(monkeypatch):
    """The frozen base's row norms are taken when the adapter is made (not a parameter: not
    trained, saved or counted) and again only when the base's weights are replaced; a forward
    dequantizes no expert and equals DoRA's formula on the dequantized experts."""
    from mlx_lm.models.switch_layers import SwitchLinear

    from mlxlab.models.adapters import lora_experts

    layer = tiny_quantized_dora()
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(6, 1, 1, 128)).astype(np.float32))
    indices = mx.array(rng.integers(0, 4, size=(6, 2)))
    dequantized = []

    def counted(linear):
        dequantized.append(linear)
        return expert_weight(linear)

    expert_weight = lora_experts.expert_weight
    monkeypatch.setattr(lora_experts, "expert_weight", counted)
    model = nn.Sequential(layer)
    for _ in range(3):  # three steps: the forward and its gradients
        out = layer(x, indices)
        grads = nn.value_and_grad(model, lambda m: m.layers[0](x, indices).square().sum())(
            model)[1]
        mx.eval(out, grads)
    assert not dequantized, f"{len(dequantized)} dequantizes of every expert in 3 steps"
    scale = np.abs(np.array(out)).max()
    assert np.abs(np.array(out) - dora_reference(layer, x, indices)).max() <= 1e-5 * scale
    assert {k for k, _ in tree_flatten(layer.trainable_parameters())} == {"lora_a", "lora_b", "m"}
    assert not [k for k, _ in tree_flatten(layer.parameters()) if "norm" in k]
    assert "_frozen_norm2" in layer.state  # what a compiled step reads
    # another base loaded into the layer (a checkpoint's): its norms are taken again
    before = layer.linear.weight
    mx.random.seed(4)
    layer.linear.update(SwitchLinear(128, 32, 4).to_quantized(group_size=64, bits=4)
                        .parameters())
    assert layer.linear.weight is not before
    taken = len(dequantized)
    out = layer(x, indices)
    assert len(dequantized) == taken + 1
    scale = np.abs(np.array(out)).max()
    assert np.abs(np.array(out) - dora_reference(layer, x, indices)).max() <= 1e-5 * scale


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "4bit"])
def test_expert_adapters_are_mlx_lms_layer_with_its_names_shapes_and_outputs(quantize):
    """LoRA on the experts is mlx-lm's LoRASwitchLinear (a subclass): the parameter names a
    checkpoint and mlx-lm's adapter files hold, their shapes and the forward are mlx-lm's own
    layer's; DoRA adds `m` alone; with the switch off the layer is its base."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.lora import LoRASwitchLinear as MLXLoRASwitchLinear

    mx.random.seed(5)
    experts = SwitchLinear(128, 32, 4, bias=True)
    if quantize:
        experts = experts.to_quantized(group_size=64, bits=4)
    ours = LoRASwitchLinear.from_base(experts, rank=4, alpha=8.0, dropout=0.0)
    theirs = MLXLoRASwitchLinear.from_base(experts, r=4, dropout=0.0, scale=2.0)
    assert isinstance(ours, MLXLoRASwitchLinear)
    draw_adapters(ours)
    theirs.lora_a, theirs.lora_b = ours.lora_a, ours.lora_b
    named = {k: v.shape for k, v in tree_flatten(ours.parameters())}
    assert named == {k: v.shape for k, v in tree_flatten(theirs.parameters())}
    base = {"linear.weight", "linear.bias", *(["linear.scales", "linear.biases"] if quantize
                                                 else [])}
    assert set(named) == {"lora_a", "lora_b", *base}  # the names checkpoints have always held
    assert named["lora_a"] == (4, 4, 128) and named["lora_b"] == (4, 32, 4)
    assert {k for k, _ in tree_flatten(ours.trainable_parameters())} == {"lora_a", "lora_b"}
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(size=(6, 1, 1, 128)).astype(np.float32))
    indices = mx.array(rng.integers(0, 4, size=(6, 2)))
    assert np.array_equal(np.array(ours(x, indices)), np.array(theirs(x, indices)))
    ours.adapter_on = False
    assert np.array_equal(np.array(ours(x, indices)), np.array(experts(x, indices)))
    dora = DoRASwitchLinear.from_base(experts, rank=4, alpha=8.0, dropout=0.0)
    assert {k for k, _ in tree_flatten(dora.parameters())} == {*named, "m"}
    assert (ours.kind, dora.kind) == ("lora", "dora")
