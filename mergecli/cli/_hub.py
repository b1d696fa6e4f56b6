"""The words of hub errors: what happened (`HubError.problem`) and its facts, as a message and a hint."""

from __future__ import annotations

from mergecli.errors import HubError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
RESUME_HINT = ("nothing local was changed; rerun the same command to resume: files the hub already has are not "
               "sent again")
OFFLINE_HINT = "run once with network access (without HF_HUB_OFFLINE) to complete the download"


def _files(files: tuple[str, ...]) -> str:
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def hub_message(error: HubError) -> tuple[str, str | None]:
    """(message, hint) for a hub error, from its problem and facts (none holds a token)."""
    repo, says = error.repo_id or "the repo", f": {error.detail}" if error.detail else ""
    where = f"{repo}@{error.revision}" if error.revision else repo
    retry = RESUME_HINT if error.writing else None
    need = "write access to" if error.writing else "access to"
    words: dict[str, tuple[str, str | None]] = {
        "gated": (f"{repo}: gated repo, and {'your token has' if error.token else 'no token was sent, so you have'}"
                  " no access to its files", f"request access on {error.endpoint}/{repo}, then {LOGIN_HINT}"),
        "revision-not-found": (f"{repo}: revision {error.revision!r} does not exist on the hub",
                               "set `revision` to an existing branch, tag or full commit sha (or leave it out for "
                               "main)"),
        "repo-not-found": _repo_not_found(error, repo),
        "unauthorized": ((f"the hub rejected your token (401 Unauthorized){says}",
                          f"the token is invalid or expired: {LOGIN_HINT}") if error.token else
                         (f"{repo}: the hub wants a token (401 Unauthorized){says}", LOGIN_HINT)),
        "forbidden": (f"{repo}: your token has no {need} this repo (403 Forbidden){says}",
                      f"use a token with {need} its namespace: {LOGIN_HINT}"),
        "not-found": (f"{repo}: not found on the hub (404){says}", "check the repo id and revision"),
        "server-failed": (f"the hub failed with {error.status}{says}",
                          retry or "the hub is busy or down; try again later"),
        "refused": (f"{repo}: the hub refused the request ({error.status}){says}", retry),
        "offline": (("HF_HUB_OFFLINE is set: pushing needs the hub", "unset HF_HUB_OFFLINE to push")
                    if error.writing else ("HF_HUB_OFFLINE is set: the hub is not contacted",
                                           "unset HF_HUB_OFFLINE (or set it to 0)")),
        "not-cached-offline": (f"{f'revision {error.revision!r} of {repo}' if error.revision else repo} is not in "
                               f"the local hub cache ({error.detail}), and HF_HUB_OFFLINE is set",
                               "run once with network access to fill the cache (or set HF_HOME to a cache that "
                               "has it)"),
        "failing-not-cached": (f"{where}: the hub at {error.endpoint} failed ({error.status}{says}), and it is not "
                               "in the local cache", "try again later; models in the cache also work with "
                                                     "HF_HUB_OFFLINE=1"),
        "unreachable-not-cached": (f"{where}: cannot reach the hub at {error.endpoint}"
                                   f"{f' ({error.detail})' if error.detail else ''}, and it is not in the local cache",
                                   "check the network and HF_ENDPOINT, or try again later; models in the cache also "
                                   "work with HF_HUB_OFFLINE=1"),
        "unreachable": (f"cannot reach the hub at {error.endpoint} ({error.detail})",
                        retry or "check the network and HF_ENDPOINT"),
        "connection-broken": (f"the connection to the hub at {error.endpoint} broke off ({error.detail})",
                              retry or "check the network and HF_ENDPOINT"),
        "upload-refused": (f"the hub refused the upload{says}", None),
        "no-token": ("no Hugging Face token: pushing needs one with write access", LOGIN_HINT),
        "read-only-token": (f"your token is read-only: pushing to {repo} needs write access",
                            f"use a token with write access: {LOGIN_HINT}"),
        "cache-layout": (f"{repo}: unexpected hub cache layout at {error.detail}", None),
        "snapshot-incomplete": (f"{repo}: the cached snapshot {(error.revision or '')[:12]} lacks "
                                f"{_files(error.files)}, and the hub cannot be reached", OFFLINE_HINT),
        "snapshot-incomplete-offline": (f"{repo}: the cached snapshot {(error.revision or '')[:12]} lacks "
                                        f"{_files(error.files)}, and HF_HUB_OFFLINE is set", OFFLINE_HINT),
        "stream-failed": (f"{repo}: fetching {_files(error.files)} failed{says}; the merge stopped and no output "
                          "was put in place", "check the network and try again, or merge without --stream "
                                              "(downloads resume where they stopped)"),
        "stream-checksum": (f"{repo}: the bytes fetched of {_files(error.files)} do not match the Hub's sha256 for "
                            "it; the merge stopped and no output was put in place",
                            "try again; if it happens again, a proxy or the Hub's copy is at fault"),
        "no-range-requests": (f"{repo}: the hub did not answer a range request for {_files(error.files)}", None),
    }
    message, hint = words.get(error.problem, (error.message, error.hint))
    if error.local_path_tried and "/" not in repo:  # a bare name: as likely a local folder, mistyped
        message = f"{repo}: no such local path, and as a hub repo id: {message.removeprefix(f'{repo}: ')}"
    elif error.local_path_tried:
        hint = f"{hint + '; ' if hint else ''}no local path of that name exists either"
    return message, hint


def _repo_not_found(error: HubError, repo: str) -> tuple[str, str]:
    if error.writing:
        return (f"{repo}: repo not found, or your token may not write to it",
                "check --repo-id, and that your token has write access to that namespace")
    if error.token:
        return (f"{repo}: no such model repo on the hub, or your token cannot see it",
                "check the repo id, and that your token has access to the repo")
    return (f"{repo}: no such model repo on the hub (or it is private)",
            f"check the repo id; for a private repo, {LOGIN_HINT}")
