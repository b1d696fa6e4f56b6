"""A user's data is never lost, leaked or misread: weights that would overflow, NaN in inputs,
links out of an input, local paths in published files, and a token problem found too late."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clirunner import cli
from conftest import tree_digest
from fakehub import fake_hub as fake_hub  # noqa: F401  (the fixture)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def pair_args(paths: list[Path], out: Path, *extra: str) -> list:
    return ["average", "-m", paths[0], "-m", paths[1], "-o", out, *extra]


def merged(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("weights", ["1e308,1e308", "1e-13,1e-13", "3e-300,3e-300", "1e308,3e307"])
def test_huge_and_tiny_weights_give_the_weighted_average(llama_fp32, tmp_path, weights):
    result = cli(*pair_args(llama_fp32, tmp_path / "scaled", "-w", weights))
    assert result.exit_code == 0, result.output
    w = [float(x) / max(map(float, weights.split(","))) for x in weights.split(",")]  # the same ratios
    inputs = [merged(path) for path in llama_fp32[:2]]
    got = merged(tmp_path / "scaled")
    for name, tensor in got.items():
        a, b = (t[name].double() for t in inputs)
        reference = (a * (w[0] / sum(w)) + b * (w[1] / sum(w)))  # float64: no overflow at these ratios
        bound = 2**-21 * (a.abs() + b.abs())  # a few float32 roundings of the inputs' magnitude
        assert ((tensor.double() - reference).abs() <= bound).all(), name


def test_weights_that_overflow_without_normalizing_are_an_error(llama_fp32, tmp_path):
    args = pair_args(llama_fp32, tmp_path / "out", "-w", "1e40,1", "--set", "normalize=false")
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert "the merged values are not finite (they overflow float32)" in result.stderr
    assert "allow_non_finite" in result.stderr and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    allowed = cli(*args, "--set", "allow_non_finite=true")
    assert allowed.exit_code == 0 and "kept, as allow_non_finite asks" in allowed.stderr
    assert torch.isinf(merged(tmp_path / "out")["model.embed_tokens.weight"]).any()


def test_a_nan_in_an_input_is_named_and_nothing_is_written(llama_fp32, tmp_path):
    poisoned = Path(shutil.copytree(llama_fp32[1], tmp_path / "poisoned"))
    tensors = load_file(poisoned / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    before = tree_digest(poisoned)
    result = cli(*pair_args([llama_fp32[0], poisoned], tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert f"model.layers.1.mlp.up_proj.weight: NaN or inf in the input {poisoned}" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert tree_digest(poisoned) == before


def float64_reference(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    models = [load_file(p / "model.safetensors") for p in paths]
    return {name: sum(m[name].double() * w for m, w in zip(models, weights)) / sum(weights) for name in models[0]}


def test_weights_are_divided_once_at_the_end(llama_bf16_sharded, llama_fp32, tmp_path):
    """Weights 1/2/4: Σ w θ (in float64, the inputs being float32), divided by 7 once, not pre-normalized:
    the float64 result rounded once, which pre-normalizing in float32 is not."""
    paths = llama_fp32
    assert cli("average", *sum((["-m", p] for p in paths), []), "-w", "1,2,4", "-o", tmp_path / "out").exit_code == 0
    got = merged(tmp_path / "out")
    models = [load_file(p / "model.safetensors") for p in paths]
    name = "model.embed_tokens.weight"
    reference = float64_reference(paths, [1, 2, 4])[name]
    assert torch.equal(got[name], reference.float())
    normalized_first = models[0][name] * (1 / 7) + models[1][name] * (2 / 7) + models[2][name] * (4 / 7)
    misrounded = (got[name].double() != reference.float().double()).float().mean()
    before = (normalized_first.double() != reference.float().double()).float().mean()
    assert misrounded < before, (float(misrounded), float(before))


# ---------------------------------------------------------------------------------------------
# Links out of an input


def test_a_support_file_linking_out_of_its_input_is_not_copied(llama_fp32, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's private notes")
    model = Path(shutil.copytree(llama_fp32[0], tmp_path / "model"))
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    result = cli(*pair_args([model, llama_fp32[1]], tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert f"{model / 'tokenizer.json'} links to {secret}, outside its input: not copied" in result.stderr
    out = tmp_path / "out"
    assert all("private notes" not in p.read_text(errors="replace") for p in out.iterdir() if p.is_file()
               and p.suffix != ".safetensors")


def test_a_shard_linking_out_of_its_input_is_refused(llama_fp32, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(llama_fp32[0] / "model.safetensors", elsewhere)
    model = tmp_path / "model"
    model.mkdir()
    shutil.copyfile(llama_fp32[0] / "config.json", model / "config.json")
    (model / "model.safetensors").symlink_to(elsewhere)
    result = cli(*pair_args([model, llama_fp32[1]], tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert f"is a link to {elsewhere}, outside the input {model}" in result.stderr


def test_a_link_loop_is_one_line(llama_fp32, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = cli(*pair_args([loop, llama_fp32[1]], tmp_path / "out"))
    assert result.exit_code != 0 and "link loop" in result.stderr and "internal error" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Local paths never published


def local_texts(out: Path) -> str:
    return "\n".join(p.read_text() for p in out.iterdir() if p.suffix in (".md", ".toml", ".json"))


def test_outputs_name_inputs_by_name_digest_and_size_never_by_path(llama_fp32, tmp_path):
    out = tmp_path / "deep" / "out"
    assert cli(*pair_args(llama_fp32, out)).exit_code == 0
    text = local_texts(out)
    assert str(tmp_path) not in text and str(llama_fp32[0].parent) not in text and os.sep + "tmp" not in text
    card = (out / "README.md").read_text()
    assert "| llama32-0 | 0.5 | `llama32-0` (local, `sha256:" in card and " KB) |" in card
    recipe = tomllib.loads((out / "mergecli.toml").read_text())
    assert recipe["output"] == "."
    assert recipe["models"][0]["path"] == os.path.relpath(llama_fp32[0], out)
    assert recipe["models"][0]["digest"].startswith("sha256:")
    again = cli("average", out / "mergecli.toml", "-o", tmp_path / "again")  # still reproduces locally
    assert again.exit_code == 0, again.output
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_a_changed_input_no_longer_matches_the_recorded_digest(llama_fp32, tmp_path):
    inputs = [Path(shutil.copytree(p, tmp_path / p.name)) for p in llama_fp32[:2]]
    out = tmp_path / "out"
    assert cli(*pair_args(inputs, out)).exit_code == 0
    shutil.copyfile(llama_fp32[2] / "model.safetensors", inputs[1] / "model.safetensors")  # replaced since
    result = cli("average", out / "mergecli.toml", "-o", tmp_path / "again")
    assert result.exit_code == 1 and "is not the checkpoint the recipe was written for" in result.stderr


def test_copied_json_support_files_lose_local_paths(llama_fp32, tmp_path):
    model = Path(shutil.copytree(llama_fp32[0], tmp_path / "model"))
    config = (model / "tokenizer_config.json").read_text()
    (model / "tokenizer_config.json").write_text(config.replace("{", f'{{"name_or_path": "{model}",', 1))
    out = tmp_path / "out"
    assert cli(*pair_args([model, llama_fp32[1]], out)).exit_code == 0
    assert str(model) not in (out / "tokenizer_config.json").read_text()
    assert '"name_or_path": "model"' in (out / "tokenizer_config.json").read_text()


@pytest.fixture
def hub(fake_hub, monkeypatch):
    """The stand-in hub, with its write token in HF_TOKEN."""
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    return fake_hub


def test_push_publishes_no_local_path_and_refuses_a_file_that_names_one(hub, llama_fp32, tmp_path):
    out = tmp_path / "out"
    assert cli(*pair_args(llama_fp32, out)).exit_code == 0
    assert cli("push", out, "--repo-id", "fake-user/clean").exit_code == 0
    published = "\n".join(v.decode(errors="replace") for k, v in hub.files("fake-user/clean").items()
                          if not k.endswith(".safetensors"))
    assert str(tmp_path) not in published and str(llama_fp32[0]) not in published
    (out / "notes.txt").write_text(f"merged on my machine from {llama_fp32[0]}\n")
    result = cli("push", out, "--repo-id", "fake-user/leaky")
    assert result.exit_code == 2, result.output
    assert f"notes.txt names the local path {llama_fp32[0]}, which pushing would publish" in result.stderr
    assert not hub.repo_exists("fake-user/leaky")


# ---------------------------------------------------------------------------------------------
# Push checked first


def push_recipe(tmp_path: Path, models: list[Path]) -> Path:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('output = "out"\npush_to_hub = true\n[push]\nrepo_id = "fake-user/merged"\n'
                      + "".join(f'[[models]]\npath = "{m}"\n' for m in models))
    return recipe


def test_push_to_hub_without_a_token_fails_before_any_tensor_is_read(hub, llama_fp32, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    poisoned = Path(shutil.copytree(llama_fp32[1], tmp_path / "poisoned"))  # a merge would stop on its NaN
    tensors = load_file(poisoned / "model.safetensors")
    tensors["lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    recipe = push_recipe(tmp_path, [llama_fp32[0], poisoned])
    for command in (["average"], ["validate"]):
        result = cli(*command, recipe)
        assert result.exit_code == 2, result.output
        assert "no Hugging Face token: pushing needs one with write access" in result.stderr
        assert "NaN" not in result.output
    assert not (tmp_path / "out").exists() and hub.requests == []


def test_push_to_hub_with_a_read_only_token_fails_before_the_merge(hub, llama_fp32, tmp_path, monkeypatch):
    hub.add_token("hf_readonly_123456", "reader", write=False)
    monkeypatch.setenv("HF_TOKEN", "hf_readonly_123456")
    result = cli("average", push_recipe(tmp_path, llama_fp32[:2]))
    assert result.exit_code == 2 and "your token is read-only" in result.stderr, result.output
    assert not (tmp_path / "out").exists()
