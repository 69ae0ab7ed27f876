"""Evaluation tasks: jsonl files of multiple-choice, generation or perplexity examples, scored
on any loaded language model with every example's score kept.

- tasks.py: read and check a task file (`read_task`, `read_tasks`);
- settings.py: the `eval` config node (`TaskSettings`);
- scoring.py: `score_task` on a model and tokenizer (multiple choice as lm-eval-harness);
- results.py: per-example scores on disk (`write_scores`, `read_scores`) and their intervals;
- paired.py: two runs' scores paired by example id (McNemar, paired bootstrap, a verdict).

A training run scores its tasks at each evaluation (training/task_evaluation.py), `mlxlab eval
MODEL TASK...` on any model (runs/task_eval.py), `mlxlab runs compare A B` pairs them, `mlxlab
export` writes them into the model card. Modules import their siblings, not this package.
"""
