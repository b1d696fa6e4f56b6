"""Hugging Face Hub inputs: resolve a repo id to a local snapshot holding only what a merge reads.

Everything goes through huggingface_hub's public API, imported at call time, never at mergecli's
import: huggingface_hub itself reads HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE, so mergecli
honours them exactly as `hf` does, and the token never passes through mergecli.

Downloads fetch the weights (safetensors preferred over `.bin`, chosen from the repo's file list
by io/files.py), config, generation config and tokenizer files. In offline mode the same code works
from the cache. A plan that reads no tensor (validate, --dry-run) reads the safetensors headers
alone, with HTTP range requests. Errors come out typed (io/hub_errors.py) and token-free; the CLI words them.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from mergecli.errors import CheckpointError, HubError
from mergecli.io.files import (
    CARD_FILE,
    CONFIG_FILES,
    MAX_HEADER,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    choose_weight_files,
    weight_map,
)
from mergecli.io.hub_errors import hub_errors
from mergecli.io.ranges import MAX_ATTEMPTS, get_range
from mergecli.io.remote import RemoteFile

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(f"(?:{_REPO_PART}/)?{_REPO_PART}")  # org/name, or a canonical name (gpt2)
_COMMIT = re.compile(r"[0-9a-f]{40}")


def names_repo(path: str) -> bool:
    """Whether an input's path is a hub repo id. A relative path that may be one is one: it is never
    looked up in the current directory (load_recipe makes a recipe's local paths absolute)."""
    return not Path(path).expanduser().is_absolute() and looks_like_repo_id(path)


def looks_like_repo_id(path: str) -> bool:
    """`org/name` or a canonical `name` (`gpt2`) with hub-legal characters (the hub also forbids
    `--`, `..` and over 96 characters)."""
    return (_REPO_ID.fullmatch(path) is not None and ".." not in path and "--" not in path
            and not path.endswith(".git") and all(len(part) <= 96 for part in path.split("/")))


@dataclass
class Snapshot:
    """A repo resolved to a commit: its small files (config, index, tokenizer) in the cache folder,
    and the names of the weight files a merge reads (not necessarily downloaded yet)."""

    repo_id: str
    commit: str
    folder: Path
    weights: list[str]
    index: dict[str, str] | None  # the weight map of a sharded checkpoint

    @property
    def cached(self) -> bool:
        return all((self.folder / name).is_file() for name in self.weights)


def resolve(repo_id: str, *, revision: str | None = None) -> Snapshot:
    """Resolve the revision (branch, tag or commit; default the main branch) to a commit, fetch the
    config, index and tokenizer files, and choose the weights a merge reads from the repo's file
    list (cached with the snapshot, so it is known offline too). `fetch_weights` downloads them;
    `remote_header` reads their headers alone.

    Raises:
        HubNotFoundError: no such repo or revision (exit 2).
        HubAccessError: gated repo without access, missing or rejected token (exit 2).
        HubError: hub unreachable, server error, or offline without the files in the cache.
        CheckpointError: the repo holds no safetensors weights or PyTorch state dict.

    Example:
        >>> directory = fetch_weights(resolve("org/llama-math", revision="main"))
    """
    metadata = list(dict.fromkeys([*CONFIG_FILES, CARD_FILE, SAFETENSORS_INDEX, *TOKENIZER_FILES]))
    with hub_errors(repo_id, revision=revision):
        folder = _snapshot(repo_id, revision, metadata)  # also caches the repo's file list
        commit = folder.name
        if not _COMMIT.fullmatch(commit):  # a snapshot directory is always named by its commit
            raise HubError("cache-layout", repo_id=repo_id, detail=str(folder))
        names = _repo_files(repo_id, commit, folder)
        indexes: dict[str, dict[str, str]] = {}

        def read_index(name: str) -> list[str]:
            index = _snapshot(repo_id, commit, [name]) / name
            if not index.is_file():
                raise HubError("snapshot-incomplete", repo_id=repo_id, revision=commit, files=(name,))
            indexes[name] = weight_map(index.read_text(), where=f"{repo_id}/{name}")
            return list(dict.fromkeys(indexes[name].values()))

        weights = choose_weight_files(names, read_index=read_index)
    if not weights:
        raise CheckpointError(
            repo_id, "this hub repo has no safetensors weights and no PyTorch state dict "
                     "(model.safetensors, sharded *.safetensors, pytorch_model.bin)",
            hint="mergecli merges transformers-style checkpoints; check the repo id and its files",
        )
    shards = [name for name in weights if not name.endswith(".index.json")]
    return Snapshot(repo_id, commit, folder, shards, next(iter(indexes.values()), None))


def fetch_weights(snapshot: Snapshot) -> Path:
    """Download the snapshot's weight files (those the cache lacks); return the snapshot folder."""
    metadata = [name for name in (*CONFIG_FILES, CARD_FILE, SAFETENSORS_INDEX, *TOKENIZER_FILES)
                if (snapshot.folder / name).is_file()]
    with hub_errors(snapshot.repo_id, revision=snapshot.commit):
        return _snapshot(snapshot.repo_id, snapshot.commit, metadata + snapshot.weights, required=snapshot.weights)


def remote_header(snapshot: Snapshot, name: str, *, attempts: int = MAX_ATTEMPTS) -> tuple[bytes, bytes, int]:
    """Read one safetensors file's header from the hub with two HTTP range requests (its size
    field, then the header), never a byte of its tensors: `(first 8 bytes, header JSON, file size)`.
    Faults are retried as the streamed reads' are (io/ranges.py), `attempts` tries in all."""
    prefix = bytearray(8)
    size = get_range(snapshot.repo_id, snapshot.commit, name, 0, prefix, attempts=attempts)
    length = int.from_bytes(prefix, "little") if size >= 8 else 0
    if not 0 < length <= min(MAX_HEADER, size - 8):  # the caller's checks say what is wrong
        return bytes(prefix[:max(0, min(8, size))]), b"", size
    header = bytearray(length)
    get_range(snapshot.repo_id, snapshot.commit, name, 8, header, attempts=attempts)
    return bytes(prefix), bytes(header), size


def streamable(snapshot: Snapshot) -> bool:
    """Whether the snapshot's weights can be read by range requests rather than downloaded: safetensors
    files, not all of them complete in the cache, and a hub that may be asked."""
    from huggingface_hub import constants

    return (not snapshot.cached and all(name.endswith(".safetensors") for name in snapshot.weights)
            and not constants.is_offline_mode())


def remote_file(snapshot: Snapshot, name: str, *, attempts: int = MAX_ATTEMPTS) -> RemoteFile:
    """One weight file to stream: its header (`remote_header`) and the Hub's digest of it (`file_identity`)."""
    prefix, raw, size = remote_header(snapshot, name, attempts=attempts)
    identity = file_identity(snapshot, name)
    return RemoteFile(snapshot.repo_id, snapshot.commit, name, size, prefix + raw,
                      sha256=identity.sha256, git_oid=identity.git_oid)


@dataclass(frozen=True)
class FileIdentity:
    """What the Hub says a file's bytes hash to: the sha256 of an LFS file, or the git blob id of a
    file stored in git itself."""

    sha256: str | None
    git_oid: str | None


def file_identity(snapshot: Snapshot, name: str) -> FileIdentity:
    """The identity the Hub gives one file at the snapshot's commit (one HEAD request: its linked
    etag is an LFS file's sha256, its etag a git file's blob id)."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(snapshot.repo_id, name, revision=snapshot.commit)
    with hub_errors(snapshot.repo_id, revision=snapshot.commit):
        for attempt in range(3):  # a kept-alive connection the server had closed: once more, on a new one
            try:
                etag = get_hf_file_metadata(url).etag or ""
                break
            except httpx2.TransportError:
                if attempt == 2:
                    raise
    etag = etag.strip('"').removeprefix("W/").strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return FileIdentity(etag, None)
    return FileIdentity(None, etag if re.fullmatch(r"[0-9a-f]{40}", etag) else None)


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
        raise HubError("snapshot-incomplete-offline" if constants.is_offline_mode() else "snapshot-incomplete",
                       repo_id=repo_id, revision=folder.name, files=tuple(missing))
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
