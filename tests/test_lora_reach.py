"""LoRA says which layers its targets reached: the default targets on an architecture
whose attention projections have other names (deepseek_v3: q_a_proj, q_b_proj,
kv_a_proj_with_mqa, kv_b_proj; only o_proj matches) are a warning naming model.lora.targets and
the names to use; on Llama they reach q/k/v/o and say so, no warning. Real mlx-lm models, built
tiny from their ModelArgs."""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx_lm.models import deepseek_v3, llama
from omegaconf import OmegaConf

from conftest import REPO
from mlxlab.models.adapters.lora import check_reach, maybe_apply_lora
from mlxlab.models.decoders.mlx_lm_decoder import TARGET_ALIASES, lora_targets


def default_lora() -> dict:
    """conf/model/hf_decoder.yaml's lora node, as a run composes it."""
    node = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "hf_decoder.yaml"))
    return {**node["lora"], "rank": 4}


def adapted(model) -> tuple[dict, list[str]]:
    lora = default_lora()
    mx.random.seed(0)
    maybe_apply_lora(model, lora_targets(lora))
    return lora, list(lora["targets"])


def test_default_targets_on_deepseek_v3_reach_only_o_proj_and_warn(caplog):
    args = deepseek_v3.ModelArgs(
        vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=1)
    model = deepseek_v3.Model(args)
    _, targets = adapted(model)
    with caplog.at_level(logging.INFO, logger="mlxlab.models.adapters.lora"):
        counts = check_reach(model, targets, TARGET_ALIASES)
    assert dict(counts) == {"o_proj": 2}
    said = [r for r in caplog.records if r.levelno == logging.INFO]
    assert said and "LoRA adapters on 2 layers: o_proj x2" in said[0].getMessage()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, caplog.text
    assert warned[0].startswith("model.lora.targets ['query', 'key', 'value', 'out'] reached "
                                "only o_proj x2"), warned[0]
    assert "query, key, value reached no layer" in warned[0]
    # mlx-lm's deepseek_v3 Linear projections (its kv_b_proj is split into per-head matrices)
    assert "model.lora.targets=[kv_a_proj_with_mqa,o_proj,q_a_proj,q_b_proj]" in warned[0], \
        warned[0]


def test_default_targets_on_llama_reach_its_four_projections_without_a_warning(caplog):
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5,
                           vocab_size=64, num_key_value_heads=2)
    model = llama.Model(args)
    _, targets = adapted(model)
    with caplog.at_level(logging.INFO, logger="mlxlab.models.adapters.lora"):
        counts = check_reach(model, targets, TARGET_ALIASES)
    assert dict(counts) == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2}
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], caplog.text


def test_default_targets_on_a_hybrid_reach_its_gated_delta_mixers_and_say_so(caplog):
    """Qwen3.5 (gated delta layers between attention layers): query/key/value reach the gated
    delta net's fused in_proj_qkv, out its out_proj, and the log names them a kind of their own
    (the layers are called linear_attn: by name they would pass for attention)."""
    from mlx_lm.models import qwen3_5

    text = {"model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 64, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
            "linear_key_head_dim": 16, "linear_value_head_dim": 8, "full_attention_interval": 2,
            "head_dim": 16}
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict({"model_type": "qwen3_5",
                                                        "text_config": text}))
    _, targets = adapted(model)
    with caplog.at_level(logging.INFO, logger="mlxlab.models.adapters.lora"):
        counts = check_reach(model, targets, TARGET_ALIASES)
    assert dict(counts) == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2,
                            "in_proj_qkv": 2, "out_proj": 2}
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "kinds: attention 8, gated delta 4" in said[0], said[0]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], caplog.text
