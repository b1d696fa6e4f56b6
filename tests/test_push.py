"""`mergecli push` and `push_to_hub = true`, against the FakeHub in tests/fakehub with the real
huggingface_hub upload code (create_repo, create_branch, preupload, git-LFS, NDJSON commit)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from clirunner import cli, cli_process
from conftest import tree_digest
from fakehub import FakeHub, fast_retries, running_hub, use_fake_hub
from mergecli import __version__

# huggingface_hub's own LFS PUT (data=<file>) triggers this httpx2 deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_SECRET_push_7c1e44b2a9f0d3"
REPO = "fake-user/llama-avg"


def local_files(folder: Path, repo: str = REPO) -> dict[str, bytes]:
    """What push uploads: every file but the hidden ones (the manifest that --force reads), the card's
    usage snippet naming the repo instead of the local folder."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith(".")}
    files["README.md"] = files["README.md"].replace(f'"path/to/{folder.name}"'.encode(), f'"{repo}"'.encode())
    return files


def test_the_pushed_card_loads_the_model_from_the_repo(hub, merged):
    result = cli("push", merged, "--repo-id", REPO)
    assert result.exit_code == 0, result.output
    card = remote_files(hub)["README.md"].decode()
    assert f'from_pretrained("{REPO}")' in card and "path/to/" not in card
    assert "path/to/" in (merged / "README.md").read_text()  # the output on disk is as the merge wrote it


def remote_files(hub: FakeHub, revision: str = "main") -> dict[str, bytes]:
    return {k: v for k, v in hub.files(REPO, revision).items() if k != ".gitattributes"}


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def lfs_puts(hub: FakeHub) -> int:
    return len(hub.requests_matching("PUT", r"^/__fakehub__/lfs/"))


def assert_secret_kept(hub: FakeHub, *outputs: str, token: str = TOKEN) -> None:
    for text in outputs:
        assert token not in text
    assert token not in hub.request_log_text()  # URLs and headers, Authorization value excluded


@pytest.fixture(scope="module")
def merged_template(llama_fp32, tmp_path_factory) -> Path:
    """A finished, sharded merge output (index + 3 shards), made once."""
    out = tmp_path_factory.mktemp("merged") / "llama-avg"
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out, "--set", "shard_size=40000")
    assert result.exit_code == 0, result.output
    assert len(shards(out)) >= 3
    return out


@pytest.fixture
def merged(merged_template, tmp_path) -> Path:
    return Path(shutil.copytree(merged_template, tmp_path / "llama-avg"))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub that knows TOKEN, wired in, with HF_TOKEN=TOKEN."""
    with running_hub(TOKEN) as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hf_home", token=TOKEN)
        yield hub


def test_push_every_file_byte_for_byte_to_a_private_branch(hub, merged, caplog):
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its logging at its most talkative
    result = cli("push", merged, "--repo-id", REPO, "--private", "--revision", "merge/v1",
                 "--message", "Merge v1: math + code")

    assert result.exit_code == 0, result.output
    assert remote_files(hub, "merge/v1") == local_files(merged)
    assert len(local_files(merged)) >= 8  # shards, index, config, tokenizer, card, recipe
    assert all(hub.is_lfs(REPO, name, "merge/v1") for name in local_files(merged) if name.endswith(".safetensors"))
    assert hub.branches(REPO) == ["main", "merge/v1"]
    assert "config.json" not in hub.files(REPO, "main")  # main untouched
    assert hub.is_private(REPO)
    commit = hub.last_commit(REPO, "merge/v1")
    assert commit.message == "Merge v1: math + code" and commit.author == "fake-user"
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO}/commit/{commit.oid}"
    assert f"pushed {len(local_files(merged))} files" in result.stderr and "branch merge/v1, private" in result.stderr
    assert f"Bearer {TOKEN}" in hub.auth_headers  # the token was used, in its header only
    assert "huggingface_hub" in caplog.text  # its log was captured, and holds no token:
    assert_secret_kept(hub, result.stdout, result.stderr, caplog.text)


def test_default_branch_and_commit_message(hub, merged):
    result = cli("push", merged, "--repo-id", REPO)

    assert result.exit_code == 0, result.output
    assert remote_files(hub) == local_files(merged)
    assert not hub.is_private(REPO)
    assert hub.last_commit(REPO).message == f"Upload weighted average of 2 models (mergecli {__version__})"
    assert result.stdout.strip() == f"{hub.url}/{REPO}/commit/{hub.head(REPO)}"

    commits = len(hub.commits(REPO))
    again = cli("push", merged, "--repo-id", REPO)  # nothing changed: no empty commit, same URL
    assert again.exit_code == 0, again.output
    assert len(hub.commits(REPO)) == commits
    assert "already holds these" in again.stderr and "no new commit" in again.stderr
    assert again.stdout == result.stdout


def test_dry_run_lists_files_and_sends_nothing(hub, merged, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    result = cli("push", merged, "--repo-id", REPO, "--dry-run")

    assert result.exit_code == 0, result.output
    assert hub.requests == []
    for name in local_files(merged):
        assert name in result.stdout
    assert shards(merged)[0].name in result.stdout
    assert f"{len(local_files(merged))} files" in result.stdout and "nothing sent" in result.stdout


def _no_toml(d: Path) -> Path:
    (d / "mergecli.toml").unlink()
    return d


def _no_weights(d: Path) -> Path:
    for p in d.glob("model*"):
        p.unlink()
    return d


def _missing_shard(d: Path) -> Path:
    shards(d)[1].unlink()
    return d


def _truncated_shard(d: Path) -> Path:
    shard = shards(d)[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    return d


def _partial(d: Path) -> Path:
    return d.rename(d.parent / f".{d.name}.partial-4242")


def _missing(d: Path) -> Path:
    return d.parent / "no-such-dir"


@pytest.mark.parametrize(("damage", "words"), [
    (_no_toml, "not a finished mergecli output: no mergecli.toml"),
    (_no_weights, "not a finished mergecli output: no model.safetensors or model.safetensors.index.json"),
    (_missing_shard, "model.safetensors.index.json lists model-00002-of-0000"),
    (_truncated_shard, "truncated"),
    (_partial, "is the temporary directory of an unfinished or killed merge"),
    (_missing, "no such directory"),
])
def test_refuses_a_directory_that_is_not_a_finished_output(hub, merged, damage, words):
    directory = damage(merged)
    before = tree_digest(directory) if directory.exists() else None

    for extra in ([], ["--dry-run"]):
        result = cli("push", directory, "--repo-id", REPO, *extra)
        assert result.exit_code == 2, result.output
        assert words in result.stderr, result.stderr
        assert "Traceback" not in result.output
    assert hub.requests == []
    assert (tree_digest(directory) if directory.exists() else None) == before


def test_hub_down(merged, tmp_path, monkeypatch):
    hub = FakeHub(token=TOKEN).start()
    use_fake_hub(monkeypatch, hub, tmp_path / "home", token=TOKEN)
    url = hub.url
    hub.stop()  # nothing listens there any more
    before = tree_digest(merged)

    result = cli("push", merged, "--repo-id", REPO)

    assert result.exit_code == 1, result.output
    assert f"error: cannot reach the hub at {url}" in result.stderr
    assert "rerun the same command to resume" in result.stderr
    assert "Traceback" not in result.output and TOKEN not in result.output
    assert tree_digest(merged) == before


def test_token_rejected_401(hub, merged, monkeypatch):
    wrong = "hf_SECRET_wrong_0b9d8e7f6a5c"
    monkeypatch.setenv("HF_TOKEN", wrong)
    before = tree_digest(merged)

    result = cli("push", merged, "--repo-id", REPO)

    assert result.exit_code == 2, result.output
    assert "error: the hub rejected your token (401 Unauthorized)" in result.stderr
    assert "hf auth login" in result.stderr and "HF_TOKEN" in result.stderr
    assert not hub.repo_exists(REPO)
    assert tree_digest(merged) == before
    assert_secret_kept(hub, result.stdout, result.stderr, token=wrong)


def test_no_token_at_all(hub, merged, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = cli("push", merged, "--repo-id", REPO)
    assert result.exit_code == 2, result.output
    assert "no Hugging Face token" in result.stderr and "hf auth login" in result.stderr
    assert hub.requests == []


def test_read_only_token_403(hub, merged, monkeypatch):
    read_only = "hf_SECRET_readonly_55aa66bb"
    hub.add_token(read_only, "fake-user", write=False)
    monkeypatch.setenv("HF_TOKEN", read_only)

    result = cli("push", merged, "--repo-id", REPO)

    assert result.exit_code == 2, result.output
    assert f"your token is read-only: pushing to {REPO} needs write access" in result.stderr
    assert not hub.requests_matching("POST")  # found before anything was sent
    assert_secret_kept(hub, result.stdout, result.stderr, token=read_only)


def test_repo_not_found_404(hub, merged):
    hub.fail_all(404, error_code="RepoNotFound", message="Repository not found")
    result = cli("push", merged, "--repo-id", REPO)
    assert result.exit_code == 2, result.output
    assert f"{REPO}: repo not found, or your token may not write to it" in result.stderr


def test_server_error_on_commit(hub, merged):
    hub.add_repo(REPO)
    hub.interrupt_commit(drop=False, status=500)
    before = tree_digest(merged)

    result = cli("push", merged, "--repo-id", REPO)

    assert result.exit_code == 1, result.output
    assert "error: the hub failed with 500" in result.stderr
    assert "rerun the same command to resume" in result.stderr
    assert [c.message for c in hub.commits(REPO)] == ["initial commit"]
    assert tree_digest(merged) == before


def test_interrupted_upload_then_rerun_sends_no_lfs_object_twice(hub, merged, monkeypatch):
    fast_retries(monkeypatch)
    hub.interrupt_commit(drop=True)  # the LFS uploads succeed, the commit's connection drops
    before = tree_digest(merged)

    result = cli("push", merged, "--repo-id", REPO)

    assert result.exit_code == 1, result.output
    assert "the connection to the hub at" in result.stderr and "broke off" in result.stderr
    assert "files the hub already has are not sent again" in result.stderr
    assert tree_digest(merged) == before
    count = len(shards(merged))
    assert len(hub.lfs_objects(REPO)) == lfs_puts(hub) == count
    assert "config.json" not in hub.files(REPO)  # nothing committed

    result = cli("push", merged, "--repo-id", REPO)

    assert result.exit_code == 0, result.output
    assert lfs_puts(hub) == count  # stored objects were not uploaded again
    assert remote_files(hub) == local_files(merged)
    assert result.stdout.strip() == f"{hub.url}/{REPO}/commit/{hub.head(REPO)}"


def test_a_new_merge_replaces_the_stale_shards_of_an_earlier_push(hub, merged, llama_fp32, tmp_path):
    assert cli("push", merged, "--repo-id", REPO).exit_code == 0
    single = tmp_path / "single"
    assert cli("average", "-m", llama_fp32[1], "-m", llama_fp32[2], "-o", single).exit_code == 0

    result = cli("push", single, "--repo-id", REPO, "--message", "v2")

    assert result.exit_code == 0, result.output
    assert remote_files(hub) == local_files(single)  # no model-0000x-of-00003 or index left behind
    assert "model.safetensors" in remote_files(hub)


def test_private_flag_on_an_existing_public_repo_is_refused(hub, merged):
    hub.add_repo(REPO)
    result = cli("push", merged, "--repo-id", REPO, "--private")
    assert result.exit_code == 2, result.output
    assert f"{REPO} exists and is public" in result.stderr
    assert [c.message for c in hub.commits(REPO)] == ["initial commit"]


def _push_recipe(tmp_path: Path, models: list[Path], **push) -> Path:
    lines = ['output = "out"', "push_to_hub = true", "", "[push]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in push.items()]
    for model in models:
        lines += ["", "[[models]]", f"path = {json.dumps(str(model))}"]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def test_push_to_hub_after_a_merge(hub, llama_fp32, tmp_path):
    recipe = _push_recipe(tmp_path, llama_fp32[:2], repo_id=REPO, private=True, revision="nightly",
                          message="nightly merge")

    result = cli("average", recipe)

    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert remote_files(hub, "nightly") == local_files(out)
    assert hub.is_private(REPO) and hub.branches(REPO) == ["main", "nightly"]
    assert hub.last_commit(REPO, "nightly").message == "nightly merge"
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO}/commit/{hub.head(REPO, 'nightly')}"
    assert_secret_kept(hub, result.stdout, result.stderr)


def test_push_to_hub_failure_keeps_the_merge(hub, llama_fp32, tmp_path):
    recipe = _push_recipe(tmp_path, llama_fp32[:2], repo_id=REPO)
    hub.interrupt_commit(drop=False, status=500)  # the token is fine; the upload fails after the merge

    result = cli("average", recipe)

    assert result.exit_code == 1, result.output
    assert "the hub failed with 500" in result.stderr
    assert f"the merge is complete in {tmp_path / 'out'}" in result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()

    result = cli("push", tmp_path / "out")  # the retry the message suggests: [push] comes from mergecli.toml
    assert result.exit_code == 0, result.output
    assert remote_files(hub) == local_files(tmp_path / "out")


def test_repo_id_is_required(hub, merged):
    result = cli("push", merged)
    assert result.exit_code == 2, result.output
    assert "no repo to push to" in result.stderr and "--repo-id" in result.stderr
    result = cli("push", merged, "--repo-id", "not a repo")
    assert result.exit_code == 2, result.output
    assert "expected ORG/NAME" in result.stderr
    assert hub.requests == []


def test_offline_mode_refuses_to_push(hub, merged, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = cli("push", merged, "--repo-id", REPO)
    assert result.exit_code == 1, result.output
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert hub.requests == []


def test_subprocess_push_never_prints_the_token(hub, merged, tmp_path):
    """A real process: everything it writes, and the server's log, are free of the token."""
    env = hub.subprocess_env(tmp_path / "sub_home", token=TOKEN)
    env["HF_HUB_VERBOSITY"] = "debug"  # huggingface_hub's own logging at its most talkative

    ok = cli_process("push", merged, "--repo-id", REPO, "--private", env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO}/commit/{hub.head(REPO)}"
    assert remote_files(hub) == local_files(merged)

    env["HF_TOKEN"] = "hf_SECRET_wrong_in_subprocess_99"
    env["MERGECLI_DEBUG"] = "1"  # even the traceback must not show it
    bad = cli_process("push", merged, "--repo-id", REPO, env=env, timeout=120)
    assert bad.returncode != 0
    assert_secret_kept(hub, ok.stdout, ok.stderr)
    assert_secret_kept(hub, bad.stdout, bad.stderr, token="hf_SECRET_wrong_in_subprocess_99")
