"""`mergecli convert`: a mergekit config as the equivalent recipe, which then merges; what mergecli does
not have is refused by name, never dropped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clirunner import cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def convert(tmp_path: Path, yaml_text: str):
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml_text)
    return cli("convert", path)


def test_ties_config_becomes_a_recipe_that_merges(llama_fp32, tmp_path):
    base, a, b = llama_fp32
    result = convert(tmp_path, f"""
merge_method: ties
base_model: {base}
dtype: bfloat16
parameters:
  normalize: false
  lambda: 0.8
  int8_mask: true
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {b}
    parameters: {{weight: 0.3, density: 0.6}}
tokenizer_source: union
""")
    assert result.exit_code == 0, result.output
    recipe = tomllib.loads(result.stdout)
    assert recipe["method"] == "ties" and recipe["dtype"] == "bfloat16" and recipe["normalize"] is False
    assert recipe["tokenizer"] == "union" and recipe["base"]["path"] == str(base)
    assert recipe["ties"] == {"lambda": 0.8, "density": 1.0}  # mergekit keeps everything unless told
    assert [(m["path"], m["weight"], m["density"]) for m in recipe["models"]] == [(str(a), 0.7, 0.4),
                                                                                  (str(b), 0.3, 0.6)]
    (tmp_path / "recipe.toml").write_text(result.stdout)
    merged = cli("merge", tmp_path / "recipe.toml", "-o", tmp_path / "out")
    assert merged.exit_code == 0, merged.output


def test_slerp_puts_mergekits_base_first_and_a_tokenizer_source_model_is_named(llama_fp32, tmp_path):
    base, a, _ = llama_fp32
    result = convert(tmp_path, f"""
merge_method: slerp
base_model: {a}
parameters: {{t: 0.3}}
models:
  - model: {base}
  - model: {a}
tokenizer:
  source: {base}
  pad_to_multiple_of: 64
""")
    assert result.exit_code == 0, result.output
    recipe = tomllib.loads(result.stdout)
    assert [m["path"] for m in recipe["models"]] == [str(a), str(base)] and "base" not in recipe
    assert recipe["slerp"] == {"t": 0.3} and recipe["pad_to_multiple_of"] == 64
    named = next(m for m in recipe["models"] if m["path"] == str(base))
    assert recipe["tokenizer"] == named["name"] == base.name


@pytest.mark.parametrize("config, words", [
    ("merge_method: model_stok\nmodels: [{model: a}]\n",
     "line 1: merge_method: 'model_stok' is not a method of mergecli"),
    ("merge_method: linear\nmodels: [{model: a@v1+lora}]\n", "a LoRA adapter's base at a revision"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {source: union, vocab: {x: y}}\n",
     "line 3: tokenizer.vocab: unknown key of the tokenizer (source, tokens, pad_to_multiple_of)"),
    ("merge_method: ties\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n    residual_weight: 0.5\n",
     "line 4: slices.0.residual_weight: a slice's own residual_weight is not supported"),
    ("merge_method: ties\nmodels: [{model: a}]\nparameters: {gamma: 0.1}\n",
     "line 3: parameters.gamma: mergekit's 'gamma' has no equivalent in mergecli's ties"),
])
def test_what_mergecli_lacks_is_refused_by_name(tmp_path, config, words):
    result = convert(tmp_path, config)
    assert result.exit_code == 2, result.output
    assert words in result.stderr and "Traceback" not in result.output


def test_relative_paths_are_read_from_the_current_directory_and_rebased_for_the_recipe(llama_fp32, tmp_path):
    """mergekit reads a config's relative paths from where it runs; a recipe's are relative to its file."""
    import shutil

    from clirunner import cli_process

    for index in (0, 1):
        shutil.copytree(llama_fp32[index], tmp_path / f"m{index}")
    config = tmp_path / "config.yml"
    config.write_text("merge_method: slerp\nbase_model: m0\nmodels: [{model: m0}, {model: ./m1}]\n"
                      "parameters: {t: 0.3}\n")
    ran = cli_process("merge", "config.yml", "-o", "out", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    written = cli_process("convert", "config.yml", "-o", "recipes/slerp.toml", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    recipe = tomllib.loads((tmp_path / "recipes" / "slerp.toml").read_text())
    assert [m["path"] for m in recipe["models"]] == ["../m0", "../m1"]
    again = cli("merge", tmp_path / "recipes" / "slerp.toml", "-o", tmp_path / "again")  # from anywhere
    assert again.exit_code == 0, again.output
    weights = [(tmp_path / folder / "model.safetensors").read_bytes() for folder in ("again", "out")]
    assert weights[0] == weights[1]
    refused = cli_process("convert", "config.yml", "-o", "recipes/slerp.toml", cwd=tmp_path)
    assert refused.returncode == 2 and "recipes/slerp.toml exists" in refused.stderr


@pytest.mark.parametrize("method,parameters,table", [
    ("dare_ties", "", {"density": 1.0, "rescale": "l1"}),  # mergekit rescales to the L1 norm by default
    ("dare_linear", "rescale: false", {"density": 1.0, "rescale": False}),
    ("della", "epsilon: 0.1", {"epsilon": 0.1}),
    ("breadcrumbs_ties", "gamma: 0.02\nrescale: true", {"gamma": 0.02, "rescale": True}),
    ("sce", "select_topk: 0.3\nint8_mask: true", {"select_topk": 0.3}),
])
def test_a_mergekit_method_s_parameters_become_its_table(llama_fp32, tmp_path, method, parameters, table):
    base, a, b = llama_fp32
    shared = "parameters:\n" + "".join(f"  {line}\n" for line in parameters.splitlines()) if parameters else ""
    result = convert(tmp_path, f"""
merge_method: {method}
base_model: {base}
{shared}models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.6}}
""".replace("{weight: 0.5, density: 0.5}", "{}" if method == "sce" else "{weight: 0.5, density: 0.5}")
        .replace("{weight: 0.5, density: 0.6}", "{}" if method == "sce" else "{weight: 0.5, density: 0.6}"))
    assert result.exit_code == 0, result.output
    recipe = tomllib.loads(result.stdout)
    assert recipe["method"] == method and recipe[method] == table
    (tmp_path / "recipe.toml").write_text(result.stdout)
    merged = cli("merge", tmp_path / "recipe.toml", "-o", tmp_path / "out")
    assert merged.exit_code == 0, merged.output


def test_model_plus_lora_becomes_an_adapter_entry_with_its_base(tmp_path):
    """mergekit's `model+lora` (the adapter merged into a cached copy of the model) is the adapter as an input,
    applied to its base as it is read."""
    result = convert(tmp_path, "merge_method: linear\nmodels:\n  - model: base-model+my-adapter\n"
                               "    parameters: {weight: 1.0}\n")
    assert result.exit_code == 0, result.output
    entry = tomllib.loads(result.stdout)["models"][0]
    assert entry["path"].endswith("my-adapter") and entry["base"].endswith("base-model"), entry
