"""A mergekit config is read as strictly as a TOML recipe: a safe reader, a size limit before parsing,
regular files only, duplicate keys refused, every value validated by the recipe schema, and each
problem said in one line naming the key and its line. Hostile or broken YAML never passes as a
recipe, never raises an internal error, and never takes more than a second or 100 MB."""

from __future__ import annotations

import os
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clirunner import cli
from mergecli import load_recipe
from mergecli.errors import RecipeError
from mergecli.methods.registry import method_of
from mergecli.recipe import dump_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def write(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def refused(result, *words: str) -> str:
    """The one problem line of a refusal (exit 2), which must hold `words`."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("hint: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.output
    return lines[0]


LLAMA = "merge_method: {method}\nbase_model: base\nmodels:\n"


@pytest.mark.parametrize("text, words", [
    # wrong recipes that used to exit 0
    ("merge_method: linear\nmodels: org/a\n", ["line 2: models: expected a list of models"]),
    ("merge_method: linear\nmodels: {a: 1}\n", ["line 2: models: expected a list of models"]),
    ("merge_method: linear\nmodels: !!set {a, b}\n", ["line 2: models: a !!set is not a value a config holds"]),
    ("merge_method: linear\nmodels:\n", ["line 2: models: expected a list of models"]),
    ("merge_method: linear\nmodels: []\n", ["line 2: models: expected a list of models"]),
    ("merge_method: ties\nmerge_method: linear\nmodels: [{model: a}]\n",
     ["line 2: merge_method: given twice (also on line 1)"]),
    # values copied unchecked into the recipe
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: abc}\n",
     ["line 4: models.0.parameters.weight: Input should be a valid number"]),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {density: half}\n",
     ["line 5: models.0.parameters.density: Input should be a valid number"]),
    ("merge_method: ties\nbase_model: b\nparameters:\n  normalize: maybe\nmodels: [{model: a}]\n",
     ["line 4: parameters.normalize: expected true or false"]),
    ("merge_method: linear\ntokenizer: {source: union, pad_to_multiple_of: -64}\nmodels: [{model: a}]\n",
     ["line 2: tokenizer.pad_to_multiple_of: Input should be greater than or equal to 1"]),
    ("merge_method: linear\ntokenizer: {source: union, pad_to_multiple_of: 100000000000000000000}\n"
     "models: [{model: a}]\n", ["line 2: tokenizer.pad_to_multiple_of: Input should be less than or equal to"]),
    ("merge_method: slerp\nbase_model: a\nparameters: {t: .nan}\nmodels: [{model: a}, {model: b}]\n",
     ["line 3: parameters.t: '.nan' is not a finite number"]),
    ("merge_method: slerp\nbase_model: a\nparameters: {t: 2}\nmodels: [{model: a}, {model: b}]\n",
     ["line 3: parameters.t: Input should be less than or equal to 1"]),
    # internal errors
    ("merge_method: [ties]\nmodels: [{model: a}]\n", ["line 1: merge_method: expected the name of a merge method"]),
    ("merge_method: linear\ndtype: [bfloat16]\nmodels: [{model: a}]\n",
     ["line 2: dtype: ['bfloat16'] is not a dtype mergecli writes"]),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: " + "9" * 5000 + "}\n",
     ["line 4: models.0.parameters.weight: a number of 5,000 characters"]),
    ('merge_method: linear\nmodels:\n  - model: "a\\ud800b"\n', ["line 3: not valid YAML (found invalid Unicode"]),
    ("merge_method: linear\nmodels:\n  - model: a\ud800b\n", ["is not UTF-8 text"]),
    ("merge_method: linear\nmodels:\n  - model: !!python/object:os.system a\n",
     ["line 3: models.0.model: a !!python/object:os.system is not a value a config holds"]),
    ("merge_method: linear\nmodels: [{model: a}]\nbogus: 1\n", ["line 3: bogus: mergekit has no key 'bogus'"]),
    ("merge_method: linear\n<<: {models: [{model: a}]}\n", ["line 2: <<: YAML merge keys (<<) are not read"]),
    ("merge_method: linear\nmodels: [{model: a, weight: 1}]\n", ["line 2: models.0.weight: unknown key"]),
    ("[unclosed\n", ["line 2: not valid YAML"]),
    ("a: &x [*x]\n", ["values nested more than 32 deep"]),
])
def test_hostile_or_broken_configs_are_refused_in_one_line(tmp_path, text, words):
    path = write(tmp_path, text)
    line = refused(cli("convert", path), str(path), *words)
    assert refused(cli("merge", path, "-o", tmp_path / "out"), *words) == line
    assert not (tmp_path / "out").exists()


def test_a_billion_laughs_is_refused_not_expanded(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(lines) + "\nmerge_method: linear\nmodels: [*a8]\n")
    refused(cli("convert", path), "the file holds more than 20,000 values")


@pytest.mark.parametrize("kind, words", [("fifo", "is a FIFO (named pipe), not a regular file"),
                                         ("zero", "is a character device, not a regular file"),
                                         ("directory", "is a directory, not a regular file")])
def test_only_regular_files_are_read(tmp_path, kind, words):
    path = tmp_path / "config.yml"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
    elif kind == "zero":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:
        path.mkdir()
    refused(cli("convert", path), words)
    refused(cli("merge", path, "-o", tmp_path / "out"), words)


@pytest.mark.parametrize("text", [
    "merge_method: linear\nmodels: [" + ", ".join(["{model: a}"] * 200_000) + "]\n",  # a huge list
    "merge_method: linear\nname: " + "x" * 50_000_000 + "\n",  # a huge string
    "#" * 100_000_000 + "\nmerge_method: linear\n",  # a huge comment
])
def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path, text):
    path = write(tmp_path, text)
    refused(cli("convert", path), "is larger than 1,000 KB; a config is a few KB")


def test_many_values_under_the_size_limit_are_refused_quickly(tmp_path):
    path = write(tmp_path, "merge_method: linear\nmodels: [" + ", ".join(["a"] * 150_000) + "]\n")
    refused(cli("convert", path), "line 2: models.", "the file holds more than 20,000 values")


# ---------------------------------------------------------------------------------------------
# Property: whatever the YAML, a one-line refusal or a recipe the TOML loader takes unchanged

KEYS = ["merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
        "model", "weight", "density", "lambda", "t", "normalize", "source", "pad_to_multiple_of", "int8_mask",
        "slices", "name", "rescale"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["linear", "ties", "slerp", "dare_ties", "task_arithmetic", "union", "base", "a",
                                     "b", "org/m", "bfloat16", "fp16", "a+b", "x@main", ""]),
                    st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=20)
CONFIGS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=7)
MUTATIONS = st.sampled_from(["", "!!set ", "&x ", "*x ", "{", "- ", "\ud800", "---\n", "\t", ": :"])


NUMBERS = st.one_of(st.floats(-2, 2), st.integers(-2, 2), st.sampled_from([0.5, 1, "0.3", "abc", None, True]))


@st.composite
def plausible_configs(draw) -> dict:
    """Configs in mergekit's forms, with values that are often right and sometimes not."""
    models = [{"model": name, **({"parameters": draw(st.dictionaries(st.sampled_from(["weight", "density"]),
                                                                       NUMBERS, max_size=2))} if draw(st.booleans())
                                 else {})} for name in draw(st.lists(st.sampled_from(["a", "b", "c", "org/d"]),
                                                                     min_size=1, max_size=3, unique=True))]
    config = {"merge_method": draw(st.sampled_from(["linear", "ties", "slerp", "dare_ties", "task_arithmetic"])),
              "models": models}
    if draw(st.booleans()):
        config["base_model"] = draw(st.sampled_from(["a", "base"]))
    if draw(st.booleans()):
        config["parameters"] = draw(st.dictionaries(st.sampled_from(["t", "lambda", "density", "normalize", "weight"]),
                                                    NUMBERS, max_size=3))
    if draw(st.booleans()):
        config["dtype"] = draw(st.sampled_from(["bfloat16", "float16", "fp32", "int8"]))
    if draw(st.booleans()):
        config["tokenizer"] = {"source": draw(st.sampled_from(["union", "base", "a"])),
                               "pad_to_multiple_of": draw(st.integers(-1, 128))}
    return config


@st.composite
def yaml_texts(draw) -> str:
    text = yaml.safe_dump(draw(st.one_of(CONFIGS, plausible_configs())), allow_unicode=True)
    if draw(st.booleans()):
        return text
    cut = draw(st.integers(0, len(text)))
    return text[:cut] + draw(MUTATIONS) + text[cut:]


def run_within_bounds(action):
    """Run `action`; it must take under a second of CPU and allocate under 100 MB."""
    tracemalloc.start()
    started = time.process_time()
    try:
        action()
    finally:
        seconds = time.process_time() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 1.0 and peak < 100e6, (seconds, peak)


accepted: list[str] = []  # the methods of the configs accepted, across examples (the next test reads it)


@settings(max_examples=int(os.environ.get("MERGECLI_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=yaml_texts())
def test_any_yaml_is_refused_in_one_line_or_becomes_a_recipe_the_toml_loader_takes(tmp_path, text):
    path = write(tmp_path, text)
    outcome = {}

    def convert() -> None:
        try:
            recipe = load_recipe(path)
            method_of(recipe)
            outcome["recipe"] = recipe
        except RecipeError as exc:
            outcome["error"] = exc

    run_within_bounds(convert)
    if "error" in outcome:
        for problem in outcome["error"].problems:
            assert problem and "\n" not in problem, problem
        return
    recipe = outcome["recipe"]
    accepted.append(recipe.method)
    toml = tmp_path / "recipe.toml"
    toml.write_text(dump_recipe(recipe))
    again = load_recipe(toml)
    method_of(again)
    assert tomllib.loads(dump_recipe(again)) == tomllib.loads(dump_recipe(recipe))
    result = cli("convert", path)
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)["method"] == recipe.method


def test_the_property_saw_configs_accepted_as_well_as_refused():
    assert len(accepted) >= 5, accepted  # the generator reaches valid configs, not only refusals
