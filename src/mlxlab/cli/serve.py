"""Serve finished runs or models over HTTP: language models and text embedders over the OpenAI
API (mlx-lm's server), a classifier with MLflow's model server.

    mlxlab serve outputs/finetune_chat/<a> outputs/finetune_chat/<b> --port 5001
    mlxlab serve models:/story-lora@champion /path/to/base/model/folder
        -> http://127.0.0.1:5001/v1: /v1/chat/completions, /v1/completions, /v1/models

Language models (decoder runs, registered decoders, base model folders) answer chat
completions and completions, streaming or not, with the model's own chat template and end
tokens; a request's `model` is a run folder as given or its folder name, a registered model
(models:/NAME@ALIAS, NAME@ALIAS, NAME) or a model folder. Runs fine-tuned from one base share
one copy of it in memory. Greedy completions equal `mlxlab generate` token for token. A
vision-language model (a VLM folder or a vision run) also answers chats whose user turns hold
OpenAI's `image_url` parts, each a `data:image/...;base64,` URL (the server fetches no URL and
reads no file for a client), as `mlxlab generate --image` answers them.

A cross-encoder folder (a BertForSequenceClassification, as sentence-transformers' CrossEncoder
saves one) or a reranker run (experiment=rerank), alone or beside language models, answers
POST /v1/rerank in vLLM's and Cohere's shape, with CrossEncoder's scores:

    mlxlab serve path/to/cross-encoder --port 5001
    curl -s http://127.0.0.1:5001/v1/rerank -d '{"model": "cross-encoder", "query": "...",
        "documents": ["...", {"text": "..."}], "top_n": 3, "return_documents": true}'
        -> {"id", "model", "results": [{"index", "relevance_score", "document"}], "usage"}

    mlxlab serve RUN --draft DRAFT_RUN --num-draft-tokens 3
    mlxlab serve RUN_A RUN_B --draft RUN_A=DRAFT_A --draft RUN_B=DRAFT_B

--draft: speculative decoding of a served model (RUN as given; alone when one model is served)
with a smaller model of the same tokenizer, e.g. one trained with experiment=draft_model; its
answers are the model's own (the same text under temperature 0), sooner. A draft the model
cannot use (another tokenizer or vocabulary, not smaller, a cache that cannot be rolled back)
is one line before the port is bound. A drafted model answers one request at a time.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:5001/v1", api_key="unused")
    client.chat.completions.create(model="<run folder name>",
                                   messages=[{"role": "user", "content": "Hi"}])

A Whisper model (a transformers or mlx-whisper Whisper folder, or a speech run), alone or
beside the others, answers OpenAI's POST /v1/audio/transcriptions (a multipart upload: file,
model, language, response_format json | text) with the transcript `mlxlab transcribe` prints:

    mlxlab serve path/to/whisper-tiny --port 5001
    client.audio.transcriptions.create(model="whisper-tiny", file=open("a.wav", "rb"))

A text embedder (a sentence-transformers folder: BERT, RoBERTa / XLM-R or a decoder such as
Qwen3-Embedding) answers POST /v1/embeddings as OpenAI's API does (a string, strings or token
ids; encoding_format float or base64; dimensions: the first N components, back to unit length),
with the vectors `mlxlab embed` writes:

    mlxlab serve path/to/all-MiniLM-L6-v2 path/to/chat-run --port 5001
    client.embeddings.create(model="all-MiniLM-L6-v2", input=["a text", "another"])

Refusals are OpenAI's error objects with OpenAI's status (404: a model not served here); a
max_tokens past the model's context is refused; a body over --max-request-mib is refused
unread (413). MLXLAB_API_KEY=KEY (or --api-key KEY) makes every request carry
`Authorization: Bearer KEY` (the client's api_key): give one when --host is not local.

A classifier (one run folder, or a models:/ or runs:/ URI) is served by MLflow's model server
as a pyfunc at /invocations:

    mlxlab serve outputs/train/<time>                    # http://127.0.0.1:5001/invocations
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
        -d '{"dataframe_records": [{"PassengerId": 1, "Pclass": 3, "Sex": "male", ...}]}'

A run folder is saved as a pyfunc model in a temporary folder (removed on exit) and served; a
models:/ or runs:/ URI is loaded from the store (--uri, else $MLFLOW_TRACKING_URI, else
<project>/mlruns/mlflow.db). It runs `python -m mlflow models serve --env-manager local` (this
environment, no new virtualenv). Both servers bind 127.0.0.1 unless --host says otherwise;
Ctrl-C stops them. For Ollama / LM Studio / llama.cpp instead: `mlxlab export RUN --format
gguf` writes a GGUF file and an Ollama Modelfile.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mlxlab.cli.common import CHECKPOINT_CHOICES, CHECKPOINT_HELP, guarded, parser_for
from mlxlab.serving.openai.checks import MAX_REQUEST_BYTES

MAX_REQUEST_MIB = MAX_REQUEST_BYTES / 2**20

URI_SCHEMES = ("models:/", "runs:/")


def main(argv: list[str]) -> int:
    parser = parser_for("serve", __doc__)
    parser.add_argument("targets", nargs="+", metavar="RUN|MODEL",
                        help="run folders, registered models (models:/<name>@<alias>, "
                        "models:/<name>/<version>) or model folders; one classifier run or "
                        "runs:/<run id>/model for MLflow's server")
    parser.add_argument("--port", type=int, default=5001, help="default 5001 (5000 is the "
                        "tracking server's); 0 = a free port, printed")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help=CHECKPOINT_HELP)
    parser.add_argument("--uri", help="tracking URI for models:/ and runs:/ targets")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="language models: new tokens when a request gives no max_tokens")
    parser.add_argument("--api-key", default=None, help="language models: every request must "
                        "carry `Authorization: Bearer KEY` (the openai client's api_key); "
                        "default: $MLXLAB_API_KEY, else no key (a command line is visible to "
                        "other users: prefer the variable)")
    parser.add_argument("--max-request-mib", type=float, default=None,
                        help=f"language models: the largest request body, in MiB (default "
                        f"{MAX_REQUEST_MIB:g}); a larger one is refused (413) unread")
    parser.add_argument("--draft", action="append", default=[], metavar="[RUN=]DRAFT",
                        help="language models: speculative decoding of RUN (a target as given) "
                        "with DRAFT, a smaller model of the same tokenizer (a run or a folder); "
                        "repeat for each served model that has one; one target: --draft DRAFT")
    parser.add_argument("--num-draft-tokens", type=int, default=3,
                        help="--draft: the tokens a draft proposes a pass (a request's "
                        "num_draft_tokens, else this)")
    parser.add_argument("--workers", type=int, default=None,
                        help="classifier: MLflow server worker processes (default 1)")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="mlxlab-serve-")

    def body() -> int:
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.max_request_mib is not None and not args.max_request_mib > 0:
            raise ValueError(f"--max-request-mib must be above 0, got {args.max_request_mib:g}")
        if args.num_draft_tokens < 1:
            raise ValueError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")
        args.api_key = api_key(args.api_key)
        drafts = draft_pairs(args.targets, args.draft)
        targets = _language_model_targets(args, Path(tmp))
        if targets is None:
            if args.api_key is not None or args.max_request_mib is not None or drafts:
                raise ValueError("an API key (--api-key, MLXLAB_API_KEY), --max-request-mib "
                                 "and --draft are for language models: MLflow's model server "
                                 "has none of them; unset them to serve this classifier")
            return _mlflow(args, args.targets[0], tmp)
        if args.workers is not None:
            raise ValueError("--workers is for a classifier's MLflow server; a language model is "
                             "served by one process (it batches concurrent requests)")
        from mlxlab.serving.openai.served import resolve_target

        # every draft found before a model loads: a wrong path is one line at once
        drafts = {t: resolve_target(d, args.uri, Path(tmp)) for t, d in drafts.items()}
        return _openai(args, targets, drafts)

    try:
        return guarded("serve", body)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def api_key(given: str | None) -> str | None:
    """The key requests must carry: --api-key, else MLXLAB_API_KEY, else None."""
    from mlxlab.runtime import settings

    key = settings.current().api_key if given is None else given
    if key is not None and (not key.strip() or key != key.strip()):
        raise ValueError("--api-key / MLXLAB_API_KEY: give a key without spaces around it "
                         "(or leave both unset for a server on 127.0.0.1 without one)")
    return key


def exposure_warning(host: str, key: str | None) -> str | None:
    """The line a server that anyone on the network may use prints: bound beyond loopback
    with no key."""
    if key is not None or ipaddress.ip_address(host).is_loopback:
        return None
    return (f"mlxlab serve: warning: listening on {host} with no API key: anyone who reaches "
            "this machine can use these models (set MLXLAB_API_KEY or --api-key)")


def draft_pairs(targets: list[str], given: list[str]) -> dict[str, str]:
    """Each --draft as {target as given: draft}: `RUN=DRAFT` (RUN one of the targets), or
    `DRAFT` alone when one model is served."""
    pairs: dict[str, str] = {}
    for text in given:
        target, sep, draft = text.partition("=")
        if not (sep and target in targets):
            if len(targets) > 1:
                raise ValueError(f"--draft {text}: name the served model it drafts for, "
                                 "--draft RUN=DRAFT with RUN as given on the command line")
            target, draft = targets[0], text
        if target in pairs:
            raise ValueError(f"--draft: {target} is given two drafts ({pairs[target]} and "
                             f"{draft}); give each served model one")
        pairs[target] = draft
    return pairs


def _language_model_targets(args: argparse.Namespace, scratch: Path) -> list | None:
    """The targets resolved when they are language models (served over the OpenAI API), None
    for one classifier or runs:/ URI (MLflow's server)."""
    from mlxlab.serving.openai.served import resolve_target

    if any(t.startswith("runs:/") for t in args.targets):
        if len(args.targets) > 1:
            raise ValueError("a runs:/ URI is served alone by MLflow's model server")
        return None
    targets = [resolve_target(t, args.uri, scratch) for t in args.targets]
    # a reranker answers /v1/rerank beside the language models (mixed freely)
    classifiers = [t.text for t in targets if t.task(args.checkpoint) == "classification"]
    if classifiers and len(targets) > 1:
        raise ValueError(f"{classifiers[0]} is a classifier, served alone by MLflow's model "
                         "server: give it to its own `mlxlab serve`")
    return None if classifiers else targets


def _openai(args: argparse.Namespace, targets: list, drafts: dict) -> int:
    from mlxlab.serving.openai.embeddings import ServedEmbedder
    from mlxlab.serving.openai.rerank import load_rerankers
    from mlxlab.serving.openai.served import attach_draft, load_served
    from mlxlab.serving.openai.server import make_server, serve_until_stopped, server_settings
    from mlxlab.serving.openai.transcriptions import load_transcribers

    reranking = [t for t in targets if t.task(args.checkpoint) == "rerank"]
    if drafted := next((t.text for t in reranking if t.text in drafts), None):
        raise ValueError(f"--draft {drafted}: a reranker scores pairs, it decodes nothing")
    hearing = [t for t in targets if t.task(args.checkpoint) == "speech"]
    if drafted := next((t.text for t in hearing if t.text in drafts), None):
        raise ValueError(f"--draft {drafted}: speculative decoding is for language models, "
                         "not Whisper")
    rerankers = load_rerankers(reranking, args.checkpoint)
    transcribers = load_transcribers(hearing, args.checkpoint)
    targets = [t for t in targets if t not in reranking and t not in hearing]
    served = load_served(targets, args.checkpoint)
    for target, s in zip(targets, served):
        if target.text in drafts:  # checked against its model before the port is bound
            attach_draft(s, drafts[target.text], args.checkpoint)
    limit = MAX_REQUEST_MIB if args.max_request_mib is None else args.max_request_mib
    settings = server_settings(args.max_tokens, api_key=args.api_key,
                               max_request_bytes=int(limit * 2**20),
                               num_draft_tokens=args.num_draft_tokens)
    try:
        server, generator = make_server(served, args.host, args.port, settings, rerankers,
                                        transcribers)
    except OSError as err:
        raise ValueError(f"cannot bind {args.host}:{args.port} ({err.strerror}): pick another "
                         "--port") from None
    host, port = server.server_address[:2]
    if warning := exposure_warning(host, args.api_key):
        print(warning, file=sys.stderr, flush=True)
    for s in served:
        also = f" (also {', '.join(s.names[1:])})" if len(s.names) > 1 else ""
        drafted = ("" if isinstance(s, ServedEmbedder) or s.draft is None
                   else f" (draft: {drafts[s.name].text})")
        print(f"  model {s.name}{also} <- {s.source}{drafted}", flush=True)
    for r in rerankers:
        print(f"  reranker {r.name} <- {r.source} (POST /v1/rerank)", flush=True)
    for t in transcribers:
        print(f"  whisper {t.name} <- {t.source} (POST /v1/audio/transcriptions)", flush=True)
    shared = sum(s.stats["shared_bytes"] for s in served)
    embedders = sum(isinstance(s, ServedEmbedder) for s in served)
    kinds = [f"{count} {kind}(s)" for count, kind in ((len(served) - embedders, "language model"),
                                                     (embedders, "text embedder"),
                                                     (len(rerankers), "reranker"),
                                                     (len(transcribers), "Whisper model"))
             if count]
    print(f"serving {' and '.join(kinds)} on http://{host}:{port}/v1 "
          f"({shared / 2**20:.1f} MiB of weights shared, held once; Ctrl-C stops)", flush=True)
    serve_until_stopped(server, generator)
    return 0


def _mlflow(args: argparse.Namespace, target: str, tmp: str) -> int:
    env = dict(os.environ)
    # mlflow execs `uvicorn` by name: find this environment's, also when the venv is not
    # activated (.venv/bin/mlxlab serve ...).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if target.startswith(URI_SCHEMES):
        from mlxlab.tracking.mlflow import resolve_uri, sqlite_path

        uri = resolve_uri(args.uri)
        db = sqlite_path(uri)
        if db is not None and not db.exists():
            raise FileNotFoundError(f"no MLflow store at {db}: register the model first "
                                    "(mlxlab register) or pass --uri")
        env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = uri
        model = target
    elif Path(target).expanduser().exists():
        from mlxlab.serving.registry import save_run_model

        model = str(save_run_model(Path(target).expanduser(), Path(tmp) / "model",
                                   args.checkpoint))
    else:
        raise FileNotFoundError(f"{target}: no such run folder, and not a "
                                f"{' or '.join(URI_SCHEMES)} URI")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
               "-h", args.host, "-p", str(args.port), "-w", str(args.workers or 1),
               "--env-manager", "local"]
    print(f"starting MLflow's model server for {target} ...", file=sys.stderr, flush=True)
    # Its own process group: mlflow starts the web server as a child; stopping the group
    # stops both. SIGTERM to us (and Ctrl-C) stops them, then the temporary model goes.
    server = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(*_: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        if accepting(args.host, args.port, server):  # the URL once a request would be answered
            print(f"serving {target} on http://{args.host}:{args.port}/invocations "
                  "(Ctrl-C stops)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        stop()
        return server.wait()


def accepting(host: str, port: int, server: subprocess.Popen, poll_s: float = 0.2) -> bool:
    """Wait until `host:port` accepts connections (True) or `server` has exited (False)."""
    import socket
    import time

    address = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    while server.poll() is None:
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(poll_s)
    return False
