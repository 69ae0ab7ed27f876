"""Tiny random embedders of the families beyond BERT, each written by transformers and
sentence-transformers themselves (their own config, weights and folder layout): RoBERTa and
XLM-RoBERTa (mean pooling), a Qwen3 decoder (Qwen3-Embedding's layout: last-token pooling,
the tokenizer padding on the left and ending each text with <|endoftext|>, a `query` prompt),
and a ModernBERT (global and sliding-window layers, a window shorter than the longest text).
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
    return _mean_pooled(model_class(config, add_pooling_layer=False), tok, folder, 38)


def _mean_pooled(model, tok, folder: Path, max_seq_length: int) -> Path:
    """`model` and `tok` (saved beside `folder`) with mean pooling and Normalize, saved by
    sentence-transformers at `folder`."""
    from sentence_transformers import SentenceTransformer, models

    encoder = folder.with_name(folder.name + "-hf")
    model.save_pretrained(encoder)
    tok.save_pretrained(encoder)
    st = SentenceTransformer(modules=[
        models.Transformer(str(encoder), max_seq_length=max_seq_length),
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


def write_modernbert(folder: Path) -> Path:
    """A 4-layer ModernBERT (every second layer global, the others a sliding window of 8
    tokens; biases on, weights drawn wider than transformers' init so that every part shows)
    with mean pooling and Normalize, saved by sentence-transformers."""
    import torch
    from tokenizers import processors
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    torch.manual_seed(3)
    bpe = _bpe(["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"], trail="[SEP]")
    bpe.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", bpe.token_to_id("[CLS]")),
                                                 ("[SEP]", bpe.token_to_id("[SEP]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, cls_token="[CLS]", pad_token="[PAD]",
                                  sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    ids = {f"{name}_token_id": tok.convert_tokens_to_ids(token) for name, token in
           [("pad", "[PAD]"), ("bos", "[CLS]"), ("eos", "[SEP]"), ("cls", "[CLS]"),
            ("sep", "[SEP]")]}
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=4,
                              num_attention_heads=4, intermediate_size=48,
                              max_position_embeddings=64, local_attention=8,
                              global_attn_every_n_layers=2, norm_bias=True, attention_bias=True,
                              mlp_bias=True, **ids)
    model = ModernBertModel(config)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.1)
    return _mean_pooled(model, tok, folder, 40)
