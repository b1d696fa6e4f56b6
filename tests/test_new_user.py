"""What a new user tripped over: each defect reproduced as the user met it."""

from __future__ import annotations

import json
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
    from mergecli import load_recipe
    from mergecli.merge.plan import plan_merge
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


def test_the_time_left_follows_a_steady_rate():
    from mergecli.cli._render import Remaining

    remaining = Remaining(0.0)
    assert remaining.words(0.5, 0.25, 1.0) == ""  # too early to tell
    for second in range(1, 11):
        words = remaining.words(float(second), 0.025 * second, 1.0)
    assert words == ", about 30 s left"
    slow = Remaining(0.0)
    for second in range(10, 61, 10):
        words = slow.words(float(second), 0.2 * second / 60, 1.0)
    assert words == ", about 4 min left"


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


# ---------------------------------------------------------------------------------------------
# The smaller things: each cost a new user a minute


def test_set_errors_name_the_flag_and_its_fix(llama_fp32, tmp_path):
    pair = ["-m", llama_fp32[0], "-m", llama_fp32[1], "-o", tmp_path / "out"]
    result = cli("average", *pair, "--set", "dtyp=float16")
    assert result.stderr.startswith("error: --set dtyp: unknown key; did you mean 'dtype'?"), result.stderr
    result = cli("average", *pair, "-w", "0,0")
    assert "(pass --set normalize=false?)" in result.stderr and "(recipe)" not in result.stderr


def test_a_zero_weight_model_is_not_read_and_one_model_is_a_copy(llama_fp32, tmp_path):
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-w", "1,0", "-o", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("has weight 0: it is not read" in note for note in report["notes"])
    assert report["bytes_read"] == sum(f.stat().st_size for f in llama_fp32[0].glob("*.safetensors")) - \
        _header_bytes(llama_fp32[0] / "model.safetensors")
    result = cli("average", "-m", llama_fp32[0], "-o", tmp_path / "b")
    assert result.exit_code == 0 and "note: one model: the output is a copy of it" in result.stderr


def _header_bytes(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_an_output_that_is_not_mergecli_s_says_so_without_suggesting_force(llama_fp32, tmp_path):
    code = tmp_path / "mycode"
    code.mkdir()
    (code / "main.py").write_text("print('hi')\n")
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", code)
    assert result.exit_code == 2 and "is not a merge output of mergecli: it holds main.py" in result.stderr
    assert "--force would not replace it either" in result.stderr


def test_a_moved_output_s_recipe_says_its_paths_are_relative_to_the_output(llama_fp32, tmp_path):
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", tmp_path / "a" / "out").exit_code == 0
    shutil.move(tmp_path / "a" / "out", tmp_path / "moved")
    result = cli("average", tmp_path / "moved" / "mergecli.toml", "-o", tmp_path / "again")
    assert result.exit_code == 2 and "relative to the output directory" in result.stderr, result.output


def test_depth_and_class_mismatches_are_said_in_a_line(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaForCausalLM

    from builders import llama_config

    for layers in (4, 6):
        LlamaForCausalLM(llama_config(layers=layers)).save_pretrained(tmp_path / f"l{layers}")
    result = cli("average", "-m", tmp_path / "l4", "-m", tmp_path / "l6", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "the inputs have different depths: l4 has 4 layers, l6 has 6 layers" in result.stderr
    assert "dropped" not in result.stderr and not (tmp_path / "out").exists()  # never a silent 4-layer merge
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bare")
    BertForSequenceClassification(config).save_pretrained(tmp_path / "task")
    result = cli("average", "-m", tmp_path / "bare", "-m", tmp_path / "task", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "task stores its tensors under `bert.` and bare without it" in result.stderr


def test_usage_errors_read_like_every_other_error():
    from clirunner import cli_process

    result = cli_process("average", "--bogus")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: No such option: --bogus (Possible options: --base)",
                                          "hint: see `mergecli average --help`"]


def test_summary_lines_without_a_terminal_end_without_spaces_and_do_not_wrap(llama_fp32, tmp_path):
    from clirunner import cli_process

    out = tmp_path / ("a-rather-long-directory-name-" * 4) / "out"
    result = cli_process("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out)
    assert result.returncode == 0, result.stderr
    assert all(line == line.rstrip() for line in result.stdout.splitlines())
    assert any(str(out) in line for line in result.stdout.splitlines())  # the whole path on one line


def test_a_dry_run_push_without_a_token_warns(llama_fp32, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", tmp_path / "out").exit_code == 0
    result = cli("push", tmp_path / "out", "--repo-id", "me/x", "--dry-run")
    assert result.exit_code == 0 and "warning: no Hugging Face token" in result.stderr


def test_the_card_describes_the_merge_and_a_local_base_s_hub_id(llama_fp32, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[base]\npath = "{llama_fp32[2]}"\nhub_id = "meta-llama/Llama-3.2-1B"\n'
                      f'[[models]]\npath = "{llama_fp32[0]}"\nname = "math"\n'
                      f'[[models]]\npath = "{llama_fp32[1]}"\nname = "code"\n')
    assert cli("average", recipe, "-o", tmp_path / "out").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'base_model:\n- "meta-llama/Llama-3.2-1B"' in card
    assert "It combines `math`, `code` into one model of their architecture (`LlamaForCausalLM`)" in card
