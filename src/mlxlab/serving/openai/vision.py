"""Image chats on a served vision-language model, inside mlx-lm's server.

    images = ServedImages.load(model, tokenizer_folder)
    ids, arrays = images.prompt(request_messages, tokenizer, first_chunk=2048)

A chat request's user turns may hold OpenAI's `image_url` parts, each a `data:image/...;base64,`
URL (checks.py refuses other URLs: the server reads nothing from the network or its own disk
for a client). The chat is laid out as `mlxlab generate --image` lays it out: the model's chat
template, then its processor expanding each image into its tokens and pixel arrays.

mlx-lm's server asks a model that sees to embed a prompt's images (`model.embed_inputs(ids,
pixel_values=...)`) and hands those rows to its chunked prefill (`model(ids, cache=...,
input_embeddings=rows)`). An mlx-vlm model merges its images itself, under its family's
positions (Qwen's M-RoPE) and mask (Gemma 3's), as training and generation run it; so
VisionRunner's embedded rows are empty markers and the image arrays go in with the first
prefill chunk, which must hold every image token (`prompt` refuses a prompt whose images reach
past it). The prompt cache stays off for these models (server.py's ServedPromptCache): mlx-vlm's M-RoPE
families keep a prompt's positions on the model, not in its cache, so a cached prefix would
continue at another prompt's positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.chat import ChatTemplate
from mlxlab.errors import ConfigError
from mlxlab.models.base import Model
from mlxlab.serving.openai.errors import ServingError


class VisionRunner(nn.Module):
    """A vision-language model as mlx-lm's generation drives one (see the module): the images
    `embed_inputs` is given go into the first forward pass after it."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model
        self._images: dict[str, mx.array] | None = None

    def make_cache(self) -> list:
        return self.model.make_cache()

    def embed_inputs(self, ids: mx.array, pixel_values: Sequence[dict[str, mx.array]]
                     ) -> mx.array:
        """Keep the prompt's image arrays (one dict: the processor's) for the next forward
        pass; one empty row per token (what mlx-lm slices into chunks)."""
        (self._images,) = pixel_values
        return mx.zeros((ids.size, 0))

    def __call__(self, inputs: mx.array, cache: list | None = None,
                 input_embeddings: mx.array | None = None) -> mx.array:
        images, self._images = self._images, None
        if input_embeddings is not None and images is not None:
            return self.model(inputs, cache=cache, **images)
        return self.model(inputs, cache=cache)


@dataclass
class ServedImages:
    """What a served vision-language model's image chats take: its processor and chat
    template, the ids its images expand into, and the runner mlx-lm's server drives."""

    processor: Any
    template: ChatTemplate
    image_ids: frozenset[int]
    runner: VisionRunner

    @classmethod
    def load(cls, model: Model, tokenizer_folder: Path, tokenizer: Any) -> ServedImages:
        from mlxlab.data.chat import load_chat_template
        from mlxlab.data.vision_chat import image_token_ids, load_processor
        from mlxlab.runs.generate import vision_folder

        processor = load_processor(vision_folder(model, "serve"))
        try:
            template = load_chat_template(tokenizer_folder)
        except ConfigError as err:
            raise ConfigError(f"{tokenizer_folder}: image chats are laid out by the model's "
                              f"chat template, and {err}") from None
        model_type = (model.hf_config or {}).get("model_type")
        return cls(processor, template,
                   frozenset(image_token_ids(processor, tokenizer, model_type)),
                   VisionRunner(model))

    def prompt(self, messages: Sequence[Mapping], first_chunk: int
               ) -> tuple[list[int], dict[str, mx.array]]:
        """(ids, image arrays) of a chat request whose messages hold image parts; a picture
        that does not decode, or images reaching past the first `first_chunk` tokens (the
        prefill's first chunk), is a ServingError."""
        from mlxlab.data.images import chat_images, open_image
        from mlxlab.runs.generate import processed_chat

        try:
            chat, refs = chat_images(messages)
            pictures = [open_image(ref, Path.cwd()) for ref in refs]
        except ConfigError as err:
            raise ServingError(f"messages: {err}", param="messages") from None
        ids, arrays = processed_chat(self.processor, self.template, chat, pictures)
        image_positions = np.flatnonzero(np.isin(ids, list(self.image_ids)))
        if image_positions.size and image_positions[-1] >= first_chunk:
            raise ServingError(f"messages: the images end at token {image_positions[-1] + 1} "
                               f"of the prompt; this server reads a prompt's images within its "
                               f"first {first_chunk} tokens: put them earlier in the chat",
                               param="messages")
        return ids, arrays
