"""`--stream`: hub inputs read by HTTP range requests as the merge needs them, nothing of them stored;
against the FakeHub (huggingface_hub's real client on 127.0.0.1), with faults injected. Each merge
is bit-identical to the same merge of the local files, or a clean refusal with no output."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clirunner import cli
from fakehub import FakeHub, fast_retries, repo_files
from fakehub import fake_hub as fake_hub  # noqa: F401  (the fixture)
from mergecli.io import ranges, remote
from references import assert_same_tensors

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPOS = ["org/shard-a", "org/shard-b", "org/shard-base"]
WEIGHT_FILES = r"/resolve/[0-9a-f]{40}/model.*\.safetensors$"


@pytest.fixture
def repos(fake_hub: FakeHub, llama_bf16_sharded, llama_fp32) -> list[Path]:
    """Two sharded bf16 LLaMAs and an fp32 one as hub repos; returns their local directories."""
    local = [*llama_bf16_sharded, llama_fp32[0]]
    for repo, path in zip(REPOS, local):
        fake_hub.add_repo(repo, repo_files(path))
    return local


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Requests of 64 KB, so that the tiny models take many, and faults land inside a file."""
    monkeypatch.setattr(remote, "CHUNK_BYTES", 64 * 1024)


@pytest.fixture
def local_average(repos, tmp_path) -> Path:
    out = tmp_path / "local"
    result = cli("average", "-m", repos[0], "-m", repos[1], "-w", "0.3,0.7", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def streamed_average(tmp_path: Path, *extra: str, output: str = "out"):
    return cli("average", "-m", REPOS[0], "-m", REPOS[1], "-w", "0.3,0.7", "--stream", "-o", tmp_path / output,
               *extra)


def test_stream_merges_bit_identically_and_stores_nothing(fake_hub, repos, local_average, tmp_path):
    size = sum(p.stat().st_size for p in (*repos[0].glob("*.safetensors"), *repos[1].glob("*.safetensors")))
    result = streamed_average(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", local_average)
    report = json.loads(result.stdout)
    fetched = sum(report["fetched"].values())
    assert set(report["fetched"]) == {"shard-a", "shard-b"}
    assert fetched == size  # each byte once, headers included
    from huggingface_hub import constants

    cached = [p for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file()]
    assert cached and max(p.stat().st_size for p in cached) < 64 * 1024  # config and tokenizer: no weights
    weight_reads = fake_hub.requests_matching("GET", WEIGHT_FILES)
    assert weight_reads and all({k.lower() for k in r.headers} >= {"range"} for r in weight_reads)


def test_files_complete_in_the_cache_are_read_from_it(fake_hub, repos, local_average, tmp_path):
    from huggingface_hub import snapshot_download

    snapshot_download(REPOS[0])  # one input whole in the cache
    fake_hub.clear_requests()
    result = streamed_average(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", local_average)
    assert set(json.loads(result.stdout)["fetched"]) == {"shard-b"}
    assert not fake_hub.requests_matching("GET", f"/{REPOS[0]}/resolve/.*safetensors")


@pytest.mark.parametrize("trim", ["histogram", "sampled"])
def test_task_vector_merge_streams_its_passes(fake_hub, repos, tmp_path, monkeypatch, trim):
    """TIES reads every input in several passes (histograms, or a sample of rows and a bracket):
    streamed, it fetches them again (the plan says so), with the output of local inputs."""
    if trim == "sampled":  # what a large tensor gets: forced on these small ones, in blocks of 8 rows
        from mergecli.methods import base as method_base
        from mergecli.methods import bracket

        monkeypatch.setattr(bracket, "MIN_SAMPLED", 1)
        monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", 8 * 64)
        settle = bracket.Bracket.settle
        monkeypatch.setattr(bracket.Bracket, "settle", lambda self, k: settled.append(settle(self, k)) or settled[-1])
    settled = []
    text = (f'method = "ties"\n[base]\npath = "{REPOS[0]}"\n[ties]\ndensity = 0.4\n'
            f'[[models]]\npath = "{REPOS[1]}"\n')
    (tmp_path / "local.toml").write_text(text.replace(REPOS[0], str(repos[0])).replace(REPOS[1], str(repos[1])))
    (tmp_path / "hub.toml").write_text(text)
    assert cli("merge", tmp_path / "local.toml", "-o", tmp_path / "local").exit_code == 0
    plan = cli("merge", tmp_path / "hub.toml", "--stream", "--dry-run", "-o", tmp_path / "out")
    assert plan.exit_code == 0, plan.output
    assert "read from the Hub by range requests" in plan.stderr and "are fetched again" in plan.stderr
    result = cli("merge", tmp_path / "hub.toml", "--stream", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", tmp_path / "local")
    assert any(settled) == (trim == "sampled")  # brackets settled thresholds, locally and streamed


@pytest.mark.parametrize("fault", [
    {"cut": 20_000, "reset": True},  # the connection reset in the middle of a range
    {"cut": 30_000},  # the body cut short
    {"status": 500},
    {"status": 429, "retry_after": "0"},
], ids=["reset-mid-range", "body-cut-short", "500", "429"])
def test_faults_are_retried_from_where_they_stopped(fake_hub, repos, local_average, tmp_path, monkeypatch, fault):
    monkeypatch.setattr(ranges, "BACKOFF_SECONDS", (0.0,))
    fake_hub.fail_next(WEIGHT_FILES, method="GET", skip=3, **fault)
    result = streamed_average(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", local_average)
    if "cut" in fault:  # resumed from the byte where it stopped: no byte fetched twice
        size = sum(p.stat().st_size for p in (*repos[0].glob("*.safetensors"), *repos[1].glob("*.safetensors")))
        assert sum(json.loads(result.stdout)["fetched"].values()) <= size


def test_faults_that_go_on_stop_the_merge_naming_the_file(fake_hub, repos, tmp_path, monkeypatch):
    monkeypatch.setattr(ranges, "BACKOFF_SECONDS", (0.0,))
    fake_hub.fail_next(WEIGHT_FILES, method="GET", status=503, times=100)
    result = streamed_average(tmp_path)
    assert result.exit_code == 1, result.output
    assert "org/shard-a: fetching model-0000" in result.stderr and "503" in result.stderr
    assert "no output was put in place" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_a_stalled_body_is_dropped_and_resumed_from_the_byte_where_it_stalled(fake_hub, repos, local_average,
                                                                               tmp_path, monkeypatch):
    """A body that stopped for 45 s used to be waited out whole; now a read that hears nothing for
    STALL_SECONDS gives up on that request and asks for the rest."""
    monkeypatch.setattr(ranges, "BACKOFF_SECONDS", (0.0,))
    monkeypatch.setattr(ranges, "STALL_SECONDS", 0.5)
    fake_hub.fail_next(WEIGHT_FILES, method="GET", skip=3, cut=10_000, stall=45)
    started = time.monotonic()
    result = streamed_average(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 30  # not the 45 s stall
    assert_same_tensors(tmp_path / "out", local_average)
    size = sum(p.stat().st_size for p in (*repos[0].glob("*.safetensors"), *repos[1].glob("*.safetensors")))
    assert sum(json.loads(result.stdout)["fetched"].values()) <= size  # the stalled bytes were not fetched twice


def test_an_answer_for_other_bytes_is_retried_not_merged(fake_hub, repos, local_average, tmp_path, monkeypatch):
    """A Content-Range one byte off used to give "NaN or inf in the input org/c", blaming the model."""
    monkeypatch.setattr(ranges, "BACKOFF_SECONDS", (0.0,))
    fake_hub.fail_next(WEIGHT_FILES, method="GET", skip=3, shift=1)
    result = streamed_average(tmp_path)
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", local_average)
    fake_hub.fail_next(WEIGHT_FILES, method="GET", shift=1, times=100)
    result = streamed_average(tmp_path, output="again")
    assert result.exit_code == 1, result.output
    assert re.search(r"org/shard-a: fetching model-0000\d-of-0000\d.safetensors failed: asked for bytes \d+-\d+, "
                     r"the server sent \d+-\d+", result.stderr), result.stderr
    assert "NaN" not in result.stderr and not (tmp_path / "again").exists()


def test_a_flipped_byte_fails_the_sha256_check_and_no_output_appears(fake_hub, repos, tmp_path):
    shard = sorted(p.name for p in repos[1].glob("*.safetensors"))[1]
    fake_hub.tamper(REPOS[1], shard, offset=(repos[1] / shard).stat().st_size - 100)
    result = streamed_average(tmp_path)
    assert result.exit_code == 1, result.output
    assert f"org/shard-b: the bytes fetched of {shard} do not match the Hub's sha256" in result.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_gated_repo_without_a_token_is_refused(fake_hub, repos, tmp_path, monkeypatch):
    fake_hub.set_gated(REPOS[1])
    result = streamed_average(tmp_path)
    assert result.exit_code == 2, result.output
    assert "org/shard-b: gated repo, and no token was sent" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_token_travels_only_in_the_authorization_header(fake_hub, repos, local_average, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    fast_retries(monkeypatch)
    fake_hub.fail_next(WEIGHT_FILES, method="GET", status=500, times=2)
    monkeypatch.setattr(ranges, "BACKOFF_SECONDS", (0.0,))
    result = streamed_average(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert fake_hub.token not in result.output
    assert fake_hub.token not in "".join(p.read_text(errors="replace") for p in (tmp_path / "out").iterdir()
                                         if p.is_file())
    assert all(a == f"Bearer {fake_hub.token}" for a in fake_hub.auth_headers)


def test_dry_run_counts_the_read_ahead_and_fetches_no_weights(fake_hub, repos, tmp_path):
    plain = cli("average", "-m", REPOS[0], "-m", REPOS[1], "--dry-run", "--json", "-o", tmp_path / "out")
    streamed = cli("average", "-m", REPOS[0], "-m", REPOS[1], "--dry-run", "--json", "-o", tmp_path / "out",
                   "--stream", "--set", "stream_buffer=64MiB")
    assert plain.exit_code == streamed.exit_code == 0, streamed.output
    assert json.loads(streamed.stdout)["peak_memory"] - json.loads(plain.stdout)["peak_memory"] == 64 * 2**20
    # one note for every streamed input, not one note each
    assert streamed.stderr.count("--stream: models.0 (shard-a), models.1 (shard-b) read from the Hub by range "
                                 "requests") == 1 and streamed.stderr.count("note:") == 1, streamed.stderr
    header_reads = [r for r in fake_hub.requests_matching("GET", WEIGHT_FILES)
                    if not r.headers.get("Range", r.headers.get("range", "")).startswith("bytes=0-7")]
    assert all(int(r.headers.get("Range", r.headers.get("range")).split("-")[1]) < 2048 for r in header_reads)

    local = cli("average", "-m", repos[0], "-m", repos[1], "--dry-run", "--stream", "-o", tmp_path / "out")
    assert local.exit_code == 0 and "no input is fetched from the Hub" in local.stderr


def test_regmean_collects_and_merges_streamed_as_from_local_files(fake_hub, repos, tmp_path):
    """collect-stats reads each block's weights by range requests as the block runs; the statistics and
    the merge are those of the local files, and nothing of the weights is stored."""
    collect_and_merge_both_ways(tmp_path, [repos[0], repos[1]], REPOS[:2])


def test_regmean_streams_moe_experts_from_their_tensors_one_per_expert(fake_hub, tmp_path):
    """A MoE model's fused experts are built from the file's tensors one per expert, each fetched by its
    range: the statistics and the merge equal those of the local files."""
    from test_families import MOE, build

    local = [build(tmp_path / f"mixtral-{i}", "mixtral", MOE["mixtral"], seed=i) for i in range(2)]
    names = ["org/moe-a", "org/moe-b"]
    for repo, path in zip(names, local):
        fake_hub.add_repo(repo, repo_files(path))
    collect_and_merge_both_ways(tmp_path, local, names)


def collect_and_merge_both_ways(tmp_path: Path, local_paths: list[Path], repo_ids: list[str]) -> None:
    """collect-stats and merge of the same two models from local files and streamed from the hub: the
    Grams and the outputs equal, and no weight file in the hub cache."""
    (tmp_path / "data.txt").write_text("the model merge weight layer token data\nthe a of to and in is\n" * 6)

    def recipe(name: str, paths: list[str]) -> Path:
        lines = ['method = "regmean"', f'output = "out-{name}"']
        for path, model in zip(paths, ("a", "b")):
            lines += ["[[models]]", f'path = "{path}"', f'name = "{model}"', 'data = "data.txt"']
        lines += ["[regmean]", f'stats_dir = "stats-{name}"', "num_examples = 8", "batch_size = 4",
                  "max_length = 12"]
        (tmp_path / f"{name}.toml").write_text("\n".join(lines) + "\n")
        return tmp_path / f"{name}.toml"

    local, hub = recipe("local", [str(p) for p in local_paths]), recipe("hub", repo_ids)
    for command in (("regmean", "collect-stats", local), ("regmean", "merge", local),
                    ("regmean", "collect-stats", hub, "--stream"), ("regmean", "merge", hub, "--stream")):
        result = cli(*command)
        assert result.exit_code == 0, result.output
    for model in ("a", "b"):
        files = sorted((tmp_path / "stats-local" / model).glob("*.safetensors"))
        assert files
        for file in files:  # the Grams (their metadata names the input: a path, or a repo and commit)
            local_grams, hub_grams = load_file(file), load_file(tmp_path / "stats-hub" / model / file.name)
            assert local_grams.keys() == hub_grams.keys()
            assert all(torch.equal(local_grams[k], hub_grams[k]) for k in local_grams), file.name
    assert_same_tensors(tmp_path / "out-hub", tmp_path / "out-local")
    from huggingface_hub import constants

    cached = [p for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in cached) < 64 * 1024  # config and tokenizer: no weights


def test_fetching_begins_while_the_merge_is_still_planned(fake_hub, repos, local_average, tmp_path):
    """The head start: weight bytes flow before the plan resolves the inputs (a run imports torch
    meanwhile), and the plan's reads claim them: still each byte fetched once."""
    fake_hub.clear_requests()
    result = streamed_average(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert_same_tensors(tmp_path / "out", local_average)
    requests = fake_hub.requests
    resolutions = [i for i, r in enumerate(requests) if r.path.startswith(f"/api/models/{REPOS[0]}/revision/")]
    weight_bytes = [i for i, r in enumerate(requests) if r.method == "GET" and re.search(WEIGHT_FILES, r.path)
                    and not r.headers["Range"].startswith(("bytes=0-", "bytes=8-"))]  # not a header
    assert len(resolutions) == 2 and weight_bytes[0] < resolutions[1]  # the head start's, then the plan's
    size = sum(p.stat().st_size for p in (*repos[0].glob("*.safetensors"), *repos[1].glob("*.safetensors")))
    assert sum(json.loads(result.stdout)["fetched"].values()) == size


def test_head_start_chunks_serve_reads_across_their_bounds_and_the_unclaimed_are_let_go(fake_hub, repos,
                                                                                       monkeypatch):
    from mergecli.io import hub

    monkeypatch.setattr(remote, "CHUNK_BYTES", 1024)

    snapshot = hub.resolve(REPOS[0])
    name = max(snapshot.weights, key=lambda n: (repos[0] / n).stat().st_size)
    data = (repos[0] / name).read_bytes()
    prefix, raw, size = hub.remote_header(snapshot, name)
    chunk, start = remote.CHUNK_BYTES, len(prefix + raw)
    assert size == len(data) > start + 6 * chunk
    fetcher = remote.Fetcher(connections=2, buffer=4 * chunk)  # the head start: the first four chunks
    file = fetcher.add(remote.RemoteFile(REPOS[0], snapshot.commit, name, size, prefix + raw,
                                         sha256=hub.file_identity(snapshot, name).sha256))
    fetcher.prefetch([[file]])
    reads = [(start + 1000, chunk),  # across the bound of the first two chunks
             (start + 2 * chunk - 10, 3 * chunk),  # the last two of the head start and past its end
             (start + 6 * chunk, 999)]  # beyond it
    fetcher.schedule([(file, offset, length) for offset, length in reads])
    try:
        for offset, length in reads:
            out = torch.empty(length, dtype=torch.uint8)
            fetcher.read_into(file, offset, out)
            assert out.numpy().tobytes() == data[offset:offset + length]
        fetcher.verify()  # the whole file hashed in order: the Hub's sha256
        assert fetcher.held == 0  # every chunk read and hashed, let go
    finally:
        fetcher.close()


def test_a_refusal_before_the_merge_costs_no_transfer(fake_hub, repos, tmp_path):
    """An output that exists without --force is refused before the head start fetches anything."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = streamed_average(tmp_path)
    assert result.exit_code == 2 and "already exists" in result.stderr, result.output
    assert not fake_hub.requests_matching("GET", WEIGHT_FILES)


def test_a_missing_repo_is_reported_once_whatever_the_head_start_met(fake_hub, repos, tmp_path):
    result = cli("average", "-m", REPOS[0], "-m", "org/no-such-model", "--stream", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "org/no-such-model" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr
    assert not (tmp_path / "out").exists()
