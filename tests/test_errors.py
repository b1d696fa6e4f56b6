"""Bad input: exit code, the words of the message, no output, no input changed, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from builders import build_llama
from clirunner import cli
from conftest import tree_digest


@pytest.fixture
def pair(llama_fp32, tmp_path) -> list[Path]:
    """Private copies of two models, so that a test may damage them."""
    return [Path(shutil.copytree(p, tmp_path / p.name)) for p in llama_fp32[:2]]


def check_failure(result, code: int, *words: str, tmp_path: Path, inputs: list[Path], before: dict) -> None:
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a temporary directory was left behind"
    assert {str(p): tree_digest(p) for p in inputs} == before


def digests(paths: list[Path]) -> dict:
    return {str(p): tree_digest(p) for p in paths}


def run_pair(pair, tmp_path, *extra):
    return cli("average", "-m", pair[0], "-m", pair[1], "-o", tmp_path / "out", *extra)


def test_missing_path(pair, tmp_path):
    before = digests(pair)
    result = cli("average", "-m", pair[0], "-m", tmp_path / "nope", "-o", tmp_path / "out")
    check_failure(result, 2, "nope", "no such file or directory", tmp_path=tmp_path, inputs=pair, before=before)


def test_truncated_shard(pair, tmp_path):
    weights = pair[1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    before = digests(pair)
    check_failure(run_pair(pair, tmp_path), 1, "model.safetensors", "truncated",
                  tmp_path=tmp_path, inputs=pair, before=before)


def test_corrupt_header(pair, tmp_path):
    weights = pair[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    weights.write_bytes(bytes(data))
    before = digests(pair)
    check_failure(run_pair(pair, tmp_path), 1, "corrupt safetensors header",
                  tmp_path=tmp_path, inputs=pair, before=before)


def test_shard_missing_from_index(llama_bf16_sharded, tmp_path):
    pair = [Path(shutil.copytree(p, tmp_path / p.name)) for p in llama_bf16_sharded]
    next(pair[1].glob("model-00002-*.safetensors")).unlink()
    before = digests(pair)
    check_failure(run_pair(pair, tmp_path), 1, "listed in the index but missing",
                  tmp_path=tmp_path, inputs=pair, before=before)


def test_shape_mismatch_lists_every_tensor(pair, tmp_path):
    """Bare weight files (no tokenizer to match rows by token): every differing tensor is listed. (With
    tokenizers, vocabularies are united or refused by tests/test_vocabulary.py.)"""
    other = build_llama(tmp_path / "bigvocab", seed=5, vocab_size=160)
    inputs = [pair[0], other]
    before = digests(inputs)
    result = cli("average", "-m", pair[0] / "model.safetensors", "-m", other / "model.safetensors",
                 "-o", tmp_path / "out")
    check_failure(result, 1, "2 mismatches", "model.embed_tokens.weight: shapes differ",
                  "lm_head.weight: shapes differ", "bigvocab [160, 32]", tmp_path=tmp_path,
                  inputs=inputs, before=before)


def test_tensor_missing_in_one_model(pair, tmp_path):
    weights = pair[1] / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    before = digests(pair)
    check_failure(run_pair(pair, tmp_path), 1, f"model.norm.weight: missing in {pair[1].name}",
                  tmp_path=tmp_path, inputs=pair, before=before)


def test_weight_count_differs(pair, tmp_path):
    before = digests(pair)
    check_failure(run_pair(pair, tmp_path, "-w", "0.2,0.3,0.5"), 2, "3 weights for 2 models",
                  tmp_path=tmp_path, inputs=pair, before=before)


def write_recipe(tmp_path, pair, extra: str, model_extra: tuple[str, str] = ("", "")) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(f'output = "out"\n{extra}\n[[models]]\npath = "{pair[0]}"\n{model_extra[0]}\n'
                    f'[[models]]\npath = "{pair[1]}"\n{model_extra[1]}\n')
    return path


def test_weights_sum_to_zero(pair, tmp_path):
    before = digests(pair)
    recipe = write_recipe(tmp_path, pair, "", ("weight = 0.5", "weight = -0.5"))
    check_failure(cli("average", recipe), 2, "recipe.toml", "weights sum to 0",
                  tmp_path=tmp_path, inputs=pair, before=before)


def test_non_finite_weight(pair, tmp_path):
    before = digests(pair)
    recipe = write_recipe(tmp_path, pair, "", ("weight = nan", ""))
    check_failure(cli("average", recipe), 2, "models.0.weight", "finite number",
                  tmp_path=tmp_path, inputs=pair, before=before)


def test_unknown_recipe_key(pair, tmp_path):
    before = digests(pair)
    recipe = write_recipe(tmp_path, pair, "backbone = true")
    check_failure(cli("average", recipe), 2, "recipe.toml: backbone: unknown key",
                  tmp_path=tmp_path, inputs=pair, before=before)


def test_output_exists_without_force(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_pair(pair, tmp_path)
    assert result.exit_code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_inside_an_input(pair, tmp_path):
    before = digests(pair)
    result = cli("average", "-m", pair[0], "-m", pair[1], "-o", pair[0] / "merged")
    assert result.exit_code == 2 and "inside the input" in result.stderr
    assert not (pair[0] / "merged").exists()
    assert digests(pair) == before
    result = cli("average", "-m", pair[0], "-m", pair[1], "-o", tmp_path, "--force")
    assert result.exit_code == 2 and "is inside the output" in result.stderr
    assert digests(pair) == before


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(2), "evil": Evil()}, tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    result = cli("average", "-m", tmp_path / "evil.pt", "-m", tmp_path / "ok.pt", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "weights_only" in result.stderr
    assert "pwned" not in result.output and not (tmp_path / "out").exists()


def test_recipe_method_mismatch(pair, tmp_path):
    recipe = write_recipe(tmp_path, pair, 'method = "regmean"')
    result = cli("average", recipe)
    assert result.exit_code == 2 and "regmean merge" in result.stderr


def test_debug_shows_traceback(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGECLI_DEBUG", "1")
    result = cli("average", "-m", pair[0], "-m", tmp_path / "nope", "-o", tmp_path / "out")
    assert result.exit_code != 0 and type(result.exception).__name__ == "InputNotFoundError"


def test_config_dtype_recorded(pair, tmp_path):
    assert run_pair(pair, tmp_path, "--set", "dtype=bfloat16").exit_code == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
