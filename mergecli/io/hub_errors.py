"""Hub errors: huggingface_hub and network exceptions turned into typed, token-free errors that say
what happened (errors.py `HubError.problem`) and hold the facts; the CLI words them.

Shared by downloads (io/hub.py) and push (publish/push.py); exit codes follow errors.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from mergecli.errors import HubAccessError, HubError, HubNotFoundError, MergecliError

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9_-]{6,}")


def redact(text: str) -> str:
    """`text` with the configured token, and anything that looks like a hub token, masked."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _server_says(exc: Exception) -> str:
    return redact(" ".join(str(getattr(exc, "server_message", None) or "").split()))[:300]


def _network_says(exc: Exception) -> str:
    return redact(str(exc))[:200] or type(exc).__name__


@contextmanager
def hub_errors(repo_id: str, *, revision: str | None = None, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into HubError / HubNotFoundError / HubAccessError."""
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    facts = {"repo_id": repo_id, "revision": revision, "writing": writing, "endpoint": constants.ENDPOINT}
    try:
        yield
    except MergecliError:
        raise
    except GatedRepoError as exc:
        raise HubAccessError("gated", status=exc.response.status_code, token=bool(get_token()), **facts) from exc
    except RevisionNotFoundError as exc:
        raise HubNotFoundError("revision-not-found", status=exc.response.status_code, **facts) from exc
    except RepositoryNotFoundError as exc:
        raise HubNotFoundError("repo-not-found", status=exc.response.status_code, token=bool(get_token()),
                               **facts) from exc
    except HfHubHTTPError as exc:
        raise http_error(exc.response.status_code, _server_says(exc), token=bool(get_token()), **facts) from exc
    except OfflineModeIsEnabled as exc:
        raise HubError("offline", **facts) from exc
    except LocalEntryNotFoundError as exc:  # not in the cache, and the hub could not be asked
        cause = exc.__cause__
        if constants.is_offline_mode() or isinstance(cause, OfflineModeIsEnabled):
            raise HubError("not-cached-offline", detail=str(constants.HF_HUB_CACHE), **facts) from exc
        if isinstance(cause, HfHubHTTPError):
            raise HubError("failing-not-cached", status=cause.response.status_code, detail=_server_says(cause),
                           **facts) from exc
        detail = _network_says(cause) if isinstance(cause, httpx2.TransportError) else ""
        raise HubError("unreachable-not-cached", detail=detail, **facts) from exc
    except httpx2.TransportError as exc:
        broken = isinstance(exc, (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError))
        raise HubError("connection-broken" if broken else "unreachable", detail=_network_says(exc), **facts) from exc
    except ValueError as exc:
        if not writing:
            raise
        # e.g. the model card's metadata refused by /api/validate-yaml before the commit
        raise HubError("upload-refused", detail=redact(str(exc))[:300], **facts) from exc


def http_error(status: int, detail: str, *, token: bool, **facts) -> HubError:
    """The typed error of an HTTP status the hub answered with."""
    if status == 401:
        return HubAccessError("unauthorized", status=status, detail=detail, token=token, **facts)
    if status == 403:
        return HubAccessError("forbidden", status=status, detail=detail, token=token, **facts)
    if status == 404:
        return HubNotFoundError("not-found", status=status, detail=detail, token=token, **facts)
    if status == 429 or status >= 500:
        return HubError("server-failed", status=status, detail=detail, token=token, **facts)
    return HubError("refused", status=status, detail=detail, token=token, **facts)
