"""mlx-lm's OpenAI-compatible server (mlx_lm.server: its HTTP handler, batching generation
thread, prompt cache, streaming and tool calling) over models loaded by mlxlab: served.py's
models, picked by the request's `model`, instead of one model path loaded from disk or the hub.

    server, generator = make_server(load_served(["outputs/ft/a", "outputs/ft/b"]), port=5001,
                                    settings=server_settings(api_key="..."))
    serve_until_stopped(server, generator)

What mlxlab changes, and why:
- ServedModels (mlx-lm's ModelProvider): `load(name)` hands over a model already in memory;
  nothing is read from disk or the network after start-up, and an unknown name never reaches
  mlx-lm's loader (which would try the hub). A model with a draft hands it over too: mlx-lm
  decodes it speculatively, one request at a time; ServedPromptCache keeps the prompt
  cache's entries of such a model under the tokens they hold.
- MlxlabResponses (its ResponseGenerator): a text completion's prompt starts as `mlxlab
  generate` starts it (the tokenizer's BOS, else end-of-text: how training laid documents
  out), so greedy answers equal it token for token. A prompt that fills the model's context is
  refused, and so is one whose max_tokens would run past it (as OpenAI refuses it); a request
  that names no max_tokens gets the server's default, cut to the room its prompt leaves.
- OpenAIHandler (its APIHandler): a request passes checks.py before mlx-lm's handler reads it
  (the API key, the body's size from its Content-Length, its JSON, the served model, the
  messages, fields this server would ignore); every refusal, mlx-lm's own included, is
  OpenAI's error object with OpenAI's status (errors.py); /v1/models lists the served names
  (not the hub cache) and /v1/models/<name> is the one model, else 404.
- POST /v1/embeddings: a text embedder's vectors (embeddings.py), computed on the request's
  own thread, one request a model at a time; a language model asked for embeddings, or an
  embedder asked for a completion, is refused naming the endpoint it answers.
- POST /v1/audio/transcriptions: a Whisper model's transcript of an uploaded audio file
  (transcriptions.py: OpenAI's multipart upload), on the request's thread, a request a model
  at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import signal
import socket
import threading
from collections.abc import Sequence
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator, Vision

from mlxlab.serving.openai.checks import (
    MAX_REQUEST_BYTES,
    body_length,
    check_fields,
    check_key,
    discard,
    has_images,
    parse_body,
    served_model,
)
from mlxlab.serving.openai.embeddings import ServedEmbedder, answer, read_request
from mlxlab.serving.openai.errors import ServingError, from_mlx_lm
from mlxlab.serving.openai.rerank import RERANK_PATHS, ServedReranker, rerank_response
from mlxlab.serving.openai.served import ServedModel
from mlxlab.serving.openai.transcriptions import (
    TRANSCRIPTION_PATHS,
    ServedTranscriber,
    transcription_response,
)

log = logging.getLogger(__name__)

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")
EMBEDDING_PATHS = ("/v1/embeddings", "/embeddings")


class Answered(BaseException):
    """A refusal on its way out of mlx-lm's handler to OpenAIHandler.do_POST, which answers it
    in OpenAI's shape. Not an Exception: mlx-lm's handler catches Exception around the steps
    that raise it (the parameters' check, the generation thread's start) and answers in its
    own shape."""

    def __init__(self, error: ServingError):
        super().__init__(error.message)
        self.error = error


def server_settings(max_tokens: int = 512, allowed_origins: Sequence[str] = (),
                    api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                    num_draft_tokens: int = 3) -> argparse.Namespace:
    """The settings mlx_lm.server takes from its command line, at its defaults (no model path:
    the models come from ServedModels), and mlxlab's: the API key every request must carry
    (None: none), the largest request body read and the tokens a served model's draft
    proposes a pass (a request's num_draft_tokens, else this)."""
    return argparse.Namespace(
        model=None, adapter_path=None, draft_model=None, trust_remote_code=False,
        chat_template="", use_default_chat_template=False, pipeline=False,
        num_draft_tokens=num_draft_tokens,
        temp=0.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=max_tokens,
        allowed_origins=list(allowed_origins), chat_template_args={}, decode_concurrency=32,
        prompt_concurrency=8, prefill_step_size=2048, prompt_cache_size=10,
        prompt_cache_bytes=None, kv_bits=None, kv_group_size=64, quantized_kv_start=0,
        api_key=api_key, max_request_bytes=max_request_bytes,
    )


class ServedModels(ModelProvider):
    """mlx-lm's model provider over models already loaded: `load(name)` makes the named one
    current (the generation thread calls it between batches, never inside one)."""

    def __init__(self, served: Sequence[ServedModel | ServedEmbedder],
                 settings: argparse.Namespace):
        super().__init__(settings)
        self.models = list(served)  # as given: /v1/models lists them in this order
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
            self.model_key = (served.name, None, "draft" if served.draft is not None else None)
            self.model = served.images.runner if served.images else served.model
            self.tokenizer = served.tokenizer
            self.processor, self.draft_model = None, served.draft
            # mlx-lm's batched decoding has no draft: a model with one answers a request at a time
            self.is_batchable = served.batchable and served.draft is None
        return self.model, self.tokenizer


class ServedPromptCache(LRUPromptCache):
    """mlx-lm's prompt cache, but none for the models named in `uncached` (vision-language
    models: mlx-vlm's M-RoPE families keep a prompt's positions on the model, not in its cache,
    so a cached prefix would continue at another prompt's positions), and a drafted model's
    entries stored under the tokens its caches hold. Speculative decoding ends with the caches a
    token short of the tokens generated (the last is never fed) or, stopped inside a round, past
    them; stored under every token, a later request sharing the prefix would resume from caches
    a token off and decode other text."""

    def __init__(self, max_size: int, uncached: set[str] = frozenset()):
        super().__init__(max_size)
        self.uncached = uncached

    def fetch_nearest_cache(self, model: Any, tokens: list[int]) -> tuple[Any, list[int]]:
        if model[0] in self.uncached:  # ServedModels.model_key: (name, None, "draft" or None)
            return None, list(tokens)
        return super().fetch_nearest_cache(model, tokens)

    def insert_cache(self, model: Any, tokens: list[int], prompt_cache: list[Any],
                     **kwargs: Any) -> None:
        if model[0] in self.uncached:
            return
        if model[2] is not None:
            held = min(len(tokens), *(c.offset for c in prompt_cache))
            for c in prompt_cache:
                c.trim(c.offset - held)
            tokens = tokens[:held]
        super().insert_cache(model, tokens, prompt_cache, **kwargs)


class MlxlabResponses(ResponseGenerator):
    """mlx-lm's generation thread; prompts are tokenized as mlxlab generates (see the module)."""

    def generate(self, request: Any, args: Any, progress_callback: Any = None) -> tuple:
        try:
            return super().generate(request, args, progress_callback)
        except ServingError as err:
            raise Answered(err) from None
        except Exception as err:
            if not self.generation_available():
                raise Answered(ServingError("the generation thread stopped: restart the "
                                            "server", status=500)) from err
            # the chat template's or the tokenizer's refusal: the request's
            raise Answered(ServingError(str(err))) from err

    def _tokenize(self, tokenizer: Any, request: Any, args: Any) -> tuple:
        served = self.model_provider.current
        field = "prompt" if request.request_type == "text" else "messages"
        if request.request_type == "text":
            prompt = [*served.start_ids, *tokenizer.encode(request.prompt, add_special_tokens=False)]
            tokenized = (prompt, [prompt], ["assistant"], "normal", None)
        elif served.images is not None and has_images(request.messages):
            prompt, arrays = served.images.prompt(request.messages,
                                                  self.cli_args.prefill_step_size)
            # one image entry: the runner takes the prompt's arrays whole (vision.py)
            vision = Vision(pixel_values=[arrays], starts=[0], cache_key=prompt)
            tokenized = (prompt, [prompt], ["assistant"], "normal", vision)
        else:
            tokenized = super()._tokenize(tokenizer, request, args)
        length = len(tokenized[0])
        room = served.context - length
        if room <= 0:
            raise ServingError(f"{field}: the prompt is {length} tokens and {served.name}'s "
                               f"maximum context length is {served.context} tokens: shorten it",
                               param=field, code="context_length_exceeded")
        if args.max_tokens is None:  # the request named none: the server's, cut to the room
            args.max_tokens = min(self.cli_args.max_tokens, room)
        elif args.max_tokens > room:
            raise ServingError(
                f"{served.name}'s maximum context length is {served.context} tokens: the "
                f"prompt is {length} and max_tokens asks for {args.max_tokens} more "
                f"({length + args.max_tokens}): shorten the {field} or ask for at most {room}",
                param="max_tokens", code="context_length_exceeded")
        return tokenized


class OpenAIHandler(APIHandler):
    """mlx-lm's HTTP handler with mlxlab's checks and OpenAI's error objects (see the module)."""

    @property
    def settings(self) -> argparse.Namespace:
        return self.response_generator.cli_args

    @property
    def provider(self) -> ServedModels:
        return self.response_generator.model_provider

    def do_POST(self) -> None:
        read = False
        try:
            check_key(self.headers.get("Authorization"), self.settings.api_key)
            if self.path not in (COMPLETION_PATHS + EMBEDDING_PATHS + RERANK_PATHS
                                 + TRANSCRIPTION_PATHS):
                raise ServingError(f"Invalid URL (POST {self.path[:200]}): this server answers "
                                   f"POST {', '.join(COMPLETION_PATHS[:2])}, "
                                   f"{EMBEDDING_PATHS[0]}, {RERANK_PATHS[0]}, "
                                   f"{TRANSCRIPTION_PATHS[0]}", status=404)
            length = body_length(self.headers, self.settings.max_request_bytes)
            raw, read = self.rfile.read(length), True
            if self.path in TRANSCRIPTION_PATHS:  # a multipart upload, not JSON
                self.transcribe(raw)
                return
            self.body = parse_body(raw, self.address_string())
            if self.path in EMBEDDING_PATHS:
                self.embed(self.body)
                return
            if self.path in RERANK_PATHS:  # a cross-encoder's scores: no generation thread
                if self.body.get("model") in self.provider.served:  # another kind of model
                    self.requested(self.body, ServedReranker)
                rerankers = self.server.rerankers
                self.answer(rerank_response(self.body, rerankers,
                                            [r.name for r in rerankers.values()]))
                return
            socket_file, self.rfile = self.rfile, io.BytesIO(raw)
            try:  # mlx-lm's handler reads the body that passed, and answers it
                super().do_POST()
            finally:
                self.rfile = socket_file
        except ServingError as err:
            self.refuse(err)
            if not read:
                discard(self.connection, self.rfile, self.headers)
        except Answered as answered:
            self.refuse(answered.error)

    def validate_model_parameters(self) -> None:
        try:
            super().validate_model_parameters()  # mlx-lm's: each field's type and range
            model = self.requested(self.body, ServedModel)
            check_fields(self.body, model, chat=self.path.endswith("/chat/completions"))
        except ValueError as err:
            raise Answered(from_mlx_lm(err, self.body)) from None
        if "max_completion_tokens" not in self.body and "max_tokens" not in self.body:
            self.max_tokens = None  # MlxlabResponses gives the server's, cut to the room left

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":  # open: a load balancer's probe carries no key
            self.handle_health_check()
            return
        try:
            check_key(self.headers.get("Authorization"), self.settings.api_key)
            if path.rstrip("/") == "/v1/models":
                rerankers = {r.name: r for r in self.server.rerankers.values()}
                transcribers = {t.name: t for t in self.server.transcribers.values()}
                served = [*self.provider.models, *rerankers.values(), *transcribers.values()]
                self.answer({"object": "list", "data": [self.model_object(s) for s in served]})
            elif path.startswith("/v1/models/"):
                name = unquote(path.removeprefix("/v1/models/"))  # a path's / comes as %2F
                self.answer(self.model_object(self.requested({"model": name})))
            else:
                raise ServingError(f"Invalid URL (GET {self.path[:200]}): this server answers "
                                   "GET /v1/models, /v1/models/<model> and /health", status=404)
        except ServingError as err:
            self.refuse(err)

    def requested(self, body: dict, kind: type | None = None
                  ) -> ServedModel | ServedEmbedder | ServedReranker:
        """The served model the request's `model` names (else 400 / 404), of `kind` where it
        is given (else 400 naming the endpoint the model answers)."""
        rerankers, transcribers = self.server.rerankers, self.server.transcribers
        names = list(dict.fromkeys([s.name for s in self.provider.models]
                                   + [r.name for r in rerankers.values()]
                                   + [t.name for t in transcribers.values()]))
        model = served_model(body, {**self.provider.served, **rerankers, **transcribers}, names)
        if kind is None or isinstance(model, kind):
            return model
        if isinstance(model, ServedTranscriber):
            raise ServingError(f"model: {model.name} is a Whisper model: it answers POST "
                               f"{TRANSCRIPTION_PATHS[0]}, not {self.path[:60]}", param="model")
        if self.path in TRANSCRIPTION_PATHS:
            whispers = ", ".join(t.name for t in set(transcribers.values()))
            raise ServingError(f"model: {model.name} is not a Whisper model; "
                               f"{TRANSCRIPTION_PATHS[0]} is for Whisper models "
                               f"({whispers or 'none served here'})", param="model")
        if isinstance(model, ServedReranker):
            raise ServingError(f"model: {model.name} is a reranker: it answers POST "
                               f"{RERANK_PATHS[0]}, not {self.path[:60]}", param="model")
        if isinstance(model, ServedEmbedder):
            raise ServingError(f"model: {model.name} is a text embedder: it answers POST "
                               f"{EMBEDDING_PATHS[0]}, not {self.path[:60]}", param="model")
        if self.path in RERANK_PATHS:
            raise ServingError(f"model: {model.name} is a language model: it answers POST "
                               f"{', '.join(COMPLETION_PATHS[:2])}; {RERANK_PATHS[0]} is for "
                               f"rerankers ({self.rerankers_listed() or 'none served here'})",
                               param="model")
        raise ServingError(f"model: {model.name} is a language model: it answers POST "
                           f"{', '.join(COMPLETION_PATHS[:2])}; {EMBEDDING_PATHS[0]} is for text "
                           f"embedders ({self.listed(ServedEmbedder) or 'none served here'})",
                           param="model")

    def rerankers_listed(self) -> str:
        return ", ".join(r.name for r in self.server.rerankers.values())

    def listed(self, kind: type) -> str:
        """The served names of one kind of model."""
        return ", ".join(s.name for s in self.provider.models if isinstance(s, kind))

    def embed(self, body: dict) -> None:
        """POST /v1/embeddings (embeddings.py)."""
        model = self.requested(body, ServedEmbedder)
        self.answer(answer(read_request(body, model), model, body["model"]))

    def transcribe(self, raw: bytes) -> None:
        """POST /v1/audio/transcriptions (transcriptions.py); a model of another kind is
        refused naming the endpoint it answers."""
        transcribers = self.server.transcribers
        try:
            content_type, data = transcription_response(
                self.headers.get("Content-Type"), raw, transcribers,
                [t.name for t in transcribers.values()])
        except ServingError as err:
            if err.code == "model_not_found":  # another kind of model, or none of that name
                self.requested({"model": transcription_model(self.headers, raw)},
                               ServedTranscriber)
            raise
        self.answer_bytes(data, content_type)

    def model_object(self, served: ServedModel | ServedEmbedder | ServedReranker
                     | ServedTranscriber) -> dict:
        """OpenAI's model object, with the other names the model answers to."""
        return {"id": served.name, "object": "model", "created": self.created,
                "owned_by": "mlxlab", "aliases": list(served.names[1:])}

    def answer(self, payload: dict, status: int = 200, cors: bool = True) -> None:
        """A JSON answer, with its length."""
        self.answer_bytes(json.dumps(payload).encode(), "application/json", status, cors)

    def answer_bytes(self, data: bytes, content_type: str, status: int = 200,
                     cors: bool = True) -> None:
        """An answer of `content_type`, with its length."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if cors:
            self._set_cors_headers()
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def refuse(self, err: ServingError, cors: bool = True) -> None:
        """OpenAI's error object with its status."""
        self.answer(err.payload(), err.status, cors)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """http.server's own refusals (a malformed request line, an unsupported method) as
        OpenAI's error object too."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        # no CORS headers: they read the request's, which a malformed request line lacks
        self.refuse(ServingError(text, status=code), cors=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s - %s", self.address_string(), format % args)


def make_server(served: Sequence[ServedModel | ServedEmbedder], host: str = "127.0.0.1",
                port: int = 5001, settings: argparse.Namespace | None = None,
                rerankers: Sequence[ServedReranker] = (),
                transcribers: Sequence[ServedTranscriber] = ()
                ) -> tuple[ThreadingHTTPServer, ResponseGenerator]:
    """The HTTP server (bound, not yet serving; port 0 = a free one: server.server_address) and
    mlx-lm's generation thread (started) over `served`; `rerankers` answer /v1/rerank,
    `transcribers` /v1/audio/transcriptions."""
    settings = settings or server_settings()
    provider = ServedModels(served, settings)
    seeing = {s.name for s in served if isinstance(s, ServedModel) and s.images is not None}
    generator = MlxlabResponses(provider, ServedPromptCache(settings.prompt_cache_size, seeing))
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]

    by_name = {name: r for r in rerankers for name in r.names}
    hearing = {name: t for t in transcribers for name in t.names}

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        rerankers = by_name  # every name a request may give a reranker -> it
        transcribers = hearing  # and a Whisper model

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


def transcription_model(headers: Any, raw: bytes) -> Any:
    """The `model` field of a transcription upload (None where it has none)."""
    from mlxlab.serving.openai.transcriptions import parse_form

    return parse_form(headers.get("Content-Type"), raw).fields.get("model")
