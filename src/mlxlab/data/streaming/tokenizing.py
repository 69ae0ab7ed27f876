"""The tokenizer of a streamed corpus: trained on a sample of its training documents (cached by
sample and settings), or the one given (`data.tokenizer.path`, or the run folder's on resume)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.data.streaming.packing import SpecialIds
from mlxlab.data.tokenizer import build_tokenizer
from mlxlab.data.tokenizer import special_ids as lm_special_ids

log = logging.getLogger(__name__)

DEFAULTS = {"kind": "bytelevel_bpe", "min_vocab": 512}  # <|endoftext|> separates documents


def reuses_tokenizer(cfg: dict, save_to: Path | None) -> bool:
    """Whether a tokenizer is given (a path, or one the run folder already has): then one
    document is read, just to check the source."""
    return bool(cfg.get("path")) or (
        save_to is not None and save_to.is_file() and not cfg.get("retrain")
    )


def tokenizer_for(cfg: dict, sample: list[str], save_to: Path | None, cache_dir: Path | None
                  ) -> Any:
    """The tokenizer `cfg` describes, trained on `sample` unless given; saved to `save_to`.
    Never pads or truncates: documents are packed, never cut short."""
    cfg = dict(cfg)
    if not reuses_tokenizer(cfg, save_to) and cache_dir is not None and not cfg.get("retrain"):
        # Trained tokenizers are cached by sample + settings, so new runs skip training.
        key = hashlib.sha256(json.dumps([sample, cfg], sort_keys=True).encode()).hexdigest()
        cached = cache_dir / "tokenizers" / f"{key[:24]}.json"
        if cached.is_file():
            log.info("cache hit: tokenizer %s", cached)
        else:
            build_tokenizer(sample, save_to=cached, **cfg)
        cfg["path"] = str(cached)
    tokenizer = build_tokenizer(sample, save_to=save_to, **cfg)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def special_ids(tokenizer: Any, cfg: dict | None = None) -> SpecialIds:
    """End-of-text, start and padding ids of the streams: a given tokenizer's (data.tokenizer.path)
    as its model folder names them (config.json, tokenizer_config.json: Gemma's <eos>), a trained
    one's from EOT_TOKENS; a pretrained tokenizer's BOS starts documents."""
    path = (cfg or {}).get("path")
    eot, pad, bos = lm_special_ids(tokenizer, Path(path).parent if path else None)
    return SpecialIds(eot=eot, bos=bos, pad=pad)


def encode_documents(tokenizer: Any, ids: SpecialIds, docs: list[str]) -> list[np.ndarray]:
    """Each document's ids as packing lays them out (BOS, text, end-of-text), as int32 arrays."""
    return [np.asarray([*ids.bos, *e.ids, ids.eot], np.int32) for e in
            tokenizer.encode_batch(docs, add_special_tokens=False)]

