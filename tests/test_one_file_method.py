"""A new method is one new file in mergecli/methods/: dropped there, with nothing else touched, it is
listed by `--help` (without importing torch), translated by `convert` from its mergekit name, planned by
`validate` and described by the card of its merge."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from clirunner import cli, cli_process
from mergecli.methods.base import registered

METHODS = Path(__file__).resolve().parent.parent / "mergecli" / "methods"


@pytest.fixture
def toy_method():
    """tests/take_first.py, renamed, copied into the package for this test only."""
    source = (Path(__file__).resolve().parent / "take_first.py").read_text()
    path = METHODS / "toy_first.py"
    path.write_text(source.replace('name = "first"', 'name = "toy_first"')
                    .replace('mergekit = "take_first"', 'mergekit = "mergekit_toy_first"'))
    try:
        yield "toy_first"
    finally:
        path.unlink()
        shutil.rmtree(METHODS / "__pycache__" / "toy_first", ignore_errors=True)
        for cached in (METHODS / "__pycache__").glob("toy_first.*"):
            cached.unlink()
        registered.pop("toy_first", None)
        sys.modules.pop("mergecli.methods.toy_first", None)


def test_a_method_is_one_file(toy_method, llama_fp32, tmp_path):
    listed = cli_process("merge", "--help")
    assert listed.returncode == 0
    assert "toy_first" in listed.stdout and "every tensor that would be averaged taken from the first" in listed.stdout

    config = tmp_path / "config.yml"
    config.write_text(f"merge_method: mergekit_toy_first\nmodels:\n  - model: {llama_fp32[0]}\n"
                      f"  - model: {llama_fp32[1]}\n")
    converted = cli("convert", config, "-o", tmp_path / "recipe.toml")
    assert converted.exit_code == 0, converted.output
    assert 'method = "toy_first"' in (tmp_path / "recipe.toml").read_text()

    checked = cli("validate", tmp_path / "recipe.toml", "-o", tmp_path / "out")
    assert checked.exit_code == 0, checked.output
    assert "21 tensors taken from the first model" in checked.stdout

    merged = cli("average", tmp_path / "recipe.toml", "-o", tmp_path / "out")
    assert merged.exit_code == 0, merged.output
    assert "**Take the first model**" in (tmp_path / "out" / "README.md").read_text()
