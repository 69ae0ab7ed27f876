"""Sample text from a language model (a finished run, or a model folder), streaming tokens as they
come.

    mlxlab generate outputs/tinystories_nano/<time> --prompt "Once upon a time"
    mlxlab generate RUN --prompt "The dog" --max-tokens 100 --temperature 0.8 --top-k 40 \
        --top-p 0.95 --seed 0 --num-samples 3
    mlxlab generate models/SmolLM2-135M-Instruct --prompt "The capital of France"
    mlxlab generate models/SmolLM2-135M-Instruct --chat --prompt "Who are you?" --system "Be brief."
    mlxlab generate models/SmolLM2-135M-Instruct --chat        # a conversation, a line a turn
    mlxlab generate VLM_RUN --chat --image cat.png --prompt "What is on the mat?"
    mlxlab generate RUN --chat --prompt "Hi" --draft DRAFT_RUN --num-draft-tokens 3

MODEL is a run folder (its --checkpoint) or any model: a Hugging Face / mlx-lm model folder, a
folder `mlxlab export` wrote, a .gguf file, ollama:NAME[:TAG] or a hub id ORG/NAME. The prompt
starts after the tokenizer's BOS (else <|endoftext|>), as training documents do. --chat: the
prompt is a user turn rendered by the model's own chat template (with --system as the system
turn, else the template's default), and the reply ends at the template's end of turn; without
--prompt, each line of stdin is the next user turn of one conversation (an empty line or end of
input ends it). Generation stops after --max-tokens new tokens, at the model's end tokens, or
when its context (max_seq_len) is full. --image FILE (with --chat, repeatable): the user turn
shows the picture(s) to a vision-language model, laid out by its own processor. --draft MODEL:
speculative decoding with a smaller model of the same tokenizer (a run or a folder), which
proposes --num-draft-tokens tokens the model checks at once: the same text under --temperature 0,
the model's own distribution otherwise; the share of tokens the draft proposed is printed.
--temperature 0 = greedy.
"""

from __future__ import annotations

import sys

from mlxlab.cli.common import add_run_arguments, guarded, parser_for


def main(argv: list[str]) -> int:
    parser = parser_for("generate", __doc__)
    add_run_arguments(parser, any_model=True)
    parser.add_argument("--prompt", default=None, help="text to continue (default: empty); "
                        "with --chat the user's turn")
    parser.add_argument("--chat", action="store_true", help="talk to the model through its own "
                        "chat template")
    parser.add_argument("--system", default=None, help="--chat: the system turn")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="--chat: a picture the user turn shows (repeatable)")
    parser.add_argument("--draft", default=None, metavar="MODEL",
                        help="a smaller model of the same tokenizer for speculative decoding")
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--num-samples", type=int, default=1)
    args = parser.parse_args(argv)

    def body() -> int:
        from mlxlab.runs.named_model import load_eval_model

        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        if args.system is not None and not args.chat:
            raise ValueError("--system is the system turn of a chat: add --chat")
        if args.image and not (args.chat and args.prompt is not None):
            raise ValueError("--image shows pictures in a chat's user turn: add --chat and "
                             "--prompt")
        if args.chat and args.prompt is None and args.num_samples > 1:
            raise ValueError("--num-samples samples one --prompt: give --prompt, or drop "
                             "--num-samples for a conversation")
        if args.draft and args.image:
            raise ValueError("--draft decodes text models; drop --image or --draft")
        if args.num_draft_tokens < 1:
            raise ValueError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")
        model = load_eval_model(args.run, args.checkpoint, "template" if args.chat else "plain",
                                purpose="mlxlab generate")
        draft_model = None
        if args.draft:
            from mlxlab.runs.named_model import load_draft

            draft_model = load_draft(model, args.draft, purpose="mlxlab generate --draft")
        print(f"[{model.checkpoint or model.path}]", file=sys.stderr)
        if args.chat and args.prompt is None:
            return converse(model, args, draft_model)
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40)
            if not args.chat:
                print(args.prompt or "", end="", flush=True)
            reply(model, args, turns(args.system, [args.prompt]), args.seed + i, draft_model)
            print(flush=True)
        return 0

    return guarded("generate", body)


def turns(system: str | None, users: list[str], replies: tuple[str, ...] = ()) -> list[dict]:
    """The chat so far: the system turn (if given), then user and assistant turns in turn."""
    chat = [{"role": "system", "content": system}] if system is not None else []
    for k, user in enumerate(users):
        chat.append({"role": "user", "content": user})
        if k < len(replies):
            chat.append({"role": "assistant", "content": replies[k]})
    return chat


def reply(model, args, chat: list[dict], seed: int, draft=None) -> str:
    """The model's text after the prompt (plain: the last user turn's text after BOS; --chat:
    the chat through its template), printed as it comes."""
    from mlxlab.runs.generate import (
        chat_prompt_ids,
        continue_ids,
        decode_stream,
        image_prompt,
        plain_prompt_ids,
    )

    folder, inputs = model.tokenizer_folder, None
    if args.image:
        prompt_ids, inputs = image_prompt(model.model, model.template, chat, args.image)
    elif model.template is not None:
        prompt_ids = chat_prompt_ids(model.tokenizer, model.template, chat)
    else:
        prompt_ids = plain_prompt_ids(model.tokenizer, folder, model.model.hf_config,
                                      chat[-1]["content"] or "")
    accepted: list[int] = []
    ids = continue_ids(model.model, model.tokenizer, folder, prompt_ids, args.max_tokens,
                       args.temperature, args.top_k, args.top_p, seed, inputs,
                       draft, args.num_draft_tokens, accepted)
    pieces = []
    for piece in decode_stream(model.tokenizer, ids):
        pieces.append(piece)
        print(piece, end="", flush=True)
    if draft is not None and accepted:
        print(f"\n[draft: {sum(accepted)} of {len(accepted)} tokens proposed by the draft "
              f"({sum(accepted) / len(accepted):.0%})]", file=sys.stderr)
    return "".join(pieces)


def converse(model, args, draft=None) -> int:
    """A conversation: each stdin line a user turn, each reply printed and kept in the chat."""
    users: list[str] = []
    replies: list[str] = []
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        users.append(line.rstrip("\n"))
        replies.append(reply(model, args, turns(args.system, users, tuple(replies)),
                             args.seed + len(replies), draft))
        print(flush=True)
