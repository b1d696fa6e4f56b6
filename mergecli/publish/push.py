"""`push`: upload a finished merge output to a model repo on the Hugging Face Hub, in one commit."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergecli import __version__
from mergecli.errors import CheckpointError, HubAccessError, HubError, MergecliError, RecipeError, UsageError
from mergecli.io.atomic import is_temporary
from mergecli.io.files import CARD_FILE, SAFETENSORS_INDEX, USAGE_PLACEHOLDER, parse_index
from mergecli.io.hub import looks_like_repo_id
from mergecli.io.hub_errors import hub_errors
from mergecli.io.safetensors import read_header
from mergecli.methods.registry import get_method
from mergecli.recipe import Recipe, load_toml

# Weights an earlier push may have left on the branch: a new merge with other shard boundaries must
# replace them all, or the stale index would point transformers at stale shards.
STALE_WEIGHTS = ["model.safetensors", "model-*-of-*.safetensors", SAFETENSORS_INDEX]


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
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory")
    if is_temporary(directory.resolve()):
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
            shards = [directory / name for name in parse_index(index.read_text(), where=str(index))]
        except MergecliError as exc:
            raise refuse(exc.message) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise refuse(f"cannot read {SAFETENSORS_INDEX}: {exc}") from None
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
            read_header(shard)  # headers only: catches a truncated copy
        except CheckpointError as exc:
            raise refuse(exc.message) from None
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
            named = local_paths_in(path)
            if named:
                raise UsageError(f"{path} names the local path {named[0]}, which pushing would publish",
                                 hint="remove it from that file (mergecli writes none: it came from an input's file)")
    return files


def _output_recipe(directory: Path) -> Recipe:
    try:
        return load_toml(directory / "mergecli.toml")
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

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    check_access(repo_id, token=token)
    api = HfApi(token=token)
    with hub_errors(repo_id, writing=True):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = api.model_info(repo_id, revision=revision)
        if private and not before.private:
            raise UsageError(f"{repo_id} exists and is public: --private would not make it private",
                             hint="make the repo private in its settings first, or push without --private")
        stale = [name for name in api.list_repo_files(repo_id, revision=revision)
                 if any(fnmatch.fnmatchcase(name, pattern) for pattern in STALE_WEIGHTS) and name not in dict(files)]
        operations = [CommitOperationAdd(name, _card_for(directory, repo_id) if name == CARD_FILE else directory / name)
                      for name, _ in files] + [CommitOperationDelete(name) for name in stale]
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return PushResult(repo_id, revision or "main", message, private, tuple(files), commit=info.oid,
                      commit_url=info.commit_url, changed=info.oid != before.sha)


def _card_for(directory: Path, repo_id: str) -> bytes:
    """The output's model card as pushed: its usage snippet names the repo instead of a local path (the
    file on disk is left as the merge wrote it)."""
    card = (directory / CARD_FILE).read_bytes()
    return card.replace(f'"{USAGE_PLACEHOLDER}{directory.name}"'.encode(), json.dumps(repo_id).encode())


def check_access(repo_id: str, *, token: str | None = None) -> None:
    """What a push needs, checked before anything else: the hub reachable (not offline), a token it
    accepts, and one that may write (not read-only).

    Raises:
        HubAccessError: no token, a rejected or read-only token (exit 2).
        HubError: offline, or the hub unreachable.
    """
    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise HubError("offline", repo_id=repo_id, writing=True)
    if not (token or get_token()):
        raise HubAccessError("no-token", repo_id=repo_id, writing=True)
    with hub_errors(repo_id, writing=True):
        account = HfApi(token=token).whoami()
    role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAccessError("read-only-token", repo_id=repo_id, writing=True, token=True)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~@%-])/[\w.@+-]+(?:/[\w.@+-]+)*")


def local_paths_in(path: Path) -> list[str]:
    """Absolute paths of this machine named in a text file (binary and huge files are not read):
    what would tell the world about the user's machine if the file were published."""
    if path.suffix == ".safetensors" or path.stat().st_size > 64 * 2**20:
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    found = []
    for match in _ABSOLUTE_PATH.finditer(text):
        top = "/" + match.group(0).split("/")[1]
        if os.path.isdir(top) and match.group(0) not in found:  # a path rooted in this machine's tree
            found.append(match.group(0))
    return found


def _default_message(recipe: Recipe) -> str:
    method = get_method(recipe.method).label(recipe)
    count = len(recipe.models)
    return f"Upload {method} of {count} model{'s' * (count != 1)} (mergecli {__version__})"


