"""Evaluation as a whole: a model scored on tasks, every example's score kept, and two models'
scores paired. What a newcomer looks for under "evaluation" is here:

- tasks.py: read and check a jsonl task file (multiple choice, generation, perplexity);
- settings.py: the `eval` config node (`TaskSettings`);
- scoring.py: `score_task` on a model and tokenizer (multiple choice as lm-eval-harness);
- results.py: per-example scores on disk (`write_scores`, `read_scores`) and their intervals;
- run_scores.py: a run's saved scores, from its folder or its MLflow artifacts;
- paired.py: two runs' scores paired by example id (McNemar, paired bootstrap, a verdict);
- in_training.py: the callback that scores `eval.tasks` at each evaluation of a training run;
- eval_run.py: `mlxlab eval MODEL TASK...`, the scores logged as an MLflow run of their own;
- file_metrics.py: `mlxlab eval RUN FILE`, a run's metrics on a labelled CSV or a text file;
- lm_eval/: lm-evaluation-harness (its model, tasks, scores, command);
- speech/: transcription tasks on a Whisper model (WER / CER per utterance).

What an objective measures on the validation split is the objective's
(objectives/validation.py); the model a verb names is loaded by runs/named_model.py. `mlxlab
runs compare A B` pairs the scores, `mlxlab export` writes them into the model card. Modules
import their siblings, not this package.
"""
