"""Hugging Face Hub inputs: resolve a repo id to a local snapshot holding only what a merge reads.

Everything goes through huggingface_hub's public API, imported at call time, never at mergecli's
import: huggingface_hub itself reads HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE, so mergecli
honours them exactly as `hf` does, and the token never passes through mergecli.

Downloads fetch the weights (safetensors preferred over `.bin`, chosen from the repo's file list
by io/files.py), config, generation config and tokenizer files. In offline mode the same code works
from the cache. Errors come out typed (io/hub_errors.py) and token-free.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from mergecli.errors import CheckpointError, HubError
from mergecli.io.files import CONFIG_FILES, SAFETENSORS_INDEX, TOKENIZER_FILES, choose_weight_files, parse_index
from mergecli.io.hub_errors import hub_errors

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(f"{_REPO_PART}/{_REPO_PART}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def looks_like_repo_id(path: str) -> bool:
    """`org/name` with hub-legal characters (the hub also forbids `--`, `..` and over 96 characters)."""
    return (_REPO_ID.fullmatch(path) is not None and ".." not in path and "--" not in path
            and not path.endswith(".git") and all(len(part) <= 96 for part in path.split("/")))


def download_checkpoint(repo_id: str, *, revision: str | None = None) -> tuple[Path, str]:
    """Download (or find in the hub cache) a model's weights, config and tokenizer files.

    The revision (branch, tag or commit; default the main branch) is resolved to a commit first;
    then the repo's file list (cached with the snapshot, so it is known offline too) decides which
    weights to fetch (io/files.py `choose_weight_files`). huggingface_hub draws its own progress
    bars on stderr.

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
    metadata = list(dict.fromkeys([*CONFIG_FILES, SAFETENSORS_INDEX, *TOKENIZER_FILES]))
    with hub_errors(repo_id, revision=revision):
        # 1. Resolve the revision (this also caches the repo's file list) and get the small files.
        folder = _snapshot(repo_id, revision, metadata)
        commit = folder.name
        if not _COMMIT.fullmatch(commit):  # a snapshot directory is always named by its commit
            raise HubError(f"{repo_id}: unexpected hub cache layout at {folder}", repo_id=repo_id)
        # 2. Choose the weights from the file list, 3. fetch them, pinned to the resolved commit.
        names = _repo_files(repo_id, commit, folder)

        def read_index(name: str) -> list[str]:
            index = _snapshot(repo_id, commit, [name]) / name
            if not index.is_file():
                raise HubError(f"{repo_id}: {name} is not in the cached snapshot",
                               hint="run once with network access to complete the download", repo_id=repo_id)
            return parse_index(index.read_text(), where=f"{repo_id}/{name}")

        weights = choose_weight_files(names, read_index=read_index)
        if not weights:
            raise CheckpointError(
                repo_id, "this hub repo has no safetensors weights and no PyTorch state dict "
                         "(model.safetensors, sharded *.safetensors, pytorch_model.bin)",
                hint="mergecli merges transformers-style checkpoints; check the repo id and its files",
            )
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
