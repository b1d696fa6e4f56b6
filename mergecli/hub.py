"""Hugging Face Hub: resolve repo ids to local snapshots, and push finished outputs.

Everything goes through huggingface_hub's public API, imported and called at call time, never at
mergecli's import: huggingface_hub itself reads HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE,
so mergecli honours them exactly as `hf` does, and the token never passes through mergecli.

Downloads fetch only what a merge reads: the weights (safetensors preferred over `.bin`: the
repo's file list is looked at first), config, generation config and tokenizer files. In offline
mode the same code works from the cache. Errors come out typed (errors.py) and token-free.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergecli.errors import (
    CheckpointError,
    HubAccessError,
    HubError,
    HubNotFoundError,
    MergecliError,
    RecipeError,
    UsageError,
)

if TYPE_CHECKING:
    from mergecli.recipe import Recipe

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(f"{_REPO_PART}/{_REPO_PART}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9_-]{6,}")
_UNFINISHED = re.compile(r"\..+\.(partial|replaced)-\d+")  # writer.atomic_directory's temporaries

CONFIG_FILES = ("config.json", "generation_config.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
STATE_DICT_FILES = ("pytorch_model.bin", "model.pt", "model.pth")
# Weights an earlier push may have left on the branch: a new merge with other shard boundaries must
# replace them all, or the stale index would point transformers at stale shards.
STALE_WEIGHTS = ["model.safetensors", "model-*-of-*.safetensors", SAFETENSORS_INDEX]
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def looks_like_repo_id(path: str) -> bool:
    """`org/name` with hub-legal characters (the hub also forbids `--`, `..` and over 96 characters)."""
    return (_REPO_ID.fullmatch(path) is not None and ".." not in path and "--" not in path
            and not path.endswith(".git") and all(len(part) <= 96 for part in path.split("/")))


# ---------------------------------------------------------------------------------------------
# Inputs: repo id -> local snapshot


def download_checkpoint(repo_id: str, *, revision: str | None = None) -> tuple[Path, str]:
    """Download (or find in the hub cache) a model's weights, config and tokenizer files.

    The revision (branch, tag or commit; default the main branch) is resolved to a commit first;
    then the repo's file list (cached with the snapshot, so it is known offline too) decides which
    weights to fetch: `model.safetensors.index.json` and the shards it lists, `model.safetensors`,
    other top-level `*.safetensors`, and only when there are none, `pytorch_model.bin` (sharded
    or not). huggingface_hub draws its own progress bars on stderr.

    Args:
        repo_id: `org/name` of a model repo.
        revision: branch, tag or full commit sha; None for the default branch.

    Returns:
        `(directory, commit)`: the snapshot directory in the hub cache and its 40-hex commit sha.

    Raises:
        HubNotFoundError: no such repo or revision (exit 2).
        HubAccessError: gated repo without access, missing or rejected token (exit 2).
        HubError: hub unreachable, server error, or offline without the files in the cache.
        CheckpointError: the repo holds no safetensors weights or PyTorch state dict.

    Example:
        >>> directory, commit = download_checkpoint("org/llama-math", revision="main")
    """
    from mergecli.merge import TOKENIZER_FILES

    metadata = [*CONFIG_FILES, SAFETENSORS_INDEX, *TOKENIZER_FILES]
    with _hub_errors(repo_id, revision=revision):
        # 1. Resolve the revision (this also caches the repo's file list) and get the small files.
        folder = _snapshot(repo_id, revision, metadata)
        commit = folder.name
        if not _COMMIT.fullmatch(commit):  # a snapshot directory is always named by its commit
            raise HubError(f"{repo_id}: unexpected hub cache layout at {folder}", repo_id=repo_id)
        # 2. Choose the weights from the file list, 3. fetch them, pinned to the resolved commit.
        names = _repo_files(repo_id, commit, folder)
        weights = _choose_weights(repo_id, names, folder,
                                  fetch=lambda files: _snapshot(repo_id, commit, files))
        wanted = [name for name in metadata if name in names] + weights
        folder = _snapshot(repo_id, commit, wanted, required=weights)
    return folder, commit


def _snapshot(repo_id: str, revision: str | None, names: list[str], *,
              required: list[str] = ()) -> Path:
    """`snapshot_download` of exactly `names` (those the repo has); returns the snapshot folder.

    When the hub cannot be asked (offline, unreachable), a cached snapshot that lacks some of
    `names` (it was filled with other patterns) is still good enough if it has every `required` file.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    patterns = [glob.escape(name) for name in names]  # exact names: fnmatch would also match sub/dirs
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except IncompleteSnapshotError as exc:  # revision resolved from the cache's refs
        folder = Path(exc.snapshot_path)
    except LocalEntryNotFoundError:  # a commit whose file list is cached, but a file is not
        folder = _cached_snapshot(repo_id, revision)
        if folder is None:
            raise
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        where = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub cannot be reached"
        raise HubError(
            f"{repo_id}: the cached snapshot {folder.name[:12]} lacks {shown}, and {where}",
            hint="run once with network access (without HF_HUB_OFFLINE) to complete the download",
            repo_id=repo_id,
        )
    return folder


def _cached_snapshot(repo_id: str, commit: str | None) -> Path | None:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if commit is None or not _COMMIT.fullmatch(commit):
        return None
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit
    return folder if folder.is_dir() else None


def _repo_files(repo_id: str, commit: str, folder: Path) -> set[str]:
    """Every file of the repo at `commit`: the cached tree listing, else the hub, else the folder."""
    import httpx2
    from huggingface_hub import HfApi, constants, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {entry.path for entry in get_cached_repo_tree(repo_id, revision=commit)}
    except CachedRepoTreeNotFoundError:  # a cache filled by an older huggingface_hub
        pass
    if not constants.is_offline_mode():
        try:
            return set(HfApi().list_repo_files(repo_id, revision=commit))
        except httpx2.TransportError:
            pass
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _index_shards(repo_id: str, index: Path) -> list[str]:
    if not index.is_file():
        raise HubError(f"{repo_id}: {index.name} is not in the cached snapshot",
                       hint="run once with network access to complete the download", repo_id=repo_id)
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{repo_id}/{index.name}", "corrupt shard index (no weight_map)") from None
    if not shards or not all(isinstance(s, str) and ".." not in s.split("/") for s in shards):
        raise CheckpointError(f"{repo_id}/{index.name}", "corrupt shard index (bad shard names)")
    return shards


def _choose_weights(repo_id: str, names: set[str], folder: Path, *,
                    fetch: Callable[[list[str]], Path]) -> list[str]:
    """The weight files to download, safetensors first (same preference as `find_weight_files`)."""
    top = {name for name in names if "/" not in name}
    if SAFETENSORS_INDEX in top:
        return [SAFETENSORS_INDEX, *_index_shards(repo_id, folder / SAFETENSORS_INDEX)]
    if "model.safetensors" in top:
        return ["model.safetensors"]
    safetensors = sorted(name for name in top if name.endswith(".safetensors"))
    if safetensors:
        return safetensors
    if BIN_INDEX in top:
        return [BIN_INDEX, *_index_shards(repo_id, fetch([BIN_INDEX]) / BIN_INDEX)]
    for name in STATE_DICT_FILES:
        if name in top:
            return [name]
    raise CheckpointError(
        repo_id, "this hub repo has no safetensors weights and no PyTorch state dict "
                 "(model.safetensors, sharded *.safetensors, pytorch_model.bin)",
        hint="mergecli merges transformers-style checkpoints; check the repo id and its files",
    )


# ---------------------------------------------------------------------------------------------
# Push


@dataclass(frozen=True)
class PushResult:
    """What `push` sent (or, with `dry_run`, would send)."""

    repo_id: str
    revision: str
    message: str
    private: bool
    files: tuple[tuple[str, int], ...]  # (path in the repo, size in bytes), sorted
    dry_run: bool = False
    commit: str | None = None  # None for a dry run
    commit_url: str | None = None
    changed: bool = True  # False: the branch already held exactly these files (no new commit)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


def output_files(directory: Path) -> list[tuple[str, int]]:
    """The files of a finished mergecli output, checked; what `push` uploads.

    Raises:
        UsageError: not a directory, a `.NAME.partial-PID` temporary, no mergecli.toml, no
            weights, an index listing missing shards, or a truncated shard.
    """
    from mergecli.checkpoint import read_safetensors_header

    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory")
    if _UNFINISHED.fullmatch(directory.resolve().name):
        raise UsageError(f"{directory} is the temporary directory of an unfinished or killed merge",
                         hint="push the output directory that a merge renames into place when it completes")

    def refuse(problem: str) -> UsageError:
        return UsageError(f"{directory}: not a finished mergecli output: {problem}",
                          hint="push a directory written by `mergecli average` or `mergecli regmean merge`")

    if not (directory / "mergecli.toml").is_file():
        raise refuse("no mergecli.toml")
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = [directory / name for name in _index_shards(str(directory), index)]
        except MergecliError as exc:
            raise refuse(exc.message) from None
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise refuse(f"{SAFETENSORS_INDEX} lists {', '.join(missing[:3])}"
                         f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}, missing here")
    elif (directory / "model.safetensors").is_file():
        shards = [directory / "model.safetensors"]
    else:
        raise refuse(f"no model.safetensors or {SAFETENSORS_INDEX}")
    for shard in shards:
        try:
            read_safetensors_header(shard)  # headers only: catches a truncated copy
        except CheckpointError as exc:
            raise refuse(exc.message) from None
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def _output_recipe(directory: Path) -> Recipe:
    from mergecli.recipe import load_recipe

    try:
        return load_recipe(directory / "mergecli.toml")
    except RecipeError as exc:
        raise UsageError(f"{directory}: not a finished mergecli output: {exc.message}") from None


def push(directory: Path | str, *, repo_id: str | None = None, private: bool | None = None,
         revision: str | None = None, message: str | None = None, dry_run: bool = False,
         token: str | None = None) -> PushResult:
    """Upload a finished merge output to a model repo on the hub, in one commit.

    The repo is created if needed (`exist_ok`), `revision` as a branch from main if it does not
    exist. Arguments left None come from the `[push]` table of the output's mergecli.toml.
    Weight files of an earlier push that this output does not have are deleted in the same commit.
    Resumable: after an interrupted upload, a rerun does not send again the files the hub already
    stores (preupload answers with their ids; the LFS batch omits stored objects); with `hf_xet`
    and the real hub, `upload_folder` itself commits large folders in resumable batches.

    Args:
        directory: a finished mergecli output (see `output_files`).
        repo_id: `org/name`.
        private: create the repo private; refuse to push into an existing public repo.
        revision: branch to commit to (default: the repo's main branch).
        message: commit message (default: says what merge it is).
        dry_run: check and list the files; send nothing (no token needed).
        token: a token; None lets huggingface_hub find one (HF_TOKEN, `hf auth login`).

    Returns:
        A `PushResult` with the files, sizes, commit and commit URL.

    Raises:
        UsageError: not a finished output, bad repo id, or --private on a public repo.
        HubAccessError / HubNotFoundError: no, rejected or read-only token; no such repo (exit 2).
        HubError: hub unreachable, server error, interrupted upload (rerun to resume).

    Example:
        >>> result = push("merged/llama-avg", repo_id="me/llama-avg", private=True)
        >>> print(result.commit_url)
    """
    directory = Path(directory)
    files = output_files(directory)
    recipe = _output_recipe(directory)
    defaults = recipe.push
    repo_id = repo_id or (defaults.repo_id if defaults else None)
    if not repo_id:
        raise UsageError("no repo to push to", hint="pass --repo-id ORG/NAME, or set [push] repo_id in the recipe")
    if not looks_like_repo_id(repo_id):
        raise UsageError(f"repo id {repo_id!r}: expected ORG/NAME (letters, digits, '.', '_', '-')")
    private = private if private is not None else bool(defaults and defaults.private)
    revision = revision or (defaults.revision if defaults else None)
    message = message or (defaults.message if defaults else None) or _default_message(recipe)
    result = PushResult(repo_id, revision or "main", message, private, tuple(files), dry_run=dry_run)
    if dry_run:
        return result

    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set: pushing needs the hub", hint="unset HF_HUB_OFFLINE to push",
                       repo_id=repo_id)
    if not (token or get_token()):
        raise HubAccessError("no Hugging Face token: pushing needs one with write access",
                             hint=LOGIN_HINT, repo_id=repo_id)
    api = HfApi(token=token)
    with _hub_errors(repo_id, writing=True):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = api.model_info(repo_id, revision=revision)
        if private and not before.private:
            raise UsageError(f"{repo_id} exists and is public: --private would not make it private",
                             hint="make the repo private in its settings first, or push without --private")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=directory, revision=revision, commit_message=message,
            allow_patterns=[glob.escape(name) for name, _ in files], delete_patterns=STALE_WEIGHTS,
        )
    return PushResult(repo_id, revision or "main", message, private, tuple(files), commit=info.oid,
                      commit_url=info.commit_url, changed=info.oid != before.sha)


def _default_message(recipe: Recipe) -> str:
    from mergecli import __version__

    method = {"average": "weighted average", "regmean": "RegMean"}.get(recipe.method, recipe.method)
    count = len(recipe.models)
    return f"Upload {method} merge of {count} model{'s' * (count != 1)} (mergecli {__version__})"


# ---------------------------------------------------------------------------------------------
# Errors: huggingface_hub / httpx2 exceptions -> typed, worded, token-free


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
def _hub_errors(repo_id: str, *, revision: str | None = None, writing: bool = False) -> Iterator[None]:
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
