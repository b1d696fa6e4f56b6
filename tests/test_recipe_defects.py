"""Defects and friction found by a new user's trial and a check against mergekit, each with the test that
failed before its fix: a converted linear config that dropped its base's weight, union rows under TIES and
DARE, a one-model task-vector merge called a copy, progress that said too much or too little, and messages
worded two ways or pointing the wrong way."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from test_vocabulary import fine_tune
from transformers import AutoTokenizer

from builders import build_llama
from clirunner import cli
from peers import assert_close, run_mergekit, tensors


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("defects")
    base = build_llama(root / "base", seed=0, vocab_size=62)
    return {"base": base, "chat": fine_tune(base, root / "chat", ["<|im_start|>", "<|im_end|>"], 1),
            "tool": fine_tune(base, root / "tool", ["<|im_start|>", "<tool>"], 2)}


def test_a_linear_config_whose_base_is_a_weighted_model_averages_it(llama_fp32, tmp_path):
    """`convert` moved such a base to [base], which is never averaged, and dropped its weight."""
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nbase_model: {llama_fp32[0]}\ndtype: float32\nmodels:\n"
                      f"  - model: {llama_fp32[0]}\n    parameters: {{weight: 0.3}}\n"
                      f"  - model: {llama_fp32[1]}\n    parameters: {{weight: 0.7}}\n")
    run_mergekit(config, tmp_path / "theirs")
    result = cli("merge", config, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    assert_close(tensors(tmp_path / "ours"), tensors(tmp_path / "theirs"))
    a, b = (tensors(path) for path in llama_fp32[:2])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(tensors(tmp_path / "ours")[name].double(), 0.3 * a[name].double() + 0.7 * b[name].double())


def test_a_linear_config_whose_base_has_no_weight_is_refused_as_mergekit_refuses_it(llama_fp32, tmp_path):
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nbase_model: {llama_fp32[2]}\nmodels:\n"
                      f"  - model: {llama_fp32[0]}\n    parameters: {{weight: 0.3}}\n"
                      f"  - model: {llama_fp32[1]}\n    parameters: {{weight: 0.7}}\n")
    result = cli("convert", config)
    assert result.exit_code == 2, result.output
    assert "line 2: base_model: linear: the base_model is not among the models and has no weight" in result.stderr


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_a_token_several_fine_tunes_added_is_their_weighted_mean(chats, tmp_path, method):
    """Under a union, a token the base lacks and both fine-tunes added used to get, per entry, one model's
    value (TIES' sign election) or one pushed outward by 1/density (DARE)."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'method = "{method}"\ntokenizer = "union"\noutput = "out"\n[{method}]\ndensity = 0.5\n'
                      f'[base]\npath = "{chats["base"]}"\n[[models]]\npath = "{chats["chat"]}"\nweight = 0.25\n'
                      f'[[models]]\npath = "{chats["tool"]}"\nweight = 0.75\n')
    result = cli("merge", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    rows = {path: (tensors(path), AutoTokenizer.from_pretrained(path).get_vocab())
            for path in (out, chats["chat"], chats["tool"])}

    def row(path: Path, token: str) -> torch.Tensor:
        weights, vocab = rows[path]
        return weights["model.embed_tokens.weight"][vocab[token]].double()

    expected = 0.25 * row(chats["chat"], "<|im_start|>") + 0.75 * row(chats["tool"], "<|im_start|>")
    assert torch.allclose(row(out, "<|im_start|>"), expected, rtol=0, atol=1e-7)
    assert torch.allclose(row(out, "<tool>"), row(chats["tool"], "<tool>"), rtol=0, atol=0)  # one holder: its row


def test_a_task_vector_merge_of_one_model_is_not_called_a_copy(llama_fp32, tmp_path):
    """DARE keeps about half of a task vector: the output is no copy of the model."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'method = "dare_linear"\noutput = "out"\n[base]\npath = "{llama_fp32[0]}"\n'
                      f'[[models]]\npath = "{llama_fp32[1]}"\n')
    result = cli("merge", recipe)
    assert result.exit_code == 0, result.output
    assert "copy of it" not in result.stderr
    average = cli("average", "-m", llama_fp32[1], "-o", tmp_path / "copy")
    assert average.exit_code == 0 and "one model: the output is a copy of it" in average.stderr


# ---------------------------------------------------------------------------------------------
# Progress


def plain_lines(run, monkeypatch) -> list[str]:
    """The plain progress lines `run(update)` prints (stderr not a terminal)."""
    import mergecli.cli._console as console
    from mergecli.cli._render import progress

    captured = io.StringIO()
    monkeypatch.setattr(console.err_console, "_file", captured)
    monkeypatch.setattr(console.mode, "quiet", False)
    with progress("merging", total=100.0, unit="work", what="8 tensors") as update:
        run(update)
    return [line for line in captured.getvalue().splitlines() if line.startswith("merging: ") and "%" in line]


def test_piped_progress_is_a_line_per_tenth_whatever_the_steps(monkeypatch):
    """A stage change used to print a line of its own: a RegMean++ merge printed a line per block."""
    clock = [0.0]
    monkeypatch.setattr("mergecli.cli._render.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("mergecli.cli._render.interactive", lambda: False)

    def run(update):
        for step in range(200):
            clock[0] += 0.05
            update(step / 2, "", step=f"block {step}/200")
        update(100.0, "")

    lines = plain_lines(run, monkeypatch)
    percents = [int(re.search(r"(\d+)%", line).group(1)) for line in lines]
    assert percents == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100], lines


def test_the_time_left_follows_the_recent_rate_and_waits_for_one(monkeypatch):
    """A streamed merge that took 12 s said "about 14 min left" while it waited for its first bytes."""
    from mergecli.cli._render import Remaining

    remaining = Remaining(0.0)
    assert remaining.words(1.5, 0.1, 100.0) == ""  # 0.1% after 1.5 s: no rate to go by yet
    assert remaining.words(6.0, 2.0, 100.0) == ""  # still under 5% of the work, 6 s in
    for second in range(7, 19):  # then 6% a second, for 12 s
        words = remaining.words(float(second), 2.0 + 6.0 * (second - 6), 100.0)
    assert words == ", about 4 s left", words  # 26% left at 6% a second; the average since the start says 6 s


def test_ties_progress_names_its_threshold_passes(llama_fp32, tmp_path):
    """It said "63% (0/57 tensors)" while its threshold passes ran."""
    recipe = tmp_path / "ties.toml"
    recipe.write_text(f'method = "ties"\noutput = "out"\n[base]\npath = "{llama_fp32[0]}"\n'
                      f'[[models]]\npath = "{llama_fp32[1]}"\n[[models]]\npath = "{llama_fp32[2]}"\n')
    result = cli("merge", recipe)
    assert result.exit_code == 0, result.output
    assert re.search(r"merging: +\d+% \(0/21 tensors, pass \d: TIES thresholds: ", result.stderr), result.stderr


# ---------------------------------------------------------------------------------------------
# Messages


def test_density_out_of_range_is_worded_once(llama_fp32, tmp_path):
    lines = []
    for where in ("[ties]\ndensity = 1.5\n", "[ties]\n[[models]]\npath = \"{a}\"\ndensity = 1.5\n"):
        recipe = tmp_path / "ties.toml"
        recipe.write_text(f'method = "ties"\n[base]\npath = "{llama_fp32[0]}"\n'
                          + where.format(a=llama_fp32[1]) + (f'[[models]]\npath = "{llama_fp32[1]}"\n'
                                                              if "[[models]]" not in where else ""))
        result = cli("validate", recipe)
        assert result.exit_code == 2, result.output
        lines.append(result.stderr.split("density:", 1)[1].splitlines()[0].strip())
    assert lines == ["density must be in (0, 1], got 1.5"] * 2


def test_a_method_in_the_wrong_case_gets_its_name_suggested(llama_fp32, tmp_path):
    result = cli("merge", "-m", llama_fp32[0], "-m", llama_fp32[1], "--set", "method=TIES", "-o", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "method: unknown method 'TIES'; did you mean 'ties'? (methods: " in result.stderr
    assert not result.stderr.rstrip().endswith("; ") and "'TIES'; (" not in result.stderr


def test_conflicting_vocabularies_under_the_base_tokenizer_speak_of_matching_not_uniting(chats, tmp_path):
    other = build_llama(tmp_path / "other", seed=5, vocab_size=70)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'output = "out"\ntokenizer = "base"\npad_to_multiple_of = 8\n[[models]]\npath = '
                      f'"{chats["base"]}"\n[[models]]\npath = "{other}"\n')
    result = cli("validate", recipe)
    assert result.exit_code == 1 and "its rows cannot be matched to that vocabulary" in result.stderr, result.stderr
    assert "united" not in result.stderr


def test_the_missing_tensor_hint_mentions_exclude(llama_fp32, tmp_path):
    from safetensors.torch import load_file, save_file

    short = tmp_path / "short"
    short.mkdir()
    for file in llama_fp32[1].iterdir():
        (short / file.name).write_bytes(file.read_bytes())
    weights = load_file(short / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, short / "model.safetensors", metadata={"format": "pt"})
    result = cli("average", "-m", llama_fp32[0], "-m", short, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "lm_head.weight: missing in short" in result.stderr, result.stderr
    assert "`exclude` the tensors only some inputs have" in result.stderr


def test_a_sentence_transformers_merge_says_to_load_it_with_sentence_transformers(tmp_path):
    from references import minilm_dir

    result = cli("average", "-m", minilm_dir(), "-m", minilm_dir(), "--name", "a", "--name", "b", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "from sentence_transformers import SentenceTransformer; SentenceTransformer(" in result.stdout
    assert "AutoModel" not in result.stdout


def test_a_chat_template_converts_and_its_hint_no_longer_speaks_of_one_setting_per_tensor(llama_fp32, tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: linear\nchat_template: chatml\nmodels:\n  - model: {llama_fp32[0]}\n"
                      f"    parameters: {{weight: 1}}\n  - model: {llama_fp32[1]}\n    parameters: {{weight: 1}}\n")
    result = cli("convert", config)
    assert result.exit_code == 0, result.output
    assert 'chat_template = "chatml"' in result.stdout and "one setting per tensor" not in result.output
    assert json.loads(json.dumps(result.stdout))  # printable as it is
