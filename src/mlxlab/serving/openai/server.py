"""mlx-lm's OpenAI-compatible server (mlx_lm.server: its HTTP handler, batching generation
thread, prompt cache, streaming and tool calling) over models loaded by mlxlab: served.py's
models, picked by the request's `model`, instead of one model path loaded from disk or the hub.

    server, generator = make_server(load_served(["outputs/ft/a", "outputs/ft/b"]), port=5001)
    serve_until_stopped(server, generator)

What mlxlab changes, and why:
- ServedModels (mlx-lm's ModelProvider): `load(name)` hands over a model already in memory;
  nothing is read from disk or the network after start-up, and an unknown name never reaches
  mlx-lm's loader (which would try the hub).
- MlxlabResponses (its ResponseGenerator): a text completion's prompt starts as `mlxlab
  generate` starts it (the tokenizer's BOS, else end-of-text: how training laid documents
  out), so greedy answers equal it token for token; a prompt that fills the model's context is
  refused, and generation stops when the context is full (as `mlxlab generate` stops).
- OpenAIHandler (its APIHandler): requests are checked before they are queued (the served
  names, the messages, fields this server would ignore), answers are 4xx naming the field,
  and /v1/models lists the served names (not the hub cache).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Mapping, Sequence
from http.server import ThreadingHTTPServer
from typing import Any

from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator

from mlxlab.serving.openai.served import ServedModel

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
# Request fields mlx-lm's server reads that would load something else than the served models.
REFUSED_FIELDS = {
    "adapters": "this server's adapters are picked by `model` (GET /v1/models lists them)",
    "draft_model": "speculative decoding is not offered by mlxlab serve",
}


class ServingError(ValueError):
    """A request this server refuses: the message names the field."""


def server_settings(max_tokens: int = 512, allowed_origins: Sequence[str] = ()
                    ) -> argparse.Namespace:
    """The settings mlx_lm.server takes from its command line, at its defaults (no model path:
    the models come from ServedModels)."""
    return argparse.Namespace(
        model=None, adapter_path=None, draft_model=None, trust_remote_code=False,
        chat_template="", use_default_chat_template=False, pipeline=False, num_draft_tokens=3,
        temp=0.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=max_tokens,
        allowed_origins=list(allowed_origins), chat_template_args={}, decode_concurrency=32,
        prompt_concurrency=8, prefill_step_size=2048, prompt_cache_size=10,
        prompt_cache_bytes=None, kv_bits=None, kv_group_size=64, quantized_kv_start=0,
    )


class ServedModels(ModelProvider):
    """mlx-lm's model provider over models already loaded: `load(name)` makes the named one
    current (the generation thread calls it between batches, never inside one)."""

    def __init__(self, served: Sequence[ServedModel], settings: argparse.Namespace):
        super().__init__(settings)
        self.models = list(served)
        self.served = {name: s for s in served for name in s.names}
        self.current: ServedModel | None = None

    def load_default(self) -> None:  # no default model: every request names one
        return None

    def load(self, model_path: str, adapter_path: str | None = None,
             draft_model_path: str | None = None) -> tuple[Any, Any]:
        served = self.served[model_path]  # OpenAIHandler let only served names through
        if self.current is not served:
            self.current = served
            # the prompt cache is keyed by this: one model's cached prefixes never meet another's
            self.model_key = (served.name, None, None)
            self.model, self.tokenizer = served.model, served.tokenizer
            self.processor, self.draft_model = None, None
            self.is_batchable = served.batchable
        return self.model, self.tokenizer


class MlxlabResponses(ResponseGenerator):
    """mlx-lm's generation thread; prompts are tokenized as mlxlab generates (see the module)."""

    def _tokenize(self, tokenizer: Any, request: Any, args: Any) -> tuple:
        served = self.model_provider.current
        if request.request_type == "text":
            prompt = [*served.start_ids, *tokenizer.encode(request.prompt, add_special_tokens=False)]
            tokenized = (prompt, [prompt], ["assistant"], "normal", None)
        else:
            tokenized = super()._tokenize(tokenizer, request, args)
        room = served.context - len(tokenized[0])
        if room <= 0:
            field = "prompt" if request.request_type == "text" else "messages"
            raise ServingError(f"{field}: the prompt is {len(tokenized[0])} tokens and "
                               f"{served.name}'s context is {served.context}: shorten it")
        args.max_tokens = min(args.max_tokens, room)
        return tokenized


def check_messages(messages: Any) -> None:
    """A chat request's messages as the chat template reads them, else a ServingError naming
    the message and field."""
    if not isinstance(messages, list) or not messages:
        raise ServingError("messages: give a non-empty list of {\"role\": ..., \"content\": ...}")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ServingError(f"{where}: a message is an object with role and content, got "
                               f"{type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ServingError(f"{where}.role: use one of {', '.join(ROLES)}; got "
                               f"{message.get('role')!r}")
        content = message.get("content")
        parts_ok = isinstance(content, list) and all(
            isinstance(p, Mapping) and isinstance(p.get("text", p.get("image_url")), str | dict)
            for p in content)
        if not (isinstance(content, str) or parts_ok
                or (content is None and message.get("tool_calls"))):
            raise ServingError(f"{where}.content: a string or a list of {{\"type\": \"text\", "
                               f"\"text\": ...}} parts; got {content!r:.80}")


class OpenAIHandler(APIHandler):
    """mlx-lm's HTTP handler with mlxlab's checks (see the module)."""

    _refused_status = 404  # until handle_completion: an unknown path is not found

    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()
        provider: ServedModels = self.response_generator.model_provider
        if self.body.get("model") not in provider.served:
            given = f"{self.body['model']!r} is not served here" if "model" in self.body \
                else "required"
            raise ServingError(f"model: {given}; use one of "
                               f"{', '.join(s.name for s in provider.models)}")
        for name, why in REFUSED_FIELDS.items():
            if self.body.get(name) is not None:
                raise ServingError(f"{name}: {why}")
        if self.body.get("n", 1) != 1:
            raise ServingError("n: this server answers one choice per request; send n=1")
        if self.path.endswith("/chat/completions"):
            check_messages(self.body.get("messages"))
        elif not isinstance(self.body.get("prompt"), str):
            raise ServingError("prompt: give the text to continue as one string")

    def handle_completion(self, request: Any, stop_words: list[str]) -> None:
        # mlx-lm answers 404 when the generation thread refuses a request; by then the model is
        # known, so the refusal is the request's (its prompt): 400.
        self._refused_status = 400
        super().handle_completion(request, stop_words)

    def _set_completion_headers(self, status_code: int = 200) -> None:
        if status_code == 404:
            status_code = self._refused_status
        super()._set_completion_headers(status_code)

    def handle_models_request(self) -> None:
        provider: ServedModels = self.response_generator.model_provider
        models = [{"id": s.name, "object": "model", "created": self.created, "owned_by": "mlxlab",
                   "aliases": list(s.names[1:])}
                  for s in provider.models]
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps({"object": "list", "data": models}).encode())
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s - %s", self.address_string(), format % args)


def make_server(served: Sequence[ServedModel], host: str = "127.0.0.1", port: int = 5001,
                settings: argparse.Namespace | None = None
                ) -> tuple[ThreadingHTTPServer, ResponseGenerator]:
    """The HTTP server (bound, not yet serving; port 0 = a free one: server.server_address) and
    mlx-lm's generation thread (started) over `served`."""
    settings = settings or server_settings()
    provider = ServedModels(served, settings)
    generator = MlxlabResponses(provider, LRUPromptCache(settings.prompt_cache_size))
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        server = Server(address, lambda *a, **k: OpenAIHandler(generator, *a, **k))
    except OSError:
        generator.stop_and_join()
        raise
    return server, generator


def serve_until_stopped(server: ThreadingHTTPServer, generator: ResponseGenerator) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop the generation thread."""
    def stop(*_: object) -> None:  # shutdown() waits for serve_forever: not on its thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    with contextlib.suppress(ValueError):  # not the main thread: the caller stops the server
        signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        generator.stop_and_join()
