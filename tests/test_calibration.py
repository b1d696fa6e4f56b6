"""Calibration data: reading jsonl / text / image folders, tokenizing, padding and sharding."""

from __future__ import annotations

import json

import pytest
import torch

from builders import word_tokenizer
from mergecli.errors import StatsError, UsageError
from mergecli.stats.calibration import read_examples, text_batches, tokenize_examples
from references import write_images, write_jsonl, write_txt


def test_jsonl_text_field_and_messages(tmp_path):
    chat = [{"role": "user", "content": "the model"}, {"role": "assistant", "content": "a merge"}]
    records = [{"body": "one two"}, {"messages": chat}, {"body": "  "}, {"body": "three"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = read_examples(path, num_examples=5, text_field="body")
    assert data.kind == "text"
    assert data.examples == ["one two", chat, "three"]  # blank texts are skipped
    assert "fewer than num_examples = 5" in data.warnings[0]


def test_text_file_one_example_per_line(tmp_path):
    path = write_txt(tmp_path / "d.txt", ["first line", "", "second line", "third"])
    data = read_examples(path, num_examples=2)
    assert data.examples == ["first line", "second line"] and not data.warnings
    other = write_txt(tmp_path / "e.txt", ["first line", "", "second line!", "third"])
    assert read_examples(other, num_examples=2).sha256 != data.sha256
    assert read_examples(write_txt(tmp_path / "f.txt", ["first line", "second line", "x"]),
                         num_examples=2).sha256 == data.sha256  # the examples used, not the file


def test_image_folder(tmp_path):
    folder = write_images(tmp_path / "images", 3, seed=0)
    (folder / "notes.md").write_text("not an image")
    data = read_examples(folder, num_examples=2)
    assert data.kind == "image"
    assert [p.name for p in data.examples] == ["img000.png", "img001.png"]


@pytest.mark.parametrize("content, error, words", [
    (None, UsageError, ["does not exist"]),
    ("", StatsError, ["holds no calibration examples"]),
    ("\n\n", StatsError, ["holds no calibration examples"]),
    ('{"text": "ok"}\n{"text": \n', StatsError, ["d.jsonl:2", "not valid JSON"]),
    ('{"prompt": "x"}\n', StatsError, ["d.jsonl:1", "no 'text' field"]),
    ('["x"]\n', StatsError, ["expected a JSON object"]),
])
def test_bad_data(tmp_path, content, error, words):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error) as info:
        read_examples(path, num_examples=4, label="models.0.data")
    for word in words:
        assert word in info.value.message
    assert "\n" not in info.value.message


def test_json_array_is_not_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}]')
    with pytest.raises(UsageError, match="JSON Lines"):
        read_examples(path, num_examples=4)


def test_empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(StatsError, match="holds no images"):
        read_examples(tmp_path / "images", num_examples=4)


def test_tokenize_truncates_and_renders_chat():
    tokenizer = word_tokenizer()
    chat = [{"role": "user", "content": "the model"}]
    ids = tokenize_examples(["the a of to and in is it that", chat], tokenizer, max_length=4)
    assert ids[0] == tokenizer("the a of to")["input_ids"]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert ids[1] == tokenizer(rendered, add_special_tokens=False)["input_ids"][:4]


def test_messages_need_a_chat_template():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(StatsError, match="no chat template"):
        tokenize_examples([[{"role": "user", "content": "x"}]], tokenizer, max_length=8)


def test_batches_are_right_padded_with_a_mask():
    token_ids = [[5, 6], [7, 8, 9, 10, 11], [12], [13, 14, 15], []]
    batches = list(text_batches(token_ids, batch_size=2, pad_token_id=0))
    assert [b.examples for b in batches] == [2, 2]  # the empty example is skipped
    first = batches[0]
    assert first.inputs["input_ids"].tolist() == [[7, 8, 9, 10, 11], [13, 14, 15, 0, 0]]
    assert first.mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert torch.equal(first.inputs["attention_mask"], first.mask.long())
    real = sorted(t for b in batches for row, m in zip(b.inputs["input_ids"], b.mask) for t in row[m].tolist())
    assert real == sorted(t for ids in token_ids for t in ids)


def test_shards_split_the_examples_exactly():
    token_ids = [[i] * (1 + i % 5) for i in range(11)]
    seen = []
    for rank in range(3):
        for batch in text_batches(token_ids, batch_size=2, pad_token_id=0, shard=(rank, 3)):
            seen += [int(row[0]) for row in batch.inputs["input_ids"]]
    assert sorted(seen) == list(range(11))


def test_jsonl_lines_are_read_lazily(tmp_path):
    # a huge data file is not read past the examples needed
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": "a b"}) + "\n")
        f.write(json.dumps({"text": "c"}) + "\n")
        f.write("not json at all\n")
    assert read_examples(path, num_examples=2).examples == ["a b", "c"]
