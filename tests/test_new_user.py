"""What a new user tripped over: each defect reproduced as the user met it."""

from __future__ import annotations

import shutil

import torch

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


def test_progress_without_a_terminal_names_the_block_and_estimates_from_the_work(tmp_path, llama_models, text_data):
    """RegMean++ says which block it is on; a RegMean plan counts its solves, not only its bytes."""
    from clirunner import cli_process
    from mergecli.merge.plan import plan_merge
    from mergecli.recipe import load_recipe
    from references import write_recipe

    recipe = write_recipe(tmp_path / "r.toml", list(zip(llama_models, text_data)),
                          settings={"num_examples": 4, "max_length": 8, "sequential": True})
    result = cli_process("regmean", "merge", recipe, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("merging:")]
    assert any("block 1/2" in line for line in lines) and any("block 2/2" in line for line in lines), lines
    plan = plan_merge(load_recipe(recipe), output=tmp_path / "plan", dry_run=True)
    try:
        solves = [task for task in plan.tasks if task.kind == "regmean++"]
        assert solves and all(task.work > task.bytes_read for task in solves)
        assert plan.work > plan.bytes_read + sum(stage.hook_cost for stage in plan.stages) - 1
    finally:
        plan.inputs.close()


def test_the_time_left_follows_the_rate_so_far():
    from mergecli.cli._render import _left

    assert _left(10.0, 0.25, 1.0) == ", about 30 s left"
    assert _left(60.0, 0.2, 1.0) == ", about 4 min left"
    assert _left(0.5, 0.25, 1.0) == ""  # too early to tell


def test_a_sentence_transformers_model_keeps_its_pipeline(tmp_path):
    """all-MiniLM-L6-v2 pools the mean and normalizes (modules.json, 1_Pooling/, 2_Normalize): the merge
    keeps that pipeline, so SentenceTransformer(out) embeds as the inputs do (here: the model merged with
    itself, which must give the model's own embeddings)."""
    from sentence_transformers import SentenceTransformer

    from references import minilm_dir

    out = tmp_path / "out"
    result = cli("average", "-m", minilm_dir(), "-m", minilm_dir(), "--name", "a", "--name", "b", "-o", out)
    assert result.exit_code == 0, result.output
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json"):
        assert (out / name).is_file(), name
    sentences = ["the model merges weights", "a layer of data"]
    original = SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, convert_to_tensor=True)
    merged = SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(merged, original, rtol=1e-5, atol=1e-5)
    assert torch.allclose(merged.norm(dim=-1), torch.ones(2), atol=1e-5)  # normalized, as the original
    card = (out / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "SentenceTransformer(" in card
