"""What a request to `mlxlab serve` passes before mlx-lm's handler reads it: the API key, the
body's size (from its Content-Length, before a byte of it is read), its JSON, and the fields
that pick or shape what is generated (the served model, the messages, max_tokens against the
model's context). Each refusal is a ServingError with OpenAI's status, param and code.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import Mapping
from typing import Any, BinaryIO

from mlxlab.serving.openai.errors import ServingError
from mlxlab.serving.openai.served import ServedModel

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
# Request fields mlx-lm's server reads that would load something else than the served models.
REFUSED_FIELDS = {
    "adapters": "this server's adapters are picked by `model` (GET /v1/models lists them)",
    "draft_model": "each served model's draft is chosen when the server starts "
                   "(mlxlab serve --draft RUN=DRAFT)",
}
MAX_REQUEST_BYTES = 2 * 2**20  # a prompt filling a 128k context, with room for JSON's escapes
EXCERPT = 120  # characters of a malformed body the log shows
DISCARD_LIMIT = 64 * 2**20  # bytes of a refused body read and dropped so the client sees the answer
DISCARD_SECONDS = 5.0


def check_key(authorization: str | None, key: str | None) -> None:
    """The request's `Authorization: Bearer <key>` when the server has a key (compared in
    constant time: the time taken tells nothing of how much of a guess was right)."""
    if key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if not authorization or scheme.lower() != "bearer":
        raise ServingError("no API key: send `Authorization: Bearer <key>` (the openai "
                           "client's api_key) with the key this server was started with",
                           status=401, code="invalid_api_key")
    # the header arrives decoded as latin-1: its bytes, against the key's UTF-8 bytes
    if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), key.encode()):
        raise ServingError("incorrect API key: send the key this server was started with "
                           "(mlxlab serve --api-key or MLXLAB_API_KEY)", status=401,
                           code="invalid_api_key")


def body_length(headers: Mapping[str, str], limit: int) -> int:
    """The body's size as its Content-Length states it, refused (413) above `limit` before it
    is read."""
    stated = headers.get("Content-Length")
    if stated is None:
        raise ServingError("Content-Length header is required", status=411)
    try:
        length = int(stated)
    except ValueError:
        raise ServingError(f"Content-Length: {stated[:40]!r} is not a number of bytes") from None
    if length < 0:
        raise ServingError(f"Content-Length: {length} is below 0")
    if length > limit:
        raise ServingError(f"the request body is {length:,} bytes and this server takes at most "
                           f"{limit:,} (mlxlab serve --max-request-mib): send a shorter prompt",
                           status=413, code="request_too_large")
    return length


def discard(connection: socket.socket, rfile: BinaryIO, headers: Mapping[str, str]) -> None:
    """Read and drop (up to DISCARD_LIMIT bytes, DISCARD_SECONDS between reads) a body that
    was refused unread: a socket closed with unread data resets the connection, and the client
    would see the reset instead of the answer."""
    stated = headers.get("Content-Length", "")
    left = min(int(stated), DISCARD_LIMIT) if stated.strip().isdigit() else 0
    try:
        connection.settimeout(DISCARD_SECONDS)
        while left > 0 and (chunk := rfile.read(min(left, 2**16))):
            left -= len(chunk)
    except OSError:  # a timeout, or the client gave up
        pass


def parse_body(raw: bytes, client: str) -> dict:
    """The JSON object the body holds. A body that is not one is logged as its size and a
    short excerpt (never whole: a client decides its size)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        log.warning("%s: a request body that is not UTF-8 JSON (%s; %d bytes, starting %r)",
                    client, str(err)[:EXCERPT], len(raw), raw[:EXCERPT])
        raise ServingError(f"Invalid JSON in request body: {str(err)[:EXCERPT]}") from None
    if not isinstance(body, dict):
        raise ServingError(f"Request should be a JSON object, got {type(body).__name__}")
    return body


def served_model(body: Mapping[str, Any], served: Mapping[str, ServedModel],
                 listed: list[str]) -> ServedModel:
    """The model the request names: 400 when it names none, 404 when this server has none of
    that name (as OpenAI answers an unknown model)."""
    if "model" not in body:
        raise ServingError(f"model: required; use one of {', '.join(listed)}", param="model")
    name = body["model"]
    if not isinstance(name, str) or name not in served:
        use = f"use one of {', '.join(listed)}" if listed else "this server serves none of its kind"
        raise ServingError(f"model: {name!r} is not served here; {use}", param="model",
                           status=404, code="model_not_found")
    return served[name]


def asked_max_tokens(body: Mapping[str, Any]) -> tuple[str, int] | None:
    """The field that asks for a number of new tokens and its value, as mlx-lm reads them
    (max_completion_tokens first), or None when the request asks for none."""
    for field in ("max_completion_tokens", "max_tokens"):
        if body.get(field) is not None:
            return field, body[field]
    return None


def check_fields(body: Mapping[str, Any], model: ServedModel, chat: bool) -> None:
    """The fields mlx-lm would read differently than this server means them, the messages or
    prompt, and a max_tokens the model's context cannot hold whatever the prompt."""
    for name, why in REFUSED_FIELDS.items():
        if body.get(name) is not None:
            raise ServingError(f"{name}: {why}", param=name)
    if (k := body.get("num_draft_tokens")) is not None:
        if model.draft is None:
            raise ServingError(f"num_draft_tokens: {model.name} is served without a draft "
                               "(mlxlab serve --draft RUN=DRAFT gives it one)",
                               param="num_draft_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ServingError(f"num_draft_tokens: give a whole number >= 1, got {k!r}",
                               param="num_draft_tokens")
    if body.get("n", 1) != 1:
        raise ServingError("n: this server answers one choice per request; send n=1", param="n")
    if chat:
        check_messages(body.get("messages"), sees=model.images is not None, name=model.name)
    elif not isinstance(body.get("prompt"), str):
        raise ServingError("prompt: give the text to continue as one string", param="prompt")
    if (asked := asked_max_tokens(body)) and asked[1] >= model.context:
        field, count = asked
        raise ServingError(
            f"{field}: {model.name}'s maximum context length is {model.context} tokens, prompt "
            f"included; {count} new tokens leave no room for a prompt: ask for fewer",
            param=field, code="context_length_exceeded")


def check_messages(messages: Any, sees: bool = False, name: str = "this model") -> None:
    """A chat request's messages as the chat template reads them, else a ServingError naming
    the message and field. Content is text, or for a model that sees (`sees`) text and
    OpenAI's image_url parts holding a data:image URL (never a URL this server would fetch)."""
    if not isinstance(messages, list) or not messages:
        raise ServingError("messages: give a non-empty list of {\"role\": ..., \"content\": ...}",
                           param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ServingError(f"{where}: a message is an object with role and content, got "
                               f"{type(message).__name__}", param=where)
        if message.get("role") not in ROLES:
            raise ServingError(f"{where}.role: use one of {', '.join(ROLES)}; got "
                               f"{message.get('role')!r}", param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                check_part(part, f"{where}.content[{j}]", sees, name)
        elif not (isinstance(content, str) or (content is None and message.get("tool_calls"))):
            raise ServingError(f"{where}.content: a string or a list of {{\"type\": \"text\", "
                               f"\"text\": ...}} parts; got {content!r:.80}",
                               param=f"{where}.content")


def check_part(part: Any, where: str, sees: bool, name: str) -> None:
    """One content part: text, or an image a model that sees reads from a data: URL."""
    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
        return
    if not is_image_part(part):
        raise ServingError(f"{where}: a part is {{\"type\": \"text\", \"text\": ...}}"
                           f"{' or an image_url part' if sees else ''}; got {part!r:.80}",
                           param=where)
    if not sees:
        raise ServingError(f"{where}: {name} is a text model and reads no images; send text "
                           "parts, or serve a vision-language model", param=where)
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, Mapping) else url
    if not (isinstance(url, str) and url.startswith("data:image/") and ";base64," in url):
        raise ServingError(f"{where}.image_url.url: give the image as a data:image/<type>;"
                           "base64,<data> URL; this server fetches no URL and reads no file "
                           f"for a client (got {str(url)[:60]!r})", param=where)


def has_images(messages: Any) -> bool:
    """Whether a chat request's messages hold an image part."""
    return any(is_image_part(p) for m in messages if isinstance(m.get("content"), list)
               for p in m["content"])


def is_image_part(part: Any) -> bool:
    """OpenAI's image part ({"type": "image_url", "image_url": {"url": ...}})."""
    return isinstance(part, Mapping) and part.get("type") == "image_url"
