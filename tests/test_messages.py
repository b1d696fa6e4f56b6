"""Messages say what the user wrote and nothing else: no text read as markup, no escape codes from
libraries, no traceback for absurd input, and the real cause of a refused output."""

from __future__ import annotations

import collections
import json
import struct

import pytest
import torch

from clirunner import cli, cli_process


def test_an_output_path_with_brackets_is_a_finished_merge(llama_fp32, tmp_path):
    out = tmp_path / "out" / "[" / "y]"
    result = cli_process("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and (out / "model.safetensors").is_file()
    assert str(out) in result.stdout


def test_brackets_in_a_path_or_a_hint_are_shown_as_written(tmp_path):
    result = cli("average", "-m", "./exp[bold]x", "-m", "./other", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "exp[bold]x: no such file or directory" in result.stderr, result.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text('push_to_hub = true\n[[models]]\npath = "a"\n')
    result = cli("validate", recipe)
    assert result.exit_code == 2 and "needs [push] repo_id" in result.stderr, result.stderr


def test_no_escape_code_from_a_library_reaches_a_non_terminal(tmp_path):
    """torch's refusal of an unsafe pickle carries ANSI bold: it is stripped."""
    unsafe = tmp_path / "unsafe.bin"
    torch.save({"a": collections.OrderedDict(x=torch.ones(1)), "b": torch.nn.Linear(1, 1)}, unsafe)
    result = cli_process("average", "-m", unsafe, "-m", unsafe, "--name", "a", "--name", "b", "-o", tmp_path / "o")
    assert result.returncode == 1 and "cannot load as a PyTorch state dict" in result.stderr, result.stderr
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout


def test_a_deeply_nested_recipe_is_one_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    result = cli_process("validate", recipe)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {recipe}: invalid recipe: its values are nested too deeply"]


def test_a_header_of_countless_empty_tensors_is_refused(tmp_path):
    """400,000 empty tensors (29 MB of header) were read into Python objects for minutes before being
    refused: the header is now refused from a scan of its bytes."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(400_000)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    paths = [tmp_path / f"empty{i}.safetensors" for i in range(2)]
    for path in paths:
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    result = cli("average", "-m", paths[0], "-m", paths[1], "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "its header lists 400,000 tensors" in result.stderr and not (tmp_path / "out").exists()


@pytest.fixture
def read_only_mount(tmpfs):
    return tmpfs("ro", "ro,size=1M")


def test_a_read_only_mount_is_called_read_only(llama_fp32, read_only_mount):
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", read_only_mount / "out")
    assert result.exit_code == 2, result.output
    assert f"{read_only_mount} is on a read-only file system" in result.stderr
    assert "permission" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Hostile names: escaped as repr writes them, never printed raw


def with_renamed(source, tmp_path, name: str, new: str, *, poison: bool = False, shorter: bool = False):
    """A copy of a LLaMA whose tensor `name` is called `new` (holding a NaN with `poison`, a row
    short with `shorter`)."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    copy.mkdir()
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (copy / file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors[new] = tensors.pop(name)
    if poison:
        tensors[new][0, 0] = float("nan")
    if shorter:
        tensors[new] = tensors[new][:-1].clone()
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("hostile", ["model.norm\nerror: all good", "model.\u202enorm.weight"],
                         ids=["newline", "right-to-left-override"])
def test_a_hostile_tensor_name_is_escaped_in_every_message(llama_fp32, tmp_path, hostile):
    name = "model.layers.0.mlp.up_proj.weight"
    poisoned = [with_renamed(llama_fp32[i], tmp_path, name, hostile, poison=i == 1) for i in range(2)]
    result = cli("average", "-m", poisoned[0], "-m", poisoned[1], "-o", tmp_path / "out")
    assert result.exit_code == 1 and f"{hostile!r}: NaN or inf in the input" in result.stderr, result.stderr
    assert hostile not in result.stderr
    shorter = [with_renamed(llama_fp32[i], tmp_path, name, hostile, shorter=i == 1) for i in range(2)]
    result = cli("average", "-m", shorter[0], "-m", shorter[1], "-o", tmp_path / "out")
    assert result.exit_code == 1 and f"{hostile!r}: shapes differ" in result.stderr, result.stderr
    assert hostile not in result.stderr


def test_a_path_that_turns_text_around_is_shown_escaped(llama_fp32, tmp_path):
    odd = tmp_path / "model\u202esnefatas.txt"
    odd.write_text("not weights")
    result = cli("average", "-m", odd, "-m", llama_fp32[1], "-o", tmp_path / "out")
    assert result.exit_code == 1 and "\u202e" not in result.stderr and "\\u202e" in result.stderr, result.stderr


@pytest.mark.parametrize("kind, words", [("fifo", "is a FIFO (named pipe), not a checkpoint"),
                                         ("zero", "is a character device, not a checkpoint")])
def test_a_fifo_or_a_device_is_said_to_be_one(llama_fp32, tmp_path, kind, words):
    """Both used to be "a broken link or a link loop"."""
    import os

    path = tmp_path / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    result = cli("average", "-m", path, "-m", llama_fp32[1] / "model.safetensors", "-o", tmp_path / "out")
    assert result.exit_code == 1 and f"{path}: {words}" in result.stderr, result.stderr
    assert "broken link" not in result.stderr


def raw_safetensors(path, header: bytes, data: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header, data", [
    (b'{"x": {"dtype": "F\\n32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
    (b'{"x\\ny": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}', bytes(8)),
    (b'{"a\\nb": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     b'"c\\u202ed": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8)),
    (b'{"a\\nb": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', bytes(8)),
    (b'{"x\n": ', b""),
    (b'{"__metadata__": {"a\\nb": 1}}', b""),
], ids=["dtype", "size", "overlap", "truncated", "json", "metadata"])
def test_a_hostile_header_is_refused_in_one_line(tmp_path, header, data):
    path = raw_safetensors(tmp_path / "model.safetensors", header, data)
    result = cli("average", "-m", path, "-m", path, "--name", "a", "--name", "b", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {path}: ") and all(line.startswith("hint: ") for line in lines[1:]), lines
    assert len(lines) <= 2 and "\u202e" not in result.stderr
