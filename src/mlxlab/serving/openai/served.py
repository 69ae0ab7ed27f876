"""The models one OpenAI-compatible server answers for, each under the names a request's
`model` may use: language models, with the weights they have in common held once, and text
embedders (sentence-transformers folders, embeddings.py).

    targets = [resolve_target(t) for t in ("outputs/ft/a", "outputs/ft/b", "models:/ft@champion")]
    served = load_served(targets)

A target is a finished decoder run (its best checkpoint, or `which`), a registered model
(`models:/NAME@ALIAS` or `models:/NAME/VERSION`, as `mlxlab register` writes them: the run
folder its version was logged from) or a base model folder (base_model_folder). Several runs
fine-tuned from one base hold one copy of it: after loading, every parameter equal to one an
earlier model has (the same name outside the adapter wrappers, shape, dtype and values) is
pointed at that array (share_weights), so each run keeps only its adapters of its own and each
request runs its own model tree, no adapter swapped in or out between requests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxlab.errors import ConfigError
from mlxlab.serving.openai.embeddings import ServedEmbedder, load_embedder

if TYPE_CHECKING:  # mlx is imported through mlxlab, which loads the fast BLAS first
    import mlx.nn as nn

    from mlxlab.serving.openai.vision import ServedImages

REGISTRY_SCHEMES = ("models:/",)


@dataclass
class ServedModel:
    """One model as the server runs it: `model(ids, cache=...)` with `make_cache()` (an mlxlab
    decoder), mlx-lm's tokenizer wrapper stopping on the model's own end tokens, the ids a
    completion prompt starts with (as the training stream laid documents out) and its context.
    `names[0]` is listed by /v1/models first; a request may use any of `names`. `images`: what
    a vision-language model's image chats take (vision.py), None for a text model. `draft`: a
    smaller model of the same tokenizer (attach_draft) that proposes tokens the model checks
    in one pass (speculative decoding), None to decode a token a pass."""

    names: tuple[str, ...]
    model: nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    start_ids: list[int]
    context: int
    batchable: bool
    source: str
    images: ServedImages | None = None
    stats: dict = field(default_factory=dict)
    draft: nn.Module | None = None
    tokenizer_json: Path | None = None

    @property
    def name(self) -> str:
        return self.names[0]


def base_model_folder(source: str) -> Path:
    """The local folder of a base model a user names (not a run): the one place a model string
    becomes a folder mlx-lm loads (config.json, *.safetensors, tokenizer files) or a
    sentence-transformers folder (modules.json): a folder, a GGUF file, ollama:NAME or a hub
    id, through models/sources."""
    from mlxlab.models.embedders.sentence_folder import is_sentence_folder
    from mlxlab.models.sources import as_local

    folder = Path(as_local(source)).expanduser()
    if not (folder / "config.json").is_file() and not is_sentence_folder(folder):
        raise ConfigError(
            f"{source}: no such run folder, and not a models:/ or runs:/ URI or a model folder "
            "(config.json, *.safetensors, tokenizer.json; an embedder's modules.json)"
        )
    return folder


def is_run(path: Path) -> bool:
    """A finished mlxlab run folder or one of its checkpoints (what load_run takes)."""
    from mlxlab.checkpoint import CHECKPOINTS_DIR, STATE_FILE

    return (path / CHECKPOINTS_DIR).is_dir() or (path / STATE_FILE).is_file()


def served_tokenizer(folder: Path, tokenizer_json: Path, stops: Sequence[int]) -> Any:
    """mlx-lm's tokenizer wrapper for a model whose tokenizer files are in `folder`: with its
    chat template (tokenizer_config.json, kept in a fine-tuning run's folder), stopping on
    exactly `stops` (the model's own end tokens, as `mlxlab generate` stops)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    if (folder / "tokenizer_config.json").is_file():
        wrapper = load_tokenizer(folder)
    else:  # a tokenizer trained here: tokenizer.json alone, no template
        from transformers import PreTrainedTokenizerFast

        wrapper = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json)))
    wrapper.eos_token_ids = list(stops)
    return wrapper


def _served(names: tuple[str, ...], model: nn.Module, tokenizer: Any, folder: Path,
            tokenizer_json: Path, source: str) -> ServedModel:
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.runs.generate import prompt_ends

    start, stops = prompt_ends(tokenizer, folder, model.hf_config)
    model.eval()
    # mlx-lm's batched decoding pads prompts on the left and masks through its own attention:
    # only mlx-lm's architectures do that; mlxlab's own decoder answers one request at a time.
    batchable = isinstance(model, MLXLMDecoder) and all(
        hasattr(c, "merge") for c in model.make_cache())
    images = None
    if model.processor_folder is not None:  # a vision-language model: image chats too
        from mlxlab.serving.openai.vision import ServedImages

        images = ServedImages.load(model, folder, tokenizer)
    return ServedModel(names, model, served_tokenizer(folder, tokenizer_json, stops), start,
                       int(model.max_seq_len), batchable, source, images,
                       tokenizer_json=tokenizer_json)


@dataclass
class Target:
    """A target as the user named it, where its model is, and the names it answers to."""

    text: str
    path: Path
    names: tuple[str, ...]
    registered: bool = False

    def task(self, which: str = "best") -> str:
        """"lm", "classification", "rerank" or "speech" (a run's checkpoint says; a model
        folder is a decoder unless it holds a sequence classifier, a cross-encoder reranker, or
        a Whisper model)."""
        from mlxlab.checkpoint import CheckpointState
        from mlxlab.models.embedders.cross_encoder import is_sequence_classifier
        from mlxlab.models.speech.whisper_folder import is_whisper_folder
        from mlxlab.runs.model import choose_checkpoint

        if not is_run(self.path):
            if is_whisper_folder(self.path):
                return "speech"
            return "rerank" if is_sequence_classifier(self.path) else "lm"
        state = CheckpointState.read(choose_checkpoint(self.path, which))
        target = str((state.config.get("model") or {}).get("_target_", ""))
        if target.endswith("CrossEncoderModel"):
            return "rerank"
        if target.endswith("WhisperModel"):
            return "speech"
        return "classification" if state.model_init.get("num_labels") else "lm"


def resolve_target(text: str, uri: str | None = None, scratch: Path | None = None) -> Target:
    """Where a target's model is: a run folder (or checkpoint) as given, a registered model's
    run folder (its checkpoint downloaded into `scratch` when that folder is gone), else a
    base model folder (base_model_folder)."""
    if text.startswith(REGISTRY_SCHEMES):
        from mlxlab.runs.registered import registered_run_dir

        spec = text.removeprefix(REGISTRY_SCHEMES[0])
        names = (text, spec, spec.split("@")[0].split("/")[0])
        return Target(text, registered_run_dir(text, uri, scratch), names, registered=True)
    path = Path(text).expanduser()
    if not is_run(path):
        path = base_model_folder(text)
    return Target(text, path, (text, path.resolve().name))


def load_target(target: Target, which: str = "best") -> ServedModel | ServedEmbedder:
    """One resolved target loaded to serve: a language model, or a text embedder (a
    sentence-transformers folder)."""
    from tokenizers import Tokenizer

    from mlxlab.models.embedders.sentence_folder import is_sentence_folder
    from mlxlab.models.pretrained import pretrained_model
    from mlxlab.runs.inference import load_run, require_task

    names = tuple(dict.fromkeys(target.names))
    if not target.registered and is_sentence_folder(target.path):
        return load_embedder(names, target.path)
    if target.registered or is_run(target.path):
        run = load_run(target.path, which)
        require_task(run, "lm", "mlxlab serve's OpenAI API")
        return _served(names, run.model, run.tokenizer, run.tokenizer_path.parent,
                       run.tokenizer_path, str(run.checkpoint))
    folder = target.path
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ConfigError(f"{folder} has no tokenizer.json: serving needs the model's fast "
                          "tokenizer (as transformers saves it)")
    model = pretrained_model(folder)
    return _served(names, model, Tokenizer.from_file(str(tokenizer_json)), folder,
                   tokenizer_json, str(folder))


def share_weights(model: nn.Module, seen: dict) -> int:
    """Point every parameter of `model` that equals one in `seen` (the arrays of the models
    loaded before it, by name once the adapter wrappers' `.linear` is read through; same
    shape, dtype and values) at that array, in place, and add its other parameters to `seen`;
    returns the bytes no longer held twice. Runs fine-tuned from one base keep one copy of it;
    a fully fine-tuned run keeps what it changed."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxlab.models.adapters.lora import lora_base_name_map

    plain = {wrapped: name for name, wrapped in lora_base_name_map(model).items()}
    same, saved = [], 0
    for name, value in tree_flatten(model.parameters()):
        first = seen.setdefault(plain.get(name, name), value)
        if first is not value and first.shape == value.shape and first.dtype == value.dtype \
                and mx.array_equal(first, value).item():
            same.append((name, first))
            saved += value.nbytes
    if same:
        model.load_weights(same, strict=False)
    return saved


def load_served(targets: Sequence[Target], which: str = "best"
                ) -> list[ServedModel | ServedEmbedder]:
    """Every target loaded, the language models' common weights held once, each name answering
    for one model."""
    given = [t.names[0] for t in targets]
    if twice := next((t for t in given if given.count(t) > 1), None):
        raise ConfigError(f"{twice} is given twice: serve each model once")
    served, seen = [], {}
    for target in targets:
        served.append(load_target(target, which))
        if isinstance(served[-1], ServedModel):
            # one target at a time: the copy a later run loads of a shared base goes at once
            served[-1].stats["shared_bytes"] = share_weights(served[-1].model, seen)
    primaries = [s.name for s in served]
    # A short name (a folder's name, a registered name without its alias) two models would
    # answer to answers for neither: a request names one of them in full.
    counts = Counter(n for s in served for n in s.names)
    for s in served:
        s.names = tuple(n for n in s.names if n == s.name or (counts[n] == 1 and n not in primaries))
    return served


def attach_draft(served: ServedModel | ServedEmbedder, draft: Target, which: str = "best"
                 ) -> None:
    """`draft` loaded as `served`'s draft model, or one ConfigError line naming the pair when
    speculative decoding cannot use it (check_draft: another tokenizer or vocabulary, not
    smaller, a cache that cannot be rolled back)."""
    from tokenizers import Tokenizer

    from mlxlab.decoding.speculative import check_draft, same_tokenizer

    if isinstance(served, ServedEmbedder):
        raise ConfigError(f"--draft {served.name}={draft.text}: {served.name} is a text embedder; "
                          "a draft speeds up a language model's generation")
    if served.images is not None:
        raise ConfigError(f"--draft {served.name}={draft.text}: a vision-language model is "
                          "served without a draft (its prompt's images go in with the first "
                          "forward pass, which a draft does not see)")
    loaded = load_target(draft, which)
    same = same_tokenizer(Tokenizer.from_file(str(served.tokenizer_json)),
                          Tokenizer.from_file(str(loaded.tokenizer_json)))
    try:
        check_draft(served.model, loaded.model, same)
    except ConfigError as err:
        raise ConfigError(f"--draft {served.name}={draft.text}: "
                          f"{str(err).removeprefix('--draft: ')}") from None
    served.draft = loaded.model
