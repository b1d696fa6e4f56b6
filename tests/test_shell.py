"""The command line as a new user meets it in a shell or a CI script: real checkpoints with their
fine-tunes, startup time, the one-liner, output for scripts, messages that name the real cause,
the card, and hub planning from headers alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from builders import build_bert, build_gpt2, build_llama
from clirunner import cli, cli_process
from fakehub import FakeHub, repo_files
from fakehub import fake_hub as fake_hub  # noqa: F401  (the fixture)
from references import minilm_dir

# huggingface_hub's own LFS PUT (data=<file>) triggers this httpx2 deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def names_in(path: Path) -> set[str]:
    with safe_open(path, "pt") as f:
        return set(f.keys())


def front_matter(output: Path) -> dict:
    import yaml

    return yaml.safe_load((output / "README.md").read_text().split("---\n")[1])


# ---------------------------------------------------------------------------------------------
# Buffers that transformers no longer saves


@pytest.fixture(scope="module")
def minilm_finetunes(tmp_path_factory) -> list[Path]:
    """Two fine-tunes of the packaged MiniLM, saved by the installed transformers (which no longer
    stores `embeddings.position_ids`)."""
    root = tmp_path_factory.mktemp("minilm-ft")
    paths = []
    for seed in range(2):
        model = transformers.AutoModel.from_pretrained(minilm_dir())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / f"ft-{seed}")
        paths.append(root / f"ft-{seed}")
    return paths


def test_minilm_merges_with_fine_tunes_saved_by_current_transformers(minilm_finetunes, tmp_path):
    base = minilm_dir()
    assert "embeddings.position_ids" in names_in(base / "model.safetensors")
    assert "embeddings.position_ids" not in names_in(minilm_finetunes[0] / "model.safetensors")
    out = tmp_path / "out"
    result = cli("average", "--base", base, "-m", minilm_finetunes[0], "-m", minilm_finetunes[1], "-o", out)
    assert result.exit_code == 0, result.output
    assert "dropped 1 tensor that transformers does not load" in result.stderr
    assert "embeddings.position_ids" in result.stderr
    merged = load_file(out / "model.safetensors")
    assert "embeddings.position_ids" not in merged
    name = "encoder.layer.1.attention.self.query.weight"
    inputs = [load_file(p / "model.safetensors")[name].double() for p in minilm_finetunes]
    torch.testing.assert_close(merged[name].double(), (inputs[0] + inputs[1]) / 2, rtol=0, atol=1e-7)
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert front_matter(out)["license"] == "apache-2.0"  # the base's card


def test_exclude_applies_before_the_compatibility_check(llama_fp32, tmp_path):
    headless = tmp_path / "headless"
    shutil.copytree(llama_fp32[1], headless)
    tensors = load_file(headless / "model.safetensors")
    del tensors["lm_head.weight"]  # a tensor transformers does load: not a buffer to drop
    save_file(tensors, headless / "model.safetensors", metadata={"format": "pt"})
    args = ["average", "-m", llama_fp32[0], "-m", headless, "-o", tmp_path / "out"]
    refused = cli(*args)
    assert refused.exit_code == 1 and "lm_head.weight: missing in headless" in refused.stderr
    result = cli(*args, "--set", "exclude=['lm_head\\..*']")
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"],
                       load_file(llama_fp32[0] / "model.safetensors")["lm_head.weight"])


def test_gpt2_attention_bias_buffers_are_dropped(tmp_path):
    old = tmp_path / "old"
    build_gpt2(old, seed=1)
    tensors = load_file(old / "model.safetensors")
    positions = 64
    for layer in range(2):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
        tensors[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    new = tmp_path / "new"
    build_gpt2(new, seed=2)
    result = cli("average", "-m", old, "-m", new, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "dropped 4 tensors" in result.stderr
    assert not any(".attn.bias" in n or "masked_bias" in n for n in names_in(tmp_path / "out" / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Startup


def imported_modules(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "mergecli", *args],
                            capture_output=True, text=True)
    modules = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return modules, result


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["average", "-h"], ["regmean", "merge", "--help"]])
def test_help_and_version_import_nothing_heavy(args):
    modules, result = imported_modules(*args)
    assert result.returncode == 0, result.stderr
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "transformers", "safetensors", "numpy",
                                                        "huggingface_hub")}
    assert not heavy, sorted(heavy)[:5]


def test_a_recipe_error_in_validate_imports_no_torch(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('output = "out"\ncopy_tokenzier = true\n[[models]]\npath = "a"\n')
    modules, result = imported_modules("validate", str(recipe))
    assert result.returncode == 2
    assert "did you mean 'copy_tokenizer'" in result.stderr
    assert not {m for m in modules if m.split(".")[0] in ("torch", "transformers")}


# ---------------------------------------------------------------------------------------------
# The one-liner


def test_generic_file_names_take_their_directory_name(llama_fp32, tmp_path):
    result = cli("average", "-m", llama_fp32[0] / "model.safetensors", "-m", llama_fp32[1] / "model.safetensors",
                 "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    recipe = (tmp_path / "out" / "mergecli.toml").read_text()
    assert f'name = "{llama_fp32[0].name}"' in recipe and f'name = "{llama_fp32[1].name}"' in recipe


def test_name_and_base_flags(llama_fp32, tmp_path):
    out = tmp_path / "out"
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "--name", "math", "--name", "code",
                 "--base", llama_fp32[2], "--set", "backbone_only=true", "-o", out)
    assert result.exit_code == 0, result.output
    recipe = (out / "mergecli.toml").read_text()
    assert 'name = "math"' in recipe and 'name = "code"' in recipe and "[base]" in recipe
    head = load_file(out / "model.safetensors")["lm_head.weight"]
    assert torch.equal(head, load_file(llama_fp32[2] / "model.safetensors")["lm_head.weight"])
    wrong = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "--name", "math", "-o", tmp_path / "x")
    assert wrong.exit_code == 2 and "1 name for 2 models" in wrong.stderr


def test_a_bare_name_that_is_no_local_path_comes_from_the_hub(fake_hub: FakeHub, tmp_path, monkeypatch):
    for seed, repo in enumerate(["gpt2", "org/gpt2-ft"]):
        build_gpt2(tmp_path / repo, seed=seed)
        fake_hub.add_repo(repo, repo_files(tmp_path / repo))
    monkeypatch.chdir(tmp_path / "org")  # no ./gpt2 here
    result = cli("average", "-m", "gpt2", "-m", "org/gpt2-ft", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "gpt2: no such local path, so it was taken from the Hugging Face Hub" in result.stderr
    missing = cli("average", "-m", "nosuchmodel", "-m", "gpt2", "-o", tmp_path / "out2")
    assert missing.exit_code == 2
    assert "nosuchmodel: no such local path, and as a hub repo id: no such model repo" in missing.stderr


# ---------------------------------------------------------------------------------------------
# Output for scripts


def test_quiet_prints_nothing_but_errors(llama_fp32, tmp_path):
    result = cli_process("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", tmp_path / "out", "-q")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    failed = cli_process("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", tmp_path / "out", "-q")
    assert failed.returncode == 2 and failed.stdout == "" and failed.stderr.startswith("error:")


def test_json_result_is_one_object_on_stdout(llama_fp32, tmp_path):
    out = tmp_path / "out"
    result = cli_process("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["output"] == str(out) and "model.safetensors" in data["files"]
    assert data["tensors"] == len(load_file(out / "model.safetensors"))
    assert data["bytes_written"] == (out / "model.safetensors").stat().st_size
    assert data["seconds"] > 0 and data["warnings"] == []
    plan = json.loads(cli_process("validate", out / "mergecli.toml", "-o", tmp_path / "again", "--json").stdout)
    assert plan["tensors"] == data["tensors"] and plan["dry_run"] is True


def test_no_progress_bar_or_escape_code_reaches_a_non_terminal_stderr(fake_hub: FakeHub, llama_fp32, tmp_path):
    for i in range(2):
        fake_hub.add_repo(f"org/llama-{i}", repo_files(llama_fp32[i]))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('output = "out"\npush_to_hub = true\n[push]\nrepo_id = "fake-user/merged"\n'
                      '[[models]]\npath = "org/llama-0"\n[[models]]\npath = "org/llama-1"\n')
    env = fake_hub.subprocess_env(tmp_path / "home", token=fake_hub.token)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    result = cli_process("average", recipe, env=env)
    assert result.returncode == 0, result.stderr
    assert "pushed" in result.stderr and fake_hub.repo_exists("fake-user/merged")
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert "\r" not in result.stdout and "\x1b" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Messages


def test_output_under_a_file_and_on_a_virtual_file_system(llama_fp32, tmp_path):
    (tmp_path / "somefile").write_text("x")
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", tmp_path / "somefile" / "out")
    assert result.exit_code == 2
    assert f"{tmp_path / 'somefile'} is a file, not a directory" in result.stderr
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", "/proc/x")
    assert result.exit_code == 2 and "virtual file system" in result.stderr
    assert "disk space" not in result.stderr


def test_an_architecture_mismatch_leads_with_the_two_architectures(llama_fp32, tmp_path):
    build_bert(tmp_path / "bert", seed=1)
    result = cli("average", "-m", tmp_path / "bert", "-m", llama_fp32[0], "-o", tmp_path / "out")
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]
    assert "different architectures" in first and "bert (BertForSequenceClassification)" in first
    assert "llama (LlamaForCausalLM)" in first and "more" not in result.stderr


@pytest.mark.parametrize("line, words", [
    ("copy_tokenizer = \"no\"", "copy_tokenizer: expected true or false"),
    ("normalise = true", "did you mean 'normalize'"),
])
def test_strict_booleans_and_did_you_mean(tmp_path, line, words):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'output = "out"\n{line}\n[[models]]\npath = "a"\n')
    result = cli("validate", recipe)
    assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # error (+ hint)


def test_set_takes_only_true_or_false_for_a_flag(llama_fp32, tmp_path):
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", tmp_path / "o", "--set", "normalize=yes")
    assert result.exit_code == 2 and "expected true or false" in result.stderr


def test_short_flags_mean_one_thing_and_h_is_help():
    assert cli("-h").exit_code == 0 and "average" in cli("-h").stdout
    assert "Examples:" in cli("regmean", "collect-stats", "-h").stdout
    push_help = cli("push", "-h").stdout
    assert "--message" in push_help and not re.search(r"-m\b", push_help.replace("--message", ""))
    assert cli("push", "x", "-m", "msg").exit_code == 2


def test_counts_read_well(llama_fp32, tmp_path):
    build_llama(tmp_path / "one", seed=3)
    result = cli("average", "-m", llama_fp32[0], "-m", tmp_path / "one", "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0
    assert "(1 shard)" in result.stdout and "1 shards" not in result.stdout
    text = result.stdout + result.stderr
    assert not re.search(r"\b1 (tensors|examples|shards|files)\b", text) and "  " not in result.stderr


# ---------------------------------------------------------------------------------------------
# The card


def test_card_tells_the_true_tokenizer_source_and_the_auto_class(tmp_path):
    base = tmp_path / "base"
    build_gpt2(base, seed=0)
    for name in os.listdir(base):
        if name.startswith(("tokenizer", "vocab", "merges", "special")):
            os.remove(base / name)
    models = []
    for seed in (1, 2):
        build_gpt2(tmp_path / f"m{seed}", seed=seed)
        models.append(tmp_path / f"m{seed}")
    (models[0] / "README.md").write_text("---\nlicense: mit\n---\n# m1\n")
    out = tmp_path / "out"
    result = cli("average", "--base", base, "-m", models[0], "-m", models[1], "--name", "m1", "--name", "m2",
                 "-o", out)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "tokenizer from `m1`" in card and "config from the base model" in card
    assert "AutoModelForCausalLM" in card and "AutoModelForCausalLM" in result.stdout
    assert front_matter(out)["license"] == "mit"  # the base has no card: the first model's


# ---------------------------------------------------------------------------------------------
# Hub planning


def test_validate_and_dry_run_of_a_hub_recipe_read_headers_only(fake_hub: FakeHub, llama_bf16_sharded, llama_fp32,
                                                                tmp_path):
    fake_hub.add_repo("org/sharded", repo_files(llama_bf16_sharded[0]))
    fake_hub.add_repo("org/single", repo_files(llama_fp32[1]))
    header_ends = {p.name: 8 + int.from_bytes(p.read_bytes()[:8], "little")
                   for p in [*llama_bf16_sharded[0].glob("*.safetensors"), llama_fp32[1] / "model.safetensors"]}
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('output = "out"\n[[models]]\npath = "org/sharded"\n[[models]]\npath = "org/single"\n')
    for command in (["validate", recipe], ["average", recipe, "--dry-run"]):
        fake_hub.clear_requests()
        result = cli(*command)
        assert result.exit_code == 0, result.output
        weights = [r for r in fake_hub.requests if r.path.endswith(".safetensors") and r.method == "GET"]
        assert len(weights) == 2 * len(header_ends), fake_hub.request_log_text()  # size field, then header
        for request in weights:
            asked = {k.lower(): v for k, v in request.headers.items()}.get("range", "")
            first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", asked).groups())
            assert last < header_ends[request.path.rsplit("/", 1)[1]]  # never a byte of tensor data
    cache = Path(constants.HF_HUB_CACHE)
    assert not list(cache.rglob("*.safetensors"))
    merged = cli("average", recipe)
    assert merged.exit_code == 0, merged.output
    assert list(cache.rglob("*.safetensors"))


def test_a_corrupt_remote_header_is_one_line(fake_hub: FakeHub, llama_fp32, tmp_path):
    files = repo_files(llama_fp32[0])
    blob = bytearray(files["model.safetensors"])
    blob[0] -= 1  # header length one byte short
    fake_hub.add_repo("org/bad", {**files, "model.safetensors": bytes(blob)})
    fake_hub.add_repo("org/good", repo_files(llama_fp32[1]))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('output = "out"\n[[models]]\npath = "org/bad"\n[[models]]\npath = "org/good"\n')
    result = cli("validate", recipe)
    assert result.exit_code == 1 and "model.safetensors" in result.stderr and "corrupt" in result.stderr
    assert "internal error" not in result.stderr
