"""A run's tokenizer as the input of another run: the one a resumed run or a distilled student
must reuse (the token ids its checkpoint was trained on), and a pretrained model folder's
tokenizer and side files for a fine-tuning run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from mlxlab.data.tokenizer import folder_tokenizer
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.sources import as_local, model_folder

log = logging.getLogger(__name__)


def run_tokenizer(path: str | Path) -> Path | None:
    """tokenizer.json of the run holding `path` (a run dir, its checkpoints/, or one checkpoint)."""
    return folder_tokenizer(path)


def require_run_tokenizer(path: str | Path, kind: str) -> Path:
    """run_tokenizer(path), or an error naming what to pass; `kind` says which run it must be."""
    found = run_tokenizer(path)
    if found is None:
        raise MissingFileError(
            f"no tokenizer.json in {path} or its run directory: pass the run directory "
            f"(outputs/<task>/<time>) of a finished {kind} run, or one of its checkpoints"
        )
    return found


def reuse_tokenizer(cfg: DictConfig, run: str | Path | None, why: str) -> None:
    """Point data.tokenizer.path at an earlier run's tokenizer.json (unless one is set), so a
    resumed run or a distilled student sees exactly the token ids the checkpoint was trained on."""
    if run is None or cfg.data.get("tokenizer", {}).get("path"):
        return
    found = run_tokenizer(run)
    if found is not None:
        cfg.data.tokenizer.path = str(found)
        log.info("%s: using the tokenizer %s", why, found)


# What a Hugging Face folder says about its tokenizer and generation besides tokenizer.json.
TOKENIZER_SIDE_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
    # a vision-language model's image processor (data/vision_chat.py)
    "preprocessor_config.json", "processor_config.json",
)


def use_pretrained_tokenizer(cfg: DictConfig) -> None:
    """Point the data at model.pretrained's tokenizer.json (unless a tokenizer is given): the
    checkpoint's embeddings only mean something for the ids it was trained with."""
    source = cfg.model.get("pretrained")
    if not source or cfg.data.get("tokenizer", {}).get("path"):
        return
    source = model_folder(source, cfg.model.get("revision"))
    if not (Path(source) / "tokenizer.json").is_file():
        raise ConfigError(f"{source} has no tokenizer.json: set data.tokenizer.path= to the "
                          "checkpoint's tokenizer (a fast tokenizer saved by transformers)")
    cfg.data.tokenizer.path = str(Path(source) / "tokenizer.json")
    log.info("pretrained model: using the tokenizer %s", cfg.data.tokenizer.path)


def keep_pretrained_files(cfg: DictConfig, run_dir: Path) -> None:
    """Copy the pretrained folder's tokenizer side files (special tokens, chat template,
    generation settings) into the run folder, so an export needs only the run."""
    source = cfg.model.get("pretrained")
    if not source:
        return
    source = model_folder(source, cfg.model.get("revision"))
    for name in TOKENIZER_SIDE_FILES:
        if (Path(source) / name).is_file() and not (run_dir / name).exists():
            shutil.copyfile(Path(source) / name, run_dir / name)


def first_teacher(cfg: DictConfig) -> str | None:
    """The first distillation teacher's folder, whose tokenizer the student reuses (unless
    data.tokenizer.path is set). A Hugging Face / mlx-lm teacher folder without tokenizer.json
    is refused then: a tokenizer the student trained itself would give the teacher other ids."""
    specs = (cfg.get("objective") or {}).get("teachers") or []
    folders = [as_local(s if isinstance(s, str) else s.get("run")) for s in specs]
    if cfg.data.get("tokenizer", {}).get("path"):
        return folders[0] if folders else None
    from mlxlab.runs.model import is_pretrained_folder

    for folder in folders:
        if is_pretrained_folder(folder) and not (Path(folder) / "tokenizer.json").is_file():
            raise ConfigError(f"teacher {folder} has no tokenizer.json: the student must read "
                              "the token ids it was trained on; set data.tokenizer.path= to its "
                              "tokenizer (a fast tokenizer saved by transformers)")
    return folders[0] if folders else None



def choose_tokenizer(cfg: DictConfig, resume: Path | None) -> None:
    """The tokenizer a new run must use, in order: a resumed run's, the first distillation
    teacher's, model.pretrained's (each unless data.tokenizer.path is set already)."""
    reuse_tokenizer(cfg, resume, "resume")
    reuse_tokenizer(cfg, first_teacher(cfg), "distillation")
    use_pretrained_tokenizer(cfg)
    use_pretrained_processor(cfg)


def use_pretrained_processor(cfg: DictConfig) -> None:
    """Point image data (data.processor) at model.pretrained's folder, whose processor makes
    the rows' ids and pixel arrays (unless a processor is given)."""
    source = cfg.model.get("pretrained")
    if not source or "processor" not in cfg.data or cfg.data.get("processor"):
        return
    cfg.data.processor = str(model_folder(source, cfg.model.get("revision")))
