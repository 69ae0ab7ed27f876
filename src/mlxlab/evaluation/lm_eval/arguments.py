"""`mlxlab eval`'s lm-evaluation-harness options on its command line (the tasks themselves are
--tasks; command_line.py reads them). Light: the verb table imports it at start-up."""

from __future__ import annotations

import argparse


def add_harness_arguments(parser: argparse.ArgumentParser) -> None:
    """lm-eval's options as one argument group of `parser`."""
    group = parser.add_argument_group("lm-eval-harness tasks (--tasks NAMES)")
    group.add_argument("--num-fewshot", type=int, metavar="N",
                       help="few-shot examples per prompt (default: each task's own)")
    group.add_argument("--limit", type=float, metavar="N",
                       help="score only the first N examples of each task (below 1: a fraction)")
    group.add_argument("--apply-chat-template", action="store_true",
                       help="prompts through the model's chat template (lm-eval's default: plain)")
    group.add_argument("--system-instruction", metavar="TEXT",
                       help="a system message before each prompt")
    group.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction,
                       default=None, help="few-shot examples as turns of the chat (needs "
                       "--apply-chat-template; on with it unless --no-fewshot-as-multiturn, as "
                       "lm-eval's command)")
