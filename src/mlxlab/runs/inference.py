"""One way to use a finished run: load it, predict rows, complete prompts, evaluate on new data.

    run = load_run("outputs/train/<time>")                  # best checkpoint; which="last" = newest
    predict_frame(run, pd.read_csv("test.csv"))             # classifier: id + label columns
    complete(run, "Once upon a time", max_tokens=50)         # language model: the continuation
    evaluate(run, "labelled.csv")                            # accuracy/F1/AUC, or loss/perplexity

The code is in this folder (loading.py, predict.py, generate.py, evaluate.py); this module
names it for scripts. The `mlxlab predict/generate/eval/register/serve` verbs and the MLflow pyfunc model
(serving/pyfunc.py) all go through it, so a run is loaded, checked and sampled one way.
"""

from mlxlab.runs.evaluate import evaluate
from mlxlab.runs.generate import complete, decode_stream, sample_ids
from mlxlab.runs.loading import LoadedRun, load_run, require_task
from mlxlab.runs.predict import class_probabilities, predict_frame, prompt_column

__all__ = [
    "LoadedRun", "class_probabilities", "complete", "decode_stream", "evaluate", "load_run",
    "predict_frame", "prompt_column", "require_task", "sample_ids",
]
