"""lm-evaluation-harness in mlxlab: its tasks scored on any mlxlab model, kept as mlxlab keeps its
own tasks.

- model.py: `MlxlabLM`, lm-eval's `TemplateLM` over an mlxlab decoder (it only runs the model);
- registered.py: the `mlxlab` model registered with lm-eval (any run or folder by name);
- tasks.py: which task-list entries are lm-eval's, its options, the checks before scoring;
- scores.py: `score_harness`, lm-eval's results as one `TaskScores` per task;
- corpus.py: lm-eval's corpus-level scores (perplexities, BLEU, chrF, TER) as additive pieces;
- arguments.py, command_line.py: `mlxlab eval --tasks` (its options, its entries' scores);
- command.py: `python -m mlxlab.evaluation.lm_eval.command`, lm-eval's own command with
  the `mlxlab` model registered.

Modules import their siblings, not this package.
"""
