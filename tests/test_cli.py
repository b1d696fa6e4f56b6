"""The command surface: version, help with examples, usage errors."""

from __future__ import annotations

import pytest

from clirunner import cli, cli_process
from mergecli import __version__


def test_version():
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"mergecli {__version__}"


@pytest.mark.parametrize("command", [["average"], ["validate"], ["push"], ["regmean", "collect-stats"],
                                     ["regmean", "merge"]])
def test_help_has_examples(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and f"mergecli {' '.join(command)} " in result.stdout


def test_nothing_to_merge_is_a_usage_error():
    result = cli("average")
    assert result.exit_code == 2 and "nothing to merge" in result.stderr


def test_recipe_and_models_together(tmp_path):
    result = cli("average", tmp_path / "r.toml", "-m", "x")
    assert result.exit_code == 2 and "not both" in result.stderr


def test_unknown_option_exits_2():
    assert cli("average", "--frobnicate").exit_code == 2


def test_missing_recipe_file(tmp_path):
    result = cli("validate", tmp_path / "absent.toml")
    assert result.exit_code == 2 and "absent.toml: no such recipe file" in result.stderr


def test_module_entry_point_runs():
    result = cli_process("--version")
    assert result.returncode == 0 and __version__ in result.stdout
