"""`mlxlab eval MODEL --tasks ...`: which entries are lm-eval's, its options (arguments.py puts
them on the command line), and their scores on the loaded model (scores.py), beside mlxlab's own
jsonl tasks (evaluation/eval_run.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlxlab.evaluation.lm_eval.tasks import HarnessOptions, check_entries, is_harness_entry
from mlxlab.evaluation.scoring import TaskScores
from mlxlab.runs.named_model import EvalModel


def split_entries(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """(mlxlab's jsonl task files, lm-eval's tasks / groups / YAML files), each in order."""
    return ([e for e in entries if not is_harness_entry(e)],
            [e for e in entries if is_harness_entry(e)])


def harness_options(args: Any, entries: Sequence[str]) -> HarnessOptions:
    """The command line's lm-eval options, the entries checked (lm-eval installed, every name
    known, every YAML there) before a model is loaded."""
    limit = args.limit
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit {limit}: give a number of examples, or a fraction in (0, 1)")
    options = HarnessOptions(args.num_fewshot,
                             int(limit) if limit is not None and limit >= 1 else limit,
                             args.apply_chat_template, args.system_instruction,
                             args.fewshot_as_multiturn)
    if not entries and (args.num_fewshot is not None or limit is not None
                        or args.apply_chat_template or args.system_instruction):
        raise ValueError("--num-fewshot, --limit, --apply-chat-template and "
                         "--system-instruction are for lm-eval tasks (--tasks NAMES)")
    check_entries(entries)
    return options


def score_harness_entries(source: EvalModel, entries: Sequence[str], options: HarnessOptions,
                          batch_size: int) -> tuple[list[TaskScores], dict[str, float]]:
    """lm-eval's `entries` on the model (its tasks' scores, its groups' metrics); nothing
    without entries."""
    if not entries:
        return [], {}
    from mlxlab.evaluation.lm_eval.registered import harness_lm
    from mlxlab.evaluation.lm_eval.scores import score_harness

    return score_harness(harness_lm(source, batch_size), entries, options)
