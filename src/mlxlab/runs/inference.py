"""One way to use a finished run: load it, predict rows, complete prompts.

    run = load_run("outputs/train/<time>")                  # best checkpoint; which="last" = newest
    predict_frame(run, pd.read_csv("test.csv"))             # classifier: id + label columns
    complete(run, "Once upon a time", max_tokens=50)         # language model: the continuation

The code is in this folder (loading.py, predict.py, generate.py); this module
names it for scripts. The `mlxlab predict/generate/eval/register/serve` verbs and the MLflow pyfunc model
(serving/pyfunc.py) all go through it, so a run is loaded, checked and sampled one way. Its metrics on new data are evaluation's
(`mlxlab.evaluation.file_metrics.evaluate(run, "labelled.csv")`).
"""

from mlxlab.runs.generate import complete, decode_stream, sample_ids
from mlxlab.runs.loading import LoadedRun, load_run, require_task
from mlxlab.runs.predict import class_probabilities, predict_frame, prompt_column

__all__ = [
    "LoadedRun", "class_probabilities", "complete", "decode_stream", "load_run",
    "predict_frame", "prompt_column", "require_task", "sample_ids",
]
