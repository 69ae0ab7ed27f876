"""Checkpoints in object storage (S3, GCS, Azure Blob) through fsspec.

`checkpoint.remote=s3://bucket/prefix` (or gs://, az://, abfs://) mirrors the run
directory's checkpoints under that prefix:

    <prefix>/checkpoints/step_00000120/{model,optimizer}.safetensors, state.json, checksums.json,
                                        COMMITTED   (uploaded last)
    <prefix>/checkpoints/best/...        (never rotated away)
    <prefix>/tokenizer.json, <prefix>/config.yaml (the resolved config)

Uploads run in one background thread, woken after each local commit; the training step never
waits on the network. Each file gets bounded retries with exponential backoff; a checkpoint whose
upload failed is retried at the next wake-up and at the end of the run, and a failed upload never
fails training. A remote directory without COMMITTED is never used: resume lists only committed
ones and verifies every checksum after download.

Credentials come only from each SDK's own chain (AWS_* / ~/.aws, GOOGLE_APPLICATION_CREDENTIALS /
gcloud / metadata server, AZURE_STORAGE_* / DefaultAzureCredential); mlxlab never reads, logs or
stores them. The same goes for endpoints of emulators: AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST,
AZURE_STORAGE_CONNECTION_STRING.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlxlab.checkpoint import (
    BEST,
    MARKER,
    CheckpointWarning,
    check_committed,
    step_name,
    step_of,
    swap_into_place,
)
from mlxlab.checkpoint.atomic import link_files, temp_dir
from mlxlab.checkpoint.discover import is_checkpoint_dir
from mlxlab.checkpoint.layout import CHECKPOINTS_DIR
from mlxlab.errors import RemoteError

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKENIZER = "tokenizer.json"
CONFIG = "config.yaml"

# The object stores a checkpoint URI may name (checkpoint.remote, resume=), and the
# fsspec package that opens each.
REMOTE_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                  "abfss": "adlfs"}


def is_remote(uri: Any) -> bool:
    """Whether `uri` names an object store (s3://, gs://, az://, ...) rather than a local path."""
    return isinstance(uri, str) and uri.split("://", 1)[0].lower() in REMOTE_SCHEMES and "://" in uri


def check_uri(uri: str) -> tuple[str, str]:
    """(scheme, rest) of a usable remote URI; RemoteError naming the fix otherwise."""
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme not in REMOTE_SCHEMES or not rest.strip("/"):
        raise RemoteError(
            f"remote checkpoint URI {uri!r} is not s3://bucket/prefix, gs://bucket/prefix or "
            "az://container/prefix"
        )
    if re.match(r"^[^/]*@", rest) and scheme in ("s3", "gs", "gcs"):
        raise RemoteError(
            f"the remote URI for {scheme}:// must not carry credentials: use the provider's "
            "standard credential chain (environment variables, config files, instance roles)"
        )
    return scheme, rest


def open_filesystem(uri: str):
    """(fsspec filesystem, root path without scheme) for `uri`; RemoteError naming the fix."""
    scheme, rest = check_uri(uri)
    try:
        import fsspec

        options: dict[str, Any] = {"skip_instance_cache": True}
        if scheme == "s3":
            # Fail fast on a dead endpoint: our own retries (with backoff) decide how long to try.
            options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60,
                                        "retries": {"max_attempts": 2}}
            if os.environ.get("AWS_ENDPOINT_URL"):  # emulators and S3-compatible stores
                options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        if scheme in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
            # gcsfs's default class also asks a gRPC control API (which emulators lack) what
            # kind of bucket this is; the plain JSON-API class is all an emulator speaks.
            from gcsfs.core import GCSFileSystem

            fs = GCSFileSystem(**options)
        else:
            fs = fsspec.filesystem(scheme, **options)
    except ImportError as e:
        raise RemoteError(
            f"{scheme}:// checkpoints need {REMOTE_SCHEMES[scheme]} ({e}): pip install -e '.[cloud]'"
        ) from e
    return fs, rest.strip("/")


def _retry(what: str, fn: Callable[[], T], retries: int, backoff_s: float,
           missing_is_final: bool = False) -> T:
    """fn(), tried `retries` + 1 times with doubling sleeps; the last error is raised.

    `missing_is_final`: a FileNotFoundError is an answer (listing an empty prefix), not an
    outage; elsewhere it is retried too (a restarted server can answer 404 for a while)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError:
            if missing_is_final or attempt == retries:
                raise
            log.info("%s: not found; retry %d of %d", what, attempt + 1, retries)
            time.sleep(backoff_s * 2**attempt)
        except Exception as e:
            if attempt == retries:
                raise
            delay = backoff_s * 2**attempt
            log.info("%s failed (%s); retry %d of %d in %.1fs", what, type(e).__name__,
                     attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class _Bounded:
    """A filesystem whose network calls each end within `timeout_s`.

    fsspec's async filesystems (s3fs, gcsfs, adlfs) take a `timeout` in their blocking wrappers;
    without it a call on a connection the server dropped can wait forever (seen with gcsfs after
    the emulator restarted), and so would the end of the run that waits for its uploads. A call
    past the limit raises FSTimeoutError, which the retry loop treats like any other outage.
    """

    CALLS = frozenset({"exists", "ls", "put_file", "pipe_file", "cat_file", "rm_file", "rm",
                       "get_file"})

    def __init__(self, fs, timeout_s: float | None) -> None:
        self._fs, self._timeout = fs, timeout_s

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if name in self.CALLS and self._timeout and getattr(self._fs, "async_impl", False):
            return functools.partial(attr, timeout=self._timeout)
        return attr


class RemoteStore:
    """One remote prefix: list, upload and download checkpoint directories, marker last."""

    def __init__(self, uri: str, retries: int = 5, backoff_s: float = 1.0,
                 timeout_s: float | None = 60.0) -> None:
        self.uri = uri.rstrip("/")
        self.scheme = uri.split("://", 1)[0].lower()
        fs, self.root = open_filesystem(uri)
        self.fs = _Bounded(fs, timeout_s)
        self.retries, self.backoff_s = int(retries), float(backoff_s)

    def url(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _try(self, what: str, fn: Callable[[], T], missing_is_final: bool = False) -> T:
        return _retry(what, fn, self.retries, self.backoff_s, missing_is_final)

    # -- listing

    def _exists(self, path: str) -> bool:
        self.fs.invalidate_cache()
        return self._try(f"exists {path}", lambda: self.fs.exists(path), missing_is_final=True)

    def committed_steps(self) -> list[int]:
        """Remote step checkpoints with a COMMITTED marker, newest first."""
        return [s for s, done in self.step_dirs() if done]

    def step_dirs(self) -> list[tuple[int, bool]]:
        """(step, committed) of every remote step directory, newest first."""
        base = self._path(CHECKPOINTS_DIR)
        self.fs.invalidate_cache()
        try:
            names = self._try(f"list {base}", lambda: self.fs.ls(base, detail=False),
                              missing_is_final=True)
        except FileNotFoundError:
            return []
        steps = sorted({s for s in map(step_of, names) if s >= 0}, reverse=True)
        return [(s, self._exists(self._path(CHECKPOINTS_DIR, step_name(s), MARKER))) for s in steps]

    # -- upload

    def put_file(self, local: Path, *parts: str) -> None:
        if not local.is_file():  # rotated away locally: nothing to retry
            raise FileNotFoundError(f"{local} is gone")
        target = self._path(*parts)
        self._try(f"upload {target}", lambda: self.fs.put_file(str(local), target))

    def put_text(self, text: str, *parts: str) -> None:
        target = self._path(*parts)
        self._try(f"upload {target}", lambda: self.fs.pipe_file(target, text.encode()))

    def marker_text(self, name: str) -> str | None:
        """The remote COMMITTED marker's text, None when there is none."""
        marker = self._path(CHECKPOINTS_DIR, name, MARKER)
        if not self._exists(marker):
            return None
        return self._try(f"read {marker}", lambda: self.fs.cat_file(marker).decode())

    def upload_checkpoint(self, local: Path, name: str) -> None:
        """Every file of `local`, then its COMMITTED marker: a remote copy is committed only
        once it is complete. An existing remote copy (best/) loses its marker first."""
        marker = self._path(CHECKPOINTS_DIR, name, MARKER)
        if self._exists(marker):
            self._try(f"delete {marker}", lambda: self.fs.rm_file(marker))
        files = sorted(p for p in local.iterdir() if p.is_file() and p.name != MARKER)
        if not (local / MARKER).is_file():
            raise FileNotFoundError(f"{local} is not committed")
        for f in files:
            self.put_file(f, CHECKPOINTS_DIR, name, f.name)
        self.put_file(local / MARKER, CHECKPOINTS_DIR, name, MARKER)

    def delete_checkpoint(self, name: str) -> None:
        """Marker first, so a half-deleted directory is never taken for a committed one."""
        base = self._path(CHECKPOINTS_DIR, name)
        marker = f"{base}/{MARKER}"
        if self._exists(marker):
            self._try(f"delete {marker}", lambda: self.fs.rm_file(marker))
        self.fs.invalidate_cache()
        with contextlib.suppress(FileNotFoundError):
            self._try(f"delete {base}", lambda: self.fs.rm(base, recursive=True))

    def rotate(self, keep_last_n: int) -> list[str]:
        """Keep the newest `keep_last_n` committed step checkpoints; delete older ones, and
        uncommitted leftovers older than the newest committed one. best/ is never touched."""
        deleted, kept, newest = [], 0, None
        for step, committed in self.step_dirs():
            if committed and kept < keep_last_n:
                kept += 1
                newest = step if newest is None else newest
                continue
            if committed or (newest is not None and step < newest):
                self.delete_checkpoint(step_name(step))
                deleted.append(step_name(step))
        return deleted

    # -- download

    def download_checkpoint(self, name: str, directory: Path) -> Path:
        """`<prefix>/checkpoints/<name>` into `directory/<name>`, verified; CheckpointError-like
        reasons come back as ValueError, and nothing unverified is ever left under `name`."""
        directory.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(directory, f"remote-{name}")
        base = self._path(CHECKPOINTS_DIR, name)
        try:
            tmp.mkdir()
            self.fs.invalidate_cache()
            files = self._try(f"list {base}", lambda: self.fs.ls(base, detail=False))
            for remote in files:
                file = remote.rstrip("/").rsplit("/", 1)[-1]
                self._try(f"download {remote}",
                          lambda r=remote, f=file: self.fs.get_file(r, str(tmp / f)))
            problem = check_committed(tmp, full=True)
            if problem is not None:
                raise ValueError(problem)
            final = directory / name
            swap_into_place(tmp, final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_file(self, local: Path, *parts: str) -> bool:
        source = self._path(*parts)
        if not self._exists(source):
            return False
        self._try(f"download {source}", lambda: self.fs.get_file(source, str(local)))
        return True


# ---------------------------------------------------------------------------- uploads


class RemoteUploader:
    """Mirror a run directory's committed checkpoints to a RemoteStore from one thread.

    `notify()` (after each local commit) wakes the thread; each round uploads the newest local
    checkpoint not yet uploaded, then best/ if it changed, then rotates the remote copies.
    `close()` runs a last round and says what was and was not uploaded.
    """

    def __init__(
        self,
        store: RemoteStore,
        run_dir: Path,
        keep_last_n: int,
        config_text: str | None = None,
        final_wait_s: float | None = 120.0,
    ) -> None:
        self.store, self.run_dir, self.keep_last_n = store, Path(run_dir), keep_last_n
        self.final_wait_s = final_wait_s  # how long the run's end waits for a running upload
        self.checkpoints = self.run_dir / CHECKPOINTS_DIR
        self.config_text = config_text
        self.uploaded: dict[str, str] = {}  # checkpoint name -> remote URI
        self.failed: dict[str, str] = {}  # name -> last error
        self.skipped: list[str] = []  # rotated away locally before they could be uploaded
        self._versions: dict[str, str | None] = {}  # name -> marker text handled
        self._best_source: str | None = None
        self._extras_done = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def notify(self, _path: Path | None = None) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if not self._stop.is_set():
                self.sync()

    def sync(self) -> None:
        """One round; errors are recorded (and retried next round), never raised."""
        with self._lock:
            try:
                self._sync()
            except Exception as e:
                log.warning("remote checkpoints: upload to %s failed (%s: %s); training goes "
                            "on and the upload is retried", self.store.uri, type(e).__name__, e)

    def _local_committed(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        dirs = [p for p in self.checkpoints.iterdir() if step_of(p.name) >= 0]
        dirs = [p for p in dirs if check_committed(p, full=False) is None]
        return sorted(dirs, key=lambda p: step_of(p.name), reverse=True)

    def _sync(self) -> None:
        if not self._extras_done:
            self._upload_extras()
        # A step saved twice (periodic, then the epoch-end save with its metric) is a new
        # version under the same name: the marker's text tells versions apart.
        pending = [p for p in self._local_committed()
                   if _marker_text(p) != self._versions.get(p.name)]
        for path in pending[: self.keep_last_n]:  # newest first; older ones rotate away anyway
            self._upload(path, path.name)
        for path in pending[self.keep_last_n:]:
            self.failed.pop(path.name, None)
            self.skipped.append(path.name)
            self._versions[path.name] = _marker_text(path)  # never tried again
        best = self.checkpoints / BEST
        if check_committed(best, full=False) is None:
            source = _best_source(best)
            if source != self._best_source:
                self._upload(best, BEST)
                self._best_source = source
        for name in self.store.rotate(self.keep_last_n):
            log.info("remote checkpoints: rotated %s", self.store.url(CHECKPOINTS_DIR, name))

    def _upload_extras(self) -> None:
        tokenizer = self.run_dir / TOKENIZER
        if tokenizer.is_file():
            self.store.put_file(tokenizer, TOKENIZER)
        if self.config_text is not None:
            self.store.put_text(self.config_text, CONFIG)
        self._extras_done = True

    def _upload(self, path: Path, name: str) -> None:
        start = time.perf_counter()
        try:
            staged = _stage(path)
        except FileNotFoundError:
            if name == BEST:
                raise
            log.info("remote checkpoints: %s was rotated away locally before its upload", name)
            self.failed.pop(name, None)
            self.skipped.append(name)
            self._versions[name] = None
            return
        marker = _marker_text(staged)
        try:
            if name != BEST and self.store.marker_text(name) == marker:
                pass  # this very version is committed there: the checkpoint resumed from
            else:
                self.store.upload_checkpoint(staged, name)
        except Exception as e:
            self.failed[name] = f"{type(e).__name__}: {e}"
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        self.failed.pop(name, None)
        self._versions[name] = marker
        self.uploaded[name] = self.store.url(CHECKPOINTS_DIR, name)
        log.info("remote checkpoints: uploaded %s in %.1fs", self.uploaded[name],
                 time.perf_counter() - start)

    def close(self) -> list[str]:
        """A final round (bounded by the retries), stop the thread; the report's lines.

        An upload round still going after `final_wait_s` is given up on (the thread is a daemon):
        the run ends, and the report lists what was not uploaded."""
        self._stop.set()
        self._wake.set()
        self._thread.join(self.final_wait_s)
        if self._thread.is_alive():
            log.warning("remote checkpoints: an upload is still going after %.0fs; not waiting "
                        "longer (what it had not finished is reported as not uploaded)",
                        self.final_wait_s)
            return self.report()
        self.sync()
        return self.report()

    def report(self) -> list[str]:
        done = sorted(n for n, uri in self.uploaded.items() if uri)
        lines = [f"remote checkpoints at {self.store.uri}: uploaded {', '.join(done) or 'none'}"]
        if self.failed:
            lines.append("NOT uploaded (after retries): " + "; ".join(
                f"{n} ({why})" for n, why in sorted(self.failed.items())))
        if self.skipped:
            lines.append("not uploaded (replaced by a newer checkpoint first): "
                         + ", ".join(sorted(set(self.skipped))))
        return lines



def _marker_text(path: Path) -> str | None:
    try:
        return (path / MARKER).read_text()
    except OSError:
        return None


def _stage(path: Path) -> Path:
    """Hard links to one version of checkpoint `path`, next to it (a `.tmp-` name, so a killed
    run's leftovers are cleaned at the next start). Checkpoint files are never changed in place
    and a re-save swaps in a new directory, so an unchanged directory inode means every link
    came from the same version."""
    for _ in range(5):
        inode = os.stat(path).st_ino
        staged = temp_dir(path.parent, f"upload-{path.name}")
        staged.mkdir()
        try:
            link_files(path, staged)
        except FileNotFoundError:
            shutil.rmtree(staged, ignore_errors=True)
            if not path.is_dir():
                raise
            continue
        if path.is_dir() and os.stat(path).st_ino == inode:
            return staged
        shutil.rmtree(staged, ignore_errors=True)
    raise FileNotFoundError(f"{path} kept changing while being staged for upload")


def _best_source(best: Path) -> str | None:
    try:
        return json.loads((best / MARKER).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------- resume


def _newest_local_step(path: Path | None) -> int:
    if path is None:
        return -1
    path = Path(path)
    directory = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if is_checkpoint_dir(directory):
        return step_of(directory.name)
    if not directory.is_dir():
        return -1
    steps = [step_of(p.name) for p in directory.iterdir()
             if step_of(p.name) >= 0 and check_committed(p, full=False) is None]
    return max(steps, default=-1)


def fetch_remote_checkpoint(
    uri: str, run_dir: Path, local: Path | None, retries: int = 2, backoff_s: float = 1.0,
    required: bool = False, timeout_s: float | None = 60.0,
) -> Path | None:
    """Resume source after looking at `uri`: `run_dir` when a committed remote checkpoint newer
    than `local`'s newest was downloaded (and verified) into it, else `local`.

    The newest remote one that fails verification is skipped with a warning, then the next
    older one, as local resume does. An unreachable store warns and keeps `local`, unless
    `required` (resume=<uri> itself), where it is an error.
    """
    store = RemoteStore(uri, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
    floor = _newest_local_step(local)
    try:
        steps = store.committed_steps()
    except Exception as e:
        if required:
            raise RemoteError(f"cannot list checkpoints at {uri} ({type(e).__name__}: {e}): "
                              "check the URI, the network and the credentials") from e
        log.warning("resume: cannot reach %s (%s); resuming from local checkpoints only", uri, e)
        return local
    target = Path(run_dir) / CHECKPOINTS_DIR
    for step in steps:
        if step <= floor:
            break
        try:
            path = store.download_checkpoint(step_name(step), target)
        except ValueError as e:
            warnings.warn(f"skipping remote checkpoint {store.url(CHECKPOINTS_DIR, step_name(step))}: "
                          f"{e}; trying the next older one", CheckpointWarning, stacklevel=2)
            continue
        except Exception as e:
            log.warning("resume: downloading %s failed (%s); trying the next older one",
                        store.url(CHECKPOINTS_DIR, step_name(step)), e)
            continue
        log.info("resume: downloaded %s (newer than local step %d) to %s",
                 store.url(CHECKPOINTS_DIR, step_name(step)), floor, path)
        _fetch_extras(store, Path(run_dir), target)
        return Path(run_dir)
    if required and local is None:
        raise RemoteError(f"no usable committed checkpoint under {store.url(CHECKPOINTS_DIR)}: "
                          "check the URI, or start without resume")
    return local


def _fetch_extras(store: RemoteStore, run_dir: Path, target: Path) -> None:
    """The tokenizer (resume must see the same token ids) and best/, when missing locally."""
    try:
        if not (run_dir / TOKENIZER).exists():
            store.get_file(run_dir / TOKENIZER, TOKENIZER)
        if not (target / BEST).exists() and store._exists(store._path(CHECKPOINTS_DIR, BEST, MARKER)):
            store.download_checkpoint(BEST, target)
    except Exception as e:
        log.warning("resume: could not download the tokenizer or best/ from %s (%s)", store.uri, e)
