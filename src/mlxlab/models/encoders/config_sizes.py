"""The sizes every embedder encoder answers (max_length, hidden_size, vocab_size), read from the
Hugging Face config.json it was built from (`hf_config`): the encoders built from such a config
(decoder_encoder.py, modernbert_encoder.py) share them here."""

from __future__ import annotations


class ConfigSizes:
    """max_length, hidden_size and vocab_size of `self.hf_config`; `default_max_length` where
    the config names no max_position_embeddings."""

    hf_config: dict
    default_max_length = 4096

    @property
    def max_length(self) -> int:
        """The longest input it reads (its max_position_embeddings)."""
        return int(self.hf_config.get("max_position_embeddings") or self.default_max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])
