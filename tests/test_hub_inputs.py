"""Hub repo ids as merge inputs: huggingface_hub's real download code against the FakeHub in
tests/fakehub (HF_ENDPOINT on 127.0.0.1) and against a pre-populated offline cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, snapshot_download
from safetensors.torch import load_file

from builders import build_llama
from clirunner import cli
from fakehub import FakeHub, fast_retries, repo_files, use_fake_hub
from fakehub import fake_hub as fake_hub  # noqa: F401  (the fixture)
from mergecli.io.checkpoint import open_checkpoint
from references import assert_same_tensors, load_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# huggingface_hub's own LFS PUT (data=<file>) triggers this httpx2 deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_SECRET_inputs_5f3a9c0d1e2b"
REPOS = ["org/llama-a", "org/llama-b"]


def write_recipe(path: Path, models: list[dict], **settings) -> Path:
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    for model in models:
        lines.append("\n[[models]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in model.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def pinned(output: Path) -> list[str | None]:
    return [m.get("revision") for m in tomllib.loads((output / "mergecli.toml").read_text())["models"]]


def front_matter(output: Path) -> dict:
    import yaml

    text = (output / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def llama_repos(fake_hub: FakeHub, llama_fp32) -> list[str]:
    """Two tiny LLaMAs (the same bytes as llama_fp32[0:2]) as public repos on the fake hub."""
    for repo, path in zip(REPOS, llama_fp32):
        fake_hub.add_repo(repo, repo_files(path))
    return REPOS


@pytest.fixture
def local_merge(llama_fp32, tmp_path) -> Path:
    """The same merge from the local directories: what the hub merges must equal."""
    out = tmp_path / "local"
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-w", "0.3,0.7", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def hub_recipe(tmp_path: Path, *, revisions=(None, None), output="out") -> Path:
    models = []
    for repo, weight, revision in zip(REPOS, (0.3, 0.7), revisions):
        models.append({"path": repo, "weight": weight, **({"revision": revision} if revision else {})})
    return write_recipe(tmp_path / "recipe.toml", models, output=output)


# ---------------------------------------------------------------------------------------------
# Offline, from a cache that huggingface_hub itself filled


def test_offline_merge_from_a_prepopulated_cache(fake_hub, llama_repos, local_merge, tmp_path, monkeypatch):
    commits = [Path(snapshot_download(repo)).name for repo in llama_repos]  # online, once, whole repos
    assert commits == [fake_hub.head(repo) for repo in llama_repos]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    served = len(fake_hub.requests)

    result = cli("average", hub_recipe(tmp_path))

    assert result.exit_code == 0, result.output
    assert len(fake_hub.requests) == served  # offline: nothing reached the server
    assert_same_tensors(tmp_path / "out", local_merge)
    assert pinned(tmp_path / "out") == commits
    assert front_matter(tmp_path / "out")["base_model"] == llama_repos


def test_offline_cache_filled_with_other_patterns_still_merges(fake_hub, llama_repos, local_merge, tmp_path,
                                                               monkeypatch):
    """A cache holding only weights and config (no tokenizer) is enough offline; the tokenizer is not copied."""
    for repo in llama_repos:
        snapshot_download(repo, allow_patterns=["*.safetensors", "config.json"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    result = cli("average", hub_recipe(tmp_path))

    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", local_merge)
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert "no input has tokenizer files" in result.stderr


def test_offline_missing_revision_and_uncached_repo(fake_hub, llama_repos, tmp_path, monkeypatch):
    for repo in llama_repos:
        snapshot_download(repo)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    result = cli("average", hub_recipe(tmp_path, revisions=(None, "v2")))
    assert result.exit_code == 1, result.output
    assert "revision 'v2' of org/llama-b is not in the local hub cache" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert "hint: run once with network access" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()

    fake_hub.add_repo("org/never-downloaded", {"config.json": "{}"})
    result = cli("average", "-m", "org/never-downloaded", "-m", "org/llama-a", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "org/never-downloaded is not in the local hub cache" in result.stderr
    assert not (tmp_path / "out").exists()


def test_offline_cache_without_the_weights(fake_hub, llama_repos, tmp_path, monkeypatch):
    for repo in llama_repos:
        snapshot_download(repo, allow_patterns=["*.json"])  # metadata only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    result = cli("average", hub_recipe(tmp_path))

    assert result.exit_code == 1, result.output
    assert "org/llama-a: the cached snapshot" in result.stderr
    assert "lacks model.safetensors, and HF_HUB_OFFLINE is set" in result.stderr


# ---------------------------------------------------------------------------------------------
# Online, through the fake server


def test_online_merge_then_rerun_pins_the_commit_after_the_branch_moved(
        fake_hub, llama_repos, llama_fp32, local_merge, tmp_path, monkeypatch):
    result = cli("average", hub_recipe(tmp_path, revisions=("main", None)))
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", local_merge)
    first = [fake_hub.head(repo) for repo in llama_repos]
    assert pinned(tmp_path / "out") == first
    downloaded = {r.path.split("/resolve/")[1].split("/", 1)[1] for r in fake_hub.requests_matching("GET", "/resolve/")}
    assert downloaded == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "chat_template.jinja"}  # weights, config, tokenizer only

    # The branch moves on (new weights), and the cache is gone: the rerun must fetch by commit.
    fake_hub.add_commit("org/llama-a", {"model.safetensors": (llama_fp32[2] / "model.safetensors").read_bytes()})
    use_fake_hub(monkeypatch, fake_hub, tmp_path / "fresh_home")
    fake_hub.clear_requests()

    result = cli("average", tmp_path / "out" / "mergecli.toml", "-o", tmp_path / "again")

    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "again", tmp_path / "out")
    assert pinned(tmp_path / "again") == first
    assert fake_hub.requests_matching("GET", f"/org/llama-a/resolve/{first[0]}/model.safetensors")
    assert not fake_hub.requests_matching(path="/resolve/main/")
    assert not fake_hub.requests_matching(path="/revision/main")

    # ... whereas the recipe naming the branch now merges the new weights.
    result = cli("average", hub_recipe(tmp_path, output="moved"))
    assert result.exit_code == 0, result.output
    assert pinned(tmp_path / "moved")[0] == fake_hub.head("org/llama-a") != first[0]
    assert not torch.equal(load_dir(tmp_path / "moved")["lm_head.weight"], load_dir(tmp_path / "out")["lm_head.weight"])


def test_safetensors_preferred_and_nothing_else_fetched(fake_hub, llama_fp32):
    files = repo_files(llama_fp32[0])
    state_dict = load_file(llama_fp32[0] / "model.safetensors")
    import io

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    fake_hub.add_repo("org/both", {**files, "pytorch_model.bin": buffer.getvalue(), "README.md": "# hi\n",
                                   "original/consolidated.pth": b"\0" * 64, "onnx/model.safetensors": b"\0" * 64})

    with open_checkpoint("org/both") as checkpoint:
        assert checkpoint.files == [checkpoint.directory / "model.safetensors"]
        assert checkpoint.commit == fake_hub.head("org/both")
        fetched = {p.name for p in checkpoint.directory.rglob("*") if p.is_file()}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja", "README.md"}  # the card: its license
    assert not fake_hub.requests_matching(path=r"\.bin$|\.pth$|onnx")


def test_sharded_repo_fetches_only_the_shards_of_its_index(fake_hub, llama_bf16_sharded):
    files = repo_files(llama_bf16_sharded[0])
    index = json.loads(files["model.safetensors.index.json"])
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    fake_hub.add_repo("org/sharded", {**files, "consolidated.safetensors": b"\0" * 128})

    with open_checkpoint("org/sharded") as checkpoint:
        assert sorted(p.name for p in checkpoint.files) == shards
        assert len(checkpoint.tensors) == len(index["weight_map"])
    assert not fake_hub.requests_matching(path="consolidated")


def test_state_dict_repo_sharded_bin(fake_hub, llama_fp32, tmp_path):
    """No safetensors at all: the sharded pytorch_model.bin and its index are fetched and read."""
    import io

    state_dict = load_file(llama_fp32[0] / "model.safetensors")
    names = sorted(state_dict)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    files: dict[str, bytes | str] = {"config.json": (llama_fp32[0] / "config.json").read_text()}
    for shard, keys in halves.items():
        buffer = io.BytesIO()
        torch.save({k: state_dict[k] for k in keys}, buffer)
        files[shard] = buffer.getvalue()
    files["pytorch_model.bin.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}})
    fake_hub.add_repo("org/bin-only", files)

    result = cli("average", "-m", "org/bin-only", "-m", llama_fp32[0], "-o", tmp_path / "out")

    assert result.exit_code == 0, result.output
    merged = load_dir(tmp_path / "out")
    assert merged.keys() == state_dict.keys()
    for name, tensor in state_dict.items():  # the average of a model with itself
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Clear errors


def test_repo_without_weights(fake_hub, llama_repos, tmp_path):
    fake_hub.add_repo("org/no-weights", {"config.json": "{}", "README.md": "# nothing\n"})
    result = cli("average", "-m", "org/no-weights", "-m", "org/llama-a", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "org/no-weights: this hub repo has no safetensors weights and no PyTorch state dict" in result.stderr
    assert not (tmp_path / "out").exists()


def test_repo_not_found(fake_hub, llama_repos, tmp_path, monkeypatch):
    result = cli("average", "-m", "org/no-such-model", "-m", "org/llama-a", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "org/no-such-model: no such model repo on the hub (or it is private)" in result.stderr
    assert "hf auth login" in result.stderr and "HF_TOKEN" in result.stderr

    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    result = cli("average", "-m", "org/no-such-model", "-m", "org/llama-a", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "or your token cannot see it" in result.stderr
    assert fake_hub.token not in result.output
    assert not (tmp_path / "out").exists()


def test_revision_not_found_online(fake_hub, llama_repos, tmp_path):
    result = cli("average", hub_recipe(tmp_path, revisions=("no-such-branch", None)))
    assert result.exit_code == 2, result.output
    assert "org/llama-a: revision 'no-such-branch' does not exist on the hub" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gated_repo(fake_hub, llama_repos, tmp_path, monkeypatch):
    fake_hub.set_gated("org/llama-a")
    result = cli("average", hub_recipe(tmp_path))
    assert result.exit_code == 2, result.output
    assert "org/llama-a: gated repo, and no token was sent" in result.stderr
    assert "hf auth login" in result.stderr and "HF_TOKEN" in result.stderr

    monkeypatch.setenv("HF_TOKEN", fake_hub.token)  # a valid token, but access not granted
    result = cli("average", hub_recipe(tmp_path))
    assert result.exit_code == 2, result.output
    assert "gated repo, and your token has no access" in result.stderr
    assert fake_hub.token not in result.output

    fake_hub.grant_access("org/llama-a")
    assert cli("average", hub_recipe(tmp_path)).exit_code == 0


def test_private_repo_and_a_rejected_token(fake_hub, llama_repos, tmp_path, monkeypatch):
    fake_hub.set_private("org/llama-b")
    result = cli("average", hub_recipe(tmp_path))
    assert result.exit_code == 2, result.output
    assert "org/llama-b: no such model repo on the hub (or it is private)" in result.stderr

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # unknown to the hub
    result = cli("average", hub_recipe(tmp_path))
    assert result.exit_code == 2, result.output
    assert "the hub rejected your token (401 Unauthorized)" in result.stderr
    assert "hf auth login" in result.stderr
    assert TOKEN not in result.output

    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    result = cli("average", hub_recipe(tmp_path))
    assert result.exit_code == 0, result.output


def test_hub_unreachable(tmp_path, monkeypatch):
    hub = FakeHub().start()
    use_fake_hub(monkeypatch, hub, tmp_path / "home")
    hub.stop()  # nothing listens on that port any more

    result = cli("average", hub_recipe(tmp_path))

    assert result.exit_code == 1, result.output
    assert "org/llama-a: cannot reach the hub at http://127.0.0.1:" in result.stderr
    assert "not in the local cache" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_hub_failing_with_500(fake_hub, llama_repos, tmp_path, monkeypatch):
    fast_retries(monkeypatch)
    fake_hub.fail_all(500, message="Internal Error")

    result = cli("average", hub_recipe(tmp_path))

    assert result.exit_code == 1, result.output
    assert f"org/llama-a: the hub at {fake_hub.url} failed (500: Internal Error), and it is not in the local cache" \
        in result.stderr
    assert not (tmp_path / "out").exists()


def test_local_directory_named_like_a_repo_id_stays_local(fake_hub, tmp_path, monkeypatch):
    build_llama(tmp_path / "org" / "llama-a", seed=3)
    monkeypatch.chdir(tmp_path)
    result = cli("average", "-m", "org/llama-a", "-m", "org/llama-a", "--name", "a", "--name", "b", "-o", "out")
    assert result.exit_code == 0, result.output  # -m paths are relative to where mergecli runs
    assert "taken from the Hugging Face Hub" not in result.stderr
    assert not fake_hub.requests


@pytest.mark.parametrize("name", ["org/a--b", "org/a.git", "org/x_y.z", "o/" + "a" * 97, "org/-a", "org/a-",
                                  "org/a.", "meta-llama/Llama-2-7b-hf", "Qwen/Qwen2.5-0.5B", "x/y_", "a/b/c",
                                  "org/a..b", "org/"])
def test_repo_ids_are_what_the_hub_accepts(name):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from mergecli.io.hub import looks_like_repo_id

    try:
        validate_repo_id(name)
        valid = True
    except HFValidationError:
        valid = False
    assert looks_like_repo_id(name) == valid
