"""Finished runs: what other runs, the verbs and users take from a run folder.

A run folder holds `.hydra/config.yaml`, `tokenizer.json` and `checkpoints/` (checkpoint/);
every checkpoint's state.json carries the resolved config and the model's constructor inputs,
so a model is rebuilt from the checkpoint alone. A module per job:

- discovery: the run folder `resume=auto` continues (committed checkpoints, lineage), and a
  failed start's empty output folder removed (`remove_unused_run_dir`);
- resume: the resume source, local or in object storage (`prepare_resume`, `remote_resume`),
  and the run folder it belongs to (`resumed_run_folder`);
- tokenizer: a run's or a pretrained folder's tokenizer reused by a new run;
- model: a run's model from one of its checkpoints (`load_run_model`), distillation teachers;
- loading, predict, generate, evaluate: using a run (`load_run`, `predict_frame`, `complete`,
  `evaluate`): scripts, the verbs and the pyfunc model import them from their modules.

Imported here: what a training run needs (light); the using modules (pandas) load on their own.
"""

from mlxlab.runs.discovery import (
    latest_run_with_checkpoints,
    newest_committed,
    remove_unused_run_dir,
)
from mlxlab.runs.model import CHECKPOINT_CHOICES, choose_checkpoint, load_run_model, load_teachers
from mlxlab.runs.resume import prepare_resume, remote_resume, resumed_run_folder
from mlxlab.runs.tokenizer import (
    TOKENIZER_SIDE_FILES,
    choose_tokenizer,
    first_teacher,
    keep_pretrained_files,
    require_run_tokenizer,
    reuse_tokenizer,
    run_tokenizer,
    use_pretrained_tokenizer,
)

__all__ = [
    "remove_unused_run_dir",
    "CHECKPOINT_CHOICES", "TOKENIZER_SIDE_FILES", "choose_checkpoint",
    "choose_tokenizer", "first_teacher", "keep_pretrained_files", "latest_run_with_checkpoints", "load_run_model",
    "load_teachers", "newest_committed", "prepare_resume", "remote_resume",
    "resumed_run_folder",
    "require_run_tokenizer", "reuse_tokenizer", "run_tokenizer", "use_pretrained_tokenizer",
]
