"""The images of a chat row: where its content parts point, read and checked.

A message's content is a list of parts; an image part is any of
- `{"type": "image", "image": "cat.png"}` (also `"path"` / `"url"`: transformers' chats),
- `{"type": "image_url", "image_url": {"url": ...}}` (OpenAI's),
- `{"type": "image"}` with the row's `images` list giving the images in order (TRL's datasets),
each a path (relative to the jsonl file's folder), a `file://` URL or a `data:image/...;base64,`
URL. Network URLs are refused: mlxlab reads nothing from the network at run time.
`chat_images` returns the messages with every image part made `{"type": "image"}` (what the
models' chat templates read) and the images in order; `open_image` decodes one, and refuses a
missing, unreadable or oversized file in one line naming it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlxlab.errors import ConfigError

# the largest image a row may hold (pixels): a larger one is refused, not silently scaled
MAX_PIXELS = 4096 * 4096
IMAGE_TYPES = ("image", "image_url")


def is_image_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") in IMAGE_TYPES


def _reference(part: Mapping) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, Mapping) else url
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    return None


def chat_images(messages: Sequence[Mapping], images: Sequence | None = None
                ) -> tuple[list[dict], list[Any]]:
    """(messages with image parts as `{"type": "image"}`, the image references in order).
    A bare `{"type": "image"}` takes the next of `images`; a count that does not match, or an
    image in an assistant turn (the model writes text), is a ConfigError."""
    given = list(images or [])
    taken, refs, out = 0, [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(dict(message))
            continue
        parts = []
        for part in content:
            if not is_image_part(part):
                parts.append(part)
                continue
            if message.get("role") == "assistant":
                raise ConfigError("an assistant turn holds an image; the model learns to write "
                                  "text: put images in user turns")
            ref = _reference(part)
            if ref is None:
                if taken >= len(given):
                    raise ConfigError(f"{taken + 1} image parts but the row's 'images' list "
                                      f"has {len(given)}; give each image part its file "
                                      "({\"type\": \"image\", \"image\": \"a.png\"}) or list "
                                      "them in 'images'")
                ref, taken = given[taken], taken + 1
            refs.append(ref)
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    if taken < len(given):
        raise ConfigError(f"the row's 'images' list has {len(given)} images and its messages "
                          f"{taken} bare image parts ({{\"type\": \"image\"}}); make them match")
    return out, refs


def image_bytes(ref: Any, folder: Path) -> tuple[str, bytes | Path]:
    """(a name for messages, the image's bytes or its path) of one reference."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"image {ref!r}: an image is a path, a file:// URL or a data: URL")
    if ref.startswith("data:"):
        head, _, data = ref.partition(",")
        if ";base64" not in head or not head.startswith("data:image/"):
            raise ConfigError(f"image {ref[:40]}...: a data URL must be data:image/<type>;"
                              "base64,<data>")
        try:
            return head, base64.b64decode(data, validate=True)
        except ValueError:
            raise ConfigError(f"image {ref[:40]}...: its base64 data does not decode") from None
    parsed = urlparse(ref)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and ref[1:3] in (":\\", ":/")):
        path = Path(ref)
    else:
        raise ConfigError(f"image {ref}: mlxlab reads no network URL at run time; download "
                          "the image and give its path")
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ConfigError(f"image not found: {path}")
    return str(path), path


def open_image(ref: Any, folder: Path, max_pixels: int = MAX_PIXELS):
    """The RGB PIL image `ref` points at (paths relative to `folder`); a missing, unreadable or
    oversized image is a ConfigError naming it."""
    from PIL import Image

    name, source = image_bytes(ref, folder)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        if image.width * image.height > max_pixels:
            raise ConfigError(f"image {name} is {image.width}x{image.height}, over "
                              f"data.max_image_pixels={max_pixels}; resize it or raise the "
                              "limit")
        image.load()
    except ConfigError:
        raise
    except Exception as e:  # PIL raises many kinds for a bad file
        raise ConfigError(f"image {name} cannot be read ({type(e).__name__}: "
                          f"{str(e)[:120]})") from None
    return image.convert("RGB")
