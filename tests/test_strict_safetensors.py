"""Inputs are read as strictly as the safetensors library reads them: a differential fuzz test.

Hypothesis mutates valid safetensors files (bytes flipped, offsets, the header length, dtypes,
shapes, keys duplicated, bytes appended or cut) and mergecli must accept a file exactly when
`safetensors.safe_open` does (and read the same tensors), or refuse it with one line naming the
file. Two differences are on purpose: a header whose JSON repeats a key (serde keeps one of them,
another parser may keep the other) and dtypes mergecli does not merge (complex, 4- and 6-bit floats)
are refused.

`MERGECLI_FUZZ_EXAMPLES=20000 pytest tests/test_strict_safetensors.py` runs a long campaign.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from clirunner import cli
from mergecli.errors import CheckpointError
from mergecli.io.safetensors import read_header

EXAMPLES = int(os.environ.get("MERGECLI_FUZZ_EXAMPLES", "150"))
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "f32", "F33", "", "C64"]
DELIBERATE = ("C64", "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0")  # dtypes safetensors reads, mergecli does not merge


def valid_file() -> bytes:
    torch.manual_seed(0)
    tensors = {"b.bias": torch.randn(3), "a.weight": torch.randn(2, 3).to(torch.bfloat16),
               "c.steps": torch.tensor([7, 8], dtype=torch.int64), "d.empty": torch.zeros(0)}
    with tempfile.TemporaryDirectory() as folder:
        save_file(tensors, Path(folder) / "x.safetensors", metadata={"format": "pt"})
        return (Path(folder) / "x.safetensors").read_bytes()


VALID = valid_file()
HEADER_LENGTH = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8:8 + HEADER_LENGTH])
DATA = VALID[8 + HEADER_LENGTH:]


def encode(header: object, data: bytes = DATA, *, raw: str | None = None) -> bytes:
    text = (raw if raw is not None else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def header_mutation(draw) -> bytes:
    header = json.loads(json.dumps(HEADER))
    names = [n for n in header if n != "__metadata__"]
    name = draw(st.sampled_from(names))
    entry = header[name]
    kind = draw(st.sampled_from(["offset", "offsets", "dtype", "shape", "extra", "duplicate", "metadata",
                                 "remove", "number", "swap"]))
    if kind == "offset":
        entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.sampled_from([[0], [0, 1, 2], ["0", 8], [0.0, 8], None, [-1, 4], [True, 4]]))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif kind == "shape":
        entry["shape"] = draw(st.sampled_from([[], [1], [2, 2], [6], [3, 1, 1], [-3], [1.5], [True], [2**70], "3"]))
    elif kind == "extra":
        entry[draw(st.sampled_from(["x", "dtype2"]))] = draw(st.sampled_from([1, "y", None]))
    elif kind == "metadata":
        header["__metadata__"] = draw(st.sampled_from([None, {}, {"a": 1}, {"a": ["b"]}, "pt", {"format": "pt"}]))
    elif kind == "remove":
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "swap":  # two tensors pointing at each other's bytes
        other = header[draw(st.sampled_from(names))]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    text = json.dumps(header)
    if kind == "duplicate":
        text = text[:-1] + f', "{name}": ' + json.dumps(entry) + "}"
    elif kind == "number":
        text = text.replace(json.dumps(entry["shape"]), draw(st.sampled_from(["[Infinity]", "[1e400]", "[NaN]",
                                                                               "[3e0]", "[0x3]", "[03]"])), 1)
    return encode(None, raw=text)


@st.composite
def byte_mutation(draw) -> bytes:
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["flip", "length", "append", "cut", "nested", "utf8"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 8 + HEADER_LENGTH - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "length":
        data[:8] = struct.pack("<Q", max(0, HEADER_LENGTH + draw(st.integers(-3, 3))))
    elif kind == "append":
        data += b"\0" * draw(st.integers(1, 9))
    elif kind == "cut":
        del data[len(data) - draw(st.integers(1, 12)):]
    elif kind == "nested":
        return encode(None, raw="[" * draw(st.integers(100, 5000)) + "]" * 3)
    else:
        return encode(None, raw='{"a\\ud800": 1}').replace(b"\\ud800", b"\xff")
    return bytes(data)


def library(path: Path) -> dict[str, torch.Tensor] | None:
    """What safetensors itself reads from the file, or None when it refuses it."""
    try:
        with safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal of the library counts
        return None


def ours(path: Path) -> dict[str, torch.Tensor] | str:
    """What mergecli reads (its own pread reader), or its one-line refusal."""
    from mergecli.io.checkpoint import open_local

    try:
        tensors, _ = read_header(path)
    except CheckpointError as exc:
        return exc.message
    with open_local(path) if tensors else _Empty() as checkpoint:
        return {t.name: checkpoint.read(t.name) for t in tensors}


class _Empty:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


OUTCOMES: Counter[str] = Counter()  # how the mutations ended, for the long campaign's report


def check(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    expected, got = library(path), ours(path)
    if isinstance(got, str):
        assert "\n" not in got and str(path) in got and "internal error" not in got, got
        deliberate = any(f'"{d}"' in content.decode("latin-1") for d in DELIBERATE) or "duplicate key" in got
        assert expected is None or deliberate, f"refused what safetensors reads: {got}"
        OUTCOMES["both refuse" if expected is None else "refused on purpose (duplicate key, unmerged dtype)"] += 1
    else:
        assert expected is not None, f"accepted what safetensors refuses: {sorted(got)}"
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        OUTCOMES["both read the same tensors"] += 1


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    if "MERGECLI_FUZZ_EXAMPLES" in os.environ:
        print(f"\nfuzz outcomes over {sum(OUTCOMES.values())} files: {dict(OUTCOMES)}")


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def check_in_a_fresh_folder(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:  # hypothesis runs many examples in one test
        check(content, Path(folder))


def test_the_valid_file_reads_the_same():
    check_in_a_fresh_folder(VALID)


@FUZZ
@given(header_mutation())
def test_header_mutations_are_read_or_refused_like_safetensors(content):
    check_in_a_fresh_folder(content)


@FUZZ
@given(byte_mutation())
def test_byte_mutations_are_read_or_refused_like_safetensors(content):
    check_in_a_fresh_folder(content)


@pytest.mark.parametrize("problem, content, words", [
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ("same bytes", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "overlap"),
    ("gap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "leave a gap"),
    ("float offset", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, "data_offsets"),
    ("string offset", {"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, "data_offsets"),
])
def test_hostile_headers_get_one_line_naming_the_problem(tmp_path, problem, content, words):
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(content, bytes(8) if problem != "overlap" else bytes(12)))
    assert library(path) is None
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert words in info.value.message and str(path) in info.value.message


def test_a_short_header_length_and_trailing_bytes_are_refused_by_the_cli(llama_fp32, tmp_path):
    for name, damage in (("short", lambda b: struct.pack("<Q", struct.unpack("<Q", b[:8])[0] - 2) + b[8:]),
                         ("trailing", lambda b: b + b"\0" * 8)):
        model = tmp_path / name
        model.mkdir()
        for item in llama_fp32[1].iterdir():
            (model / item.name).write_bytes(item.read_bytes())
        weights = model / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        result = cli("average", "-m", llama_fp32[0], "-m", model, "-o", tmp_path / "out")
        assert result.exit_code == 1 and str(weights) in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) <= 2 and "internal error" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_index_that_places_tensors_in_the_wrong_shard_is_refused(llama_bf16_sharded, tmp_path):
    model = tmp_path / "sharded"
    model.mkdir()
    for item in llama_bf16_sharded[0].iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    moved = next(name for name, shard in index["weight_map"].items() if shard == shards[0])
    index["weight_map"][moved] = shards[1]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("average", "-m", llama_bf16_sharded[1], "-m", model, "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert f"the index places tensor {moved!r} in {shards[1]}, but it is in {shards[0]}" in result.stderr
