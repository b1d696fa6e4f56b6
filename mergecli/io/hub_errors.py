"""Hub errors: huggingface_hub and network exceptions turned into typed, worded, token-free errors.

Shared by downloads (io/hub.py) and push (publish/push.py); exit codes follow errors.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from mergecli.errors import HubAccessError, HubError, HubNotFoundError, MergecliError

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9_-]{6,}")
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"

def redact(text: str) -> str:
    """`text` with the configured token, and anything that looks like a hub token, masked."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _server_says(exc: Exception) -> str:
    message = getattr(exc, "server_message", None) or ""
    message = " ".join(str(message).split())
    return f": {redact(message)[:300]}" if message else ""


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

    where = f"{repo_id}@{revision}" if revision else repo_id
    endpoint = constants.ENDPOINT
    retry = ("nothing local was changed; rerun the same command to resume: files the hub already "
             "has are not sent again") if writing else None
    try:
        yield
    except MergecliError:
        raise
    except GatedRepoError as exc:
        raise HubAccessError(
            f"{repo_id}: gated repo, and {'your token has' if get_token() else 'no token was sent, so you have'}"
            " no access to its files",
            hint=f"request access on {endpoint}/{repo_id}, then {LOGIN_HINT}", repo_id=repo_id,
            status=exc.response.status_code) from exc
    except RevisionNotFoundError as exc:
        raise HubNotFoundError(
            f"{repo_id}: revision {revision!r} does not exist on the hub",
            hint="set `revision` to an existing branch, tag or full commit sha (or leave it out for main)",
            repo_id=repo_id, status=exc.response.status_code) from exc
    except RepositoryNotFoundError as exc:
        if writing:
            message, hint = (f"{repo_id}: repo not found, or your token may not write to it",
                             "check --repo-id, and that your token has write access to that namespace")
        elif get_token():
            message, hint = (f"{repo_id}: no such model repo on the hub, or your token cannot see it",
                             "check the repo id, and that your token has access to the repo")
        else:
            message, hint = (f"{repo_id}: no such model repo on the hub (or it is private)",
                             f"check the repo id; for a private repo, {LOGIN_HINT}")
        raise HubNotFoundError(message, hint=hint, repo_id=repo_id, status=exc.response.status_code) from exc
    except HfHubHTTPError as exc:
        raise _http_error(exc, repo_id, writing=writing, retry=retry) from exc
    except OfflineModeIsEnabled as exc:
        raise HubError("HF_HUB_OFFLINE is set: the hub is not contacted",
                       hint="unset HF_HUB_OFFLINE (or set it to 0)", repo_id=repo_id) from exc
    except LocalEntryNotFoundError as exc:  # not in the cache, and the hub could not be asked
        cause = exc.__cause__
        if constants.is_offline_mode() or isinstance(cause, OfflineModeIsEnabled):
            what = f"revision {revision!r} of {repo_id}" if revision else repo_id
            raise HubError(
                f"{what} is not in the local hub cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set",
                hint="run once with network access to fill the cache (or set HF_HOME to a cache that has it)",
                repo_id=repo_id) from exc
        if isinstance(cause, HfHubHTTPError):
            problem = f"the hub at {endpoint} failed ({cause.response.status_code}{_server_says(cause)})"
        elif isinstance(cause, httpx2.TransportError):
            problem = f"cannot reach the hub at {endpoint} ({redact(str(cause))[:200] or type(cause).__name__})"
        else:
            problem = f"cannot reach the hub at {endpoint}"
        raise HubError(f"{where}: {problem}, and it is not in the local cache",
                       hint="check the network and HF_ENDPOINT, or try again later; "
                            "models in the cache also work with HF_HUB_OFFLINE=1", repo_id=repo_id) from exc
    except httpx2.TransportError as exc:
        detail = redact(str(exc))[:200] or type(exc).__name__
        if isinstance(exc, (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError)):
            message = f"the connection to the hub at {endpoint} broke off ({detail})"
        else:
            message = f"cannot reach the hub at {endpoint} ({detail})"
        raise HubError(message, hint=retry or "check the network and HF_ENDPOINT", repo_id=repo_id) from exc
    except ValueError as exc:
        if not writing:
            raise
        # e.g. the model card's metadata refused by /api/validate-yaml before the commit
        raise HubError(f"the hub refused the upload: {redact(str(exc))[:300]}", repo_id=repo_id) from exc


def _http_error(exc, repo_id: str, *, writing: bool, retry: str | None) -> HubError:
    from huggingface_hub import get_token

    status = exc.response.status_code
    says = _server_says(exc)
    if status == 401:
        if get_token():
            return HubAccessError(f"the hub rejected your token (401 Unauthorized){says}",
                                  hint=f"the token is invalid or expired: {LOGIN_HINT}", repo_id=repo_id,
                                  status=status)
        return HubAccessError(f"{repo_id}: the hub wants a token (401 Unauthorized){says}", hint=LOGIN_HINT,
                              repo_id=repo_id, status=status)
    if status == 403:
        need = "write access to" if writing else "access to"
        return HubAccessError(f"{repo_id}: your token has no {need} this repo (403 Forbidden){says}",
                              hint=f"use a token with {need} its namespace: {LOGIN_HINT}", repo_id=repo_id,
                              status=status)
    if status == 404:
        return HubNotFoundError(f"{repo_id}: not found on the hub (404){says}",
                                hint="check the repo id and revision", repo_id=repo_id, status=status)
    if status == 429 or status >= 500:
        return HubError(f"the hub failed with {status}{says}",
                        hint=retry or "the hub is busy or down; try again later", repo_id=repo_id, status=status)
    return HubError(f"{repo_id}: the hub refused the request ({status}){says}", hint=retry, repo_id=repo_id,
                    status=status)
