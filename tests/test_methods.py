"""A merge method is one file: the toy method of take_first.py, registered, runs through validate,
--dry-run and a merge end to end; an unknown method is refused as a recipe error."""

from __future__ import annotations

import sys
from pathlib import Path

import take_first  # noqa: F401  (registers method "first")
import torch
from safetensors.torch import load_file

from clirunner import cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def recipe(tmp_path: Path, models: list[Path], method: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(f'method = "{method}"\noutput = "out"\n'
                    + "".join(f'[[models]]\npath = "{m}"\n' for m in models))
    return path


def test_a_third_method_validates_plans_and_merges(llama_fp32, tmp_path):
    path = recipe(tmp_path, llama_fp32[:2], "first")

    checked = cli("validate", path)
    assert checked.exit_code == 0, checked.output
    assert "21 tensors taken from the first model" in checked.stdout and "valid first recipe" in checked.stdout

    dry = cli("average", path, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "21 tensors taken from the first model" in dry.stdout and not (tmp_path / "out").exists()

    merged = cli("average", path)
    assert merged.exit_code == 0, merged.output
    assert "21 taken from the first model" in merged.stdout
    out, first = load_file(tmp_path / "out" / "model.safetensors"), load_file(llama_fp32[0] / "model.safetensors")
    assert out.keys() == first.keys() and all(torch.equal(out[k], first[k]) for k in first)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "A copy of the first model of 2 models" in card and "**Take the first model**" in card
    assert "`mergecli average mergecli.toml -o again/`" in card
    assert tomllib.loads((tmp_path / "out" / "mergecli.toml").read_text())["method"] == "first"


def test_the_command_that_runs_a_method_is_the_methods_own(llama_fp32, tmp_path):
    result = cli("regmean", "merge", recipe(tmp_path, llama_fp32[:2], "first"))
    assert result.exit_code == 2, result.output
    assert "method is 'first', which `mergecli average` runs" in result.stderr


def test_an_unknown_method_is_a_recipe_error(llama_fp32, tmp_path):
    path = recipe(tmp_path, llama_fp32[:2], "firts")
    for command in (["validate"], ["average"], ["regmean", "merge"]):
        result = cli(*command, path)
        assert result.exit_code == 2, result.output
        assert f"{path}: method: unknown method 'firts'; did you mean 'first'? (methods: arcee_fusion, average, " \
            in result.stderr
    assert not (tmp_path / "out").exists()
