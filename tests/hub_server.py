"""A stand-in Hugging Face Hub for the test suite (no network needed).

`FakeHub` is a small threaded HTTP server on 127.0.0.1 (free port) that keeps model repos in
memory and speaks the subset of the Hub protocol that `huggingface_hub` 2.4 really uses for
repo creation, branches, uploads (preupload + git-LFS "basic"/"multipart" + NDJSON commit) and
downloads (model info, tree listing, HEAD/GET /resolve). The real `huggingface_hub` client code
runs unchanged against it; see tests/test_hub_server.py.

Quick start (pytest)::

    from hub_server import FakeHub, use_fake_hub

    def test_push(monkeypatch, tmp_path):
        with FakeHub(token="hf_test_secret") as hub:          # started, stopped on exit
            use_fake_hub(monkeypatch, hub, tmp_path / "hf_home", token="hf_test_secret")
            ...  # call the tool / huggingface_hub; then inspect:
            hub.files("fake-user/merged", revision="main")      # {path: bytes}
            hub.branches("fake-user/merged"), hub.is_private("fake-user/merged")
            hub.commits("fake-user/merged")[-1].message
            hub.request_log_text()   # request lines + headers, Authorization value redacted
            hub.auth_headers         # raw Authorization values actually received

or use the `fake_hub` fixture defined below. Import it into the test module as
``from hub_server import fake_hub as fake_hub  # noqa: F401`` (the "as" form keeps ruff's F811 quiet
when the fixture name is then used as a test argument). It yields a started hub already wired in
with `use_fake_hub`; HF_TOKEN is *not* set: pass `token=` yourself or
`monkeypatch.setenv("HF_TOKEN", hub.token)`. `import hub_server` works because tests/ has no
`__init__.py` (pytest's default "prepend" import mode puts tests/ on sys.path, as conftest.py's
`from builders import ...` relies on too).

For a CLI run in a subprocess: ``subprocess.run(..., env=hub.subprocess_env(tmp_path / "home",
token=hub.token))`` -- the child imports huggingface_hub with HF_ENDPOINT etc. already set.

Pointing huggingface_hub at the server -- what `use_fake_hub` does and why
---------------------------------------------------------------------------
`huggingface_hub.constants` reads every environment variable ONCE, at import time. Setting
`HF_ENDPOINT` with monkeypatch after the library was imported changes nothing in-process, so
`use_fake_hub` does both:

* sets env vars (`HF_ENDPOINT`, `HF_HOME`, `HF_HUB_DISABLE_XET=1`, `HF_HUB_DISABLE_TELEMETRY=1`,
  removes `HF_TOKEN`/`HF_HUB_OFFLINE`/...) -- for subprocesses (a CLI run with `subprocess`)
  and for a library imported later;
* patches the already-imported values: `constants.ENDPOINT`, **`constants.HUGGINGFACE_CO_URL_TEMPLATE`**
  (hf_hub_download builds its /resolve URL from this template, not from ENDPOINT!), the cache
  paths (`HF_HOME`, `HF_HUB_CACHE`, `HF_ASSETS_CACHE`, `HF_TOKEN_PATH`, `HF_XET_CACHE`, ...),
  `HF_HUB_OFFLINE=False`, `HF_HUB_DISABLE_XET=True`, `HF_HUB_DISABLE_TELEMETRY=True`, and
  **`huggingface_hub.hf_api.api.endpoint`**: the module-level functions
  (`huggingface_hub.upload_folder`, `create_repo`, `whoami`, ...) are bound methods of an `HfApi()`
  created at import time, whose endpoint was frozen then. `HfApi()` objects created *after*
  patching pick up the new ENDPOINT; one created before keeps the old one (or pass `endpoint=`).

huggingface_hub 2.4 quirks the caller must know
-----------------------------------------------
* Xet: if the `hf_xet` package is installed (it is in this venv) and `HF_HUB_DISABLE_XET` is not
  true, uploads ALWAYS go through Xet (`upload_folder` -> `pipelined_upload`,
  `preupload_lfs_files` -> `_upload_xet_files`), whatever the server advertises. This server
  implements no Xet/CAS, so `constants.HF_HUB_DISABLE_XET` must be True (use_fake_hub sets it);
  the /xet-*-token routes answer 501 with a message saying so. Downloads never use Xet here:
  the server never sends `X-Xet-Hash`.
* `HfApi.upload_large_folder` does not exist in 2.4 (replaced by the Xet-only resumable
  `pipelined_upload` behind `upload_folder`). Without Xet, `upload_folder` is ONE commit; a
  re-run after an interrupted commit is cheap because the preupload answer carries each file's
  remote oid and the LFS batch answer omits `actions` for objects already stored.
* Offline mode is the module attribute `constants.HF_HUB_OFFLINE` (read by
  `constants.is_offline_mode()` on every request); set it with
  `monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)`. The env var alone
  does nothing after import.
* Error mapping (`utils/_http.py::hf_raise_for_status`) is driven by the `X-Error-Code` header:
  RepoNotFound -> RepositoryNotFoundError, RevisionNotFound -> RevisionNotFoundError,
  EntryNotFound -> RemoteEntryNotFoundError (subclass of EntryNotFoundError), GatedRepo ->
  GatedRepoError (subclass of RepositoryNotFoundError!). Its "401 on a repo URL means repo not
  found" fallback only matches `https://` URLs, so this http:// server always sends the code
  explicitly where the real Hub would end up as RepositoryNotFoundError. A 401 whose
  `X-Error-Message` is "Invalid credentials in Authorization header" (wrong token) stays a
  plain `HfHubHTTPError` (status 401); `whoami` rewrites it to "Invalid user token.".
* Retries: `http_backoff` retries 408/429/500/502/503/504 and network errors 5 times, sleeping
  1+2+4+8+8 s. It is used for preupload, the LFS batch/PUT/verify calls, tree listing and (on a
  second attempt) the download HEAD; the commit POST, create_repo, model_info and whoami are
  NOT retried. So `fail_all(500)` makes e.g. `upload_folder`/`hf_hub_download` take ~25 s
  unless the test calls `fast_retries(monkeypatch)`.
* An interrupted commit (dropped connection) surfaces as `httpx2.RemoteProtocolError` (the
  client library is `httpx2`, a fork of httpx); a 500 on commit as `HfHubHTTPError`.
* Downloads read `X-Repo-Commit`, `ETag` (git blob sha1 for regular files) or `X-Linked-Etag`
  (sha256 for LFS files), `Content-Length`/`X-Linked-Size`; a missing X-Repo-Commit makes the
  client fail with FileMetadataError/LocalEntryNotFoundError.
* The token is read, per request, from `token=`, else `HF_TOKEN` env, else the token file at
  `constants.HF_TOKEN_PATH` (patched into the temp HF_HOME by use_fake_hub).
* A commit touching README.md first POSTs it to /api/validate-yaml (implemented: bad YAML front
  matter -> ValueError "Invalid metadata in README.md").
* tests/conftest.py's autouse `isolated_env` only sets env vars (HF_HUB_OFFLINE=1, HF_HOME): they
  have no effect on an already-imported huggingface_hub. use_fake_hub overrides both env and constants.

Auth model of the fake
----------------------
Tokens map to a user name (`FakeHub(token=..., user=...)`, more via `add_token`). A request whose
Authorization header carries an unknown token gets 401 "Invalid credentials in Authorization
header" on every route (like the Hub). Anonymous requests may read public repos; writes need a
token with write access (anonymous -> 401, read-only token -> 403). Private repos are readable by
any known token; anonymous -> 401 RepoNotFound. A missing repo is 404 RepoNotFound (401 when
anonymous, like the Hub). Gated repos: metadata and tree are public, file content (/resolve)
needs a user granted with `grant_access` (anonymous -> 401 GatedRepo, other users -> 403 GatedRepo).

Failure simulation
------------------
* `fail_all(status, error_code=None, message=None)` -- every request answers `status` until
  `clear_failures()`.
* `fail_next(path=regex, method=None, status=500 | drop=True, skip=N, times=1, apply_first=False)`
  -- the (N+1)-th matching request fails `times` times (status, or the connection is closed without
  a response); with `apply_first=True` the request is processed first and only the response is lost.
* `interrupt_commit(skip=0, drop=True, status=500, apply_first=False)` -- shortcut for the commit endpoint.

Endpoints implemented (model repos only; datasets/spaces answer 404 RepoNotFound)
---------------------------------------------------------------------------------
GET  /api/whoami-v2                              GET /api/agent-harnesses (empty registry)
POST /api/validate-yaml (README.md front matter, called before any commit touching README.md)
POST /api/repos/create (409 + url if it exists)  DELETE /api/repos/delete
GET  /api/models/{repo}[/revision/{rev}]         (?blobs=true adds sizes/oids/lfs to siblings)
GET  /api/models/{repo}/tree/{rev}[/{path}]      (?recursive=true)
POST /api/models/{repo}/paths-info/{rev}         GET /api/models/{repo}/refs[?include_prs=1]
GET  /api/models/{repo}/commits/{rev}            PUT /api/models/{repo}/settings
POST|DELETE /api/models/{repo}/branch/{branch}   (409 if the branch exists)
POST /api/models/{repo}/preupload/{rev}          POST /api/models/{repo}/commit/{rev}[?create_pr=1]
POST /{repo}.git/info/lfs/objects/batch          POST /{repo}.git/info/lfs/objects/verify
PUT  /__fakehub__/lfs/{id}[/part/{n}]            POST /__fakehub__/lfs/{id}/complete   (fake S3, no auth)
HEAD|GET /{repo}/resolve/{rev}/{path}            (Range supported)
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

__all__ = [
    "CommitRecord",
    "FakeHub",
    "RequestRecord",
    "fake_hub",
    "fast_retries",
    "running_hub",
    "use_fake_hub",
]

DEFAULT_TOKEN = "hf_test_secret"
DEFAULT_USER = "fake-user"

# The Hub refuses non-LFS files above 10 MB; we use the same threshold to pick the upload mode.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# What the Hub puts in `.gitattributes` of a new repo (abridged): these patterns go to LFS.
_LFS_PATTERNS = """
    *.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gguf *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack
    *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/*
    *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*
""".split()
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS)

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Words that can follow a repo id in /api/models/... (tells a canonical one-part id from namespace/name).
_API_REPO_SUBPATHS = {
    *"revision tree paths-info refs commits branch settings preupload commit tag".split(),
    *"xet-read-token xet-write-token".split(),
}


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub calls `oid`/`blobId` and sends as ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """A file in a commit: its bytes and whether git stores it as an LFS pointer."""

    content: bytes
    lfs: bool
    sha256: str
    git_oid: str  # sha1 of the blob git stores: the content, or the LFS pointer text

    @classmethod
    def make(cls, content: bytes, lfs: bool) -> _Blob:
        sha256 = hashlib.sha256(content).hexdigest()
        stored = _lfs_pointer(sha256, len(content)) if lfs else content
        return cls(content=content, lfs=lfs, sha256=sha256, git_oid=_git_blob_sha1(stored))

    @property
    def etag(self) -> str:
        # The Hub's ETag for a file: sha256 for LFS files, git blob id otherwise.
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, len(self.content)))


@dataclass
class CommitRecord:
    """One commit as stored by the fake hub. `files` is the full tree after the commit."""

    oid: str
    message: str  # the summary line (`commit_message` in huggingface_hub)
    description: str
    branch: str  # branch (or "refs/pr/N") the commit was made on
    author: str | None  # user name of the token that made it (never the token itself)
    parent: str | None
    date: str
    files: dict[str, _Blob] = field(repr=False)
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.message


@dataclass
class RequestRecord:
    """One request received. `headers` has the Authorization value replaced by "<redacted>"."""

    method: str
    path: str  # raw path + query, as sent
    headers: dict[str, str]
    body: bytes = field(repr=False)
    authorized: bool  # an Authorization header was present
    status: int | None = None  # status answered, None if the connection was dropped

    @property
    def request_line(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: Any = False  # False, "auto" or "manual"
    granted: set[str] = field(default_factory=set)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    pr_refs: dict[str, str] = field(default_factory=dict)  # "refs/pr/N" -> commit oid
    commits: dict[str, CommitRecord] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # commit oids, oldest first
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes
    created_at: str = field(default_factory=_now_iso)


@dataclass
class _FailureRule:
    method: str | None
    path: re.Pattern[str] | None
    status: int
    drop: bool
    skip: int
    times: int
    error_code: str | None
    message: str
    apply_first: bool

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path is None or self.path.search(path) is not None


@dataclass
class _Upload:
    """A pending LFS upload (what a presigned S3 URL stands for)."""

    repo_id: str
    oid: str
    size: int
    parts: dict[int, bytes] = field(default_factory=dict)


class _HubError(Exception):
    """Raised by route code; turned into an error response with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _Drop(Exception):
    """Close the connection without answering."""


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(obj: Any, status: int = 200, headers: dict | None = None) -> _Response:
    body = json.dumps(obj).encode()
    return _Response(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer has Content-Length
    timeout = 60  # idle keep-alive connections end eventually
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def _handle(self) -> None:
        self.server.hub._serve(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):  # track connections to close them on stop()
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


# --------------------------------------------------------------------------------------------
# The fake hub
# --------------------------------------------------------------------------------------------


class FakeHub:
    """In-memory stand-in for huggingface.co (model repos only). See the module docstring."""

    def __init__(
        self,
        token: str | None = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        *,
        initial_gitattributes: bool = True,
        multipart_chunk_size: int | None = None,
    ):
        """
        Args:
            token: a valid write token for `user` (None: start with no token at all).
            initial_gitattributes: like the Hub, a new repo starts with an "initial commit"
                holding a `.gitattributes` (its LFS patterns decide the upload mode).
            multipart_chunk_size: if set, LFS objects larger than this are uploaded with the
                LFS "multipart" transfer (parts of this size + completion call).
        """
        self.token = token
        self.user = user
        self.initial_gitattributes = initial_gitattributes
        self.multipart_chunk_size = multipart_chunk_size
        self._tokens: dict[str, tuple[str, bool]] = {}  # token -> (user, can_write)
        if token is not None:
            self._tokens[token] = (user, True)
        self._repos: dict[str, _Repo] = {}
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.RLock()
        self._requests: list[RequestRecord] = []
        self._auth_headers: list[str] = []
        self._fail_all: tuple[int, str | None, str] | None = None
        self._rules: list[_FailureRule] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._server.sockets_lock:
            for sock in list(self._server.open_sockets):  # end idle keep-alive connections
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321 (no trailing slash): the HF_ENDPOINT value."""
        return f"http://127.0.0.1:{self.port}"

    def env(self, hf_home: str | os.PathLike[str], token: str | None = None) -> dict[str, str]:
        """Environment variables for a subprocess (a CLI run) that must use this hub.

        Returns only the variables to set; start from `os.environ` minus `HF_TOKEN` etc. yourself,
        or use `subprocess_env`."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": "0",
        }
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def subprocess_env(self, hf_home: str | os.PathLike[str], token: str | None = None) -> dict[str, str]:
        """A full environment for `subprocess.run(..., env=...)`: os.environ cleaned of HF settings
        that would escape the fake (tokens, offline flags, cache locations) + `env()`."""
        base = {k: v for k, v in os.environ.items() if k not in _ENV_TO_CLEAR}
        return {**base, **self.env(hf_home, token)}

    # ---- tokens, seeding, settings -------------------------------------------------------------

    def add_token(self, token: str, user: str, *, write: bool = True) -> None:
        """Accept another token (e.g. a read-only one: writes then get 403)."""
        with self._lock:
            self._tokens[token] = (user, write)

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str] | None = None,
        *,
        private: bool = False,
        gated: Any = False,
        branch: str = "main",
        message: str = "Add files",
    ) -> str:
        """Create a repo server-side (no HTTP), optionally with a first commit of `files`.

        Returns the head commit oid of `branch`."""
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id} already exists")
            repo = self._new_repo(repo_id, private=private, author=None)
            repo.gated = gated
            if branch != "main":
                repo.branches[branch] = repo.branches["main"]
            if files:
                return self.add_commit(repo_id, files, branch=branch, message=message)
            return repo.branches[branch]

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes | str],
        *,
        branch: str = "main",
        message: str = "Update files",
        delete: tuple[str, ...] | list[str] = (),
        lfs: bool | None = None,
    ) -> str:
        """Commit `files` (path -> content) server-side on `branch` (created from main if new).

        `lfs=None` decides per file like the preupload endpoint does. Returns the commit oid."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            parent = repo.commits[repo.branches[branch]]
            tree = dict(parent.files)
            added = []
            for path, content in files.items():
                data = content.encode() if isinstance(content, str) else bytes(content)
                is_lfs = lfs if lfs is not None else self._upload_mode(tree, path, len(data), data[:512]) == "lfs"
                tree[path] = _Blob.make(data, is_lfs)
                if is_lfs:
                    repo.lfs_objects[tree[path].sha256] = data
                added.append(path)
            for path in delete:
                tree.pop(path, None)
            return self._record_commit(repo, branch, tree, message, "", None, parent.oid, added, list(delete)).oid

    def set_private(self, repo_id: str, private: bool = True) -> None:
        with self._lock:
            self._repo_or_raise(repo_id).private = private

    def set_gated(self, repo_id: str, gated: Any = "manual") -> None:
        """Gate a repo (True/"manual"/"auto") or ungate it (False)."""
        with self._lock:
            self._repo_or_raise(repo_id).gated = "manual" if gated is True else gated

    def grant_access(self, repo_id: str, user: str | None = None) -> None:
        """Let `user` (default: the hub's main user) download a gated repo's files."""
        with self._lock:
            self._repo_or_raise(repo_id).granted.add(user or self.user)

    # ---- inspection ----------------------------------------------------------------------------

    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._repo_or_raise(repo_id).private

    def is_gated(self, repo_id: str) -> bool:
        with self._lock:
            return bool(self._repo_or_raise(repo_id).gated)

    def branches(self, repo_id: str) -> list[str]:
        """Branch names, sorted (PR refs excluded, see `pull_requests`)."""
        with self._lock:
            return sorted(self._repo_or_raise(repo_id).branches)

    def pull_requests(self, repo_id: str) -> dict[str, str]:
        """{"refs/pr/N": head oid}."""
        with self._lock:
            return dict(self._repo_or_raise(repo_id).pr_refs)

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit oid a branch (or "refs/pr/N") points at."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            return repo.branches.get(branch) or repo.pr_refs[branch]

    def resolve(self, repo_id: str, revision: str = "main") -> str:
        """Branch / PR ref / commit oid -> commit oid (KeyError if unknown)."""
        with self._lock:
            oid = self._resolve(self._repo_or_raise(repo_id), revision)
            if oid is None:
                raise KeyError(revision)
            return oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """All files of the repo at `revision` (branch, PR ref or commit oid): path -> bytes."""
        with self._lock:
            commit = self._repo_or_raise(repo_id).commits[self.resolve(repo_id, revision)]
            return {path: blob.content for path, blob in commit.files.items()}

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.files(repo_id, revision)[path]

    def is_lfs(self, repo_id: str, path: str, revision: str = "main") -> bool:
        """Whether `path` is stored as a git-LFS pointer at `revision`."""
        with self._lock:
            commit = self._repo_or_raise(repo_id).commits[self.resolve(repo_id, revision)]
            return commit.files[path].lfs

    def lfs_objects(self, repo_id: str) -> dict[str, bytes]:
        """Every LFS object uploaded to the repo (sha256 -> bytes), committed or not."""
        with self._lock:
            return dict(self._repo_or_raise(repo_id).lfs_objects)

    def commits(self, repo_id: str, branch: str | None = None) -> list[CommitRecord]:
        """Commits oldest first; with `branch`, only the history reachable from that branch."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            if branch is None:
                return [repo.commits[oid] for oid in repo.order]
            history = []
            oid: str | None = self.head(repo_id, branch)
            while oid is not None:
                history.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return history[::-1]

    def last_commit(self, repo_id: str, branch: str = "main") -> CommitRecord:
        with self._lock:
            return self._repo_or_raise(repo_id).commits[self.head(repo_id, branch)]

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def auth_headers(self) -> list[str]:
        """Raw Authorization header values received (where the token legitimately travels)."""
        with self._lock:
            return list(self._auth_headers)

    def request_log(self) -> list[str]:
        """One text entry per request: request line + headers, Authorization value redacted.

        Use it to assert that a secret never appears anywhere else (URL, other headers)."""
        lines = []
        for record in self.requests:
            headers = "".join(f"\n{k}: {v}" for k, v in record.headers.items())
            lines.append(f"{record.request_line}{headers}")
        return lines

    def request_log_text(self) -> str:
        return "\n".join(self.request_log())

    def requests_matching(self, method: str | None = None, path: str | None = None) -> list[RequestRecord]:
        """Requests whose method equals `method` and whose path matches regex `path`."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper()) and (path is None or re.search(path, r.path))
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._auth_headers.clear()

    # ---- failure simulation --------------------------------------------------------------------

    def fail_all(self, status: int, *, error_code: str | None = None, message: str | None = None) -> None:
        """Answer every request with `status` (and `X-Error-Code: error_code`) until cleared."""
        with self._lock:
            self._fail_all = (status, error_code, message or f"Simulated failure ({status})")

    def fail_next(
        self,
        path: str | None = None,
        *,
        method: str | None = None,
        status: int = 500,
        drop: bool = False,
        skip: int = 0,
        times: int = 1,
        error_code: str | None = None,
        message: str | None = None,
        apply_first: bool = False,
    ) -> None:
        """Make the (skip+1)-th request matching (`method`, regex `path`) fail `times` times.

        drop=True closes the connection without a response (client: RemoteProtocolError), else
        the answer is `status`. apply_first=True processes the request before failing (the
        change lands, the client never hears about it)."""
        with self._lock:
            self._rules.append(
                _FailureRule(
                    method=method,
                    path=re.compile(path) if path is not None else None,
                    status=status,
                    drop=drop,
                    skip=skip,
                    times=times,
                    error_code=error_code,
                    message=message or f"Simulated failure ({status})",
                    apply_first=apply_first,
                )
            )

    def interrupt_commit(
        self, *, skip: int = 0, drop: bool = True, status: int = 500, apply_first: bool = False
    ) -> None:
        """Make the commit endpoint fail once, after `skip` commits went through."""
        self.fail_next(
            r"^/api/models/.+/commit/",
            method="POST",
            drop=drop,
            status=status,
            skip=skip,
            apply_first=apply_first,
        )

    def clear_failures(self) -> None:
        with self._lock:
            self._fail_all = None
            self._rules.clear()

    # ---- request handling ----------------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        method = handler.command
        raw_path = handler.path
        body = handler.read_body()
        auth = handler.headers.get("Authorization")
        headers = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in handler.headers.items()}
        record = RequestRecord(method, raw_path, headers, body, authorized=auth is not None)
        with self._lock:
            self._requests.append(record)
            if auth is not None:
                self._auth_headers.append(auth)
            rule = self._pick_failure(method, urlsplit(raw_path).path)
            fail_all = self._fail_all

        request_id = handler.headers.get("X-Amzn-Trace-Id") or secrets.token_hex(8)
        try:
            if fail_all is not None:
                raise _HubError(fail_all[0], fail_all[2], fail_all[1])
            if rule is not None and not rule.apply_first:
                self._raise_rule(rule)
            response = self._route(method, raw_path, body, auth, handler.headers.get("Range"))
            if rule is not None:
                self._raise_rule(rule)
        except _Drop:
            handler.close_connection = True  # the socket closes, nothing was written
            return
        except _HubError as err:
            response = _json_response(
                {"error": err.message}, err.status, {"X-Error-Message": err.message, **err.headers}
            )
            if err.code:
                response.headers["X-Error-Code"] = err.code
        except Exception as exc:  # a bug in the fake: answer 500 with the reason, keep serving
            message = f"FakeHub internal error: {type(exc).__name__}: {exc}"
            response = _json_response({"error": message}, 500, {"X-Error-Message": message})
        record.status = response.status

        handler.send_response(response.status)
        response.headers.setdefault("Content-Length", str(len(response.body)))
        response.headers.setdefault("X-Request-Id", request_id)
        for key, value in response.headers.items():
            # http.server encodes headers as latin-1: keep messages with odd characters sendable
            handler.send_header(key, str(value).encode("latin-1", "replace").decode("latin-1"))
        handler.end_headers()
        if method != "HEAD" and response.body:
            handler.wfile.write(response.body)

    def _pick_failure(self, method: str, path: str) -> _FailureRule | None:
        for rule in self._rules:
            if rule.times <= 0 or not rule.matches(method, path):
                continue
            if rule.skip > 0:
                rule.skip -= 1
                continue
            rule.times -= 1
            return rule
        return None

    @staticmethod
    def _raise_rule(rule: _FailureRule) -> None:
        if rule.drop:
            raise _Drop()
        raise _HubError(rule.status, rule.message, rule.error_code)

    def _route(self, method: str, raw_path: str, body: bytes, auth: str | None, range_header: str | None) -> _Response:
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        # Split before unquoting: revisions are quoted with safe="" ("refs/pr/1" -> "refs%2Fpr%2F1").
        segs = [unquote(s) for s in split.path.split("/")[1:]]

        # Internal "S3" routes: no Authorization, like presigned URLs.
        if segs[:2] == ["__fakehub__", "lfs"] and len(segs) >= 3:
            return self._lfs_storage(method, segs[2:], body)

        user = self._user_for(auth)  # raises 401 for an unknown token
        with self._lock:
            if segs[:1] == ["api"]:
                return self._route_api(method, segs[1:], query, body, user)
            if len(segs) >= 5 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
                return self._route_lfs(method, f"{segs[0]}/{segs[1][:-4]}", segs[5:], body, user)
            if len(segs) >= 4 and segs[0].endswith(".git") and segs[1:4] == ["info", "lfs", "objects"]:
                return self._route_lfs(method, segs[0][:-4], segs[4:], body, user)
            if segs[:1] in (["datasets"], ["spaces"], ["kernels"]):
                raise _HubError(404, "Repository not found", "RepoNotFound")
            for idx in (2, 1):  # /{ns}/{name}/resolve/... or canonical /{name}/resolve/...
                if len(segs) > idx + 2 and segs[idx] == "resolve":
                    if method not in ("GET", "HEAD"):
                        raise _HubError(405, "Method not allowed")
                    repo_id = "/".join(segs[:idx])
                    return self._resolve_file(
                        method, repo_id, segs[idx + 1], "/".join(segs[idx + 2 :]), user, range_header
                    )
        raise _HubError(404, f"Not found: {method} {split.path}")

    def _route_api(self, method: str, segs: list[str], query: dict, body: bytes, user) -> _Response:
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami(user)
        if segs == ["agent-harnesses"] and method == "GET":
            return _json_response({"standardEnvVars": [], "harnesses": {}})
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(_json(body))
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(_json(body), user)
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(_json(body), user)
        if segs[:1] in (["datasets"], ["spaces"], ["kernels"]):
            raise _HubError(404, "Repository not found (FakeHub only serves model repos)", "RepoNotFound")
        if segs[:1] != ["models"] or len(segs) < 2:
            raise _HubError(404, f"Not found: /api/{'/'.join(segs)}")

        rest = segs[1:]
        if len(rest) >= 2 and rest[1] not in _API_REPO_SUBPATHS:
            repo_id, rest = f"{rest[0]}/{rest[1]}", rest[2:]
        else:
            repo_id, rest = rest[0], rest[1:]
        action = rest[0] if rest else None
        arg = rest[1] if len(rest) > 1 else None
        extra = "/".join(rest[2:])

        if action is None and method == "GET":
            return self._model_info(repo_id, "main", query, user)
        if action == "revision" and arg is not None and method == "GET":
            return self._model_info(repo_id, arg, query, user)
        if action == "tree" and arg is not None and method == "GET":
            return self._tree(repo_id, arg, extra, query, user)
        if action == "paths-info" and arg is not None and method == "POST":
            return self._paths_info(repo_id, arg, body, user)
        if action == "refs" and method == "GET":
            return self._refs(repo_id, query, user)
        if action == "commits" and arg is not None and method == "GET":
            return self._list_commits(repo_id, arg, user)
        if action == "branch" and arg is not None and method in ("POST", "DELETE"):
            return self._branch(method, repo_id, arg, body, user)
        if action == "settings" and method == "PUT":
            return self._settings(repo_id, _json(body), user)
        if action == "preupload" and arg is not None and method == "POST":
            return self._preupload(repo_id, arg, _json(body), query, user)
        if action == "commit" and arg is not None and method == "POST":
            return self._commit(repo_id, arg, body, query, user)
        if action in ("xet-read-token", "xet-write-token"):
            self._repo_for_read(repo_id, user)
            raise _HubError(
                501,
                "FakeHub does not implement Xet storage: set HF_HUB_DISABLE_XET=1 "
                "(monkeypatch huggingface_hub.constants.HF_HUB_DISABLE_XET = True) so uploads use git-LFS",
            )
        raise _HubError(404, f"Not found: {method} /api/models/{repo_id}/{'/'.join(rest)}")

    # ---- auth helpers --------------------------------------------------------------------------

    def _user_for(self, auth: str | None) -> tuple[str, bool] | None:
        """(user, can_write) for the request's token, None if anonymous, 401 if unknown."""
        if auth is None:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        with self._lock:
            known = self._tokens.get(token)
        if known is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return known

    def _repo_or_raise(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise KeyError(f"FakeHub has no repo {repo_id!r} (repos: {sorted(self._repos)})")
        return repo

    def _repo_for_read(self, repo_id: str, user) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            # The Hub answers 401 to anonymous callers so as not to reveal whether a repo exists.
            raise _HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_id: str, user) -> _Repo:
        repo = self._repo_for_read(repo_id, user)
        if user is None:
            raise _HubError(401, "You must be authenticated to write to this repo", "RepoNotFound")
        if not user[1]:
            raise _HubError(403, f"You don't have the rights to write to {repo_id} (read-only token)")
        return repo

    def _check_gate(self, repo: _Repo, user) -> None:
        if not repo.gated or (user is not None and user[0] in repo.granted):
            return
        if user is None:
            raise _HubError(
                401,
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
                "GatedRepo",
            )
        raise _HubError(
            403,
            f"Access to model {repo.repo_id} is restricted and you are not in the authorized "
            "list. Visit the repo page to ask for access.",
            "GatedRepo",
        )

    def _resolve(self, repo: _Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.pr_refs:
            return repo.pr_refs[revision]
        if revision in repo.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):  # abbreviated commit id
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def _commit_at(self, repo: _Repo, revision: str) -> CommitRecord:
        oid = self._resolve(repo, revision)
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # ---- repo lifecycle ------------------------------------------------------------------------

    def _new_repo(self, repo_id: str, *, private: bool, author: str | None) -> _Repo:
        repo = _Repo(repo_id=repo_id, private=private)
        self._repos[repo_id] = repo
        files = (
            {".gitattributes": _Blob.make(DEFAULT_GITATTRIBUTES.encode(), False)} if self.initial_gitattributes else {}
        )
        self._record_commit(
            repo,
            "main",
            files,
            "initial commit",
            "",
            "system" if author is None else author,
            None,
            list(files),
            [],
        )
        return repo

    def _record_commit(
        self,
        repo: _Repo,
        ref: str,
        files: dict[str, _Blob],
        message: str,
        description: str,
        author: str | None,
        parent: str | None,
        added: list[str],
        deleted: list[str],
    ) -> CommitRecord:
        oid = secrets.token_hex(20)  # a fresh 40-hex commit id
        commit = CommitRecord(
            oid=oid,
            message=message,
            description=description,
            branch=ref,
            author=author,
            parent=parent,
            date=_now_iso(),
            files=files,
            added=added,
            deleted=deleted,
        )
        repo.commits[oid] = commit
        repo.order.append(oid)
        if ref.startswith("refs/pr/"):
            repo.pr_refs[ref] = oid
        else:
            repo.branches[ref] = oid
        return commit

    def _whoami(self, user) -> _Response:
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        name, can_write = user
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": name,
                "email": f"{name}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "fakehub", "role": "write" if can_write else "read"},
                },
            }
        )

    @staticmethod
    def _validate_yaml(payload: dict) -> _Response:
        """Model card check done before any commit touching README.md: the YAML front matter must parse
        to a mapping (400 + {"errors": [...]} -> huggingface_hub raises ValueError)."""
        import yaml  # a huggingface_hub dependency

        content = str(payload.get("content", ""))
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"Invalid YAML in README.md: {exc}"})
        status = 400 if errors else 200
        return _json_response({"errors": errors, "warnings": []}, status)

    def _create_repo(self, payload: dict, user) -> _Response:
        if user is None:
            raise _HubError(401, "You must be authenticated to create a repo")
        if payload.get("type") not in (None, "model"):
            raise _HubError(400, "FakeHub only supports model repos")
        name, namespace = payload.get("name"), payload.get("organization") or user[0]
        if not (isinstance(name, str) and _REPO_PART.match(name) and _REPO_PART.match(namespace)):
            raise _HubError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self._repos:
            # huggingface_hub reads "url" from the 409 body when exist_ok=True.
            return _json_response(
                {"error": "You already created this model repo", "url": url},
                409,
                {"X-Error-Message": "You already created this model repo"},
            )
        if not user[1]:
            raise _HubError(403, "You don't have the rights to create a repo (read-only token)")
        visibility = payload.get("visibility")
        private = visibility == "private" if visibility is not None else bool(payload.get("private", False))
        self._new_repo(repo_id, private=private, author=user[0])
        return _json_response({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _delete_repo(self, payload: dict, user) -> _Response:
        name, namespace = payload.get("name"), payload.get("organization") or (user[0] if user else None)
        repo_id = f"{namespace}/{name}" if namespace else str(name)
        self._repo_for_write(repo_id, user)
        del self._repos[repo_id]
        return _Response(200)

    def _settings(self, repo_id: str, payload: dict, user) -> _Response:
        repo = self._repo_for_write(repo_id, user)
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "gated" in payload:
            repo.gated = payload["gated"]
        return _json_response({})

    # ---- reads ---------------------------------------------------------------------------------

    def _model_info(self, repo_id: str, revision: str, query: dict, user) -> _Response:
        repo = self._repo_for_read(repo_id, user)
        commit = self._commit_at(repo, revision)
        with_blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(blob.content), blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {
                        "size": len(blob.content),
                        "sha256": blob.sha256,
                        "pointerSize": blob.pointer_size,
                    }
            siblings.append(sibling)
        namespace = repo_id.split("/")[0] if "/" in repo_id else None
        return _json_response(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": namespace,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": repo.gated,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": None,
                "siblings": siblings,
            }
        )

    def _tree_entries(self, commit: CommitRecord, prefix: str, recursive: bool) -> list[dict]:
        base = prefix.strip("/")
        base_slash = f"{base}/" if base else ""
        files = {p: b for p, b in commit.files.items() if p.startswith(base_slash)}
        if base and not files:
            if base in commit.files:  # the path is a file, not a folder
                raise _HubError(404, f"{base} is a file, not a folder", "EntryNotFound")
            raise _HubError(404, f"Folder {base} does not exist", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path, blob in sorted(files.items()):
            rel_parts = path[len(base_slash) :].split("/")
            # folders on the way to this file
            for depth in range(1, len(rel_parts)):
                if not recursive and depth > 1:
                    break
                folder = base_slash + "/".join(rel_parts[:depth])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "path": folder,
                        "size": 0,
                        "oid": hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest(),
                    },
                )
            if recursive or len(rel_parts) == 1:
                entries[path] = _file_entry(path, blob)
        return list(entries.values())

    def _tree(self, repo_id: str, revision: str, path: str, query: dict, user) -> _Response:
        repo = self._repo_for_read(repo_id, user)
        commit = self._commit_at(repo, revision)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        # Single page: no "Link: <...>; rel=next" header, so huggingface_hub stops paginating.
        return _json_response(self._tree_entries(commit, path, recursive))

    def _paths_info(self, repo_id: str, revision: str, body: bytes, user) -> _Response:
        repo = self._repo_for_read(repo_id, user)
        commit = self._commit_at(repo, revision)
        form = parse_qs(body.decode())
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(_file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(
                    {
                        "type": "directory",
                        "path": path,
                        "size": 0,
                        "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest(),
                    }
                )
        return _json_response(out)

    def _refs(self, repo_id: str, query: dict, user) -> _Response:
        repo = self._repo_for_read(repo_id, user)
        return _json_response(
            {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                    for b, oid in sorted(repo.branches.items())
                ],
                "converts": [],
                "tags": [],
                "pullRequests": [{"name": r, "ref": r, "targetCommit": oid} for r, oid in sorted(repo.pr_refs.items())],
            }
        )

    def _list_commits(self, repo_id: str, revision: str, user) -> _Response:
        repo = self._repo_for_read(repo_id, user)
        oid: str | None = self._commit_at(repo, revision).oid
        items = []
        while oid is not None:
            c = repo.commits[oid]
            items.append(
                {
                    "id": c.oid,
                    "title": c.message,
                    "message": c.description,
                    "date": c.date,
                    "authors": [{"user": c.author or "system"}],
                }
            )
            oid = c.parent
        return _json_response(items)  # newest first, one page

    def _resolve_file(self, method: str, repo_id: str, revision: str, path: str, user, range_header) -> _Response:
        repo = self._repo_for_read(repo_id, user)
        commit = self._commit_at(repo, revision)
        common = {"X-Repo-Commit": commit.oid}
        self._check_gate(repo, user)  # gated: no file content (nor its absence) without access
        blob = commit.files.get(path)
        if blob is None:
            # X-Repo-Commit lets huggingface_hub cache the non-existence (.no_exist/<commit>/<path>).
            raise _HubError(404, "Entry not found", "EntryNotFound", headers=common)
        name = quote(path.rsplit("/", 1)[-1])
        headers = {
            **common,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\";",
        }
        if blob.lfs:
            # The real Hub redirects LFS files to a CDN and puts the file's identity in these headers.
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.content))
        data = blob.content
        if range_header and method == "GET":
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
            if m and (m.group(1) or m.group(2)):
                size = len(data)
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start, end = max(size - int(m.group(2)), 0), size - 1
                if start >= size or start > end:
                    raise _HubError(
                        416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                    )
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return _Response(206, data[start : end + 1], headers)
        # For HEAD the body is not written, but it still sets Content-Length.
        return _Response(200, data, headers)

    # ---- writes --------------------------------------------------------------------------------

    def _branch(self, method: str, repo_id: str, branch: str, body: bytes, user) -> _Response:
        repo = self._repo_for_write(repo_id, user)
        if method == "DELETE":
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise _HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _json_response({})
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        if not branch or branch.startswith("refs/") or ".." in branch:
            raise _HubError(400, f"Invalid branch name: {branch}")
        payload = _json(body) if body else {}
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = self._commit_at(repo, start).oid
        return _json_response({})

    def _upload_mode(self, tree: dict[str, _Blob], path: str, size: int, sample: bytes) -> str:
        """Regular git blob or LFS: like the Hub, by .gitattributes patterns, size and binary sniffing."""
        if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
            return "lfs"
        gitattributes = tree.get(".gitattributes")
        text = gitattributes.content.decode(errors="replace") if gitattributes else ""
        name = path.rsplit("/", 1)[-1]
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                pattern = parts[0]
                target = path if "/" in pattern else name
                if fnmatch.fnmatchcase(target, pattern):
                    return "lfs"
        return "regular"

    def _preupload(self, repo_id: str, revision: str, payload: dict, query: dict, user) -> _Response:
        repo = self._repo_for_write(repo_id, user)
        commit = self._commit_at(repo, revision)
        out = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f["size"])
            sample = base64.b64decode(f.get("sample", ""))
            mode = self._upload_mode(commit.files, path, size, sample)
            existing = commit.files.get(path)
            # `oid` lets the client skip unchanged files: sha256 for LFS, git blob sha1 otherwise.
            oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.git_oid)
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json_response({"files": out, "commitOid": commit.oid})

    def _route_lfs(self, method: str, repo_id: str, rest: list[str], body: bytes, user) -> _Response:
        if method != "POST" or rest not in (["batch"], ["verify"]):
            raise _HubError(404, "Not found")
        repo = self._repo_for_write(repo_id, user)
        payload = _json(body)
        if rest == ["verify"]:
            if repo.lfs_objects.get(payload.get("oid"), None) is None:
                raise _HubError(404, f"LFS object {payload.get('oid')} not found")
            return _json_response({})
        if payload.get("operation") != "upload":
            raise _HubError(422, "FakeHub only implements the LFS 'upload' operation")
        multipart = "multipart" in payload.get("transfers", []) and self.multipart_chunk_size
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                objects.append(
                    {
                        "oid": str(oid),
                        "size": int(size or 0),
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            stored = repo.lfs_objects.get(oid)
            if stored is not None and len(stored) == size:
                objects.append({"oid": oid, "size": size})  # no "actions": already uploaded
                continue
            upload_id = secrets.token_hex(16)
            self._uploads[upload_id] = _Upload(repo_id=repo_id, oid=oid, size=size)
            base = f"{self.url}/__fakehub__/lfs/{upload_id}"
            verify = {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}}
            if multipart and size > self.multipart_chunk_size:
                chunk = self.multipart_chunk_size
                nparts = -(-size // chunk)
                header = {
                    "chunk_size": str(chunk),
                    **{str(n): f"{base}/part/{n}" for n in range(1, nparts + 1)},
                }
                upload = {"href": f"{base}/complete", "header": header, "expires_in": 3600}
            else:
                upload = {"href": base, "header": {}, "expires_in": 3600}
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {"upload": upload, "verify": verify},
                }
            )
        return _json_response(
            {"transfer": "multipart" if multipart else "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_storage(self, method: str, rest: list[str], body: bytes) -> _Response:
        """The fake object store behind the LFS upload URLs (stands in for S3 presigned URLs)."""
        with self._lock:
            upload = self._uploads.get(rest[0])
            if upload is None:
                raise _HubError(403, "Invalid or expired upload URL")
            if method == "PUT" and len(rest) == 1:
                self._store_lfs(upload, body)
                del self._uploads[rest[0]]
                return _Response(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            if method == "PUT" and len(rest) == 3 and rest[1] == "part":
                upload.parts[int(rest[2])] = body
                return _Response(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            if method == "POST" and rest[1:] == ["complete"]:
                payload = _json(body)
                numbers = [p["partNumber"] for p in payload.get("parts", [])]
                if numbers != sorted(upload.parts) or payload.get("oid") != upload.oid:
                    raise _HubError(400, "Completion does not match the uploaded parts")
                for part in payload["parts"]:
                    expected = f'"{hashlib.md5(upload.parts[part["partNumber"]]).hexdigest()}"'
                    if part["etag"] != expected:
                        raise _HubError(400, f"Bad etag for part {part['partNumber']}")
                self._store_lfs(upload, b"".join(upload.parts[n] for n in sorted(upload.parts)))
                del self._uploads[rest[0]]
                return _json_response({})
        raise _HubError(405, "Method not allowed")

    def _store_lfs(self, upload: _Upload, data: bytes) -> None:
        if len(data) != upload.size or hashlib.sha256(data).hexdigest() != upload.oid:
            raise _HubError(400, "Uploaded content does not match the announced oid/size")
        repo = self._repos.get(upload.repo_id)
        if repo is not None:
            repo.lfs_objects[upload.oid] = data

    def _commit(self, repo_id: str, revision: str, body: bytes, query: dict, user) -> _Response:
        repo = self._repo_for_write(repo_id, user)
        base = self._commit_at(repo, revision)
        create_pr = query.get("create_pr") in ("1", "true", "True")
        if not create_pr and revision not in repo.branches and revision not in repo.pr_refs:
            raise _HubError(400, f"Cannot commit to {revision}: not a branch (commit to a branch or use create_pr)")

        try:  # NDJSON: one {"key": ..., "value": ...} object per line, the header first
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HubError(400, f"Invalid NDJSON commit payload: {exc}") from exc
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "First NDJSON line must be the commit header")
        header = lines[0]["value"]
        summary = header.get("summary") or ""
        if not summary.strip():
            raise _HubError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")
        if parent_commit and not base.oid.startswith(parent_commit):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")

        tree = dict(base.files)
        added: list[str] = []
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _check_path(value.get("path", ""))
            if key == "file":
                encoding = value.get("encoding", "utf-8")
                content = value.get("content", "")
                data = base64.b64decode(content) if encoding == "base64" else content.encode()
                tree[path] = _Blob.make(data, False)
                added.append(path)
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise _HubError(400, "Only sha256 LFS objects are supported")
                data = repo.lfs_objects.get(value.get("oid"))
                if data is None:
                    raise _HubError(422, f"LFS object {value.get('oid')} for {path} was never uploaded")
                if value.get("size") is not None and int(value["size"]) != len(data):
                    raise _HubError(422, f"LFS object size mismatch for {path}")
                tree[path] = _Blob.make(data, True)
                added.append(path)
            elif key == "deletedFile":
                if path not in tree:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
                deleted.append(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                gone = [p for p in tree if p.startswith(prefix)]
                if not gone:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
                deleted.extend(gone)
            else:
                raise _HubError(400, f"Unknown commit operation: {key}")

        ref = revision
        pr_num = None
        if create_pr:
            pr_num = len(repo.pr_refs) + 1
            ref = f"refs/pr/{pr_num}"
        commit = self._record_commit(
            repo, ref, tree, summary, header.get("description") or "", user[0], base.oid, added, deleted
        )
        out = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if pr_num is not None:
            out["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{pr_num}"
        return _json_response(out)


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise _HubError(400, f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise _HubError(400, "JSON body must be an object")
    return data


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.rstrip("/").split("/")):
        raise _HubError(400, f"Invalid path in commit: {path!r}")
    if path.split("/")[0] == ".git":
        raise _HubError(400, f"Invalid path in commit: {path!r}")
    return path


# --------------------------------------------------------------------------------------------
# Wiring huggingface_hub to a FakeHub
# --------------------------------------------------------------------------------------------

# Env vars that would make a test reach the real Hub, use the real cache/token, or go offline.
_ENV_TO_CLEAR = tuple(
    """
    HF_TOKEN HUGGING_FACE_HUB_TOKEN HF_TOKEN_PATH HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HF_HUB_CACHE
    HUGGINGFACE_HUB_CACHE HF_ASSETS_CACHE HUGGINGFACE_ASSETS_CACHE HF_XET_CACHE HF_HUB_ENABLE_HF_TRANSFER
    HUGGINGFACE_CO_STAGING HF_OIDC_RESOURCE HF_HUB_DISABLE_IMPLICIT_TOKEN TRANSFORMERS_CACHE XDG_CACHE_HOME
    """.split()
)


def _file_entry(path: str, blob: Any) -> dict[str, Any]:
    """A file as the tree and paths-info endpoints describe it (with its LFS pointer, if any)."""
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(blob.content), "oid": blob.git_oid}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content), "pointerSize": blob.pointer_size}
    return entry


def use_fake_hub(
    monkeypatch: pytest.MonkeyPatch,
    hub: FakeHub,
    hf_home: str | os.PathLike[str],
    *,
    token: str | None = None,
) -> Path:
    """Point huggingface_hub (already imported or not, this process and subprocesses) at `hub`.

    Caches, token file and xet cache go under `hf_home` (created). `token`, if given, is exported
    as HF_TOKEN; otherwise no token is configured anywhere. Everything is undone by monkeypatch.
    Returns the hub cache dir (`hf_home/hub`)."""
    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    return point_huggingface_hub(monkeypatch, hub.url, home, env=hub.env(home, token), offline=False)


def point_huggingface_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, *,
                          env: dict[str, str], offline: bool) -> Path:
    """Set `env` (after clearing HF settings that would escape it) and patch the constants that
    huggingface_hub read from the environment at import: endpoint, caches, token paths, offline.
    Returns the hub cache dir (`home/hub`)."""
    from huggingface_hub import constants, hf_api

    for name in _ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    hub_cache = home / "hub"
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "default_cache_path": str(hub_cache),
        "default_assets_cache_path": str(home / "assets"),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "default_xet_cache_path": str(home / "xet"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_XET": True,  # no Xet/CAS here: uploads must use git-LFS
        "HF_HUB_DISABLE_TELEMETRY": True,  # else the first request fetches {ENDPOINT}/api/agent-harnesses
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "_staging_mode": False,
    }
    for name, value in patched.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # Module-level functions (huggingface_hub.upload_folder, ...) are bound to an HfApi() made at import.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # Modules that copied a constant by value at import time.
    from huggingface_hub.utils import _cache_manager

    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub.utils import _cache_assets

        monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(home / "assets"))
    return hub_cache


class _NoSleepTime:
    """Stand-in for the `time` module inside huggingface_hub: same API, `sleep` returns at once."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(_seconds: float) -> None:
        return None


def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove huggingface_hub's retry back-off sleeps (1+2+4+8+8 s on 5xx) for this test only.

    Patches the `time` name inside huggingface_hub.utils._http and file_download, not the global
    time module."""
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", _NoSleepTime())
    monkeypatch.setattr(file_download, "time", _NoSleepTime())


@contextlib.contextmanager
def running_hub(token: str | None = DEFAULT_TOKEN, **kwargs: Any) -> Iterator[FakeHub]:
    """`with running_hub("hf_x") as hub:` -- a started FakeHub, stopped on exit."""
    hub = FakeHub(token=token, **kwargs)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A started FakeHub (token "hf_test_secret", user "fake-user") wired in with `use_fake_hub`,
    HF_HOME = tmp_path / "hf_home". No token is configured client-side."""
    with running_hub() as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hf_home")
        yield hub
