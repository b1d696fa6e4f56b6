"""`--stream`'s head start: the hub inputs' headers are read and their bytes start to flow while the
process is still importing torch and planning (seconds, against a link that could carry hundreds of
MB in that time).

A thread resolves each hub input, reads its files' headers and the Hub's sha256 for each, adds them
to the merge's `Fetcher` and has it fetch the start of every file (`Fetcher.prefetch`). Nothing here
imports torch. What goes wrong here is not reported here, nor retried: the plan that follows opens
the same inputs, meets the same problem and deals with it as it always does.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from mergecli.io import hub
from mergecli.io.remote import Fetcher, RemoteFile


class HeadStart:
    """The fetcher of a streamed merge, started before the plan: it resolves the inputs and reads their
    headers at once, and fetches weights once `release`d (the recipe bound: a refused recipe costs no
    weight byte); `fetcher()` waits for the headers."""

    def __init__(self, inputs: list[tuple[str, str | None]], *, connections: int, buffer: int):
        self._fetcher = Fetcher(connections=connections, buffer=buffer)
        self._go = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._start, args=(inputs,), name="mergecli-head-start", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Let the head start fetch weights."""
        self._go.set()

    def fetcher(self) -> Fetcher:
        """The fetcher, its files added, once the head start has begun fetching."""
        self.release()
        self._thread.join()
        return self._fetcher

    def close(self) -> None:
        """Give up: nothing more is fetched."""
        self._closed = True
        self._go.set()
        self._thread.join()
        self._fetcher.close()

    def _start(self, inputs: list[tuple[str, str | None]]) -> None:
        with ThreadPoolExecutor(max_workers=min(8, len(inputs))) as pool:
            found = list(pool.map(lambda spec: _remote_files(*spec), inputs))
        for files in found:  # in the recipe's order, whatever order they were found in
            for file in files:
                self._fetcher.add(file)
        self._go.wait()
        if any(found) and not self._closed:
            self._fetcher.prefetch([files for files in found if files])


def _remote_files(path: str, revision: str | None) -> list[RemoteFile]:
    """The files of one input that a streamed merge will fetch: those `open_checkpoint` would stream
    (none for a local path, a snapshot the cache holds, or anything the plan will refuse)."""
    if not hub.names_repo(path):
        return []
    try:
        snapshot = hub.resolve(path, revision=revision)
        if not hub.streamable(snapshot):
            return []
        files = [hub.remote_file(snapshot, name, attempts=1)  # a fault: the plan retries
                 for name in snapshot.weights if not (snapshot.folder / name).is_file()]
        return [] if any(len(file.head) <= 8 for file in files) else files  # a bad header: the plan says so
    except Exception:  # noqa: BLE001 — the plan meets it again and reports it
        return []
