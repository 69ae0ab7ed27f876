"""Tiny random hybrid checkpoints as transformers 5 saves them (`save_pretrained`, its own keys:
`rope_parameters`, `layer_types`, fused experts, no hub-only keys): one per family mlx-lm runs
through a gated delta net, a Mamba-2 mixer or a short convolution, with a ChatML tokenizer so a
run can fine-tune it. Every parameter is drawn away from its initial value (norm weights, A_log,
dt_bias, conv kernels too), so a norm read with the wrong offset or a kernel on the wrong axis
changes the logits."""

from __future__ import annotations

from pathlib import Path

from hf_helpers import tiny

COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
GATED = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
             linear_num_key_heads=2, linear_num_value_heads=4)
MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)


def _configs(t, vocab: int) -> dict:
    """model_type -> its tiny transformers config (each family's sequence mixer, its full
    attention layer and, where the family has one, its MoE block)."""
    c = {**COMMON, "vocab_size": vocab}
    return {
        "qwen3_5": lambda: t.Qwen3_5TextConfig(
            **c, **GATED, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
        "qwen3_next": lambda: t.Qwen3NextConfig(
            **c, **GATED, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32),
        "kimi_linear": lambda: t.KimiLinearConfig(
            **{**c, "num_key_value_heads": 4}, num_hidden_layers=2, layer_types=[
                "linear_attention", "full_attention"], linear_head_dim=16, linear_num_heads=4,
            linear_conv_kernel_dim=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, num_experts=4, num_experts_per_token=2,
            moe_intermediate_size=32, num_shared_experts=1, first_k_dense_replace=1,
            mlp_layer_types=["dense", "sparse"]),
        # Kimi-Linear whose latent sizes all differ (rank, nope, rope, value), with delta
        # layers on both sides of its latent layer and two shared experts
        "kimi_linear_mla": lambda: t.KimiLinearConfig(
            **{**c, "num_key_value_heads": 4}, num_hidden_layers=3, layer_types=[
                "linear_attention", "full_attention", "linear_attention"], linear_head_dim=16,
            linear_num_heads=4, linear_conv_kernel_dim=3, kv_lora_rank=32, q_lora_rank=None,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, num_experts=4,
            num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=2,
            first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"]),
        "olmo_hybrid": lambda: t.OlmoHybridConfig(
            **c, **GATED, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
        "nemotron_h": lambda: t.NemotronHConfig(
            **c, num_hidden_layers=4, layers_block_type=["mamba", "attention", "mlp", "moe"],
            mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
            chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32),
        # Nemotron-H as the hub ships it: without experts (Nemotron-H 8B), or with every
        # feed-forward layer routed (Nemotron 3 Nano); two mixer groups
        "nemotron_h_dense": lambda: t.NemotronHConfig(
            **c, num_hidden_layers=4, layers_block_type=["mamba", "attention", "mlp", "mamba"],
            mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
            chunk_size=16),
        "nemotron_h_moe": lambda: t.NemotronHConfig(
            **c, num_hidden_layers=4, layers_block_type=["mamba", "attention", "moe", "mamba"],
            mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
            chunk_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32),
        "falcon_h1": lambda: t.FalconH1Config(
            **c, **MAMBA, num_hidden_layers=2, mamba_d_ssm=128,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
            embedding_multiplier=2.0, lm_head_multiplier=0.5, key_multiplier=0.7,
            attention_in_multiplier=1.1, attention_out_multiplier=0.9,
            ssm_multipliers=[1.2, 0.8, 1.1, 0.9, 1.3], ssm_in_multiplier=0.9,
            ssm_out_multiplier=1.1, mlp_multipliers=[1.1, 0.9]),
        "granitemoehybrid": lambda: t.GraniteMoeHybridConfig(
            **c, **MAMBA, num_hidden_layers=2, layer_types=["mamba", "attention"],
            num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
            embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5,
            attention_multiplier=0.25),
        # Granite 4.0-H without experts (micro, 1B, 350M): its MLP is the shared_mlp, as wide
        # as shared_intermediate_size (intermediate_size, the experts' width, unused)
        "granitemoehybrid_dense": lambda: t.GraniteMoeHybridConfig(
            **c, **MAMBA, num_hidden_layers=2, layer_types=["mamba", "attention"],
            num_local_experts=0, shared_intermediate_size=32, embedding_multiplier=2.0,
            logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.25),
        "mamba2": lambda: t.Mamba2Config(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
            n_groups=1, state_size=16, expand=2, conv_kernel=4, chunk_size=16,
            tie_word_embeddings=False),
        "lfm2": lambda: t.Lfm2Config(
            **{**{k: v for k, v in c.items() if k != "head_dim"}, "tie_word_embeddings": True},
            num_hidden_layers=2,
            layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
            conv_L_cache=3),
        "gemma4_text": lambda: t.Gemma4TextConfig(
            **c, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
            sliding_window=8, hidden_size_per_layer_input=16, vocab_size_per_layer_input=vocab,
            global_head_dim=32),
    }


FAMILIES = ("qwen3_5", "qwen3_next", "kimi_linear", "olmo_hybrid", "nemotron_h", "falcon_h1",
            "granitemoehybrid", "mamba2", "lfm2", "gemma4_text")


def _multimodal_qwen3_5(t, vocab: int):
    """Qwen3.5 as the hub ships it (Qwen3_5ForConditionalGeneration): the text model under
    text_config, a one-block vision tower beside it."""
    text = dict(**COMMON, **GATED, vocab_size=vocab, num_hidden_layers=2,
                layer_types=["linear_attention", "full_attention"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, patch_size=4)
    return t.Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=vocab - 4,
                           video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
                           vision_end_token_id=vocab - 1)


def tiny_config(kind: str):
    """The transformers config of the tiny `kind` (vocabulary 512), without its weights."""
    import transformers as t

    return _configs(t, 512)[kind]()


def save_tiny_hybrid(kind: str, path: Path, seed: int = 0, **overrides) -> Path:
    """The tiny random `kind` saved by transformers at `path`, with a ChatML tokenizer
    ("qwen3_5_multimodal": Qwen3.5 with its vision tower); `overrides` change its config's
    keys (wider rows, more layers)."""
    import torch
    import transformers as t

    tok = tiny.tiny_tokenizer("qwen2", chat="chatml")
    if kind == "qwen3_5_multimodal":
        config = _multimodal_qwen3_5(t, tok.get_vocab_size())
        model = t.Qwen3_5ForConditionalGeneration(config)
    else:
        config = _configs(t, tok.get_vocab_size())[kind]()
        if overrides:
            config = type(config).from_dict({**config.to_dict(), **overrides})
    config.eos_token_id = config.pad_token_id = tok.token_to_id("<|im_end|>")
    config.bos_token_id = None
    torch.manual_seed(seed)
    if kind != "qwen3_5_multimodal":
        model = t.AutoModelForCausalLM.from_config(config)
    model = model.float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:  # norms, A_log, dt_bias, biases: off their initial value
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    t.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                              pad_token="<|im_end|>", chat_template=tiny.CHATML
                              ).save_pretrained(path)
    return path
