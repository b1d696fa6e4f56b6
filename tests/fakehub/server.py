"""`FakeHub`: a threaded HTTP server on 127.0.0.1 that serves the fake's repos (routes.py), records
every request (the Authorization value redacted) and fails on demand.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from fakehub import routes
from fakehub.repos import Blob, CommitRecord, Repo, new_repo
from fakehub.routes import HubError, Response, json_response, parse_json

DEFAULT_TOKEN = "hf_test_secret"
_SLICE = 256 * 1024  # a throttled body is sent in pieces of this size
DEFAULT_USER = "fake-user"
# Env vars that would make a test reach the real hub, use the real cache or token, or go offline.
ENV_TO_CLEAR = tuple("""
    HF_TOKEN HUGGING_FACE_HUB_TOKEN HF_TOKEN_PATH HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HF_HUB_CACHE
    HUGGINGFACE_HUB_CACHE HF_ASSETS_CACHE HUGGINGFACE_ASSETS_CACHE HF_XET_CACHE HF_HUB_ENABLE_HF_TRANSFER
    HUGGINGFACE_CO_STAGING HF_HUB_DISABLE_IMPLICIT_TOKEN TRANSFORMERS_CACHE XDG_CACHE_HOME
""".split())


@dataclass
class RequestRecord:
    """One request received; `headers` has the Authorization value replaced by "<redacted>"."""

    method: str
    path: str  # raw path + query, as sent
    headers: dict[str, str]
    status: int | None = None  # None: the connection was dropped
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass
class _FailureRule:
    method: str | None
    path: re.Pattern[str] | None
    status: int
    drop: bool
    skip: int
    times: int
    cut: int | None = None  # answer, but send only this many bytes of the body, then close
    reset: bool = False  # ... then reset the connection (RST) instead of closing it
    retry_after: str | None = None  # with `status`: a Retry-After header
    stall: float = 0.0  # with `cut`: after those bytes, wait this long, then send the rest (no close)
    shift: int = 0  # answer a Range request with the range this many bytes further on (a faulty proxy)

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or self.method.upper() == method)
                and (self.path is None or self.path.search(path) is not None))


class _Drop(Exception):
    """Close the connection without an answer."""


class FakeHub:
    """An in-memory stand-in for huggingface.co (model repos only); see fakehub/__init__.py."""

    def __init__(self, token: str | None = DEFAULT_TOKEN, user: str = DEFAULT_USER):
        self.token, self.user = token, user
        self.tokens: dict[str, tuple[str, bool]] = {token: (user, True)} if token else {}  # → (user, can write)
        self.repos: dict[str, Repo] = {}
        self.uploads: dict[str, routes.Upload] = {}
        self._lock = threading.RLock()
        self._requests: list[RequestRecord] = []
        self._auth_headers: list[str] = []
        self._fail_all: HubError | None = None
        self._rules: list[_FailureRule] = []
        self._server: _Server | None = None
        self._rate: float | None = None
        self._latency = 0.0
        self._link_free = 0.0  # when the throttled link is next free (time.monotonic)
        self._link_lock = threading.Lock()
        self.bytes_sent = 0  # response bodies sent, in all

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is None:
            self._server = _Server(self)
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            for sock in list(self._server.open_sockets):  # end idle keep-alive connections
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The HF_ENDPOINT value, e.g. http://127.0.0.1:54321."""
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self, hf_home: str | os.PathLike[str], token: str | None = None) -> dict[str, str]:
        """The variables a process needs to use this hub (the cache in `hf_home`)."""
        env = {"HF_ENDPOINT": self.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "0"}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def subprocess_env(self, hf_home: str | os.PathLike[str], token: str | None = None) -> dict[str, str]:
        """A whole environment for `subprocess.run`: os.environ without hub settings, plus `env()`."""
        return {**{k: v for k, v in os.environ.items() if k not in ENV_TO_CLEAR}, **self.env(hf_home, token)}

    # ---- seeding --------------------------------------------------------------------------------

    def add_token(self, token: str, user: str, *, write: bool = True) -> None:
        with self._lock:
            self.tokens[token] = (user, write)

    def add_repo(self, repo_id: str, files: dict[str, bytes | str] | None = None, *, private: bool = False) -> str:
        """Create a repo (with a first commit of `files`); returns its head commit."""
        with self._lock:
            self.repos[repo_id] = new_repo(repo_id, private=private, author=None)
            return self.add_commit(repo_id, files) if files else self.head(repo_id)

    def add_commit(self, repo_id: str, files: dict[str, bytes | str], *, branch: str = "main") -> str:
        """Commit `files` (path → content) on `branch`; returns the commit oid."""
        with self._lock:
            repo = self.repos[repo_id]
            tree = dict(repo.commits[repo.branches.get(branch, repo.branches["main"])].files)
            for path, content in files.items():
                data = content.encode() if isinstance(content, str) else bytes(content)
                lfs = repo.upload_mode(tree, path, len(data), data[:512]) == "lfs"
                tree[path] = Blob(data, lfs)
                if lfs:
                    repo.lfs_objects[tree[path].sha256] = data
            return repo.record_commit(branch, tree, "Add files", None).oid

    def set_private(self, repo_id: str, private: bool = True) -> None:
        self.repos[repo_id].private = private

    def set_gated(self, repo_id: str) -> None:
        self.repos[repo_id].gated = "manual"

    def grant_access(self, repo_id: str, user: str | None = None) -> None:
        self.repos[repo_id].granted.add(user or self.user)

    # ---- inspection -----------------------------------------------------------------------------

    def repo_exists(self, repo_id: str) -> bool:
        return repo_id in self.repos

    def is_private(self, repo_id: str) -> bool:
        return self.repos[repo_id].private

    def branches(self, repo_id: str) -> list[str]:
        return sorted(self.repos[repo_id].branches)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of the repo at `revision`: path → bytes."""
        repo = self.repos[repo_id]
        return {path: blob.content for path, blob in repo.commits[repo.resolve(revision)].files.items()}

    def is_lfs(self, repo_id: str, path: str, revision: str = "main") -> bool:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)].files[path].lfs

    def lfs_objects(self, repo_id: str) -> dict[str, bytes]:
        """Every LFS object uploaded to the repo, committed or not."""
        return dict(self.repos[repo_id].lfs_objects)

    def commits(self, repo_id: str) -> list[CommitRecord]:
        """Commits, oldest first."""
        return list(self.repos[repo_id].commits.values())

    def last_commit(self, repo_id: str, branch: str = "main") -> CommitRecord:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[branch]]

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    @property
    def auth_headers(self) -> list[str]:
        """Raw Authorization values received (where a token legitimately travels)."""
        with self._lock:
            return list(self._auth_headers)

    def request_log_text(self) -> str:
        """Every request line and header, the Authorization value redacted: where no secret may appear."""
        return "\n".join(f"{r.method} {r.path}" + "".join(f"\n{k}: {v}" for k, v in r.headers.items())
                         for r in self.requests)

    def requests_matching(self, method: str | None = None, path: str | None = None) -> list[RequestRecord]:
        """Requests of `method` whose path matches the regex `path`."""
        return [r for r in self.requests
                if (method is None or r.method == method.upper()) and (path is None or re.search(path, r.path))]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._auth_headers.clear()

    # ---- failures -------------------------------------------------------------------------------

    def fail_all(self, status: int, *, error_code: str | None = None, message: str | None = None) -> None:
        """Answer every request with `status` (and `X-Error-Code: error_code`) until `clear_failures`."""
        self._fail_all = HubError(status, message or f"Simulated failure ({status})", error_code)

    def fail_next(self, path: str | None = None, *, method: str | None = None, status: int = 500,
                  drop: bool = False, skip: int = 0, times: int = 1, cut: int | None = None, reset: bool = False,
                  retry_after: str | None = None, stall: float = 0.0, shift: int = 0) -> None:
        """Make the (skip+1)-th request matching (`method`, regex `path`) fail `times` times: with
        `status` (and `retry_after`), by closing the connection without an answer (`drop`), by
        answering and sending only `cut` bytes of the body before closing (or resetting: `reset`) it,
        or before pausing `stall` seconds and sending the rest; or (`shift`) by answering a Range
        request with the bytes, and the Content-Range, `shift` bytes further on."""
        with self._lock:
            self._rules.append(_FailureRule(method, re.compile(path) if path else None, status, drop, skip, times,
                                            cut, reset, retry_after, stall, shift))

    def tamper(self, repo_id: str, path: str, offset: int, revision: str = "main") -> None:
        """Flip one byte of a stored LFS file's content, the hub still claiming the original's sha256."""
        with self._lock:
            repo = self.repos[repo_id]
            files = repo.commits[repo.resolve(revision)].files
            blob = files[path]
            content = bytearray(blob.content)
            content[offset] ^= 0xFF
            files[path] = Blob(bytes(content), blob.lfs, claimed_sha256=blob.sha256)

    def throttle(self, bytes_per_second: float | None, latency: float = 0.0) -> None:
        """Serve file bodies at `bytes_per_second` in all (one link, shared by every connection), each
        answer after `latency` seconds; None: as fast as possible."""
        with self._lock:
            self._rate, self._latency, self._link_free = bytes_per_second, latency, 0.0

    def interrupt_commit(self, *, drop: bool = True, status: int = 500) -> None:
        """Make the next commit fail (after its LFS uploads went through)."""
        self.fail_next(r"^/api/models/.+/commit/", method="POST", drop=drop, status=status)

    def clear_failures(self) -> None:
        with self._lock:
            self._fail_all = None
            self._rules.clear()

    # ---- serving --------------------------------------------------------------------------------

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        method, raw_path = handler.command, handler.path
        body = handler.read_body()
        auth = handler.headers.get("Authorization")
        headers = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in handler.headers.items()}
        record = RequestRecord(method, raw_path, headers)
        with self._lock:
            self._requests.append(record)
            if auth is not None:
                self._auth_headers.append(auth)
            rule = self._pick_rule(method, urlsplit(raw_path).path)
        try:
            if self._fail_all is not None:
                raise self._fail_all
            if rule is not None and rule.cut is None and not rule.shift:
                if rule.drop:
                    raise _Drop()
                raise HubError(rule.status, f"Simulated failure ({rule.status})",
                               headers={"Retry-After": rule.retry_after} if rule.retry_after else None)
            range_header = handler.headers.get("Range")
            if rule is not None and rule.shift and range_header:
                range_header = re.sub(r"\d+", lambda m: str(int(m.group()) + rule.shift), range_header)
            with self._lock:
                response = self._route(method, raw_path, body, auth, range_header)
        except _Drop:
            handler.close_connection = True
            return
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            response = json_response({"error": err.message}, err.status, headers)
            if err.code:
                response.headers["X-Error-Code"] = err.code
        record.status = response.status
        if rule is not None and rule.cut is not None and not rule.stall:
            response.headers["Connection"] = "close"
        handler.send_response(response.status)
        response.headers.setdefault("Content-Length", str(len(response.body)))
        response.headers.setdefault("X-Request-Id", secrets.token_hex(8))
        for key, value in response.headers.items():
            handler.send_header(key, str(value).encode("latin-1", "replace").decode("latin-1"))
        if self._rate and method == "GET" and len(response.body) > 4096:
            time.sleep(self._latency)
        handler.end_headers()
        body = response.body if method != "HEAD" else b""
        with self._link_lock:
            self.bytes_sent += len(body) if rule is None or rule.cut is None else min(rule.cut, len(body))
        if rule is not None and rule.stall:  # the body stalls, then goes on (if anyone still listens)
            handler.wfile.write(body[:rule.cut])
            handler.wfile.flush()
            time.sleep(rule.stall)
            handler.wfile.write(body[rule.cut:])
            return
        if rule is not None and rule.cut is not None:
            handler.wfile.write(body[:rule.cut])
            handler.wfile.flush()
            if rule.reset:  # an RST, as a dropped link or a proxy gives
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            return
        if self._rate and len(body) > 4096:
            self._send_throttled(handler, body)
        elif body:
            handler.wfile.write(body)

    def _send_throttled(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        view = memoryview(body)
        for start in range(0, len(view), _SLICE):
            piece = view[start:start + _SLICE]
            with self._link_lock:  # the piece's turn on the shared link
                now = time.monotonic()
                begin = max(now, self._link_free)
                self._link_free = begin + len(piece) / self._rate
            if self._link_free > now:
                time.sleep(self._link_free - now)
            handler.wfile.write(piece)

    def _pick_rule(self, method: str, path: str) -> _FailureRule | None:
        for rule in self._rules:
            if rule.times > 0 and rule.matches(method, path):
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                rule.times -= 1
                return rule
        return None

    def _user(self, auth: str | None) -> routes.User:
        if auth is None:
            return None
        known = self.tokens.get(auth.removeprefix("Bearer ").strip())
        if known is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return known

    def _route(self, method: str, raw_path: str, body: bytes, auth: str | None, range_header: str | None) -> Response:
        # Split before unquoting: a revision is quoted whole ("a/b" → "a%2Fb").
        segs = [unquote(s) for s in urlsplit(raw_path).path.split("/")[1:]]
        if segs[:2] == ["__fakehub__", "lfs"] and method == "PUT":
            return routes.lfs_store(self, segs[2], body)
        user = self._user(auth)
        api = (method, *segs[:2])
        if api == ("GET", "api", "whoami-v2"):
            return routes.whoami(self, user)
        if api == ("POST", "api", "validate-yaml"):
            return routes.validate_yaml(parse_json(body))
        if segs[:3] == ["api", "repos", "create"] and method == "POST":
            return routes.create_repo(self, parse_json(body), user)
        canonical = len(segs) >= 3 and (segs[2] in self.repos or segs[3:4] in (["revision"], ["tree"]))
        if segs[:2] == ["api", "models"] and canonical:  # a canonical repo id, such as "gpt2"
            segs = [*segs[:2], "", *segs[2:]]
        if segs[:2] == ["api", "models"] and len(segs) >= 4:
            repo_id, action, rest = "/".join(filter(None, segs[2:4])), segs[4:5], segs[5:]
            revision = rest[0] if rest else "main"
            if method == "GET" and action in ([], ["revision"]):
                return routes.model_info(self, repo_id, revision, user)
            if method == "GET" and action == ["tree"]:
                return routes.tree(self, repo_id, revision, user)
            if method == "POST" and action == ["branch"]:
                return routes.create_branch(self, repo_id, revision, body, user)
            if method == "POST" and action == ["preupload"]:
                return routes.preupload(self, repo_id, revision, parse_json(body), user)
            if method == "POST" and action == ["commit"]:
                return routes.commit(self, repo_id, revision, body, user)
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{segs[0]}/{segs[1][:-4]}"
            if segs[5] == "batch":
                return routes.lfs_batch(self, repo_id, parse_json(body), user)
            return routes.lfs_verify(self, repo_id, parse_json(body), user)
        if len(segs) > 3 and segs[1] == "resolve" and segs[0] in self.repos:  # a canonical repo: "gpt2"
            segs = ["", *segs]
        if len(segs) > 4 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = "/".join(filter(None, segs[:2]))
            return routes.resolve_file(self, method, repo_id, segs[3], "/".join(segs[4:]), user, range_header)
        raise HubError(404, f"Not found: {method} {raw_path}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the hub; every answer has a Content-Length
    timeout = 60  # idle keep-alive connections end eventually
    disable_nagle_algorithm = True  # headers and body are separate writes: no delayed-ACK stalls

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.hub.serve(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.open_sockets: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address):
        """A client that hung up mid-answer (a stopped merge's read-ahead): not the fake's failure, and
        no traceback on the stderr that a test reads."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def process_request(self, request, client_address):  # tracked, to close them on stop()
        self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.open_sockets.discard(request)
        super().shutdown_request(request)
