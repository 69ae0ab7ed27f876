"""Sample text from a finished language-model run, streaming tokens as they come.

    mlxlab generate outputs/tinystories_nano/<time> --prompt "Once upon a time"
    mlxlab generate RUN --prompt "The dog" --max-tokens 100 --temperature 0.8 --top-k 40 \
        --top-p 0.95 --seed 0 --num-samples 3

The tokenizer is the run's tokenizer.json; the prompt starts after the tokenizer's BOS (else
<|endoftext|>), as training documents do. Generation stops after --max-tokens new tokens, at
<|endoftext|>, or when the model's context (model.max_seq_len) is full. --temperature 0 = greedy.
"""

from __future__ import annotations

import sys

from mlxlab.cli.common import add_run_arguments, guarded, parser_for


def main(argv: list[str]) -> int:
    parser = parser_for("generate", __doc__)
    add_run_arguments(parser)
    parser.add_argument("--prompt", default="", help="text to continue (default: empty)")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--num-samples", type=int, default=1)
    args = parser.parse_args(argv)

    def body() -> int:
        from mlxlab.inference import complete, load_run, require_task

        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        run = load_run(args.run, args.checkpoint)
        require_task(run, "lm", "mlxlab generate")
        print(f"[{run.checkpoint}]", file=sys.stderr)
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40)
            print(args.prompt, end="", flush=True)
            complete(run, args.prompt, args.max_tokens, args.temperature, args.top_k, args.top_p,
                     args.seed + i, on_text=lambda s: print(s, end="", flush=True))
            print(flush=True)
        return 0

    return guarded("generate", body)
