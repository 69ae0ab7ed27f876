"""Tiny random embedders of the families beyond BERT, each written by transformers and
sentence-transformers themselves (their own config, weights and folder layout): RoBERTa and
XLM-RoBERTa (mean pooling), and a Qwen3 decoder (Qwen3-Embedding's layout: last-token pooling,
the tokenizer padding on the left and ending each text with <|endoftext|>, a `query` prompt).
The tokenizer is a byte-level BPE trained on a few sentences; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

TEXTS = ["The cat sat on the mat.", "dog", "", "Zebra! " * 30, "the THE  tHe,\tcat",
         "a b c d", "Café naïve résumé"]
CORPUS = ["the cat sat on the mat", "a dog and a zebra", "Café naïve résumé", "query: what",
          "Instruct: find the document\nQuery: the cat"] * 4
HIDDEN, FFN, LAYERS = 32, 64, 2
QUERY_PROMPT = "Instruct: find the document\nQuery: "


def _bpe(special: list[str], trail: str | None = None):
    """A byte-level BPE (RoBERTa's `<s> ... </s>` around a text, or `trail` after it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if trail is None:
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                          ("<s>", tok.token_to_id("<s>")))
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {trail}", special_tokens=[(trail, tok.token_to_id(trail))])
    return tok


def write_roberta(folder: Path, xlm: bool = False) -> Path:
    """A 2-layer RoBERTa (or XLM-RoBERTa: the same layout, its own model_type) with mean
    pooling and Normalize, saved by sentence-transformers."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import (
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaModel,
        XLMRobertaConfig,
        XLMRobertaModel,
    )

    torch.manual_seed(1)
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(special), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    config_class, model_class = ((XLMRobertaConfig, XLMRobertaModel) if xlm
                                 else (RobertaConfig, RobertaModel))
    config = config_class(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                          num_attention_heads=4, intermediate_size=FFN,
                          max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
    encoder = folder.with_name(folder.name + "-hf")
    model_class(config, add_pooling_layer=False).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    st = SentenceTransformer(modules=[
        models.Transformer(str(encoder), max_seq_length=38),
        models.Pooling(HIDDEN, pooling_mode="mean"), models.Normalize()], device="cpu")
    st.save(str(folder))
    return folder


def write_qwen3(folder: Path) -> Path:
    """A 2-layer Qwen3 decoder as Qwen3-Embedding lays one out: its base model's weights, a
    tokenizer that pads on the left and ends each text with <|endoftext|>, last-token pooling,
    Normalize, and prompts {query, document}."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    torch.manual_seed(2)
    end = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe([end], trail=end), eos_token=end,
                                  pad_token=end, padding_side="left")
    config = Qwen3Config(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         intermediate_size=FFN, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-6)
    decoder = folder.with_name(folder.name + "-hf")
    Qwen3Model(config).save_pretrained(decoder)
    tok.save_pretrained(decoder)
    st = SentenceTransformer(
        modules=[models.Transformer(str(decoder), max_seq_length=64),
                 models.Pooling(HIDDEN, pooling_mode="lasttoken"), models.Normalize()],
        prompts={"query": QUERY_PROMPT, "document": ""}, device="cpu")
    st.save(str(folder))
    return folder
