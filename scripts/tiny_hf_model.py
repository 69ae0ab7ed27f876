"""Write a tiny random-weight decoder checkpoint with transformers (no download): config.json,
model.safetensors and a tokenizer trained on the shipped TinyStories sample. For trying
`model.pretrained=` and `mlxlab export` offline, and for the parity tests.

    python scripts/tiny_hf_model.py llama /tmp/tiny-llama [--seed 0]
    (llama | qwen2 | mistral | llama3: llama with llama3 rope scaling, tied embeddings |
     qwen3 | gemma3_text | phi3 | olmo2 | qwen3_moe | mixtral | ... : KINDS)

config.json is written as the hub's checkpoints carry it (transformers 4's keys): transformers 5
writes `rope_parameters` and `num_local_experts` where those have `rope_theta` / `rope_scaling` /
`num_experts`, and mlx-lm reads the hub's. gemma3_text has Gemma's tokens (<pad>, <eos>, <bos>;
with --chat gemma, generation_config.json stopping at <eos> and <end_of_turn> as Gemma 3's
instruction-tuned checkpoints do): end tokens on no fixed list.
    python scripts/tiny_hf_model.py llama /tmp/tiny-llama --no-torch [--hidden 512 --layers 8]
    python scripts/tiny_hf_model.py llama /tmp/tiny-chat --chat chatml   (a chat template:
    chatml | llama3 | qwen2.5 | mistral, with its special tokens in the tokenizer)

Needs transformers and torch (the dev extra); `--no-torch` writes a Llama with MLX and
tokenizers only (`save_tiny_llama_without_torch`), for a machine without PyTorch (a GPU box
with the CUDA MLX wheels alone: benchmarks/speed/bench_gpu.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import processors

from mlxlab.config import asset_path
from mlxlab.data.tokenizer import build_tokenizer

KINDS = ("llama", "qwen2", "mistral", "llama3", "qwen3", "gemma3_text", "phi3", "olmo2",
         "qwen3_moe", "mixtral", "gemma2", "granite", "starcoder2", "deepseek_v3", "granitemoe",
         "lfm2", "cohere2", "exaone4", "glm4", "olmo3")

# Real chat templates, verbatim from the models' tokenizer_config.json (ChatML as OpenHermes /
# TRL write it; Meta-Llama-3-8B-Instruct; Qwen2.5-7B-Instruct, with tools and a default system
# prompt; Mistral-7B-Instruct-v0.1), with the special tokens each one writes and ends turns on.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
    "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] "
    "| trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
    "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# style: (template, added special tokens, bos, eos)
CHAT_STYLES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<s>", "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": (QWEN25, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "mistral": (MISTRAL, [], "<s>", "</s>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<s>", "<end_of_turn>"),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|end|>"),
}


# family: its special tokens (as the real tokenizers number them), BOS, EOS. Gemma's <eos> and
# <bos> are on no fixed list: what names its end of text is the model folder.
FAMILIES = {"llama": (["<s>", "</s>"], "<s>", "</s>"),
            "qwen2": (["<|endoftext|>"], None, "<|endoftext|>"),
            "gemma": (["<pad>", "<eos>", "<bos>"], "<bos>", "<eos>")}


def tiny_tokenizer(kind: str, vocab_size: int = 512, chat: str | None = None):
    """A byte-level BPE in the family's style (FAMILIES): Llama/Mistral <s> BOS + </s> EOS, Qwen2
    <|endoftext|> and no BOS, Gemma <bos> + <eos>; with `chat`, that chat style's special tokens
    too."""
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")[:400]
    specials, bos, _ = FAMILIES[kind]
    specials = specials + (CHAT_STYLES[chat][1] if chat else [])
    tok = build_tokenizer(stories, vocab_size=vocab_size, kind="bytelevel_bpe",
                          special_tokens=specials)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def save_chat_tokenizer(style: str, path: str | Path, kind: str = "llama",
                        save_jinja: bool = True) -> Path:
    """A tiny tokenizer folder (tokenizer.json, tokenizer_config.json) with the chat `style`'s
    template and special tokens, written by transformers as a real model's is (the template in
    chat_template.jinja, or in tokenizer_config.json with save_jinja=False)."""
    from transformers import PreTrainedTokenizerFast

    template, _, bos, eos = CHAT_STYLES[style]
    tok = tiny_tokenizer("qwen2" if style == "qwen2.5" else kind, chat=style)
    specials = {"eos_token": eos, "pad_token": eos}
    if bos is not None:
        specials["bos_token"] = bos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **specials)
    fast.save_pretrained(path, save_jinja_files=save_jinja)
    return Path(path)


def _config(kind: str, tok, eos: str, overrides: dict):
    """The transformers config of a tiny `kind`: hidden 64, 2 layers, 4 query / 2 key-value heads
    (head size 16), untied unless the family ties."""
    import transformers as t

    common = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        eos_token_id=tok.token_to_id(eos), tie_word_embeddings=False,
    )
    start = "<bos>" if tok.token_to_id("<bos>") is not None else "<s>"
    bos = {"bos_token_id": tok.token_to_id(start), "pad_token_id": tok.token_to_id(eos)}
    gqa = {"num_key_value_heads": 2, "head_dim": 16}
    if kind == "qwen2":
        return t.Qwen2Config(**{**common, "rope_theta": 1e6, "num_key_value_heads": 2,
                                "tie_word_embeddings": True, **overrides})
    if kind == "mistral":
        return t.MistralConfig(**{**common, "num_key_value_heads": 1, "sliding_window": None,
                                  "bos_token_id": tok.token_to_id("<s>"), **overrides})
    if kind == "qwen3":
        return t.Qwen3Config(**{**common, **bos, **gqa, "rope_theta": 1e6,
                                "tie_word_embeddings": True, **overrides})
    if kind == "gemma3_text":  # a sliding-window layer, then a global one (hub: 5 to 1)
        return t.Gemma3TextConfig(**{**common, **bos, **gqa, "sliding_window": 16,
                                     "layer_types": ["sliding_attention", "full_attention"],
                                     "query_pre_attn_scalar": 16, "tie_word_embeddings": True,
                                     "hidden_activation": "gelu_pytorch_tanh", **overrides})
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        return t.Phi3Config(**{**common, **bos, "num_key_value_heads": 2, **overrides})
    if kind == "olmo2":  # norms after attention and MLP, q/k norms over all heads
        return t.Olmo2Config(**{**common, **bos, "num_key_value_heads": 2, **overrides})
    if kind == "qwen3_moe":
        return t.Qwen3MoeConfig(**{**common, **bos, **gqa, "num_experts": 4,
                                   "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                   "decoder_sparse_step": 1, "mlp_only_layers": [],
                                   "norm_topk_prob": True, **overrides})
    if kind == "mixtral":
        return t.MixtralConfig(**{**common, **bos, **gqa, "num_local_experts": 4,
                                  "num_experts_per_tok": 2, "intermediate_size": 64, **overrides})
    if kind in MORE_CONFIGS:
        return MORE_CONFIGS[kind](t, {**common, **bos}, overrides)
    extra = {"bos_token_id": tok.token_to_id("<s>"), "num_key_value_heads": 2}
    if kind == "llama3":
        extra.update(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return t.LlamaConfig(**{**common, **extra, **overrides})


# More decoders the export is proven on (tests/test_export_architectures.py): each with what makes
# it unlike Llama switched on (Gemma 2's soft-capping, Granite's multipliers, StarCoder2's
# LayerNorm and biases, DeepSeek-V3's latent attention and routed experts, Granite MoE's fused
# experts, LFM2's convolution blocks; Cohere 2's parallel blocks, LayerNorm and logit scale;
# EXAONE 4's local layer with rope beside a global one without; GLM-4's partial rotary and four
# norms a layer; OLMo 3's sliding windows). Gemma 2's window spans the whole context: mlx-lm's
# Gemma 2 attends to every earlier token in every layer. mlx-lm reads Cohere 2's and EXAONE 4's
# local/global layers from sliding_window_pattern (the hub's key), transformers from layer_types.
MORE_CONFIGS = {
    "gemma2": lambda t, c, o: t.Gemma2Config(**{
        **c, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", **o}),
    "granite": lambda t, c, o: t.GraniteConfig(**{
        **c, "num_key_value_heads": 2, "embedding_multiplier": 12.0, "logits_scaling": 8.0,
        "residual_multiplier": 0.22, "attention_multiplier": 0.0625, **o}),
    "starcoder2": lambda t, c, o: t.Starcoder2Config(**{
        **c, "num_key_value_heads": 2, "norm_epsilon": 1e-5, "use_bias": True,
        "sliding_window": None, "tie_word_embeddings": True, **o}),
    "deepseek_v3": lambda t, c, o: t.DeepseekV3Config(**{
        **c, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1,
        "topk_group": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "rope_scaling": None, **o}),
    "granitemoe": lambda t, c, o: t.GraniteMoeConfig(**{
        **c, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "intermediate_size": 32, "embedding_multiplier": 12.0, "logits_scaling": 8.0,
        "residual_multiplier": 0.22, "attention_multiplier": 0.0625, **o}),
    "lfm2": lambda t, c, o: t.Lfm2Config(**{
        **c, "num_key_value_heads": 2, "block_ff_dim": 160, "block_auto_adjust_ff_dim": False,
        "conv_L_cache": 3, "layer_types": ["conv", "full_attention"], "norm_eps": 1e-5,
        "tie_word_embeddings": True, **o}),
    "cohere2": lambda t, c, o: t.Cohere2Config(**{
        **c, "num_key_value_heads": 2, "head_dim": 16, "logit_scale": 0.25, "sliding_window": 256,
        "sliding_window_pattern": 2, "layer_types": ["sliding_attention", "full_attention"],
        "layer_norm_eps": 1e-5, "tie_word_embeddings": True, **o}),
    "exaone4": lambda t, c, o: t.Exaone4Config(**{
        **c, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 256,
        "sliding_window_pattern": "LG", "layer_types": ["sliding_attention", "full_attention"],
        **o}),
    "glm4": lambda t, c, o: t.Glm4Config(**{
        **c, "num_key_value_heads": 2, "head_dim": 16, "partial_rotary_factor": 0.5,
        "attention_bias": True, **o}),
    "olmo3": lambda t, c, o: t.Olmo3Config(**{
        **c, "num_key_value_heads": 2, "sliding_window": 256,
        "layer_types": ["sliding_attention", "full_attention"], **o}),
}


def hub_config(config: dict) -> dict:
    """A transformers 5 config.json in the keys the hub's checkpoints carry (and mlx-lm reads):
    rope_parameters -> rope_theta (+ rope_scaling, + Gemma 3's rope_local_base_freq and
    sliding_window_pattern), num_local_experts -> num_experts for the Qwen MoE family."""
    c = dict(config)
    params = c.pop("rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: a global and a local rope
        c["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
    if params:
        c["rope_theta"] = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        c["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        if "partial_rotary_factor" in scaling:
            c["partial_rotary_factor"] = scaling["partial_rotary_factor"]
    if c.get("model_type") == "gemma3_text":
        types = c.pop("layer_types", None) or []
        c.pop("_sliding_window_pattern", None)
        c["sliding_window_pattern"] = (types.index("full_attention") + 1
                                       if "full_attention" in types else len(types) + 1)
    if c.get("model_type") == "lfm2":  # the hub's LFM2 configs name the width block_dim too
        c.setdefault("block_dim", c["hidden_size"])
    if c.get("model_type") in ("qwen3_moe", "qwen2_moe", "olmoe") and "num_local_experts" in c:
        c["num_experts"] = c.pop("num_local_experts")
    return c


def save_tiny_model(kind: str, path: str | Path, seed: int = 0, chat: str | None = None,
                    **overrides) -> Path:
    import json

    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {list(KINDS)}")
    path = Path(path)
    family = ("qwen2" if kind in ("qwen2", "qwen3", "qwen3_moe")
              else "gemma" if kind == "gemma3_text" else "llama")
    tok = tiny_tokenizer(family, chat=chat)
    _, bos, eos = FAMILIES[family]
    if family == "qwen2" and kind != "qwen2":  # no BOS, but a pad/bos id the config can name
        overrides = {"bos_token_id": None, "pad_token_id": tok.token_to_id(eos), **overrides}
    config = _config(kind, tok, eos, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # larger than the 0.02 init, so logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    config_file = path / "config.json"
    config_file.write_text(json.dumps(hub_config(json.loads(config_file.read_text())), indent=2))
    specials = {"eos_token": eos, "pad_token": "<pad>" if family == "gemma" else eos}
    if bos is not None:
        specials["bos_token"] = bos
    if chat and family == "gemma":  # as google/gemma-3-*-it: EOS <eos>, turns end <end_of_turn>
        _gemma_generation_config(path, tok)
    elif chat:  # the chat style's end of turn is the EOS generation stops on
        specials["eos_token"] = CHAT_STYLES[chat][3]
    template = {"chat_template": CHAT_STYLES[chat][0]} if chat else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials, **template).save_pretrained(path)
    return path


def _gemma_generation_config(path: Path, tok) -> None:
    """generation_config.json as Gemma 3's instruction-tuned checkpoints have it: generation
    stops at <eos> and at <end_of_turn>."""
    import json

    file = path / "generation_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    ends = [tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")]
    file.write_text(json.dumps({**config, "eos_token_id": [i for i in ends if i is not None]},
                               indent=2))


def save_tiny_llama_without_torch(path: str | Path, seed: int = 0, hidden: int = 64,
                                  layers: int = 2, heads: int = 4, kv_heads: int = 2,
                                  intermediate: int | None = None, vocab_size: int = 512,
                                  chat: str | None = None, std: float = 0.2) -> Path:
    """A Llama folder in Hugging Face's layout (config.json, model.safetensors under HF's weight
    names, tokenizer.json and its config) with random N(0, std) matrices (0.2: attention so
    peaked that a backward makes denormals; 0.02: a trained model's scale), written with MLX and
    tokenizers: what `model=hf_decoder model.pretrained=<path>` loads, no PyTorch needed. `chat`:
    a CHAT_STYLES template in tokenizer_config.json, its special tokens in the tokenizer."""
    import json

    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer("llama", vocab_size, chat=chat)
    vocab, head_dim = tok.get_vocab_size(), hidden // heads
    intermediate = intermediate or int(hidden * 2.5)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>"),
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    key = mx.random.key(seed)

    def normal(*shape: int) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return std * mx.random.normal(shape, key=sub)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden),
               "model.norm.weight": mx.ones((hidden,)), "lm_head.weight": normal(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": normal(intermediate, hidden),
            p + "mlp.up_proj.weight": normal(intermediate, hidden),
            p + "mlp.down_proj.weight": normal(hidden, intermediate),
            p + "input_layernorm.weight": mx.ones((hidden,)),
            p + "post_attention_layernorm.weight": mx.ones((hidden,)),
        })
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
    template = {}
    if chat:  # the chat style's end of turn is the EOS generation stops on
        specials["eos_token"] = CHAT_STYLES[chat][3]
        template = {"chat_template": CHAT_STYLES[chat][0]}
    (path / "tokenizer_config.json").write_text(json.dumps(
        {**specials, **template, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return path


def teach_chats(path: str | Path, chats: list[tuple[list, list]], tools: list | None = None,
                steps: int = 100, batch_size: int = 16, lr: float = 3e-3, stop_loss: float = 0.0,
                seed: int = 0, snapshots: tuple[int, ...] = ()) -> float:
    """A short SFT (torch, Adam) of the transformers model in `path` on chats rendered with its
    own template and `tools`: each chat is (its prompt's messages, the whole chat), and every
    token after the prompt is trained (tool turns too: fixed text the model reads back). Random
    batches of `batch_size`, until `steps` or a loss under `stop_loss`; the model is saved back
    into `path` and the last loss returned. How the tool tests and benchmarks teach a tiny model
    a tool-call format, as people SFT before RL. `snapshots`: steps after which the model so far
    is also saved, beside `path` as `<path>_step<n>` (its files copied), so one SFT gives
    warm starts of several strengths."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)

    def encode(messages: list, prompt: bool) -> list[int]:
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                       add_generation_prompt=prompt)
        return tok(text, add_special_tokens=False)["input_ids"]

    seqs = [(len(encode(prompt, True)), encode(chat, False)) for prompt, chat in chats]
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss = float("nan")
    for step in range(1, steps + 1):
        picked = torch.randint(0, len(seqs), (min(batch_size, len(seqs)),), generator=rng)
        batch = [seqs[i] for i in picked.tolist()] if len(seqs) > batch_size else seqs
        width = max(len(s) for _, s in batch)
        ids = torch.tensor([s + [0] * (width - len(s)) for _, s in batch])
        labels = ids.clone()
        for i, (start, s) in enumerate(batch):
            labels[i, :start], labels[i, len(s):] = -100, -100
        out = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        out.backward()
        optimizer.step()
        loss = out.item()
        if step in snapshots:
            snapshot = Path(path).with_name(f"{Path(path).name}_step{step}")
            shutil.copytree(path, snapshot, dirs_exist_ok=True)
            model.save_pretrained(snapshot, safe_serialization=True)
            print(f"SFT step {step}: loss {loss:.4f}, saved {snapshot}", flush=True)
        if loss < stop_loss:
            break
    model.save_pretrained(path, safe_serialization=True)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true",
                        help="llama only: write it with MLX (no transformers/torch)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chat", choices=list(CHAT_STYLES), default=None,
                        help="add this chat template and its special tokens")
    args = parser.parse_args()
    if args.no_torch:
        if args.kind != "llama":
            parser.error("--no-torch writes llama only")
        print(save_tiny_llama_without_torch(args.out, args.seed, args.hidden, args.layers))
        return
    print(save_tiny_model(args.kind, args.out, args.seed, chat=args.chat))


if __name__ == "__main__":
    main()
