"""What a new user tripped over: each defect reproduced as the user met it."""

from __future__ import annotations

import shutil

from clirunner import cli


def test_a_recipe_path_never_falls_back_to_the_current_directory(llama_fp32, tmp_path, monkeypatch):
    """The recipe says `a`; there is no `a` next to it, but there is one where mergecli runs: not used."""
    shutil.copytree(llama_fp32[0], tmp_path / "a")
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.write_text(f'output = "out"\n[[models]]\npath = "a"\n[[models]]\npath = "{llama_fp32[1]}"\n')
    monkeypatch.chdir(tmp_path)
    result = cli("average", recipe)
    assert result.exit_code != 0 and "a: no such local path" in result.stderr, result.output
    assert not (tmp_path / "recipes" / "out").exists()
    shutil.copytree(llama_fp32[0], tmp_path / "recipes" / "a")  # beside the recipe: that one is used
    assert cli("average", recipe).exit_code == 0


def test_a_mistyped_local_folder_says_no_such_path_before_the_hub(llama_fp32, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama_fp32[0], tmp_path / "minilm-sentiment")
    result = cli("average", "-m", "minilm-sentimnet", "-m", "minilm-sentiment", "-o", "out")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: minilm-sentimnet: no such local path, and as a hub repo id: ")
    assert "cannot reach the hub" not in result.stderr.splitlines()[0].split("as a hub repo id")[0]
