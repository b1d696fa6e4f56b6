"""Recipe validation, overrides and the resolved TOML written into outputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomllib

from mergecli import load_recipe
from mergecli.errors import RecipeError
from mergecli.methods.registry import method_of
from mergecli.recipe import dump_recipe, parse_size


def write(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recipe = load_recipe(write(tmp_path, 'output = "out"\n[[models]]\npath = "a"\n[[models]]\npath = "b"\n'))
    assert recipe.output == str(tmp_path / "out")
    assert [m.path for m in recipe.models] == [str(tmp_path / "a"), str(tmp_path / "b")]  # relative to the recipe
    assert [m.name for m in recipe.models] == ["a", "b"]
    assert recipe.weights(normalize=True) == [0.5, 0.5]
    assert recipe.shard_size == 5 * 10**9 and recipe.dtype == "auto"


def test_hub_ids_are_kept(tmp_path):
    recipe = load_recipe(write(tmp_path, '[[models]]\npath = "org/model-a"\n'))
    assert recipe.models[0].path == "org/model-a" and recipe.models[0].name == "model-a"


def test_unknown_keys_name_file_and_path(tmp_path):
    path = write(tmp_path, 'normalise = true\n[[models]]\npath = "a"\nwieght = 2\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}: normalise: unknown key" in str(info.value)
    # a model's keys are checked against the common ones and its method's, once the method is known
    path = write(tmp_path, '[[models]]\npath = "a"\nwieght = 2\n')
    with pytest.raises(RecipeError) as info:
        method_of(load_recipe(path))
    assert f"{path}: models.0.wieght: unknown key; did you mean 'weight'?" in str(info.value)


def test_a_method_declares_its_own_keys(tmp_path):
    text = 'method = "regmean"\n[regmean]\nreduce_non_diagonal_ration = 0.5\n[[models]]\npath = "a"\n'
    with pytest.raises(RecipeError, match="regmean.reduce_non_diagonal_ration: unknown key; did you mean "
                                          "'reduce_non_diagonal_ratio'"):
        method_of(load_recipe(write(tmp_path, text)))
    with pytest.raises(RecipeError, match="regmean.sequential: expected true or false"):
        method_of(load_recipe(write(tmp_path, 'method = "regmean"\n[regmean]\nsequential = "yes"\n'
                                              '[[models]]\npath = "a"\n')))
    with pytest.raises(RecipeError, match="pus: unknown key; did you mean 'push'"):
        method_of(load_recipe(write(tmp_path, '[pus]\nrepo_id = "x/y"\n[[models]]\npath = "a"\n')))
    recipe = load_recipe(write(tmp_path, 'method = "regmean"\n[regmean]\nstats_dir = "s"\n[[models]]\npath = "a"\n'))
    assert method_of(recipe).name == "regmean" and recipe.settings.stats_dir == str(tmp_path / "s")


def test_a_string_weight_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"models\.0\.weight: Input should be a valid number"):
        load_recipe(write(tmp_path, '[[models]]\npath = "a"\nweight = "0.3"\n'))


def test_bad_weight_type(tmp_path):
    with pytest.raises(RecipeError, match=r"models\.1\.weight: Input should be a valid number"):
        load_recipe(write(tmp_path, '[[models]]\npath = "a"\n[[models]]\npath = "b"\nweight = "x"\n'))


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_non_finite_weight(tmp_path, weight):
    with pytest.raises(RecipeError, match=r"models\.0\.weight: Input should be a finite number"):
        load_recipe(write(tmp_path, f'[[models]]\npath = "a"\nweight = {weight}\n'))


def test_zero_sum_weights_with_normalize(tmp_path):
    text = '[[models]]\npath = "a"\nweight = 1\n[[models]]\npath = "b"\nweight = -1\n'
    with pytest.raises(RecipeError, match="weights sum to 0"):
        method_of(load_recipe(write(tmp_path, text)))
    recipe = load_recipe(write(tmp_path, "normalize = false\n" + text))
    assert method_of(recipe).weights(recipe) == [1.0, -1.0]


def test_duplicate_names_and_bad_regex(tmp_path):
    defaults = load_recipe(write(tmp_path, '[[models]]\npath = "x/a"\n[[models]]\npath = "y/a"\n'))
    assert [m.name for m in defaults.models] == ["x-a", "y-a"]  # default names made unique from the paths
    with pytest.raises(RecipeError, match="names must be unique"):
        load_recipe(write(tmp_path, '[[models]]\npath = "x/a"\nname = "a"\n[[models]]\npath = "y/a"\nname = "a"\n'))
    with pytest.raises(RecipeError, match=r"exclude: .*invalid regex"):
        load_recipe(write(tmp_path, 'exclude = ["(("]\n[[models]]\npath = "a"\n'))


def test_name_cannot_escape_stats_dir(tmp_path):
    with pytest.raises(RecipeError, match="name"):
        load_recipe(write(tmp_path, '[[models]]\npath = "a"\nname = "../../etc"\n'))


def test_invalid_toml(tmp_path):
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(write(tmp_path, "models = [\n"))


def test_set_overrides(tmp_path):
    path = write(tmp_path, '[[models]]\npath = "a"\n[[models]]\npath = "b"\n')
    recipe = load_recipe(path, overrides=["normalize=false", "models.1.weight=0.7", "dtype=bfloat16", "method=regmean",
                                          "regmean.reduce_non_diagonal_ratio=0.9", 'exclude=["x.*"]'])
    assert method_of(recipe).weights(recipe) == [1.0, 0.7]
    assert recipe.dtype == "bfloat16" and recipe.exclude == ["x.*"]
    assert recipe.settings.reduce_non_diagonal_ratio == 0.9
    with pytest.raises(RecipeError, match="no list item '5'"):
        load_recipe(path, overrides=["models.5.weight=1"])
    with pytest.raises(RecipeError, match="dtype: Input should be"):
        load_recipe(path, overrides=["dtype=float8"])


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8),
                                            ("2GiB", 2 * 2**30), (1234, 1234), ("1.5KB", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_dump_roundtrips(tmp_path):
    recipe = load_recipe(write(tmp_path, 'exclude = ["a\\\\..*"]\nshard_size = "1MB"\n[base]\npath = "base"\n'
                                         '[[models]]\npath = "a"\nweight = 0.25\n[[models]]\npath = "b"\n'))
    again = tmp_path / "again.toml"
    again.write_text(dump_recipe(recipe))
    reloaded = load_recipe(again)
    assert reloaded.model_dump() == recipe.model_dump()
    assert tomllib.loads(dump_recipe(recipe))["exclude"] == ["a\\..*"]
    assert math.isclose(sum(reloaded.weights(normalize=True)), 1.0)


def test_readme_recipe_is_valid(tmp_path):
    """The recipe documented in the README validates, every key of the schema included."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    recipe = load_recipe(write(tmp_path, block.replace('method = "average"', 'method = "regmean"')))
    method_of(recipe)
    assert recipe.models[0].path == "org/llama-math" and recipe.base.path == "meta-llama/Llama-2-7b-hf"
    assert recipe.push.repo_id == "me/llama-avg" and recipe.settings.reduce_non_diagonal_ratio == 0.6
    lines = block.splitlines()
    documented = {line.split("=")[0].strip() for line in lines if "=" in line and not line.startswith("[")}
    documented |= {line.split("]")[0].strip("[").split(".")[0] for line in lines if line.startswith("[")}  # tables
    schema = set(type(recipe).model_fields) | {f for m in (recipe.models[0], recipe.settings, recipe.push)
                                                 for f in type(m).model_fields}
    assert schema - documented == set(), "recipe keys missing from the README"
