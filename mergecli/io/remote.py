"""Hub files read by HTTP range requests as a merge needs their bytes (`--stream`): nothing of them is
written to disk.

Each streamed pass tells the `Fetcher` the reads it will make, in the order it will make them
(`schedule`); contiguous reads of one file become one request of up to CHUNK_BYTES. Several
connections fetch those requests in that order, ahead of the merge but never more than `buffer`
bytes ahead, so fetching overlaps combining and writing and memory stays bounded. A read the pass
did not announce is fetched when asked.

Integrity: every file is hashed in file order as its bytes arrive (its header first), a chunk that
arrives ahead of the hash being kept until the bytes before it come, within a bound; `verify`, after
the merge, fetches what was never read (or was dropped past the bound) and compares the digest with
the Hub's (the LFS sha256, or the git blob id of a small file). A mismatch fails the merge before
its output is put in place.

Faults: a dropped connection, a body cut short, a 5xx or a 429 (after its Retry-After) is retried
from the byte where it stopped, with backoff, MAX_ATTEMPTS times; then the merge stops naming the
file. URLs, headers, token, endpoint and proxies are huggingface_hub's, pinned to the commit.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mergecli.errors import HubError
from mergecli.io.hub_errors import hub_errors

CHUNK_BYTES = 4 * 2**20  # one request: long against its latency, short enough that a read waits little for it
DEFAULT_CONNECTIONS = 8
DEFAULT_BUFFER = 256 * 2**20
MAX_ATTEMPTS = 6
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)
MAX_RETRY_AFTER = 60.0
TIMEOUT_SECONDS = 60.0


@dataclass(eq=False)
class RemoteFile:
    """One hub file read by ranges: where it is, what it must hash to, and its hash so far."""

    repo_id: str
    commit: str
    name: str
    size: int
    head: bytes  # its first bytes (the safetensors size field and header), already fetched
    sha256: str | None = None  # the Hub's LFS oid
    git_oid: str | None = None  # the git blob id, for a file stored without LFS
    fetched: int = 0  # bytes fetched
    hashed: int = field(default=0, init=False)  # bytes hashed, in order from the start
    _hasher: object = field(default=None, init=False, repr=False)
    _ahead: dict[int, bytes | bytearray] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.sha256:
            self._hasher = hashlib.sha256()
        elif self.git_oid:
            self._hasher = hashlib.sha1(b"blob %d\0" % self.size)
        self.absorb(0, self.head)
        self.fetched += len(self.head)

    @property
    def checked(self) -> bool:
        """Whether the Hub says what the file must hash to."""
        return self._hasher is not None

    def absorb(self, start: int, data: bytes | bytearray | memoryview, *,
               keep_ahead: int = 0) -> tuple[bool, list[int]]:
        """Hash what `data` (the bytes at `start`) adds in order; keep it for later when it lies ahead of the
        hash and fits in `keep_ahead` more bytes, else drop it (verify fetches those bytes again).

        Returns (whether `data` is kept for later, the starts of data kept earlier and hashed now)."""
        if self._hasher is None:
            return False, []
        with self._lock:
            if start > self.hashed:
                held = sum(len(piece) for piece in self._ahead.values())
                if held + len(data) <= keep_ahead:
                    self._ahead[start] = data
                    return True, []
                return False, []
            self._extend(start, data)
            drained = []
            while True:  # what was waiting for these bytes
                following = [s for s in self._ahead if s <= self.hashed]
                if not following:
                    return False, drained
                for s in sorted(following):
                    self._extend(s, self._ahead.pop(s))
                    drained.append(s)

    def _extend(self, start: int, data: bytes | bytearray | memoryview) -> None:
        end = start + len(data)
        if end > self.hashed:
            self._hasher.update(memoryview(data)[self.hashed - start:])
            self.hashed = end

    def count_fetched(self, count: int) -> None:
        with self._lock:
            self.fetched += count

    def next_ahead(self) -> int:
        """Where the first chunk kept ahead of the hash starts (the file's size when none is)."""
        with self._lock:
            return min(self._ahead, default=self.size)

    def digest_matches(self) -> bool:
        return self._hasher.hexdigest() == (self.sha256 or self.git_oid)


class _Transient(Exception):
    """A fault worth retrying: a 5xx, a 429, a body cut short."""

    def __init__(self, what: str, wait: float | None = None):
        super().__init__(what)
        self.wait = wait


def fetch_range(file: RemoteFile, start: int, out: bytearray | memoryview) -> None:
    """Fill `out` with the bytes of `file` from `start` (see `get_range`), counting them as fetched."""
    get_range(file.repo_id, file.commit, file.name, start, out, counted=file.count_fetched)


def get_range(repo_id: str, commit: str, name: str, start: int, out: bytearray | memoryview, *,
              counted: Callable[[int], None] | None = None) -> int:
    """Fill `out` with the bytes of a hub file from `start`, retrying faults from the byte where they
    stopped; returns the file's size (from Content-Range).

    Raises:
        HubError: the faults went on MAX_ATTEMPTS times (`stream-failed`), the hub refused (typed), or
            it does not answer range requests.
    """
    import httpx2
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    view, got, attempt, size = memoryview(out), 0, 0, -1
    url, headers = hf_hub_url(repo_id, name, revision=commit), build_hf_headers()
    with hub_errors(repo_id, revision=commit):
        while got < len(view):
            try:
                last = start + len(view) - 1
                with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start + got}-{last}"},
                                          follow_redirects=True, timeout=TIMEOUT_SECONDS) as response:
                    if response.status_code == 429 or response.status_code >= 500:
                        raise _Transient(f"HTTP {response.status_code}", _retry_after(response))
                    if response.status_code >= 400:
                        response.read()  # the error's words are in the body
                        hf_raise_for_status(response)
                    total = response.headers.get("Content-Range", "").rpartition("/")[2]
                    if response.status_code != 206 or not total.isdigit():
                        raise HubError("no-range-requests", repo_id=repo_id, files=(name,))
                    size = int(total)
                    for piece in response.iter_bytes():
                        taken = min(len(piece), len(view) - got)
                        view[got:got + taken] = piece[:taken]
                        got += taken
                        if counted is not None:
                            counted(taken)
                if got < len(view) and start + got < size:
                    raise _Transient("the body ended early")
                if got < len(view):  # asked past the end: what there is
                    return size
                attempt = 0
            except (httpx2.TransportError, _Transient) as fault:
                attempt += 1
                if attempt >= MAX_ATTEMPTS:
                    raise HubError("stream-failed", repo_id=repo_id, revision=commit, files=(name,),
                                   detail=f"{fault or type(fault).__name__}, {MAX_ATTEMPTS} attempts") from None
                wait = getattr(fault, "wait", None)
                time.sleep(min(wait, MAX_RETRY_AFTER) if wait is not None
                           else BACKOFF_SECONDS[min(attempt - 1, len(BACKOFF_SECONDS) - 1)])
    return size


def _retry_after(response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


@dataclass(eq=False)
class _Chunk:
    file: RemoteFile
    start: int
    length: int
    reads: int = 0  # announced reads it serves that are still to come
    hashed: bool = False  # its bytes went into its file's hash (or were dropped from it: verify fetches them)
    data: bytearray | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class Fetcher:
    """Range requests for the streamed files of one merge, ahead of its reads and bounded in bytes."""

    def __init__(self, *, connections: int = DEFAULT_CONNECTIONS, buffer: int = DEFAULT_BUFFER):
        self.connections, self.buffer = connections, buffer
        self.files: list[RemoteFile] = []
        self._queue: deque[_Chunk] = deque()
        self._reads: dict[tuple[int, int, int], deque[_Chunk]] = {}
        self._held = 0  # bytes fetched or being fetched and not yet both read and hashed
        self._kept: dict[tuple[int, int], _Chunk] = {}  # chunks whose bytes wait for earlier ones to be hashed
        self._hashed_early: set[tuple[int, int]] = set()  # kept chunks hashed before they were registered
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def add(self, file: RemoteFile) -> RemoteFile:
        self.files.append(file)
        return file

    @property
    def fetched(self) -> int:
        return sum(file.fetched for file in self.files)

    def schedule(self, reads: list[tuple[RemoteFile, int, int]]) -> None:
        """The reads (file, offset, length) the next pass makes, in the order it makes them."""
        open_chunks: dict[int, _Chunk] = {}
        with self._cv:
            for file, offset, length in reads:
                chunk = open_chunks.get(id(file))
                if chunk is None or chunk.start + chunk.length != offset or chunk.length + length > CHUNK_BYTES:
                    chunk = open_chunks[id(file)] = _Chunk(file, offset, 0)
                    self._queue.append(chunk)
                chunk.length += length
                chunk.reads += 1
                self._reads.setdefault((id(file), offset, length), deque()).append(chunk)
            while len(self._threads) < self.connections and self._queue:
                thread = threading.Thread(target=self._fetch_loop, name="mergecli-fetch", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cv.notify_all()

    def read_into(self, file: RemoteFile, offset: int, out: torch.Tensor) -> None:
        """Copy `len(out)` bytes of `file` at `offset` into `out` (uint8, contiguous): from the chunk
        that was fetched for it, or fetched now when the read was not announced."""
        target = memoryview(out.numpy()).cast("B")
        with self._cv:
            waiting = self._reads.get((id(file), offset, len(target)))
            chunk = waiting.popleft() if waiting else None
            if waiting is not None and not waiting:
                del self._reads[(id(file), offset, len(target))]
        if chunk is None:
            fetch_range(file, offset, target)
            file.absorb(offset, target)  # hashed now or not kept: no copy needed
            return
        while not chunk.ready.wait(0.5):  # a timeout: Ctrl-C reaches a waiting main thread
            pass
        if chunk.error is not None:
            raise chunk.error
        target[:] = memoryview(chunk.data)[offset - chunk.start:offset - chunk.start + len(target)]
        with self._cv:
            chunk.reads -= 1
            self._release(chunk)

    def _release(self, chunk: _Chunk) -> None:
        """Free a chunk's bytes once every read has them and they are hashed (under the condition)."""
        if chunk.reads == 0 and chunk.hashed and chunk.data is not None:
            chunk.data = None
            self._held -= chunk.length
            self._cv.notify_all()

    def _fetch_loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not (self._queue and (self._held == 0 or
                                                                 self._held + self._queue[0].length <= self.buffer)):
                    self._cv.wait()
                if self._closed:
                    return
                chunk = self._queue.popleft()
                self._held += chunk.length
                room = self.buffer // 2 - sum(kept.length for kept in self._kept.values())  # for bytes ahead of a hash
            try:
                data = bytearray(chunk.length)
                fetch_range(chunk.file, chunk.start, data)
                kept, drained = chunk.file.absorb(chunk.start, data, keep_ahead=max(0, room))
            except BaseException as error:  # handed to the read that waits for it
                chunk.error = error
                chunk.ready.set()
                continue
            with self._cv:  # a kept chunk counts in the read-ahead until it is hashed
                chunk.data = data
                key = (id(chunk.file), chunk.start)
                chunk.hashed = not kept or key in self._hashed_early
                self._hashed_early.discard(key)
                if not chunk.hashed:
                    self._kept[key] = chunk
                for start in drained:
                    earlier = self._kept.pop((id(chunk.file), start), None)
                    if earlier is None:
                        self._hashed_early.add((id(chunk.file), start))
                    else:
                        earlier.hashed = True
                        self._release(earlier)
            chunk.ready.set()

    def verify(self) -> None:
        """Fetch what each file's hash still lacks, in order, and compare it with the Hub's digest.

        Raises:
            HubError: a file's bytes do not hash to what the Hub says (`stream-checksum`).
        """
        for file in self.files:
            if not file.checked or file.fetched == 0:
                continue
            while file.hashed < file.size:
                start = file.hashed
                data = bytearray(min(CHUNK_BYTES, file.size - start, max(1, file.next_ahead() - start)))
                fetch_range(file, start, data)
                file.absorb(start, data)
            if not file.digest_matches():
                raise HubError("stream-checksum", repo_id=file.repo_id, revision=file.commit, files=(file.name,))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
