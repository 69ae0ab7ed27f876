"""The hybrid families in and out: a folder as transformers 5 saves it loads through mlx-lm with
transformers' logits (models/hf_normalise.py), and `mlxlab export --format hf` of a
fine-tune writes transformers' own layout, which transformers loads with the fine-tune's logits
(export/architectures.py). Float32, the same random weights on both sides (tests/hybrid_families.py);
the gap allowed is 1e-4 of the logits' scale (measured: 7e-6 and under; the multimodal Qwen3.5: 2.6e-5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hf_helpers import mlx_logits, torch_logits
from hybrid_families import FAMILIES, save_tiny_hybrid
from mlxlab.errors import ConfigError
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

IDS = np.random.default_rng(5).integers(0, 500, size=(2, 24))
# each family, and Granite-4.0-H without experts (its MLP transformers' shared_mlp)
KINDS = (*FAMILIES, "granitemoehybrid_dense")
LIMIT = 1e-4  # of the logits' scale


def transformers_side(folder: Path, auto: str = "AutoModelForCausalLM") -> np.ndarray:
    import torch
    import transformers

    model, info = getattr(transformers, auto).from_pretrained(folder, dtype=torch.float32,
                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return torch_logits(model.eval(), IDS)


def relative_gap(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / max(1.0, np.abs(theirs).max()))


@pytest.mark.parametrize("kind", KINDS)
def test_a_transformers_folder_loads_with_its_logits(kind, tmp_path):
    from mlxlab.export.architectures import HYBRIDS_TESTED, TESTED

    folder = save_tiny_hybrid(kind, tmp_path / kind)
    model = MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    assert model.architecture["model_type"] in (*HYBRIDS_TESTED, *TESTED)
    assert relative_gap(mlx_logits(model, IDS), transformers_side(folder)) <= LIMIT


def test_qwen3_5_as_the_hub_ships_it_loads_its_text_model(tmp_path):
    """The multimodal folder (text_config, a vision tower): its text model, on text."""
    from mlxlab.export.architectures import HYBRIDS_TESTED

    folder = save_tiny_hybrid("qwen3_5_multimodal", tmp_path / "qwen3_5")
    model = MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    assert model.architecture["model_type"] in HYBRIDS_TESTED
    theirs = transformers_side(folder, "AutoModelForImageTextToText")
    assert relative_gap(mlx_logits(model, IDS), theirs) <= LIMIT  # measured 2.6e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_fine_tune_exports_in_transformers_layout(kind, tmp_path):
    """LoRA, 3 steps, then --format hf: transformers loads every tensor under the names it
    saved them, with the fine-tune's logits; the check in the report agrees. --format mlx-lm
    loads in mlx-lm with them too."""
    from safetensors import safe_open

    from mlxlab.export import export_run
    from mlxlab.runs import load_run_model
    from test_mlx_lm_decoders import train_chat

    folder = save_tiny_hybrid(kind, tmp_path / kind)
    _, run = train_chat(folder, tmp_path)
    model, _ = load_run_model(run)
    ours = mlx_logits(model, IDS)
    base = mlx_logits(MLXLMDecoder(vocab_size=1, pretrained=str(folder)), IDS)
    assert np.abs(base - ours).max() > 1e-3  # the adapters changed the model
    report = export_run(run, tmp_path / "hf", "hf", "float32")
    assert report["check"]["max_abs_logit_gap"] <= LIMIT * report["check"]["logit_scale"]
    assert relative_gap(ours, transformers_side(tmp_path / "hf")) <= LIMIT

    def names(path: Path) -> set[str]:
        with safe_open(str(path / "model.safetensors"), "np") as f:
            return set(f.keys())

    assert names(tmp_path / "hf") == names(folder)

    import mlx.core as mx
    import mlx_lm

    export_run(run, tmp_path / "mlx", "mlx-lm", "float32")  # mlx-lm's own layout
    theirs, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert relative_gap(np.array(theirs(mx.array(IDS))), ours) <= LIMIT


def test_every_hybrid_export_trusts_without_pytorch_has_a_family_here():
    """HYBRIDS_TESTED (written unchecked where PyTorch is missing) is one model type per family
    saved here (each load test checks its folder's type is on it; lfm2 is in TESTED)."""
    from mlxlab.export.architectures import HYBRIDS_TESTED, TESTED

    assert len(set(HYBRIDS_TESTED)) == len(FAMILIES) and "lfm2" in TESTED


# mlx-lm arguments a transformers 5 folder of the family leaves at mlx-lm's default, each checked
# to be what transformers computes: Qwen3.5 dense (no MoE keys: 0 experts), a default rope (no
# rope_scaling), Kimi's sigmoid router (transformers' too) with one expert group, OLMo-Hybrid's
# gated-norm eps (1e-5 in both), Nemotron-H's layer list (derived from layers_block_type),
# Falcon-H1's always-present MLP and unrotated rope, Granite's bias-free MLP, Mamba-2's state
# size (= state_size), Gemma 4's rope read from rope_parameters and its layer_types
REVIEWED_DEFAULTS = {
    "qwen3_5": {"num_experts", "num_experts_per_tok", "decoder_sparse_step", "rope_scaling",
                "shared_expert_intermediate_size", "moe_intermediate_size", "norm_topk_prob"},
    "qwen3_next": {"rope_scaling"},
    "kimi_linear": {"rope_scaling", "moe_router_activation_func", "use_grouped_topk"},
    "olmo_hybrid": {"layer_norm_epsilon"},
    "nemotron_h": {"hybrid_override_pattern", "layer_types", "num_hidden_layers"},
    "falcon_h1": {"mamba_use_mlp", "mlp_expansion_factor", "rope_traditional", "rope_scaling"},
    "granitemoehybrid": {"mlp_bias"},
    "mamba2": {"ssm_state_size", "max_position_embeddings"},
    "lfm2": set(),
    "gemma4_text": {"global_partial_rotary_factor", "num_global_key_value_heads",
                    "rope_traditional", "partial_rotary_factor", "sliding_window_pattern"},
}


@pytest.mark.parametrize("kind", FAMILIES)
def test_no_mlx_lm_argument_is_left_at_a_default_nobody_checked(kind, tmp_path):
    """A key mlx-lm reads that the folder does not give (after hf_normalise) takes mlx-lm's
    default silently: each one is on the reviewed list, so a new one (a newer transformers or
    mlx-lm) fails here until it is read from the config or checked."""
    import dataclasses
    import json

    from hybrid_families import tiny_config
    from mlxlab.models.mlx_lm_classes import mlx_lm_config, model_classes

    tiny_config(kind).save_pretrained(tmp_path)
    config = mlx_lm_config(json.loads((tmp_path / "config.json").read_text()), tmp_path)
    args = model_classes(config, tmp_path)[1]
    if kind == "qwen3_5":  # the text model's arguments
        from mlx_lm.models.qwen3_5 import TextModelArgs as args
    left = {f.name for f in dataclasses.fields(args) if f.name not in config}
    assert left == REVIEWED_DEFAULTS[kind]


def test_a_layer_pattern_mlx_lm_cannot_build_is_refused(tmp_path):
    """mlx-lm's Qwen3-Next places full attention every n-th layer; another pattern is one
    line, not a model with the wrong layers."""
    import json

    folder = save_tiny_hybrid("qwen3_next", tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=3, layer_types=["full_attention", "linear_attention",
                                                    "full_attention"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"layer_types=.*full attention every n-th layer"):
        MLXLMDecoder(vocab_size=1, pretrained=str(folder))


def test_mamba2_with_several_groups_is_refused(tmp_path):
    import json

    folder = save_tiny_hybrid("mamba2", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_groups": 2}))
    with pytest.raises(ConfigError, match=r"n_groups=2: .*only n_groups=1 loads here"):
        MLXLMDecoder(vocab_size=1, pretrained=str(folder))


@pytest.mark.slow
def test_a_kernel_written_on_the_wrong_axis_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """The export's convolution kernels left in mlx-lm's (C, K, 1): transformers refuses the
    shape, and the one line names the tensor, the shape written and the one expected; nothing
    is left at --out."""
    import mlxlab.export.architectures as architectures
    from mlxlab.cli.export import main
    from test_mlx_lm_decoders import train_chat

    _, run = train_chat(save_tiny_hybrid("mamba2", tmp_path / "mamba2"), tmp_path)
    monkeypatch.setattr(architectures, "_conv_axes", dict)
    capsys.readouterr()
    assert main([str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert ("tensor backbone.layers.0.mixer.conv1d.weight: written with shape (160, 4, 1), "
            "transformers expects (160, 1, 4) and 1 more") in lines[0]
    assert "above report" not in lines[0] and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_a_multimodal_qwen3_5_exports_as_the_text_model_it_trained(tmp_path):
    """mlx-lm loads Qwen3.5's text model only: the export is Qwen3_5ForCausalLM (no config
    claiming a vision tower whose weights it lacks), with the fine-tune's logits."""
    import json

    from mlxlab.export import export_run
    from mlxlab.runs import load_run_model
    from test_mlx_lm_decoders import train_chat

    _, run = train_chat(save_tiny_hybrid("qwen3_5_multimodal", tmp_path / "qwen3_5"), tmp_path)
    model, _ = load_run_model(run)
    export_run(run, tmp_path / "hf", "hf", "float32")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and "vision_config" not in config
    assert relative_gap(mlx_logits(model, IDS), transformers_side(tmp_path / "hf")) <= LIMIT


@pytest.mark.parametrize(("kind", "change", "says"), [
    ("gemma4_text", {"per_layer_config": {"0": {"head_dim": 32}}},
     r"per_layer_config=.*one head size .* for every full-attention layer"),
    ("lfm2", {"tie_word_embeddings": False}, r"tie_word_embeddings=false: .*own lm_head"),
    ("granitemoehybrid", {"mamba_n_groups": 2}, r"mamba_n_groups=2: .*per group"),
], ids=["gemma4-sliding-override", "lfm2-untied", "granite-groups"])
def test_a_config_mlx_lm_would_build_otherwise_is_one_line(kind, change, says, tmp_path):
    import json

    from hybrid_families import tiny_config
    from mlxlab.models.mlx_lm_classes import mlx_lm_config

    tiny_config(kind).save_pretrained(tmp_path)
    config = {**json.loads((tmp_path / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=says):
        mlx_lm_config(config, tmp_path)
