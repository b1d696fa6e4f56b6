"""A vocabulary matches embedding rows to tokens, so a tokenizer whose files contradict themselves or
each other is refused, naming the file (or both), before anything is read: never an output whose rows
follow one file where another says otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_vocabulary import CHAT, fine_tune

from builders import build_llama
from clirunner import cli


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab-trust")
    base = build_llama(root / "base", seed=0, vocab_size=62)
    return {"base": base, "chat": fine_tune(base, root / "chat", CHAT, 1)}


def edited(source: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of `source` whose tokenizer.json (and tokenizer_config.json) `edit(tokenizer, config)` changed."""
    copy = Path(shutil.copytree(source, tmp_path / name))
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    config = json.loads((copy / "tokenizer_config.json").read_text())
    edit(tokenizer, config)
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    if config is not None:
        (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


def union(tmp_path: Path, base: Path, model: Path) -> tuple:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'tokenizer = "union"\noutput = "out"\n[base]\npath = "{base}"\n'
                      f'[[models]]\npath = "{model}"\nname = "chat"\n[[models]]\npath = "{base}"\nname = "plain"\n')
    return cli("average", recipe), tmp_path / "out"


def vocab(tokenizer: dict) -> dict:
    return tokenizer["model"]["vocab"]


def added(tokenizer: dict, content: str) -> dict:
    return next(entry for entry in tokenizer["added_tokens"] if entry["content"] == content)


def set_twice(tokenizer, config):
    vocab(tokenizer)["math"] = vocab(tokenizer)["code"]


def id_of_a_word(tokenizer, config):
    added(tokenizer, "<|im_end|>")["id"] = vocab(tokenizer)["the"]


def added_twice(tokenizer, config):
    tokenizer["added_tokens"].append(dict(added(tokenizer, "<|im_end|>")))


def word_added_again(tokenizer, config):
    added(tokenizer, "<|im_end|>")["content"] = "the"


def past_the_rows(tokenizer, config):
    added(tokenizer, "<|im_end|>")["id"] = 1000


def a_gap(tokenizer, config):
    added(tokenizer, "<|im_end|>")["id"] += 1


def decoder_disagrees(tokenizer, config):
    number = str(added(tokenizer, "<|im_end|>")["id"])
    config["added_tokens_decoder"] = {number: {"content": "<|other|>", "special": True}}


def decoder_malformed(tokenizer, config):
    config["added_tokens_decoder"] = ["<|im_end|>"]


@pytest.mark.parametrize("edit, file, words", [
    (set_twice, "tokenizer.json", "model.vocab: id {code} is given to both 'math' and 'code'"),
    (id_of_a_word, "tokenizer.json", "added_tokens: '<|im_end|>' has the id {the}, which is the vocabulary's 'the'"),
    (added_twice, "tokenizer.json", "added_tokens: '<|im_end|>' is added twice"),
    (word_added_again, "tokenizer.json", "added_tokens: 'the' has the id 63, but it is already the vocabulary's "
                                         "token {the}"),
    (past_the_rows, "tokenizer.json", "no token has the id 63, though the ids run to 1000"),
    (a_gap, "tokenizer.json", "no token has the id 63, though the ids run to 64"),
    (decoder_disagrees, "tokenizer_config.json", "added_tokens_decoder gives the id 63 to '<|other|>', "
                                                 "tokenizer.json gives it to '<|im_end|>'"),
    (decoder_malformed, "tokenizer_config.json", "added_tokens_decoder is not a mapping of ids to tokens"),
])
def test_a_tokenizer_whose_files_disagree_is_refused_naming_them(family, tmp_path, edit, file, words):
    model = edited(family["chat"], tmp_path, "chat", edit)
    words = words.format(**vocab(json.loads((family["chat"] / "tokenizer.json").read_text())))
    result, out = union(tmp_path, family["base"], model)
    assert result.exit_code == 1, result.output
    assert f"error: {model / file}: {words}" in result.stderr, result.stderr
    assert not out.exists() and "internal error" not in result.stderr


def test_conflicting_ids_in_the_base_are_refused_too(family, tmp_path):
    base = edited(family["base"], tmp_path, "base", set_twice)
    result, out = union(tmp_path, base, family["chat"])
    assert result.exit_code == 1 and f"error: {base / 'tokenizer.json'}: model.vocab: id " in result.stderr
    assert not out.exists()


def test_a_malformed_tokenizer_config_is_refused_by_name(family, tmp_path):
    model = Path(shutil.copytree(family["chat"], tmp_path / "chat"))
    (model / "tokenizer_config.json").write_text("{not json")
    result, out = union(tmp_path, family["base"], model)
    assert result.exit_code == 1 and f"error: {model / 'tokenizer_config.json'}: is not valid JSON" in result.stderr
    assert not out.exists()


def test_tokens_claimed_past_the_embedding_blame_the_tokenizer_not_the_weights(family, tmp_path):
    """100k claimed added tokens used to say `model.safetensors: truncated while reading`."""
    def claim(tokenizer, config):
        start = max(vocab(tokenizer).values()) + 1
        tokenizer["added_tokens"] = [{"id": start + i, "content": f"<t{i}>", "special": True}
                                     for i in range(100_000)]
        config["added_tokens_decoder"] = {}

    model = edited(family["chat"], tmp_path, "chat", claim)
    result, out = union(tmp_path, family["base"], model)
    assert result.exit_code == 1, result.output
    assert f"error: {model / 'tokenizer.json'}: its tokens run to id 100061, past the 64 rows of the embedding of " \
           "models.0 (chat)" in result.stderr
    assert "safetensors" not in result.stderr and not out.exists()


def test_a_damaged_config_under_a_union_blames_the_config(family, tmp_path):
    """It used to say `the inputs do not have the same tensors`."""
    model = Path(shutil.copytree(family["chat"], tmp_path / "chat"))
    (model / "config.json").write_text('{"vocab_size": 64, ')
    result, out = union(tmp_path, family["base"], model)
    assert result.exit_code == 1, result.output
    assert f"error: {model / 'config.json'}: is not a valid config (a JSON object)" in result.stderr
    assert "the same tensors" not in result.stderr and not out.exists()


def test_a_token_of_ten_megabytes_is_refused_at_once(family, tmp_path):
    def huge(tokenizer, config):
        added(tokenizer, "<|im_end|>")["content"] = "x" * 10_000_000
        config["added_tokens_decoder"] = {}

    model = edited(family["chat"], tmp_path, "chat", huge)
    result, out = union(tmp_path, family["base"], model)
    assert result.exit_code == 1, result.output
    assert "added_tokens: a token of 10,000,000 characters; real tokens have at most a few hundred" in result.stderr
