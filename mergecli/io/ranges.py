"""One hub file's bytes from a given offset, by HTTP range requests: faults retried from the byte where
they stopped, so a long read survives a flaky link without fetching anything twice.

A dropped connection, a body cut short or stalled, a 5xx, a 429 (after its Retry-After), or an
answer for other bytes than asked (its Content-Range checked against the request) is retried with
backoff, MAX_ATTEMPTS times in all; then the read stops with one HubError naming the file. URLs,
headers, token, endpoint and proxies are huggingface_hub's, every request pinned to the commit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from mergecli.errors import HubError
from mergecli.io.hub_errors import hub_errors

MAX_ATTEMPTS = 6
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)
MAX_RETRY_AFTER = 60.0
CONNECT_SECONDS = 60.0
# A body that sends nothing for this long has stalled: the request is dropped and the read resumes from
# the byte where the stall began (a CDN edge that hangs would otherwise hold the merge for minutes).
STALL_SECONDS = 15.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class _Transient(Exception):
    """A fault worth retrying: a 5xx, a 429, a body cut short."""

    def __init__(self, what: str, wait: float | None = None):
        super().__init__(what)
        self.wait = wait


def get_range(repo_id: str, commit: str, name: str, start: int, out: bytearray | memoryview, *,
              counted: Callable[[int], None] | None = None, attempts: int = MAX_ATTEMPTS) -> int:
    """Fill `out` with the bytes of a hub file from `start`, retrying faults from the byte where they
    stopped (`attempts` tries in all); returns the file's size (from Content-Range).

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
                timeout = httpx2.Timeout(CONNECT_SECONDS, read=STALL_SECONDS)
                with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start + got}-{last}"},
                                          follow_redirects=True, timeout=timeout) as response:
                    if response.status_code == 429 or response.status_code >= 500:
                        raise _Transient(f"HTTP {response.status_code}", _retry_after(response))
                    if response.status_code >= 400:
                        response.read()  # the error's words are in the body
                        hf_raise_for_status(response)
                    answered = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
                    if response.status_code != 206 or answered is None:
                        raise HubError("no-range-requests", repo_id=repo_id, files=(name,))
                    first, final, size = (int(number) for number in answered.groups())
                    if first != start + got or final != min(last, size - 1):
                        raise _Transient(f"asked for bytes {start + got}-{last}, the server sent {first}-{final}")
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
                if attempt >= attempts:
                    raise HubError("stream-failed", repo_id=repo_id, revision=commit, files=(name,),
                                   detail=f"{fault or type(fault).__name__}, {attempts} attempts") from None
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
