"""Hub files read by HTTP range requests as a merge needs their bytes (`--stream`): nothing of them is
written to disk.

Each streamed pass tells the `Fetcher` the reads it will make, in the order it will make them
(`schedule`); contiguous reads of one file become one request of up to CHUNK_BYTES. Several
connections fetch those requests in that order, ahead of the merge but never more than `buffer`
bytes ahead, so fetching overlaps combining and writing and memory stays bounded. A read the pass
did not announce is fetched when asked.

A head start (`prefetch`) fills the link while the merge is still being planned (torch alone takes
seconds to import): each input's files from the end of their headers, in file order, up to the
read-ahead bound; the first pass's reads claim those chunks, a read spanning two of them copying
from both. This module imports nothing heavy, so that the head start can begin before torch.

Integrity: every file is hashed in file order as its bytes arrive (its header first), a chunk that
arrives ahead of the hash being kept until the bytes before it come, within a bound; `verify`, after
the merge, fetches what was never read (or was dropped past the bound) and compares the digest with
the Hub's (the LFS sha256, or the git blob id of a small file). A mismatch fails the merge before
its output is put in place.

Each request goes through io/ranges.py (faults retried from the byte where they stopped).
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mergecli.errors import HubError
from mergecli.io.ranges import get_range

if TYPE_CHECKING:  # this module runs before torch is imported (`Fetcher.prefetch`)
    import torch

CHUNK_BYTES = 4 * 2**20  # one request: long against its latency, short enough that a read waits little for it
DEFAULT_CONNECTIONS = 8
DEFAULT_BUFFER = 256 * 2**20


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


def fetch_range(file: RemoteFile, start: int, out: bytearray | memoryview) -> None:
    """Fill `out` with the bytes of `file` from `start` (see `get_range`), counting them as fetched."""
    get_range(file.repo_id, file.commit, file.name, start, out, counted=file.count_fetched)


@dataclass(eq=False)
class _Chunk:
    file: RemoteFile
    start: int
    length: int
    reads: int = 0  # announced reads it serves that are still to come (+1 while a head start holds it)
    hashed: bool = False  # its bytes went into its file's hash (or were dropped from it: verify fetches them)
    data: bytearray | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def end(self) -> int:
        return self.start + self.length


class Fetcher:
    """Range requests for the streamed files of one merge, ahead of its reads and bounded in bytes."""

    def __init__(self, *, connections: int = DEFAULT_CONNECTIONS, buffer: int = DEFAULT_BUFFER):
        self.connections, self.buffer = connections, buffer
        self.files: list[RemoteFile] = []
        self._queue: deque[_Chunk] = deque()
        self._reads: dict[tuple[int, int, int], deque[list[_Chunk]]] = {}  # a read → the chunks it copies from
        self._early: dict[int, list[_Chunk]] = {}  # per file, the head start's chunks, until the first schedule
        self._held = 0  # bytes fetched or being fetched and not yet both read and hashed
        self._kept: dict[tuple[int, int], _Chunk] = {}  # chunks whose bytes wait for earlier ones to be hashed
        self._hashed_early: set[tuple[int, int]] = set()  # kept chunks hashed before they were registered
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def add(self, file: RemoteFile) -> RemoteFile:
        self.files.append(file)
        return file

    def known(self, repo_id: str, commit: str, name: str) -> RemoteFile | None:
        """The file already added for this repo, commit and name (by a head start), if any."""
        return next((file for file in self.files
                     if (file.repo_id, file.commit, file.name) == (repo_id, commit, name)), None)

    @property
    def fetched(self) -> int:
        return sum(file.fetched for file in self.files)

    @property
    def held(self) -> int:
        """Bytes in the read-ahead now: fetched, or being fetched, and not yet both read and hashed."""
        with self._cv:
            return self._held

    def prefetch(self, files: list[list[RemoteFile]]) -> None:
        """A head start, before the merge knows its reads: fetch each input's files (one list per input)
        from the end of their headers, in order, CHUNK_BYTES at a time, taking a chunk from each input in
        turn, up to the read-ahead bound. The first `schedule` claims what its reads need; the rest is
        dropped (and fetched again if read later)."""
        with self._cv:
            pending = [self._head_start_chunks(input_files) for input_files in files]
            planned = 0
            while pending and planned < self.buffer:
                for sequence in list(pending):
                    chunk = next(sequence, None)
                    if chunk is None:
                        pending.remove(sequence)
                        continue
                    self._early.setdefault(id(chunk.file), []).append(chunk)
                    self._queue.append(chunk)
                    planned += chunk.length
            self._start_threads()

    @staticmethod
    def _head_start_chunks(files: list[RemoteFile]) -> Iterator[_Chunk]:
        for file in files:
            for start in range(len(file.head), file.size, CHUNK_BYTES):
                yield _Chunk(file, start, min(CHUNK_BYTES, file.size - start), reads=1)

    def schedule(self, reads: list[tuple[RemoteFile, int, int]]) -> None:
        """The reads (file, offset, length) the next pass makes, in the order it makes them."""
        open_chunks: dict[int, _Chunk] = {}
        with self._cv:
            for file, offset, length in reads:
                early = [c for c in self._early.get(id(file), ()) if c.start < offset + length and c.end > offset]
                covered = max((c.end for c in early), default=offset)  # a head start covers a file's prefix
                chunks = early
                if covered < offset + length:
                    rest = offset + length - covered
                    chunk = open_chunks.get(id(file))
                    if chunk is None or chunk.end != covered or chunk.length + rest > CHUNK_BYTES:
                        chunk = open_chunks[id(file)] = _Chunk(file, covered, 0)
                        self._queue.append(chunk)
                    chunk.length += rest
                    chunks = [*early, chunk]
                for chunk in chunks:
                    chunk.reads += 1
                self._reads.setdefault((id(file), offset, length), deque()).append(chunks)
            if self._early:  # the head start's hold ends: unclaimed chunks are let go, fetched or not
                for chunks in self._early.values():
                    for chunk in chunks:
                        chunk.reads -= 1
                        self._release(chunk)
                self._early.clear()
                self._queue = deque(chunk for chunk in self._queue if chunk.reads > 0)
            self._start_threads()
            self._cv.notify_all()

    def _start_threads(self) -> None:
        while len(self._threads) < self.connections and self._queue:
            thread = threading.Thread(target=self._fetch_loop, name="mergecli-fetch", daemon=True)
            self._threads.append(thread)
            thread.start()

    def read_into(self, file: RemoteFile, offset: int, out: torch.Tensor) -> None:
        """Copy `len(out)` bytes of `file` at `offset` into `out` (uint8, contiguous): from the chunks
        that were fetched for it, or fetched now when the read was not announced."""
        target = memoryview(out.numpy()).cast("B")
        with self._cv:
            waiting = self._reads.get((id(file), offset, len(target)))
            chunks = waiting.popleft() if waiting else None
            if waiting is not None and not waiting:
                del self._reads[(id(file), offset, len(target))]
        if chunks is None:
            fetch_range(file, offset, target)
            file.absorb(offset, target)  # hashed now or not kept: no copy needed
            return
        for chunk in chunks:
            while not chunk.ready.wait(0.5):  # a timeout: Ctrl-C reaches a waiting main thread
                pass
            if chunk.error is not None:
                raise chunk.error
            first, last = max(offset, chunk.start), min(offset + len(target), chunk.end)
            target[first - offset:last - offset] = memoryview(chunk.data)[first - chunk.start:last - chunk.start]
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
                self._drained(chunk.file, drained)
                self._release(chunk)  # a head start's chunk that no read claimed
            chunk.ready.set()

    def _drained(self, file: RemoteFile, starts: list[int]) -> None:
        """Chunks kept ahead of the hash of `file` and hashed now: let go once read (under the condition)."""
        for start in starts:
            earlier = self._kept.pop((id(file), start), None)
            if earlier is None:
                self._hashed_early.add((id(file), start))
            else:
                earlier.hashed = True
                self._release(earlier)

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
                _, drained = file.absorb(start, data)
                with self._cv:
                    self._drained(file, drained)
            if not file.digest_matches():
                raise HubError("stream-checksum", repo_id=file.repo_id, revision=file.commit, files=(file.name,))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
