"""Image + text chats for vision-language fine-tuning (task="lm"): the model's own processor
makes the ids and pixel arrays, and the loss falls on every assistant turn and nowhere else.

Rows are chats as data=chat reads them, whose user turns may hold images (data/images.py:
paths relative to the file, file:// and data: URLs, a row's `images` list for bare
`{"type": "image"}` parts; several a row). Each row is
1. rendered with the model's chat template and tokenized with its tokenizer, the assistant
   tokens marked as for text chats (data/chat.py: the template's own `{% generation %}` tags,
   or the turns inferred and checked against its rendering);
2. run through the model's processor (mlx-vlm's, as its generation uses it) on that text and
   the row's images: the ids with every image placeholder expanded to the family's image tokens,
   and the pixel arrays (`pixel_values`, with `pixel_attention_mask` or `image_grid_thw` where
   the family has them);
3. the two id sequences aligned (they differ only where images were expanded): each processor
   token takes the mark of the text token it matches; an expanded image token is never trained.
   A row where an assistant token finds no match is refused, naming it, never trained on a
   guessed mask.
Rows are preprocessed once and cached in the user cache (`images/`, keyed by the processor's
files, the text and the image bytes), so a second run or epoch decodes no image. A row longer
than max_length is cut only where no image token is lost, else dropped (counted). Batches are
right-padded ids as for text, plus the rows' pixel arrays joined as the family's row of
config/vision_families.py lays them out (join_images): a per-row axis (SmolVLM's (rows, images,
C, H, W)) padded to the batch's most images; images first (Gemma 3's, LLaVA's, PaliGemma's
(images, C, H, W)) or all images' patches (Qwen's) concatenated in row order, a text-only row
adding none. A family whose rows all need an image (PaliGemma) refuses a text-only row at
setup; a prefix-LM family's batches carry its token types (prefix_types).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Iterator
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxlab.config.records import check_number
from mlxlab.config.vision_families import family_ways, vision_family
from mlxlab.data.batching import Batch, Batching, make_batches
from mlxlab.data.chat import ChatError, encode_chats
from mlxlab.data.completions import PromptCompletion, Rows, read_rows
from mlxlab.data.images import MAX_PIXELS, chat_images, image_bytes, open_image
from mlxlab.errors import ConfigError
from mlxlab.runtime import settings

log = logging.getLogger(__name__)

# the processor's files that decide its output (with tokenizer.json): the cache key holds them
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json",
                   "tokenizer_config.json", "config.json")
# processor outputs that are images' arrays (the batch's image inputs: objectives/losses.py)
IMAGE_PREFIXES = ("pixel_", "image_")
CACHE_VERSION = 1
# the processor (or tokenizer) attributes that name a token images expand into
IMAGE_TOKEN_NAMES = ("image_token", "fake_image_token", "global_image_token", "boi_token",
                     "eoi_token", "vision_start_token", "vision_end_token")


def image_keys(arrays: dict) -> list[str]:
    return sorted(k for k in arrays if k.startswith(IMAGE_PREFIXES))


def load_processor(folder: str | Path):
    """mlx-vlm's processor of a model folder (the one its generation uses): its family's module
    is imported first, which puts mlx-vlm's processor class (no PyTorch needed) before
    transformers' own."""
    try:
        from mlx_vlm.utils import get_model_type, load_config
        from mlx_vlm.utils import load_processor as load
    except ImportError:
        raise ConfigError("image chats need mlx-vlm: pip install 'mlxlab[vision]'") from None
    # a family mlx-vlm lacks: transformers' processor, if it loads
    with contextlib.suppress(ImportError, OSError, ValueError):
        importlib.import_module(f"mlx_vlm.models.{get_model_type(load_config(Path(folder)))}")
    try:
        return load(str(folder), add_detokenizer=False)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{folder}: its image processor does not load ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); a vision-language model folder "
                          "has preprocessor_config.json beside its tokenizer") from None


def image_token_ids(processor: Any, tokenizer: Tokenizer, model_type: str | None = None
                    ) -> set[int]:
    """The ids `processor` expands images into (never trained): its image token, and the
    family's image-tile and image-boundary tokens it adds."""
    # each family's processor names its own (Idefics3's fake_image_token, Gemma's boi_token,
    # ...) on itself or its tokenizer: the attributes either has
    names = set()
    for source in (processor, processor.tokenizer):
        found = vars(source) | {a: getattr(type(source), a) for a in dir(type(source))
                                if a.endswith("_token") and not a.startswith("_")}
        names |= {v for a, v in found.items() if a in IMAGE_TOKEN_NAMES and isinstance(v, str)}
    ids = {tokenizer.token_to_id(n) for n in names}
    if family_ways(model_type).grid_tokens:
        ids |= {i for name, i in tokenizer.get_vocab().items()
                if name.startswith("<row_") and "_col_" in name}
    return {i for i in ids if i is not None}


def align_mask(text_ids: np.ndarray, text_mask: np.ndarray, ids: np.ndarray,
               image_ids: set[int]) -> np.ndarray:
    """The assistant mask of `ids` (the processor's) from that of `text_ids` (the same chat
    tokenized before the images were expanded): matched tokens keep their mark, expanded ones
    get none. ValueError when a marked token has no match."""
    mask = np.zeros(len(ids), bool)
    matcher = SequenceMatcher(None, text_ids.tolist(), ids.tolist(), autojunk=False)
    for a, b, n in matcher.get_matching_blocks():
        mask[b:b + n] = text_mask[a:a + n]
    mask &= ~np.isin(ids, list(image_ids))
    if mask.sum() != text_mask.sum():
        raise ValueError(f"{int(text_mask.sum() - mask.sum())} assistant tokens found no "
                         "match in the processor's ids")
    return mask


class VisionChat(PromptCompletion):
    """Batches of image + text chats from `train_file` (and `val_file`, else the last
    `val_fraction` of the rows), for a vision-language model (models/vision/vision_language.py).
    `processor` is the model's folder (train.py sets it from model.pretrained), whose
    tokenizer, chat template and image processor make the rows."""

    def __init__(self, train_file: str, processor: str | None = None,
                 max_image_pixels: int = MAX_PIXELS, **kwargs):
        if kwargs.get("pack"):
            raise ConfigError("data.pack=true: image chats are not packed (each row carries "
                              "its own images); set data.pack=false")
        super().__init__(train_file, **kwargs)
        check_number("data.max_image_pixels", max_image_pixels, int, 1)
        self.processor_folder, self.max_image_pixels = processor, int(max_image_pixels)
        self.processor = None

    # ---- setup: rows -> (ids, mask, cached arrays) ------------------------------------------
    def setup(self, run_dir: str | Path | None = None) -> None:
        train, val = self._split(self._read(self.train_file), self._read)
        self._setup_tokenizer(train, run_dir)
        if not self.processor_folder:
            raise ConfigError("image chats need the model's processor: set "
                              "model.pretrained=<vision-language model folder>")
        self.processor = load_processor(self.processor_folder)
        self.model_type = json.loads((Path(self.processor_folder) / "config.json").read_text(
            encoding="utf-8")).get("model_type")
        vision_family(self.model_type)  # a family batches are joined for: before any row
        self._key = self._processor_key()
        self.train, self.val = self._encode(train), self._encode(val)
        if not self.train[0]:
            raise ConfigError(f"{train.path}: no training row is left to learn from (see the "
                              "counts above); raise data.max_length")
        log.info("%s: %d image chats, %d train / %d val, %d images, vocab %d", self.train_file,
                 len(train.rows) + len(val.rows), len(self.train[0]), len(self.val[0]),
                 sum(c["images"] for c in self.train[2] + self.val[2]), self.vocab_size)

    def _read(self, path: str | Path) -> Rows:
        rows = read_rows(path, self.keys)
        if rows.format != "chat":
            raise ConfigError(f"{path} holds {rows.format} rows; data=vision_chat reads chats "
                              "({\"messages\": [...]}) whose user turns may hold images")
        return rows

    def _processor_key(self) -> str:
        digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
        for name in PROCESSOR_FILES:
            path = Path(self.processor_folder) / name
            if path.is_file():
                digest.update(name.encode() + hashlib.sha256(path.read_bytes()).digest())
        digest.update(str(self.tokenizer_hash).encode())
        return digest.hexdigest()

    def _encode(self, rows: Rows) -> tuple[list, list, list]:
        """(ids, target masks, cache entries) of the rows kept; the rows cut or dropped are
        counted in the log."""
        if not rows.rows:
            return [], [], []
        folder = Path(rows.path).parent
        family = vision_family(self.model_type)
        chats, refs = [], []
        for number, row in rows.rows:
            try:
                messages, images = chat_images(row[self.keys["messages"]], row.get("images"))
                for ref in images:  # named now: before anything is preprocessed
                    image_bytes(ref, folder)
            except ConfigError as e:
                raise ConfigError(f"{rows.path}:{number}: {e}") from None
            if not images and not family.text_rows:
                raise ConfigError(f"{rows.path}:{number}: {text_rows_refused(family.name)}")
            chats.append({"messages": messages, "tools": row.get("tools")})
            refs.append(images)
        try:
            encoded = encode_chats(self.tokenizer, self._chat_template(), chats)
        except ChatError as e:
            raise ConfigError(f"{rows.path}:{rows.rows[e.index][0]}: {e.reason}") from None
        image_ids = self._image_token_ids()
        kept = ([], [], [])
        dropped: dict[str, list[int]] = {}
        for (number, _), chat, images in zip(rows.rows, encoded, refs):
            entry = self._cached(rows.path, number, chat, images, folder, image_ids)
            ids, target = entry["input_ids"], entry["target"]
            if len(ids) > self.max_length + 1:
                last_image = np.flatnonzero(np.isin(ids, list(image_ids)))
                if self.too_long == "drop" or (last_image.size and
                                               last_image[-1] >= self.max_length + 1):
                    dropped.setdefault("longer than max_length (cutting would lose image "
                                       "tokens)" if self.too_long != "drop" else
                                       "longer than max_length", []).append(number)
                    continue
                ids, target = ids[: self.max_length + 1], target[: self.max_length + 1]
            if not target[1:].any():
                dropped.setdefault("no assistant turn", []).append(number)
                continue
            kept[0].append(ids)
            kept[1].append(target)
            kept[2].append(entry)
        if dropped:
            counts = "; ".join(f"{len(lines)} {why} (first: line {lines[0]})"
                               for why, lines in dropped.items())
            log.warning("%s: %d of %d rows were dropped: %s", rows.path,
                        sum(map(len, dropped.values())), len(rows.rows), counts)
        return kept

    def _image_token_ids(self) -> set[int]:
        return image_token_ids(self.processor, self.tokenizer, self.model_type)

    def _cached(self, path: str, number: int, chat, images: list, folder: Path,
                image_ids: set[int]) -> dict:
        """A row's processor output (ids, target mask, image arrays) from the cache, made and
        kept there on first use."""
        digest = hashlib.sha256((self._key + chat.text).encode())
        for ref in images:
            _, source = image_bytes(ref, folder)
            digest.update(source if isinstance(source, bytes) else Path(source).read_bytes())
        file = settings.current().cache_dir / "images" / f"{digest.hexdigest()}.npz"
        if file.is_file():
            with np.load(file) as stored:
                entry = {k: stored[k] for k in stored.files}
            return {**entry, "file": str(file), "images": len(images)}
        pictures = []
        for ref in images:
            try:
                pictures.append(open_image(ref, folder, self.max_image_pixels))
            except ConfigError as e:
                raise ConfigError(f"{path}:{number}: {e}") from None
        out = self.processor(text=[chat.text], images=[pictures] if pictures else None,
                             return_tensors="np")
        arrays = {k: np.asarray(v) for k, v in out.items()}
        ids = arrays.pop("input_ids")[0].astype(np.int32)
        arrays.pop("attention_mask", None)
        try:
            target = align_mask(chat.ids, chat.assistant_mask, ids, image_ids)
        except ValueError as e:
            raise ConfigError(f"{path}:{number}: the processor's ids do not hold the chat's "
                              f"assistant turns ({e}); report the model family") from None
        entry = {"input_ids": ids, "target": target,
                 **{k: arrays[k] for k in image_keys(arrays)}}
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")  # a sweep's jobs may write it at once
        np.savez(tmp, **entry)
        os.replace(tmp, file)  # atomic: a parallel job never reads half a file
        return {**entry, "file": str(file), "images": len(images)}

    # ---- batches -----------------------------------------------------------------------------
    def _collate(self, split: tuple, index: np.ndarray, multiple: int) -> Batch:
        """The text rows' batch (PromptCompletion's), and the rows' image arrays beside it."""
        rows, targets, entries = split
        batch = super()._collate((rows, targets), index, multiple)
        batch.update(join_images([entries[i] for i in index], self.model_type))
        if vision_family(self.model_type).blocks == "prefix":
            batch["token_type_ids"] = prefix_types([targets[i] for i in index],
                                                   batch["input_ids"].shape[1])
        return batch

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        for index in make_batches(self._lengths(self.val), batching, self.max_length):
            yield self._collate(self.val, index, batching.bucket_multiple)


def text_rows_refused(family: str) -> str:
    """The one line refusing a text-only row to a family whose rows all need an image."""
    return (f"{family}: every row needs an image (its processor and model take no text-only "
            "row); train the text-only rows in a separate run, or give every row an image")


def prefix_types(targets: list[np.ndarray], width: int) -> mx.array:
    """A prefix-LM family's token types of the batch's inputs (PaliGemma's processor makes
    them from a prompt and its `suffix`): 0 for a row's prefix (its images and prompt, up to
    its first trained token), 1 from its first trained token on and for the padding."""
    types = np.ones((len(targets), width), np.int32)
    for row, target in enumerate(targets):
        first = int(np.argmax(target)) if target.any() else len(target)
        types[row, : min(first, width)] = 0
    return mx.array(types)


def join_images(entries: list[dict], model_type: str | None) -> dict[str, mx.array]:
    """The rows' image arrays as one batch's, joined as the family's layout says
    (config/vision_families.py): "rows" arrays padded with empty images to the most a row has
    and stacked (a row without images: all empty, which the family drops); "images" and
    "patches" arrays concatenated in row order, a row without images adding none. A family
    whose rows all need images refuses a text-only row in one line."""
    family = vision_family(model_type)
    keys = sorted({k for e in entries for k in image_keys(e)})
    if keys and not family.text_rows and not all(image_keys(e) for e in entries):
        raise ConfigError(text_rows_refused(family.name))
    out = {}
    for key in keys:
        parts = [e[key] for e in entries if key in e]
        if family.pixels == "rows":
            most = max(p.shape[1] for p in parts)
            padded = []
            for e in entries:
                p = e.get(key)
                if p is None:
                    p = np.zeros((1, 0, *parts[0].shape[2:]), parts[0].dtype)
                pad = np.zeros((1, most - p.shape[1], *p.shape[2:]), p.dtype)
                padded.append(np.concatenate([p, pad], axis=1))
            out[key] = mx.array(np.concatenate(padded))
        else:
            out[key] = mx.array(np.concatenate(parts))
    return out
