"""lm-eval's own command with mlxlab's model registered:

    python -m mlxlab.evaluation.lm_eval.command run --model mlxlab \\
        --model_args model=outputs/finetune/<time> --tasks arc_easy --limit 100

takes exactly `lm_eval`'s arguments (evaluation/lm_eval/registered.py: what `--model_args` holds).
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import mlxlab.evaluation.lm_eval.registered  # noqa: F401 - registers --model mlxlab

    cli_evaluate()


if __name__ == "__main__":
    main()
