"""A finished run's model, rebuilt from one of its checkpoints: for inference, export and as a
distillation teacher (the trainer loads teachers through here).

Every checkpoint's state.json (a `CheckpointState`) carries the resolved config and the model's
constructor inputs: the config's model node is instantiated with `model_init`, the scheduled
operations it had done are redone, the weights load strictly, and a model trained on a shrunken
vocabulary is wrapped to speak the tokenizer's own ids again. A checkpoint of every weight is
rebuilt from itself alone; one of the trained parameters only (its state records a `base`) is
rebuilt on its pretrained base, from the recorded source, once the base's files are proved the
same (models/sources/fingerprint.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.nn as nn
from omegaconf import OmegaConf

from mlxlab.checkpoint import (
    BEST,
    CHECKPOINTS_DIR,
    QUANTIZED,
    STATE_FILE,
    CheckpointState,
    check_committed,
    find_run_checkpoints,
    load_checkpoint,
)
from mlxlab.checkpoint.discover import is_checkpoint_dir
from mlxlab.config import instantiate
from mlxlab.config.retired import with_moved_targets
from mlxlab.errors import ConfigError, UserError
from mlxlab.models.quantized.quantize import quantize_linears
from mlxlab.models.sources import as_local, resolve
from mlxlab.models.sources.fingerprint import check_base, holds_base
from mlxlab.training.model_ops import apply_done

log = logging.getLogger(__name__)

CHECKPOINT_CHOICES = ("best", "last", QUANTIZED)  # cli/common.py spells them again


def choose_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The committed checkpoint of a run folder to load: `best` = best/ (else the newest, for a
    run without validation), `last` = the newest step_*, `quantized` = the best weights
    quantized (trainer.quantize_bits). A checkpoint folder is itself."""
    if which not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoint={which!r}: use one of {', '.join(CHECKPOINT_CHOICES)}")
    if which == QUANTIZED and not is_checkpoint_dir(Path(path)):
        found = Path(path) / CHECKPOINTS_DIR / QUANTIZED
        if check_committed(found, full=False) is not None:
            raise ConfigError(f"{path} has no quantized checkpoint: train with "
                              "trainer.quantize_bits=4 (or 8) to save one")
        return found
    candidates = find_run_checkpoints(Path(path))  # newest step first, then best/
    if which == "best":
        candidates = sorted(candidates, key=lambda p: p.name != BEST)
    usable = [p for p in candidates if check_committed(p, full=False) is None]
    if not usable:
        raise ConfigError(f"{path} holds no committed checkpoint: train it first or give another run")
    return usable[0]


def load_run_model(path: str | Path, which: str = "best") -> tuple[nn.Module, CheckpointState]:
    """Rebuild the model of a finished run (its best checkpoint, else the newest; or the newest
    with which="last") with its weights; the state's `path` says which checkpoint was loaded."""
    checkpoint = choose_checkpoint(path, which)
    state = CheckpointState.read(checkpoint)
    if "model" not in state.config or not state.model_init:
        raise ConfigError(f"{checkpoint}/state.json has no model config: it is not an mlxlab run")
    model_cfg = OmegaConf.create(with_moved_targets(state.config["model"]))  # older runs' paths
    if state.base:  # the trained parameters only: on the base, proved the same, from its files
        folder = base_folder(state.base)
        check_base(state.base, folder, str(checkpoint))
        model_cfg.pretrained = str(folder)
        if "revision" in model_cfg:  # pinned already: the folder is that revision's
            model_cfg.revision = None
    elif "pretrained" in model_cfg:  # every weight is the checkpoint's: no source needed
        model_cfg.pretrained = None
    model = instantiate(model_cfg, **state.model_init)
    apply_done(model, state)  # scheduled operations (grown layers...) it had done
    quantization = state.extra.get("quantization")
    if quantization:  # packed weights: quantize the float model the same way, then load
        quantize_linears(model, **quantization)
    load_checkpoint(checkpoint, model, strict=True,
                    verify_base=holds_base(model, str(checkpoint)))
    vocab_map = (state.data or {}).get("vocab_map")
    if vocab_map:  # trained on a shrunken vocabulary: speak the tokenizer's own ids again
        from mlxlab.models.decoders.remapped import RemappedLM

        model = RemappedLM(model, vocab_map["keep"], vocab_map["full_size"])
    model.eval()
    return model, state


def base_folder(base: dict) -> Path | None:
    """The folder of a checkpoint's recorded base: the one it resolved to when it trained, else
    its source resolved again (a GGUF file converted again, a hub id from the cache); None when
    neither is there (check_base says so in one line)."""
    folder = Path(str(base.get("folder") or ""))
    if base.get("folder") and folder.is_dir():
        return folder
    try:
        return resolve(base["pretrained"], base.get("revision")).folder
    except UserError:
        return None


def load_teachers(
    specs: list, vocab_size: int, num_labels: int | None, label_names: list[str] | None = None
) -> tuple[list[nn.Module], list[float]]:
    """Teachers for distillation: each spec is {run: <folder>, weight: float}, the folder a
    finished mlxlab run (or one of its checkpoints) or a Hugging Face / mlx-lm model folder (a
    BertForSequenceClassification, or any decoder mlx-lm loads).

    A teacher must predict over the same outputs as the student: the same label set for
    classifiers, the same token ids for language models (train.py points the student's data at
    the first teacher's tokenizer.json for that).
    """
    models, weights = [], []
    for spec in specs:
        spec = {"run": spec} if isinstance(spec, str) else dict(spec)
        if not spec.get("run"):
            raise ConfigError("each objective.teachers entry needs run=<finished run dir or "
                              "Hugging Face model folder>")
        spec["run"] = as_local(spec["run"])  # a GGUF file or hub id as its folder
        if is_pretrained_folder(spec["run"]):
            model = pretrained_teacher(Path(spec["run"]), vocab_size, num_labels, label_names)
            where = "a pretrained folder"
        else:
            model, state = load_run_model(spec["run"])
            check_teacher_outputs(spec["run"], state.model_init, vocab_size, num_labels)
            where = str(state.path)
        model.freeze()
        models.append(model)
        weights.append(float(spec.get("weight", 1.0)))
        log.info("teacher: %s (%s)", spec["run"], where)
    return models, weights


def check_teacher_outputs(source: str, theirs: dict, vocab_size: int, num_labels: int | None
                          ) -> None:
    if theirs.get("num_labels") != num_labels or theirs.get("vocab_size") != vocab_size:
        raise ConfigError(
            f"teacher {source} was trained with vocab_size={theirs.get('vocab_size')}, "
            f"num_labels={theirs.get('num_labels')} but the student's data has "
            f"vocab_size={vocab_size}, num_labels={num_labels}: give the student the teacher's "
            f"tokenizer (data.tokenizer.path=<teacher run>/tokenizer.json) and the same label column"
        )


def is_pretrained_folder(path: str | Path) -> bool:
    """A Hugging Face / mlx-lm model folder (config.json), not an mlxlab run or checkpoint."""
    path = Path(str(path))
    return (path / "config.json").is_file() and not (path / CHECKPOINTS_DIR).is_dir() \
        and not (path / STATE_FILE).is_file()  # a checkpoint has model.safetensors too


def pretrained_teacher(folder: Path, vocab_size: int, num_labels: int | None,
                       label_names: list[str] | None) -> nn.Module:
    """A BERT classifier with its trained head (its labels the student's, in the same order), or
    a decoder whose embedding table covers the student's token ids (a padded table's extra rows
    are cut from its logits). Anything else: one line naming the mismatch."""
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.models.decoders.remapped import FirstLogits
    from mlxlab.models.encoders.bert import BertClassifier
    from mlxlab.models.hf import read_config

    config = read_config(folder)
    kind = config.get("model_type")
    if kind == "bert":
        if num_labels is None:
            raise ConfigError(f"teacher {folder} is a BERT classifier but the student is a "
                              "language model: give a decoder folder or a finished LM run")
        theirs = [str(v) for _, v in sorted((config.get("id2label") or {}).items(),
                                             key=lambda kv: int(kv[0]))]
        if len(theirs) != num_labels:
            raise ConfigError(
                f"teacher {folder} has {len(theirs) or 'no'} trained labels (config.json "
                f"id2label) but the student's data has {num_labels}: give a classifier "
                "fine-tuned on the same label column")
        default = [f"LABEL_{i}" for i in range(num_labels)]
        if label_names and theirs != default and theirs != [str(n) for n in label_names]:
            raise ConfigError(f"teacher {folder} orders its labels {theirs}, the student's data "
                              f"{list(label_names)}: they must be the same labels in one order")
        model = BertClassifier(vocab_size=vocab_size, num_labels=num_labels, pretrained=str(folder))
    else:
        if num_labels is not None:
            raise ConfigError(f"teacher {folder} is a {kind} decoder but the student is a "
                              "classifier: give a BERT classifier folder or a finished run")
        model = MLXLMDecoder(vocab_size=vocab_size, pretrained=str(folder))
        if model.vocab_size != vocab_size:  # check_vocab refused a smaller table already
            model = FirstLogits(model, vocab_size)
    model.eval()
    return model
