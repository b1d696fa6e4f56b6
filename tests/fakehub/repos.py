"""The fake hub's state: model repos in memory, as commits of file trees, with git-LFS objects."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

# The hub stores files of 10 MB or more, or binary ones, in LFS; so does the fake.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# What the hub puts in `.gitattributes` of a new repo (abridged): these patterns go to LFS.
_LFS_PATTERNS = "*.bin *.ckpt *.gguf *.h5 *.model *.msgpack *.npy *.onnx *.pt *.pth *.safetensors *.tar *.zip".split()
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def repo_files(path: Path) -> dict[str, bytes]:
    """A model directory as the files of a hub repo (relative path → bytes), for `FakeHub.add_repo`."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Blob:
    """A file's content, and whether the hub keeps it in LFS."""

    content: bytes
    lfs: bool
    claimed_sha256: str | None = None  # what the hub says the content hashes to (`FakeHub.tamper`: not it)

    @cached_property  # a GB-sized blob is hashed once, not on every range request
    def sha256(self) -> str:
        return self.claimed_sha256 or hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @cached_property
    def git_oid(self) -> str:
        """The git object id of what git stores: the content, or its LFS pointer."""
        stored = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(self.pointer)

    def entry(self, path: str) -> dict:
        """The file as the tree endpoint describes it."""
        entry = {"type": "file", "path": path, "size": len(self.content), "oid": self.git_oid}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": self.pointer_size}
        return entry


@dataclass
class CommitRecord:
    oid: str
    message: str
    branch: str
    author: str | None
    parent: str | None
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool | str = False
    granted: set[str] = field(default_factory=set)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, CommitRecord] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    created_at: str = field(default_factory=now_iso)

    def resolve(self, revision: str) -> str | None:
        """A branch, a full commit oid or a unique abbreviation of one → the commit oid."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def record_commit(self, branch: str, files: dict[str, Blob], message: str, author: str | None) -> CommitRecord:
        parent = self.branches.get(branch)
        commit = CommitRecord(secrets.token_hex(20), message, branch, author, parent, now_iso(), files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    def upload_mode(self, tree: dict[str, Blob], path: str, size: int, sample: bytes) -> str:
        """"lfs" or "regular", like the hub: by size, binary sniffing and .gitattributes patterns."""
        if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
            return "lfs"
        attributes = tree.get(".gitattributes")
        name = path.rsplit("/", 1)[-1]
        for line in (attributes.content.decode(errors="replace") if attributes else "").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                if fnmatch.fnmatchcase(path if "/" in parts[0] else name, parts[0]):
                    return "lfs"
        return "regular"


def new_repo(repo_id: str, *, private: bool, author: str | None) -> Repo:
    """A repo with the hub's "initial commit" holding a `.gitattributes`."""
    repo = Repo(repo_id=repo_id, private=private)
    repo.record_commit("main", {".gitattributes": Blob(DEFAULT_GITATTRIBUTES.encode(), False)},
                       "initial commit", author or "system")
    return repo
