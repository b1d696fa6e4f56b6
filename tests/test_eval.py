"""`mergecli eval`: the loss it reports for each input and for the merge (never written) equals transformers'
loss of the same models loaded whole with `from_pretrained` (the merge: written by `mergecli merge`), each
example run alone, on the same tokens: LLaMA, GPT-2 and Mixtral (MoE)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from test_families import MOE, build

from builders import build_gpt2, build_llama
from clirunner import cli
from mergecli.stats.calibration import read_examples, tokenize_examples
from references import random_texts, write_txt

TEXTS = 12


def reference_loss(path: Path, data: Path) -> tuple[float, int]:
    """transformers' mean next-token loss over every real token, each example run alone (no padding)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    examples = read_examples(data, num_examples=TEXTS).examples
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in tokenize_examples(examples, tokenizer, max_length=24):
            if len(ids) < 2:
                continue
            ids = torch.tensor([ids])
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return total / tokens, tokens


def family(kind: str, root: Path) -> list[Path]:
    if kind == "llama":
        return [build_llama(root / f"llama-{i}", seed=80 + i) for i in range(3)]
    if kind == "gpt2":
        return [build_gpt2(root / f"gpt2-{i}", seed=80 + i) for i in range(3)]
    return [build(root / f"mixtral-{i}", "mixtral", MOE["mixtral"], seed=80 + i) for i in range(3)]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mixtral"])
def test_eval_losses_equal_transformers_losses_of_the_inputs_and_of_the_written_merge(kind, tmp_path):
    models = family(kind, tmp_path)
    data = write_txt(tmp_path / "held-out.txt", random_texts(7, TEXTS, longest=20))
    recipe = tmp_path / "ties.toml"
    recipe.write_text(f'method = "ties"\noutput = "{tmp_path / "merged"}"\ndtype = "float32"\n[base]\n'
                      f'path = "{models[0]}"\n[ties]\ndensity = 0.5\n'
                      + "".join(f'[[models]]\npath = "{m}"\nweight = {w}\n' for m, w in zip(models[1:], (0.6, 0.4))))
    result = cli("eval", recipe, "--data", data, "--max-length", "24", "--batch-size", "5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert not (tmp_path / "merged").exists()  # nothing written
    assert cli("merge", recipe).exit_code == 0
    for row, path in zip([*report["models"], report["merge"]], [*models, tmp_path / "merged"]):
        loss, tokens = reference_loss(path, data)
        assert row["tokens"] == tokens, row
        assert abs(row["loss"] - loss) <= 1e-4 * loss, (row, loss)
        assert math.isclose(row["perplexity"], math.exp(row["loss"]))


def test_eval_refuses_images_and_a_missing_data_file_in_one_line(tmp_path):
    model = build_llama(tmp_path / "m", seed=1)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'output = "out"\n[[models]]\npath = "{model}"\n')
    result = cli("eval", recipe, "--data", tmp_path / "missing.jsonl")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    (tmp_path / "empty.txt").write_text("")
    result = cli("eval", recipe, "--data", tmp_path / "empty.txt")
    assert result.exit_code != 0 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr



# ---------------------------------------------------------------------------------------------
# sweep


@pytest.fixture
def ties_setup(tmp_path):
    models = family("llama", tmp_path)
    data = write_txt(tmp_path / "held-out.txt", random_texts(9, TEXTS, longest=20))
    recipe = tmp_path / "ties.toml"
    recipe.write_text(f'method = "ties"\noutput = "unused"\ndtype = "float32"\n[base]\npath = "{models[0]}"\n'
                      "[ties]\ndensity = 0.5\n" + "".join(f'[[models]]\npath = "{m}"\n' for m in models[1:]))
    return models, data, recipe


def test_each_sweep_candidate_scores_as_eval_of_it_alone_reading_the_inputs_about_twice(ties_setup, tmp_path,
                                                                                      monkeypatch):
    """6 TIES candidates: every loss equals `eval` with the same --set, and the inputs' bytes read in all (counted
    at the reader) are at most 2.5 times their size: a threshold pass and the merges, shared by the candidates."""
    from mergecli.io.checkpoint import Checkpoint

    models, data, recipe = ties_setup
    counted = [0]
    original = Checkpoint.read_stored

    def counting(self, name, rows=None, **kwargs):
        out = original(self, name, rows, **kwargs)
        counted[0] += out.nbytes
        return out

    monkeypatch.setattr(Checkpoint, "read_stored", counting)
    args = ["--data", data, "--max-length", "24", "--batch-size", "4"]
    result = cli("sweep", recipe, "--grid", "ties.density=0.2,0.5,0.9", "--grid", "models.1.weight=0.5,1.5", *args,
                 "--json", "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    swept = json.loads(result.stdout)
    size = sum((m / "model.safetensors").stat().st_size for m in models)
    assert counted[0] <= 2.5 * size, (counted[0], size)
    monkeypatch.setattr(Checkpoint, "read_stored", original)
    losses = [c["loss"] for c in swept["candidates"]]
    assert len(losses) == 6 and losses == sorted(losses)
    assert (tmp_path / "report" / "loss.png").stat().st_size > 1000 and swept["plot"].endswith("loss.png")
    for candidate in swept["candidates"]:
        sets = [f"--set={k}={v}" for k, v in candidate["settings"].items()]
        alone = json.loads(cli("eval", recipe, *args, *sets, "--json").stdout)["merge"]
        assert abs(alone["loss"] - candidate["loss"]) <= 1e-6 * alone["loss"], (candidate, alone)


def test_sweep_writes_the_best_and_fails_above_a_loss(ties_setup, tmp_path):
    _, data, recipe = ties_setup
    args = ["--data", data, "--max-length", "24", "--grid", "ties.density=0.3,0.7"]
    result = cli("sweep", recipe, *args, "--write-best", "-o", tmp_path / "best", "--json")
    assert result.exit_code == 0, result.output
    best = json.loads(result.stdout)["candidates"][0]
    written = (tmp_path / "best" / "mergecli.toml").read_text()
    assert f"density = {best['settings']['ties.density']}" in written
    failed = cli("sweep", recipe, *args, "--fail-above", "0.01")
    assert failed.exit_code == 1 and "is above --fail-above 0.01" in failed.stderr


@pytest.mark.parametrize("grid, words", [
    ("ties.densty=0.2,0.4", "ties.densty"),
    ("ties.density=a,b", "ties.density"),
    ("ties.density", "expected KEY=V1,V2"),
])
def test_a_bad_grid_is_one_line(ties_setup, grid, words):
    _, data, recipe = ties_setup
    result = cli("sweep", recipe, "--grid", grid, "--data", data)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and words in lines[0] and "Traceback" not in result.stderr
