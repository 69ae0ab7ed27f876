"""Train, save and reload `tokenizers` tokenizers: BERT-style WordPiece or byte-level BPE."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

KINDS = ("wordpiece", "bytelevel_bpe")
DEFAULT_SPECIAL_TOKENS = {
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "bytelevel_bpe": ["<|endoftext|>", "<|pad|>"],
}
PAD_TOKENS = ("[PAD]", "<|pad|>", "<pad>")
# End of text of a tokenizer with no model folder to name it (ours, BERT's), and the last resort
# for a folder whose config names none: ours and Qwen2/SmolLM, Llama 2/Mistral, Llama 3, BERT.
EOT_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "[SEP]")
# where a model folder names its end-of-text ids, in the order they are taken
EOS_ID_FILES = ("config.json", "generation_config.json")


# encoders whose positions count from their pad id + 1 (transformers' RoBERTa embeddings)
OFFSET_POSITIONS = ("roberta", "xlm-roberta")


def truncation_length(folder: str | Path, max_length: int | None = None) -> int:
    """The tokens a text (or a pair) of the model `folder` is cut to: `max_length`, else its
    sentence_bert_config.json's max_seq_length, else tokenizer_config.json's model_max_length
    (sentence-transformers' order), never past the positions its config.json gives the encoder
    (max_position_embeddings, RoBERTa's less its pad offset; 512 without one)."""
    folder = Path(folder)
    config = json_or_empty(folder / "config.json")
    positions = int(config.get("max_position_embeddings") or 512)
    if config.get("model_type") in OFFSET_POSITIONS:
        positions -= int(config.get("pad_token_id", 1)) + 1
    given = (max_length or json_or_empty(folder / "sentence_bert_config.json").get("max_seq_length")
             or json_or_empty(folder / "tokenizer_config.json").get("model_max_length"))
    return int(min(positions, int(given))) if given else positions


def _normalizer_and_pre_tokenizer(kind: str):
    if kind == "wordpiece":
        # BertNormalizer: clean control chars, split CJK, lowercase, strip accents.
        return normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # Byte-level: no normalization, every string is representable, decoding is lossless.
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False)


def _word_counts(texts: Iterable[str], kind: str) -> tuple[Counter[str], list[str]]:
    """Word counts after the tokenizer's own normalization and pre-tokenization, and the
    sorted characters they use (WordPiece only)."""
    normalizer, pre_tokenizer = _normalizer_and_pre_tokenizer(kind)
    counts: Counter[str] = Counter()
    for text in texts:
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(text))
    chars = sorted(set().union(*counts)) if kind == "wordpiece" else []
    return counts, chars


def auto_vocab_size(
    texts: Iterable[str],
    kind: str = "wordpiece",
    min_frequency: int = 2,
    num_special: int = 0,
    min_vocab: int = 128,
    max_vocab: int = 8192,
) -> int:
    """Vocabulary size chosen from the data.

    Rule: pre-tokenize the texts exactly as the tokenizer will (lowercased words and punctuation
    for WordPiece, byte-level words for BPE) and count the distinct words seen at least
    `min_frequency` times. The size is

        num_special + alphabet + repeated_words,  rounded up to a multiple of 64,
        clamped to [min_vocab, max_vocab]

    where alphabet is 256 for byte-level BPE and, for WordPiece, twice the number of distinct
    characters (each one word-initial and as a "##" continuation).
    So every word that repeats can get its own token, rare words are split into sub-words, and
    the embedding table never outgrows what the data can train. Multiples of 64 keep matmuls
    aligned.
    """
    counts, chars = _word_counts(texts, kind)
    # WordPiece keeps each character twice: word-initial "a" and continuation "##a".
    alphabet = 256 if kind == "bytelevel_bpe" else 2 * len(chars)
    repeated = sum(1 for c in counts.values() if c >= min_frequency)
    raw = num_special + alphabet + repeated
    size = -(-raw // 64) * 64
    return int(min(max(size, min_vocab), max_vocab))


def build_tokenizer(
    texts: Iterable[str] | None,
    vocab_size: int | str = "auto",
    min_vocab: int = 128,
    max_vocab: int = 8192,
    min_frequency: int = 2,
    kind: str = "wordpiece",
    special_tokens: Sequence[str] | None = None,
    path: str | None = None,
    save_to: str | Path | None = None,
    retrain: bool = False,
    cache_dir: str | Path | None = None,
) -> Tokenizer:
    """Load or train a tokenizer.

    Order: `path` (a given tokenizer.json) wins; else an existing `save_to` file is reused unless
    `retrain`; else one trained earlier on the same texts with the same settings is loaded from
    `cache_dir` (unless `retrain`); else a new tokenizer is trained on `texts`. The result is
    written to `save_to`. The log line says which of these happened.

    kind="wordpiece": BERT style, `[PAD]=0 [UNK] [CLS] [SEP] [MASK]`, lowercase, whitespace +
    punctuation split, post-processor wraps every text as `[CLS] ... [SEP]`; the vocabulary is
    whole words + characters, built deterministically (see `_wordpiece_vocab`).
    kind="bytelevel_bpe": GPT style, <|endoftext|> and <|pad|>, no special tokens added on encode;
    trained by tokenizers' BpeTrainer, which may stop below vocab_size when merges run out.
    Both give the same tokenizer for the same texts in every process (a test checks it).
    vocab_size="auto" picks the size with `auto_vocab_size` (see its docstring for the rule).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; use one of {list(KINDS)}")
    save_to = Path(save_to) if save_to is not None else None
    if path:
        tok = _given(path)
    elif save_to is not None and save_to.is_file() and not retrain:
        tok = Tokenizer.from_file(str(save_to))
        log.info("reusing tokenizer %s (vocab %d)", save_to, tok.get_vocab_size())
        return tok
    else:
        special = list(special_tokens or DEFAULT_SPECIAL_TOKENS[kind])
        tok = _trained(_texts(texts), kind, vocab_size, min_vocab, max_vocab, min_frequency,
                       special, None if retrain else cache_dir)
    if save_to is not None:
        _save(tok, save_to)
    return tok


def _given(path: str) -> Tokenizer:
    """tokenizer.path: the user's tokenizer.json."""
    if not Path(path).is_file():
        raise MissingFileError(
            f"tokenizer file not found: {path} (set tokenizer.path= to a tokenizer.json)"
        )
    tok = Tokenizer.from_file(str(path))
    log.info("loaded tokenizer %s (vocab %d)", path, tok.get_vocab_size())
    return tok


def _texts(texts: Iterable[str] | None) -> list[str]:
    """The texts a tokenizer trains on: some, or one line why not."""
    if texts is None:
        raise ConfigError(
            "build_tokenizer needs texts to train on, or path= to a tokenizer.json"
        )
    texts = list(texts)
    if not texts:
        raise ConfigError("cannot train a tokenizer on zero texts; is the data empty?")
    return texts


def _trained(texts: list[str], kind: str, vocab_size: int | str, min_vocab: int,
             max_vocab: int, min_frequency: int, special: list[str],
             cache_dir: str | Path | None) -> Tokenizer:
    """The tokenizer these settings train on `texts`: the one `cache_dir` keeps for them, else
    trained now (and kept there)."""
    settings = [kind, vocab_size, min_vocab, max_vocab, min_frequency, special]  # the cache key
    cached = _cache_file(cache_dir, texts, settings) if cache_dir else None
    if cached is not None and cached.is_file():
        tok = Tokenizer.from_file(str(cached))
        log.info("cache hit: %s tokenizer %s (vocab %d)", kind, cached, tok.get_vocab_size())
        return tok
    if vocab_size == "auto":
        vocab_size = auto_vocab_size(
            texts, kind, min_frequency, len(special), min_vocab, max_vocab
        )
    elif not isinstance(vocab_size, int) or vocab_size <= len(special):
        raise ConfigError(
            f"tokenizer.vocab_size must be 'auto' or an int > {len(special)}, "
            f"got {vocab_size!r}"
        )
    tok = _train(texts, kind, int(vocab_size), min_frequency, special)
    log.info("trained %s tokenizer, vocab %d", kind, tok.get_vocab_size())
    if cached is not None:
        _save(tok, cached)
    return tok


def _cache_file(cache_dir: str | Path, texts: list[str], settings: list) -> Path:
    """Where a tokenizer trained on exactly these texts with these settings is kept."""
    h = hashlib.sha256(json.dumps(settings, default=str).encode())
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return Path(cache_dir) / f"{h.hexdigest()[:24]}.json"


def _save(tok: Tokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: parallel jobs sharing a cache never read half a file


def _train(
    texts: list[str], kind: str, vocab_size: int, min_frequency: int, special: list[str]
) -> Tokenizer:
    normalizer, pre_tokenizer = _normalizer_and_pre_tokenizer(kind)
    if kind == "wordpiece":
        # Built here rather than by trainers.WordPieceTrainer, which breaks count ties in hash
        # order and so gives a different vocabulary in every process (tabular text is all ties).
        unk = "[UNK]" if "[UNK]" in special else special[0]
        tok = Tokenizer(
            models.WordPiece(
                _wordpiece_vocab(texts, vocab_size, min_frequency, special), unk_token=unk
            )
        )
        tok.decoder = decoders.WordPiece()
        trainer = None
    else:
        tok = Tokenizer(models.BPE())
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    if trainer is not None:
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if kind == "wordpiece" and {"[CLS]", "[SEP]"} <= set(special):
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    return tok


def _wordpiece_vocab(
    texts: list[str], vocab_size: int, min_frequency: int, special: list[str]
) -> dict[str, int]:
    """Deterministic WordPiece vocabulary: specials, every character (word-initial and "##"
    continuation, so any word can be spelled), then the words seen at least `min_frequency`
    times, most frequent first (ties alphabetical), up to `vocab_size`; rare words are spelled
    from characters. Unused slots fill it up to vocab_size."""
    counts, chars = _word_counts(texts, "wordpiece")
    tokens = list(dict.fromkeys([*special, *chars, *(f"##{c}" for c in chars)]))
    frequent = sorted(
        (w for w, c in counts.items() if c >= min_frequency and len(w) > 1),
        key=lambda w: (-counts[w], w),
    )
    tokens += frequent[: max(0, vocab_size - len(tokens))]
    # Pad to exactly vocab_size, like BERT's [unused] slots: the size stays a multiple of 64.
    tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    return {t: i for i, t in enumerate(tokens)}


def find_token_id(tok: Tokenizer, candidates: Sequence[str], what: str) -> int:
    """Id of the first candidate token the tokenizer knows; a clear error if none."""
    for token in candidates:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ConfigError(
        f"tokenizer has no {what} token (looked for {list(candidates)}); "
        "add one to tokenizer.special_tokens"
    )


def folder_tokenizer(path: str | Path) -> Path | None:
    """tokenizer.json of the model folder or run holding `path` (a pretrained folder, a run
    dir, its checkpoints/, or one checkpoint)."""
    path = Path(str(path))
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def vocabulary_difference(a: str | Path, b: str | Path) -> str | None:
    """None when the tokenizers in files `a` and `b` give every token (added ones too) the same
    id, else what differs first, in words: two models scored on one sequence of ids must read
    them as the same text."""
    if Path(a).read_bytes() == Path(b).read_bytes():
        return None
    va = Tokenizer.from_file(str(a)).get_vocab(with_added_tokens=True)
    vb = Tokenizer.from_file(str(b)).get_vocab(with_added_tokens=True)
    if len(va) != len(vb):
        return f"{len(va)} tokens vs {len(vb)}"
    for token, id_ in sorted(va.items(), key=lambda kv: kv[1]):
        if vb.get(token) != id_:
            return f"token {token!r} is id {id_} vs {vb.get(token)}"
    return None


def tokenizer_hash(tok: Tokenizer) -> str:
    """Short hash of what maps text to ids (truncation/padding settings excluded)."""
    spec = json.loads(tok.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def start_ids(tok: Tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens: a pretrained Llama
    tokenizer's BOS; [] for ours (and Qwen2's), which add none."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i]
    return []


def model_end_tokens(folder: str | Path, tok: Tokenizer | None = None) -> list[str]:
    """The end-of-text tokens a model folder names, in order: config.json's eos_token_id (or its
    text_config's), generation_config.json's (an id or a list: where generation stops), then
    tokenizer_config.json's eos_token; ids turned into tokens with `tok` (else the folder's
    tokenizer.json). Gemma's <eos> and <end_of_turn>, Llama 3's <|eot_id|>, Phi-3's <|end|>:
    whatever the model says, not a fixed list."""
    folder = Path(folder)
    ids: list[int] = []
    for name in EOS_ID_FILES:
        config = json_or_empty(folder / name)
        value = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
        ids += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
    if ids and tok is None and (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokens = [t for t in (tok.id_to_token(i) for i in ids) if t] if tok is not None else []
    named = json_or_empty(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(named, dict):
        named = named.get("content")
    if isinstance(named, str) and named:
        tokens.append(named)
    return list(dict.fromkeys(tokens))


def json_or_empty(path: Path) -> dict:
    """A JSON object file's content; {} where the file is missing or holds no object (what it
    names is then taken from the other files)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def end_of_text_ids(tok: Tokenizer, folder: str | Path | None = None,
                    config: Mapping | None = None) -> list[int]:
    """The end-of-text ids a model names that `tok` holds, in order: `config`'s eos_token_id (a
    checkpoint's config.json, for a run folder that keeps only the tokenizer files), then the
    model `folder`'s (model_end_tokens): Gemma's <eos> and <end_of_turn>, Phi-3's <|endoftext|>
    and <|end|>. None named: the first of EOT_TOKENS (a tokenizer trained here), else a
    ConfigError."""
    value = (config or {}).get("eos_token_id")
    ids = [v for v in (value if isinstance(value, list) else [value])
           if isinstance(v, int) and tok.id_to_token(v) is not None]
    named = model_end_tokens(folder, tok) if folder is not None else []
    ids += [tok.token_to_id(t) for t in named if tok.token_to_id(t) is not None]
    if ids:
        return list(dict.fromkeys(ids))
    if folder is not None and not any(tok.token_to_id(t) is not None for t in EOT_TOKENS):
        raise ConfigError(f"{folder} names no end-of-text token the tokenizer holds (config.json "
                          "and generation_config.json eos_token_id, tokenizer_config.json "
                          "eos_token): set one there")
    return [find_token_id(tok, EOT_TOKENS, "end-of-text")]


def special_ids(tok: Tokenizer, folder: str | Path | None = None) -> tuple[int, int, list[int]]:
    """(end-of-text id, padding id, start ids) of a language-model tokenizer: EOS the first the
    model `folder` names (end_of_text_ids), else from EOT_TOKENS; padding from PAD_TOKENS, else
    EOS; BOS from start_ids."""
    eot = end_of_text_ids(tok, folder)[0]
    pad = next((tok.token_to_id(t) for t in PAD_TOKENS if tok.token_to_id(t) is not None), eot)
    return eot, pad, start_ids(tok)
