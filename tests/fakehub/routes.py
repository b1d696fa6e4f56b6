"""The hub endpoints mergecli's tests reach through huggingface_hub, answered from the fake's repos.

Reads: model info, tree listing, HEAD/GET /resolve (with Range, as the header reads use).
Writes: whoami, validate-yaml, create repo, create branch, preupload, git-LFS batch + verify +
upload, NDJSON commit. Errors carry the `X-Error-Code` that huggingface_hub maps to its types.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fakehub.repos import Blob, CommitRecord, Repo, new_repo

if TYPE_CHECKING:
    from fakehub.server import FakeHub

User = tuple[str, bool] | None  # (name, can write), None when anonymous


class HubError(Exception):
    """An error answer: status, message (X-Error-Message) and optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        raise HubError(400, f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise HubError(400, "JSON body must be an object")
    return data


@dataclass
class Upload:
    """A pending LFS upload (what a presigned S3 URL stands for)."""

    repo_id: str
    oid: str
    size: int


# ---- access --------------------------------------------------------------------------------------


def repo_for_read(hub: FakeHub, repo_id: str, user: User) -> Repo:
    repo = hub.repos.get(repo_id)
    if repo is None or (repo.private and user is None):
        # The hub answers 401 to anonymous callers so as not to reveal whether a repo exists.
        raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
    return repo


def repo_for_write(hub: FakeHub, repo_id: str, user: User) -> Repo:
    repo = repo_for_read(hub, repo_id, user)
    if user is None:
        raise HubError(401, "You must be authenticated to write to this repo", "RepoNotFound")
    if not user[1]:
        raise HubError(403, f"You don't have the rights to write to {repo_id} (read-only token)")
    return repo


def commit_at(repo: Repo, revision: str) -> CommitRecord:
    oid = repo.resolve(revision)
    if oid is None:
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return repo.commits[oid]


def check_gate(repo: Repo, user: User) -> None:
    if not repo.gated or (user is not None and user[0] in repo.granted):
        return
    if user is None:
        raise HubError(401, f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                            "authenticated to access it. Please log in.", "GatedRepo")
    raise HubError(403, f"Access to model {repo.repo_id} is restricted and you are not in the authorized "
                        "list. Visit the repo page to ask for access.", "GatedRepo")


# ---- account -------------------------------------------------------------------------------------


def whoami(hub: FakeHub, user: User) -> Response:
    if user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    name, can_write = user
    return json_response({
        "type": "user", "id": hashlib.sha1(name.encode()).hexdigest()[:24], "name": name, "fullname": name,
        "orgs": [], "auth": {"type": "access_token",
                             "accessToken": {"displayName": "fakehub", "role": "write" if can_write else "read"}},
    })


def validate_yaml(payload: dict) -> Response:
    """The model card check before a commit touching README.md: the front matter must be a mapping."""
    import yaml  # a huggingface_hub dependency

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", str(payload.get("content", "")), re.DOTALL)
    errors = []
    if match:
        try:
            metadata = yaml.safe_load(match.group(1))
            if metadata is not None and not isinstance(metadata, dict):
                errors.append({"message": "YAML metadata must be a mapping"})
        except yaml.YAMLError as exc:
            errors.append({"message": f"Invalid YAML in README.md: {exc}"})
    return json_response({"errors": errors, "warnings": []}, 400 if errors else 200)


def create_repo(hub: FakeHub, payload: dict, user: User) -> Response:
    if user is None:
        raise HubError(401, "You must be authenticated to create a repo")
    name, namespace = payload.get("name"), payload.get("organization") or user[0]
    pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    if not (isinstance(name, str) and pattern.fullmatch(name) and pattern.fullmatch(namespace)):
        raise HubError(400, f"Invalid repo name: {namespace}/{name}")
    repo_id = f"{namespace}/{name}"
    url = f"{hub.url}/{repo_id}"
    if repo_id in hub.repos:  # huggingface_hub reads "url" from the 409 body when exist_ok=True
        return json_response({"error": "You already created this model repo", "url": url}, 409,
                             {"X-Error-Message": "You already created this model repo"})
    if not user[1]:
        raise HubError(403, "You don't have the rights to create a repo (read-only token)")
    visibility = payload.get("visibility")
    private = visibility == "private" if visibility is not None else bool(payload.get("private", False))
    hub.repos[repo_id] = new_repo(repo_id, private=private, author=user[0])
    return json_response({"url": url, "name": repo_id, "id": secrets.token_hex(12)})


# ---- reads ---------------------------------------------------------------------------------------


def model_info(hub: FakeHub, repo_id: str, revision: str, user: User) -> Response:
    repo = repo_for_read(hub, repo_id, user)
    commit = commit_at(repo, revision)
    return json_response({
        "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
        "author": repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
        "createdAt": repo.created_at, "private": repo.private, "gated": repo.gated, "disabled": False,
        "downloads": 0, "likes": 0, "tags": [], "siblings": [{"rfilename": p} for p in sorted(commit.files)],
    })


def tree(hub: FakeHub, repo_id: str, revision: str, user: User) -> Response:
    """The whole tree (the `recursive` listing snapshot_download asks for), one page."""
    commit = commit_at(repo_for_read(hub, repo_id, user), revision)
    entries: dict[str, dict] = {}
    for path, blob in sorted(commit.files.items()):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                        "oid": hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()})
        entries[path] = blob.entry(path)
    return json_response(list(entries.values()))


def resolve_file(hub: FakeHub, method: str, repo_id: str, revision: str, path: str, user: User,
                 range_header: str | None) -> Response:
    repo = repo_for_read(hub, repo_id, user)
    commit = commit_at(repo, revision)
    common = {"X-Repo-Commit": commit.oid}
    check_gate(repo, user)  # gated: no file content (nor its absence) without access
    blob = commit.files.get(path)
    if blob is None:  # X-Repo-Commit lets huggingface_hub cache the non-existence
        raise HubError(404, "Entry not found", "EntryNotFound", headers=common)
    name = quote(path.rsplit("/", 1)[-1])
    headers = {**common, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream",
               "Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\";"}
    if blob.lfs:  # the hub redirects LFS files to a CDN and puts the file's identity in these headers
        headers["X-Linked-Etag"] = f'"{blob.sha256}"'
        headers["X-Linked-Size"] = str(len(blob.content))
    data = blob.content
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header or "")
    if method == "GET" and match and (match.group(1) or match.group(2)):
        size = len(data)
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        else:
            start, end = max(size - int(match.group(2)), 0), size - 1
        if start >= size or start > end:
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Response(206, data[start:end + 1], headers)
    return Response(200, data, headers)  # for HEAD the body is not sent, but sets Content-Length


# ---- writes --------------------------------------------------------------------------------------


def create_branch(hub: FakeHub, repo_id: str, branch: str, body: bytes, user: User) -> Response:
    repo = repo_for_write(hub, repo_id, user)
    if branch in repo.branches:
        raise HubError(409, f"Reference already exists: refs/heads/{branch}")
    start = (parse_json(body) if body else {}).get("startingPoint") or "main"
    repo.branches[branch] = commit_at(repo, start).oid
    return json_response({})


def preupload(hub: FakeHub, repo_id: str, revision: str, payload: dict, user: User) -> Response:
    repo = repo_for_write(hub, repo_id, user)
    commit = commit_at(repo, revision)
    out = []
    for entry in payload.get("files", []):
        path, size = entry["path"], int(entry["size"])
        mode = repo.upload_mode(commit.files, path, size, base64.b64decode(entry.get("sample", "")))
        existing = commit.files.get(path)
        # `oid` lets the client skip unchanged files: sha256 for LFS, git blob sha1 otherwise
        oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.git_oid)
        out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return json_response({"files": out, "commitOid": commit.oid})


def lfs_batch(hub: FakeHub, repo_id: str, payload: dict, user: User) -> Response:
    repo = repo_for_write(hub, repo_id, user)
    objects = []
    for obj in payload.get("objects", []):
        oid, size = obj.get("oid"), obj.get("size")
        stored = repo.lfs_objects.get(oid)
        if stored is not None and len(stored) == size:
            objects.append({"oid": oid, "size": size})  # no "actions": already uploaded
            continue
        upload_id = secrets.token_hex(16)
        hub.uploads[upload_id] = Upload(repo_id, oid, size)
        verify = {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}}
        upload = {"href": f"{hub.url}/__fakehub__/lfs/{upload_id}", "header": {}, "expires_in": 3600}
        objects.append({"oid": oid, "size": size, "authenticated": True,
                        "actions": {"upload": upload, "verify": verify}})
    return json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                         headers={"Content-Type": "application/vnd.git-lfs+json"})


def lfs_verify(hub: FakeHub, repo_id: str, payload: dict, user: User) -> Response:
    repo = repo_for_write(hub, repo_id, user)
    if payload.get("oid") not in repo.lfs_objects:
        raise HubError(404, f"LFS object {payload.get('oid')} not found")
    return json_response({})


def lfs_store(hub: FakeHub, upload_id: str, data: bytes) -> Response:
    """The object store behind the LFS upload URLs (presigned S3 URLs on the real hub: no auth)."""
    upload = hub.uploads.pop(upload_id, None)
    if upload is None:
        raise HubError(403, "Invalid or expired upload URL")
    if len(data) != upload.size or hashlib.sha256(data).hexdigest() != upload.oid:
        raise HubError(400, "Uploaded content does not match the announced oid/size")
    repo = hub.repos.get(upload.repo_id)
    if repo is not None:
        repo.lfs_objects[upload.oid] = data
    return Response(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})


def commit(hub: FakeHub, repo_id: str, revision: str, body: bytes, user: User) -> Response:
    repo = repo_for_write(hub, repo_id, user)
    base = commit_at(repo, revision)
    if revision not in repo.branches:
        raise HubError(400, f"Cannot commit to {revision}: not a branch")
    try:  # NDJSON: one {"key": ..., "value": ...} object per line, the header first
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(400, f"Invalid NDJSON commit payload: {exc}") from exc
    if not lines or lines[0].get("key") != "header" or not (lines[0]["value"].get("summary") or "").strip():
        raise HubError(400, "The first NDJSON line must be the commit header, with a summary")
    files = dict(base.files)
    for line in lines[1:]:
        key, value = line.get("key"), line.get("value") or {}
        path = value.get("path", "")
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise HubError(400, f"Invalid path in commit: {path!r}")
        if key == "file":
            content = value.get("content", "")
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            files[path] = Blob(data, False)
        elif key == "lfsFile":
            data = repo.lfs_objects.get(value.get("oid"))
            if data is None:
                raise HubError(422, f"LFS object {value.get('oid')} for {path} was never uploaded")
            files[path] = Blob(data, True)
        elif key == "deletedFile":
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        else:
            raise HubError(400, f"Unknown commit operation: {key}")
    record = repo.record_commit(revision, files, lines[0]["value"]["summary"], user[0])
    return json_response({"success": True, "commitOid": record.oid,
                          "commitUrl": f"{hub.url}/{repo_id}/commit/{record.oid}", "hookOutput": ""})
