"""Sample text from a trained language-model run, streaming tokens as they come.

    python scripts/generate.py outputs/tinystories_nano/<time> --prompt "Once upon a time"
        [--max-tokens 100 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0 --num-samples 1]

The path is a run directory (its best checkpoint is used, else the newest) or one checkpoint
directory; the tokenizer is the run's tokenizer.json. Generation stops after --max-tokens new
tokens, at <|endoftext|>, or when the model's context (model.max_seq_len) is full.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from mlxlab.data.tokenizer import EOT_TOKENS, find_token_id, start_ids, tokenizer_hash
from mlxlab.models.transformer import generate_step
from mlxlab.runs import load_run_model, require_run_tokenizer

if TYPE_CHECKING:  # mlx.core is imported through mlxlab, which loads the fast BLAS first
    import mlx.nn as nn


def load_run(path: str | Path) -> tuple[nn.Module, Tokenizer, dict]:
    """The run's model (best checkpoint, else newest), its tokenizer and the checkpoint state."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a run directory (outputs/<task>/<time>) or a checkpoint"
        )
    tokenizer_path = require_run_tokenizer(path, "language-model")
    model, state = load_run_model(path)
    if not hasattr(model, "make_cache"):
        raise ValueError(
            f"{path} is a {type(model).__name__} run, not a language model: generate from a run "
            "of a transformer experiment (e.g. experiment=tinystories_nano)"
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    expected = state.get("tokenizer_hash")
    if expected and tokenizer_hash(tokenizer) != expected:
        raise ValueError(
            f"{tokenizer_path} is not the tokenizer {state['checkpoint_path']} was trained with "
            "(hash differs): use the tokenizer.json of that run"
        )
    return model, tokenizer, state


def sample_ids(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    seed: int = 0,
) -> Iterator[int]:
    """New token ids after `prompt`: at most `max_tokens`, ending before <|endoftext|>.

    The prompt starts as every document does in the training stream: after the tokenizer's BOS
    (a pretrained Llama's), else after the end-of-text token (ours).
    """
    if max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {max_tokens}")
    eot = find_token_id(tokenizer, EOT_TOKENS, "end-of-text")
    start = start_ids(tokenizer) or [eot]
    prompt_ids = [*start, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    if len(prompt_ids) >= model.max_seq_len:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is "
            f"{model.max_seq_len}: shorten --prompt"
        )
    if max_tokens == 0:
        return
    for n, token in enumerate(generate_step(model, prompt_ids, temperature, top_k, top_p, seed), 1):
        if token == eot:
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


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The continuation of `prompt` (without the prompt); `on_text` sees each piece as it comes."""
    pieces = []
    ids = sample_ids(model, tokenizer, prompt, max_tokens, temperature, top_k, top_p, seed)
    for piece in decode_stream(tokenizer, ids):
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    return "".join(pieces)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="run directory (outputs/<task>/<time>) or checkpoint dir")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty)")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--num-samples", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        model, tokenizer, state = load_run(args.path)
        print(f"[{state['checkpoint_path']}]", file=sys.stderr)
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40)
            print(args.prompt, end="", flush=True)
            generate(
                model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_k,
                args.top_p, args.seed + i, on_text=lambda s: print(s, end="", flush=True),
            )
            print(flush=True)
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
