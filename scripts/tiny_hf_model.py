"""Write a tiny random-weight Llama-family checkpoint with transformers (no download): config.json,
model.safetensors and a tokenizer trained on the shipped TinyStories sample. For trying
`model.pretrained=` and `mlxlab export` offline, and for the parity tests.

    python scripts/tiny_hf_model.py llama /tmp/tiny-llama [--seed 0]
    (llama | qwen2 | mistral | llama3: llama with llama3 rope scaling, tied embeddings)

Needs transformers and torch (the dev extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import processors

from mlxlab.config import asset_path
from mlxlab.data.tokenizer import build_tokenizer

KINDS = ("llama", "qwen2", "mistral", "llama3")


def tiny_tokenizer(kind: str, vocab_size: int = 512):
    """A byte-level BPE in the family's style: Llama/Mistral <s> BOS + </s> EOS, Qwen2
    <|endoftext|> and no BOS."""
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")[:400]
    specials = ["<|endoftext|>"] if kind == "qwen2" else ["<s>", "</s>"]
    tok = build_tokenizer(stories, vocab_size=vocab_size, kind="bytelevel_bpe",
                          special_tokens=specials)
    if kind != "qwen2":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def save_tiny_model(kind: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {list(KINDS)}")
    path = Path(path)
    tok = tiny_tokenizer(kind)
    eos = "<|endoftext|>" if kind == "qwen2" else "</s>"
    common = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        eos_token_id=tok.token_to_id(eos), tie_word_embeddings=False,
    )
    if kind == "qwen2":
        config = Qwen2Config(**{**common, "rope_theta": 1e6, "num_key_value_heads": 2,
                                "tie_word_embeddings": True, **overrides})
    elif kind == "mistral":
        config = MistralConfig(**{**common, "num_key_value_heads": 1, "sliding_window": None,
                                  "bos_token_id": tok.token_to_id("<s>"), **overrides})
    else:
        extra = {"bos_token_id": tok.token_to_id("<s>"), "num_key_value_heads": 2}
        if kind == "llama3":
            extra.update(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        config = LlamaConfig(**{**common, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # larger than the 0.02 init, so logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    specials = {"eos_token": eos, "pad_token": eos}
    if kind != "qwen2":
        specials["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_tiny_model(args.kind, args.out, args.seed))


if __name__ == "__main__":
    main()
