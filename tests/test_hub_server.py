"""The fake Hub in tests/fakehub, exercised with the real huggingface_hub client code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from fakehub import FakeHub, fast_retries
from fakehub import fake_hub as fake_hub  # noqa: F401  (re-exported so pytest finds the fixture)

# huggingface_hub's own LFS PUT (data=<file>) triggers this httpx2 deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_test_secret"
REPO = "fake-user/merged-model"


@pytest.fixture
def api(fake_hub: FakeHub) -> HfApi:
    return HfApi(token=TOKEN)  # created after use_fake_hub: its endpoint is the fake's URL


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "to_upload"
    folder.mkdir()
    (folder / "README.md").write_text("# merged model\n")
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024))
    return folder


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_create_repo_records_private_flag_and_exist_ok(fake_hub: FakeHub, api: HfApi) -> None:
    assert api.whoami()["name"] == "fake-user"

    url = api.create_repo(REPO, private=True, exist_ok=True)
    again = api.create_repo(REPO, private=True, exist_ok=True)
    public = api.create_repo("fake-user/public-model")

    assert url == again == f"{fake_hub.url}/{REPO}"
    assert url.repo_id == REPO
    assert fake_hub.is_private(REPO) is True
    assert fake_hub.is_private("fake-user/public-model") is False
    assert public.repo_id == "fake-user/public-model"
    assert fake_hub.branches(REPO) == ["main"]
    assert [c.message for c in fake_hub.commits(REPO)] == ["initial commit"]
    with pytest.raises(HfHubHTTPError) as excinfo:  # exist_ok=False on an existing repo: 409
        api.create_repo(REPO)
    assert excinfo.value.response.status_code == 409


def test_upload_folder_to_new_branch_byte_for_byte(fake_hub: FakeHub, api: HfApi, upload_dir: Path) -> None:
    api.create_repo(REPO, exist_ok=True)
    api.create_branch(REPO, branch="merge/v1", exist_ok=True)
    api.create_branch(REPO, branch="merge/v1", exist_ok=True)  # 409 swallowed by exist_ok

    info = api.upload_folder(
        repo_id=REPO, folder_path=upload_dir, revision="merge/v1", commit_message="Merge v1 (linear)"
    )

    expected = _local_files(upload_dir)
    remote = fake_hub.files(REPO, revision="merge/v1")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == expected
    assert fake_hub.is_lfs(REPO, "model.safetensors", revision="merge/v1")  # went through git-LFS
    assert not fake_hub.is_lfs(REPO, "config.json", revision="merge/v1")  # inline in the commit
    assert fake_hub.requests_matching("PUT", r"^/__fakehub__/lfs/"), "no LFS PUT: bytes were not sent via LFS"
    assert not fake_hub.requests_matching(path="xet")

    assert sorted(fake_hub.branches(REPO)) == ["main", "merge/v1"]
    commit = fake_hub.last_commit(REPO, "merge/v1")
    assert commit.message == "Merge v1 (linear)"
    assert commit.author == "fake-user"
    assert commit.branch == "merge/v1"
    assert info.oid == commit.oid == fake_hub.head(REPO, "merge/v1")
    assert info.commit_url == f"{fake_hub.url}/{REPO}/commit/{commit.oid}"
    assert "model.safetensors" not in fake_hub.files(REPO, "main")  # main untouched

    # The token travelled only in the Authorization header.
    assert f"Bearer {TOKEN}" in fake_hub.auth_headers
    assert TOKEN not in fake_hub.request_log_text()
    assert "<redacted>" in fake_hub.request_log_text()


def test_snapshot_download_then_offline_from_cache(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    weights = os.urandom(200_000)
    fake_hub.add_repo(REPO)
    sha = fake_hub.add_commit(REPO, {"model.safetensors": weights, "config.json": "{}", "notes/big.bin": b"\0" * 10},
                              branch="release")

    folder = snapshot_download(REPO, revision="release", allow_patterns=["*.safetensors", "*.json"])
    assert Path(folder).name == sha
    got = _local_files(Path(folder))
    assert got == {"model.safetensors": weights, "config.json": b"{}"}
    assert str(tmp_path / "hf_home" / "hub") in folder  # the temp HF_HOME, not the user's cache

    served = len(fake_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = snapshot_download(REPO, revision="release", allow_patterns=["*.safetensors", "*.json"])
    assert offline == folder
    assert _local_files(Path(offline)) == got
    assert len(fake_hub.requests) == served  # offline: nothing reached the server
    with pytest.raises(huggingface_hub.errors.OfflineModeIsEnabled):
        HfApi().model_info(REPO)


def test_download_by_branch_and_by_commit_sha(fake_hub: FakeHub) -> None:
    first = fake_hub.add_repo(REPO, {"config.json": "v1"})
    second = fake_hub.add_commit(REPO, {"config.json": "v2"})
    assert first != second and len(second) == 40

    assert Path(hf_hub_download(REPO, "config.json")).read_text() == "v2"
    assert Path(hf_hub_download(REPO, "config.json", revision=first)).read_text() == "v1"
    assert Path(hf_hub_download(REPO, "config.json", revision=second)).read_text() == "v2"
    assert HfApi().model_info(REPO, revision=first).sha == first


def test_missing_repo_revision_and_file_raise_hub_errors(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, {"config.json": "{}"})

    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("fake-user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("fake-user/does-not-exist", "config.json", token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.safetensors")
    assert HfApi().repo_exists(REPO) and not HfApi().repo_exists("fake-user/does-not-exist")


def test_wrong_or_missing_token_is_rejected(fake_hub: FakeHub, upload_dir: Path) -> None:
    fake_hub.add_repo(REPO, {"config.json": "{}"})

    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(token="hf_wrong").whoami()
    assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as excinfo:
        snapshot_download(REPO, token="hf_wrong")
    assert excinfo.value.response.status_code == 401
    assert not isinstance(excinfo.value, RepositoryNotFoundError)  # "Invalid credentials", not "not found"

    with pytest.raises(HfHubHTTPError) as excinfo:  # anonymous write
        HfApi().upload_folder(repo_id=REPO, folder_path=upload_dir, commit_message="nope")
    assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi().create_repo("fake-user/anonymous")
    assert excinfo.value.response.status_code == 401

    fake_hub.add_token("hf_read_only", "reader", write=False)
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(token="hf_read_only").upload_folder(repo_id=REPO, folder_path=upload_dir, commit_message="nope")
    assert excinfo.value.response.status_code == 403
    assert [c.message for c in fake_hub.commits(REPO)] == ["initial commit", "Add files"]


def test_private_repo_needs_a_token(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, {"config.json": "{}"}, private=True)

    with pytest.raises(RepositoryNotFoundError) as excinfo:
        hf_hub_download(REPO, "config.json")
    assert excinfo.value.response.status_code == 401
    assert Path(hf_hub_download(REPO, "config.json", token=TOKEN)).read_text() == "{}"


def test_gated_repo_raises_gated_repo_error(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, {"model.safetensors": b"\0weights"})
    fake_hub.set_gated(REPO)

    with pytest.raises(GatedRepoError) as excinfo:
        hf_hub_download(REPO, "model.safetensors", token=TOKEN)
    assert excinfo.value.response.status_code == 403
    with pytest.raises(GatedRepoError) as excinfo:
        snapshot_download(REPO)  # anonymous
    assert excinfo.value.response.status_code == 401

    fake_hub.grant_access(REPO)
    assert Path(hf_hub_download(REPO, "model.safetensors", token=TOKEN)).read_bytes() == b"\0weights"


def test_interrupted_commit_then_rerun_succeeds(fake_hub: FakeHub, api: HfApi, upload_dir: Path) -> None:
    api.create_repo(REPO)
    fake_hub.interrupt_commit(drop=True)

    with pytest.raises(httpx2.RemoteProtocolError):
        api.upload_folder(repo_id=REPO, folder_path=upload_dir, commit_message="Upload merge")
    assert [c.message for c in fake_hub.commits(REPO)] == ["initial commit"]
    assert "model.safetensors" not in fake_hub.files(REPO)
    assert len(fake_hub.lfs_objects(REPO)) == 1  # the LFS bytes did arrive before the commit failed
    puts_before = len(fake_hub.requests_matching("PUT", r"^/__fakehub__/lfs/"))

    info = api.upload_folder(repo_id=REPO, folder_path=upload_dir, commit_message="Upload merge")

    assert fake_hub.last_commit(REPO).message == "Upload merge"
    assert info.oid == fake_hub.head(REPO)
    assert {k: v for k, v in fake_hub.files(REPO).items() if k != ".gitattributes"} == _local_files(upload_dir)
    assert len(fake_hub.requests_matching("PUT", r"^/__fakehub__/lfs/")) == puts_before  # not re-uploaded


def test_commit_500_is_not_retried_and_lands_nothing(fake_hub: FakeHub, api: HfApi, upload_dir: Path) -> None:
    api.create_repo(REPO)
    fake_hub.interrupt_commit(drop=False, status=500)

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(repo_id=REPO, folder_path=upload_dir, commit_message="x")
    assert excinfo.value.response.status_code == 500
    assert len(fake_hub.requests_matching("POST", "/commit/")) == 1
    assert fake_hub.commits(REPO)[-1].message == "initial commit"


def test_fail_all_switch(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_repo(REPO, {"config.json": "{}"})

    fake_hub.fail_all(404, error_code="RepoNotFound")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(REPO)
    fake_hub.fail_all(401)
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi().model_info(REPO)
    assert excinfo.value.response.status_code == 401

    fast_retries(monkeypatch)  # 500 is retried 5 times with back-off sleeps
    fake_hub.fail_all(500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi().list_repo_files(REPO)
    assert excinfo.value.response.status_code == 500
    assert len(fake_hub.requests_matching("GET", "/tree/")) == 6  # 1 try + 5 retries

    fake_hub.clear_failures()
    assert ".gitattributes" in HfApi().list_repo_files(REPO)


def test_subprocess_uses_the_fake_hub_through_env(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo(REPO, {"config.json": '{"a": 1}'}, private=True)
    code = (
        "import sys, huggingface_hub as h;"
        f"p = h.hf_hub_download({REPO!r}, 'config.json');"
        "print(open(p).read()); print(p)"
    )
    env = fake_hub.subprocess_env(tmp_path / "sub_home", token=TOKEN)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    content, path = out.stdout.splitlines()[:2]
    assert content == '{"a": 1}'
    assert path.startswith(str(tmp_path / "sub_home" / "hub"))


def test_dropped_lfs_put_is_retried_by_the_client(
    fake_hub: FakeHub, api: HfApi, monkeypatch: pytest.MonkeyPatch, upload_dir: Path
) -> None:
    fast_retries(monkeypatch)
    api.create_repo(REPO)
    fake_hub.fail_next(r"^/__fakehub__/lfs/", method="PUT", drop=True)

    api.upload_folder(repo_id=REPO, folder_path=upload_dir, commit_message="retry")

    puts = fake_hub.requests_matching("PUT", r"^/__fakehub__/lfs/")
    assert [r.status for r in puts] == [None, 200]  # first PUT dropped, the retry went through
    assert fake_hub.files(REPO)["model.safetensors"] == (upload_dir / "model.safetensors").read_bytes()
