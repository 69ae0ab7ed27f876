"""Tokenizer folders in the chat styles of the architectures mlxlab loads, built locally (no
download): the models' real chat templates (tests/chat_templates/*.jinja, verbatim from the
model repositories, as TRL and axolotl keep them), their special tokens in a tiny byte-level
BPE, and their tokenizer_config.json / config.json / generation_config.json end-of-text
settings as the real checkpoints name them."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from conftest import REPO
from mlxlab.config import asset_path
from mlxlab.data.tokenizer import build_tokenizer

TEMPLATES = REPO / "tests" / "chat_templates"

# style: template file, added tokens, bos, eos (tokenizer_config.json), config.json
# eos_token_id and generation_config.json eos_token_id (as tokens), model_type
STYLES = {
    # meta-llama/Llama-3.2-1B-Instruct
    "llama3.2": dict(template="llama3_2.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>",
                     tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                     config=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                     generation=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                     model_type="llama"),
    # mistralai/Mistral-7B-Instruct-v0.3 (control tokens [INST] ... as in its tokenizer)
    "mistral-v0.3": dict(template="mistral_v0_3.jinja", bos="<s>", eos="</s>",
                         tokens=["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                                 "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                                 "[/TOOL_RESULTS]"],
                         config=["</s>"], generation=["</s>"], model_type="mistral"),
    # Qwen/Qwen3-0.6B
    "qwen3": dict(template="qwen3.jinja", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                  tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                          "</tool_call>", "<think>", "</think>"],
                  config=["<|im_end|>"], generation=["<|im_end|>", "<|endoftext|>"],
                  model_type="qwen3"),
    # google/gemma-3-1b-it: its EOS is <eos>, and generation stops at <end_of_turn> too
    "gemma3": dict(template="gemma3.jinja", bos="<bos>", eos="<eos>", pad="<pad>",
                   tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                   config=["<eos>"], generation=["<eos>", "<end_of_turn>"],
                   model_type="gemma3_text"),
    # Gemma 3 with TRL's {% generation %} tags (trl/chat_templates/gemma3_training.jinja)
    "gemma3-tagged": dict(template="gemma3_training.jinja", bos="<bos>", eos="<eos>",
                          pad="<pad>",
                          tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                          config=["<eos>"], generation=["<eos>", "<end_of_turn>"],
                          model_type="gemma3_text"),
    # microsoft/Phi-3-mini-4k-instruct: eos_token <|endoftext|>; generation stops at <|end|>,
    # <|assistant|> and <|endoftext|> (generation_config.json)
    "phi3": dict(template="phi3.jinja", bos="<s>", eos="<|endoftext|>",
                 tokens=["<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                         "<|assistant|>", "<|end|>"],
                 config=["<|endoftext|>"], generation=["<|endoftext|>", "<|assistant|>", "<|end|>"],
                 model_type="phi3"),
    # microsoft/Phi-3.5-mini-instruct: eos_token <|endoftext|>, turns end at <|end|>; config.json
    # only (no generation_config.json), so the template itself must say where a turn ends
    "phi3.5": dict(template="phi3_5.jinja", bos="<s>", eos="<|endoftext|>",
                   tokens=["<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                           "<|assistant|>", "<|end|>"],
                   config=["<|endoftext|>"], generation=None, model_type="phi3"),
    # HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system prompt)
    "smollm2": dict(template="smollm2.jinja", bos="<|im_start|>", eos="<|im_end|>",
                    tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    config=["<|im_end|>"], generation=["<|im_end|>"], model_type="llama"),
}


def base_tokenizer() -> Tokenizer:
    """A tiny byte-level BPE on the shipped stories (no special tokens of any style)."""
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")[:200]
    return build_tokenizer(stories, vocab_size=400, kind="bytelevel_bpe",
                           special_tokens=["<|unused|>"])


def save_style(style: str, folder: Path, base: Tokenizer) -> Path:
    """A tokenizer folder of `style`: tokenizer.json, tokenizer_config.json and
    chat_template.jinja written by transformers, config.json and generation_config.json beside
    them naming the end-of-text ids."""
    from transformers import PreTrainedTokenizerFast

    spec = STYLES[style]
    tok = Tokenizer.from_str(base.to_str())
    tok.add_special_tokens(spec["tokens"])
    template = (TEMPLATES / spec["template"]).read_text(encoding="utf-8")
    specials = {"eos_token": spec["eos"], "pad_token": spec.get("pad", spec["eos"])}
    if spec["bos"]:
        specials["bos_token"] = spec["bos"]
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                            **specials).save_pretrained(folder)
    ids = {name: [tok.token_to_id(t) for t in spec[key]]
           for name, key in (("config.json", "config"), ("generation_config.json", "generation"))
           if spec[key]}
    for name, eos in ids.items():
        extra = {"model_type": spec["model_type"]} if name == "config.json" else {}
        (folder / name).write_text(json.dumps({**extra, "eos_token_id": eos}))
    return folder


# the chat every style is checked on (tests/test_chat_templates.py)
SYSTEM = {"role": "system", "content": "Be kind."}
TURNS = [{"role": "user", "content": "Who is Tim?"},
         {"role": "assistant", "content": "Tim is a dog."},
         {"role": "user", "content": "And Sue?"},
         {"role": "assistant", "content": "  Sue is his friend. "}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
WITH_TOOLS = ("llama3.2", "mistral-v0.3", "qwen3")  # templates that write `tools`
# each assistant turn as the template writes it, up to its end-of-turn token, by hand
REPLIES = {
    "llama3.2": ["Tim is a dog.<|eot_id|>", "Sue is his friend.<|eot_id|>"],
    # the reply's leading space is the model's: the prompt ends at [/INST]
    "mistral-v0.3": [" Tim is a dog.</s>", " Sue is his friend.</s>"],
    # the last turn opens an (empty) reasoning block, which the model writes
    "qwen3": ["Tim is a dog.<|im_end|>",
              "<think>\n\n</think>\n\n  Sue is his friend. <|im_end|>"],
    "gemma3": ["Tim is a dog.<end_of_turn>", "Sue is his friend.<end_of_turn>"],
    # the tags wrap the newline after <end_of_turn> too
    "gemma3-tagged": ["Tim is a dog.<end_of_turn>\n", "Sue is his friend.<end_of_turn>\n"],
    # every turn ends at <|end|>, the last one too (not at the chat's closing <|endoftext|>)
    "phi3": ["Tim is a dog.<|end|>", "  Sue is his friend. <|end|>"],
    "phi3.5": ["Tim is a dog.<|end|>", "  Sue is his friend. <|end|>"],
    "smollm2": ["Tim is a dog.<|im_end|>", "  Sue is his friend. <|im_end|>"],
}
