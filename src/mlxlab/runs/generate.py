"""A language model's continuation of a prompt (a run's or a model folder's): token ids sampled
(mlx-lm's generation, with its KV cache: decoding/generation.py) after the prompt laid out as the
training stream lays documents out (after BOS, ending before end-of-text) or as a chat's next
assistant turn (the model's own chat template), decoded as whole text pieces. Generation stops on the model's own
end tokens (data/chat.py stop_ids: its chat template's end of turn, its config's and tokenizer
files' EOS, which the run folder keeps), EOT_TOKENS' only for a tokenizer trained here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mlxlab.data.chat import ChatTemplate, encode_chat, stop_ids
from mlxlab.data.tokenizer import end_of_text_ids, start_ids
from mlxlab.models.base import Model
from mlxlab.runs.loading import LoadedRun, require_task


def prompt_ends(tokenizer: Tokenizer, folder: Path, config: dict | None
                ) -> tuple[list[int], list[int]]:
    """(the ids a prompt starts after, the ids generation stops on) for a model whose tokenizer
    files are in `folder`: the tokenizer's BOS, else the end-of-text token (as the training
    stream laid documents out); the model's stop_ids. `mlxlab serve` starts and stops the same."""
    start = start_ids(tokenizer) or end_of_text_ids(tokenizer, folder, config)[:1]
    return start, stop_ids(tokenizer, folder, config)


def sample_ids(
    run: LoadedRun,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    seed: int = 0,
) -> Iterator[int]:
    """New token ids after `prompt`: at most `max_tokens`, ending before the first of the
    model's stop ids (stop_ids: Gemma's <end_of_turn> or <eos>, ours <|endoftext|>).

    The prompt starts as every document does in the training stream: after the tokenizer's BOS
    (a pretrained Llama's or Gemma's), else after the end-of-text token (ours).
    """
    require_task(run, "lm", "generating text")
    folder = run.tokenizer_path.parent
    prompt_ids = plain_prompt_ids(run.tokenizer, folder, run.model.hf_config, prompt)
    return continue_ids(run.model, run.tokenizer, folder, prompt_ids, max_tokens, temperature,
                        top_k, top_p, seed)


def plain_prompt_ids(tokenizer: Tokenizer, folder: Path, config: Mapping | None,
                     prompt: str) -> list[int]:
    """`prompt` as a document starts: after the tokenizer's BOS, else its end-of-text."""
    start, _ = prompt_ends(tokenizer, folder, config)
    return [*start, *tokenizer.encode(prompt, add_special_tokens=False).ids]


def chat_prompt_ids(tokenizer: Tokenizer, template: ChatTemplate,
                    messages: Sequence[Mapping]) -> list[int]:
    """The chat rendered by the model's own template with the assistant turn opened (its
    default system turn where it writes one), as ids: what the model answers."""
    return encode_chat(tokenizer, template, messages, add_generation_prompt=True).ids.tolist()


def continue_ids(model: Model, tokenizer: Tokenizer, folder: Path, prompt_ids: list[int],
                 max_tokens: int = 100, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, seed: int = 0,
                 inputs: Mapping | None = None, draft: Model | None = None,
                 num_draft_tokens: int = 3, accepted: list[int] | None = None) -> Iterator[int]:
    """New token ids after `prompt_ids`: at most `max_tokens`, ending before the first of the
    model's stop ids (stop_ids of its tokenizer files in `folder`: its chat template's end of
    turn, its end-of-text ids). `inputs`: a vision-language prompt's pixel arrays
    (image_prompt). `draft`: speculative decoding (decoding/generation.py)."""
    from mlxlab.decoding.generation import generate_tokens

    if max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {max_tokens}")
    stops = set(prompt_ends(tokenizer, folder, model.hf_config)[1])
    if len(prompt_ids) >= model.max_seq_len:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is "
            f"{model.max_seq_len}: shorten --prompt"
        )
    return _until_stop(generate_tokens(model, prompt_ids, temperature, top_k, top_p, seed,
                                       inputs, draft, num_draft_tokens, accepted),
                       stops, max_tokens)


def image_prompt(model: Model, template: ChatTemplate, messages: Sequence[Mapping],
                 images: Sequence[str | Path]) -> tuple[list[int], dict]:
    """A chat whose last user turn shows `images` (files), opened for the assistant's reply, as
    the vision-language model's processor lays it out: (ids, the pixel arrays its first forward
    pass reads). A text model is one line."""
    from mlxlab.data.images import open_image
    from mlxlab.data.vision_chat import load_processor

    messages = [dict(m) for m in messages]
    last = messages[-1]
    text = last.get("content") or ""
    parts = text if isinstance(text, list) else [{"type": "text", "text": text}]
    last["content"] = [*({"type": "image"} for _ in images), *parts]
    pictures = [open_image(str(i), Path.cwd()) for i in images]
    return processed_chat(load_processor(vision_folder(model, "--image")), template, messages,
                          pictures)


def vision_folder(model: Model, where: str) -> str:
    """The folder of the processor that lays out `model`'s image prompts; a text model is one
    line naming `where` the images came from."""
    from mlxlab.errors import ConfigError

    if model.processor_folder is None:
        raise ConfigError(f"{where}: this is a text model ({model.architecture.get('model_type')}"
                          "); give a vision-language model (a run of model=vision_language or "
                          "its folder)")
    return model.processor_folder


def processed_chat(processor: object, template: ChatTemplate, messages: Sequence[Mapping],
                   pictures: Sequence) -> tuple[list[int], dict]:
    """A chat whose image parts are `{"type": "image"}` (one per picture, in order), opened for
    the assistant's reply and laid out by a vision-language model's `processor`: (ids, the
    pixel arrays its first forward pass reads)."""
    import mlx.core as mx

    from mlxlab.data.vision_chat import image_keys

    out = processor(text=[template.render(messages, add_generation_prompt=True)],
                    images=[list(pictures)], return_tensors="np")
    arrays = {k: np.asarray(v) for k, v in out.items()}
    return (arrays["input_ids"][0].astype(int).tolist(),
            {k: mx.array(arrays[k]) for k in image_keys(arrays)})


def _until_stop(tokens: Iterable[int], stops: set[int], max_tokens: int) -> Iterator[int]:
    if max_tokens == 0:
        return
    for n, token in enumerate(tokens, 1):
        if token in stops:
            return
        yield token
        if n >= max_tokens:
            return


def decode_stream(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as the ids come, each yielded once it is whole text.

    A byte-level BPE token can end inside a multi-byte character, which decodes as U+FFFD; such
    a tail is held back until a later token completes it (or shown as is at the end).
    """
    seen: list[int] = []
    shown = 0  # characters of decode(seen) already yielded
    text = ""
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=False)
        if not text.endswith("\ufffd") and len(text) > shown:
            yield text[shown:]
            shown = len(text)
    if len(text) > shown:
        yield text[shown:]


def complete(
    run: LoadedRun,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The continuation of `prompt` (without the prompt); `on_text` sees each piece as it comes.
    temperature=0 is greedy."""
    pieces = []
    ids = sample_ids(run, prompt, max_tokens, temperature, top_k, top_p, seed)
    for piece in decode_stream(run.tokenizer, ids):
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    return "".join(pieces)

