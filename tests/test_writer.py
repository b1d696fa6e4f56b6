"""Shard planning and in-place writing, checked by reading the files back with safetensors."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from mergecli.io.safetensors import TensorSpec as OutputTensor
from mergecli.io.writer import ShardWriter, plan_shards


def test_plan_shards_respects_size_and_order():
    tensors = [OutputTensor(f"t{i}", torch.float32, (10, 10)) for i in range(5)]  # 400 bytes each
    plans = plan_shards(tensors, 1000)
    assert [list(p.offsets) for p in plans] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [p.filename for p in plans] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan_shards(tensors, 10**9)[0].filename == "model.safetensors"
    big = plan_shards([OutputTensor("huge", torch.float32, (1000,)), *tensors[:1]], 100)
    assert [list(p.offsets) for p in big] == [["huge"], ["t0"]]  # a tensor larger than a shard


def test_blocks_written_in_place_out_of_order(tmp_path):
    specs = {"a": OutputTensor("a", torch.bfloat16, (6, 3)), "b": OutputTensor("b", torch.int64, ()),
             "c": OutputTensor("c", torch.float32, (4,))}
    plans = plan_shards(list(specs.values()), 40)
    writer = ShardWriter(tmp_path, plans, specs)
    a = torch.randn(6, 3).to(torch.bfloat16)
    writer.write("c", torch.arange(4.0))
    writer.write("a", a[3:], row_start=3)  # the second block first
    writer.write("b", torch.tensor(7))
    writer.write("a", a[:3], row_start=0)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    read = {}
    for filename in set(index["weight_map"].values()):
        with safe_open(tmp_path / filename, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            read.update({k: f.get_tensor(k) for k in f.keys()})
    assert torch.equal(read["a"], a) and read["b"].item() == 7 and torch.equal(read["c"], torch.arange(4.0))
    assert index["metadata"]["total_size"] == 36 + 8 + 16


def test_output_shards_are_preallocated(tmp_path):
    """fallocate reserves each shard's blocks up front (a full disk fails before any tensor is
    written); the file's size is then its planned size, and its bytes are what was written."""
    import os

    from mergecli.io.linux import preallocate

    with open(tmp_path / "f", "wb") as f:
        assert preallocate(f.fileno(), 1 << 20)
    stat = os.stat(tmp_path / "f")
    assert stat.st_size == 1 << 20 and stat.st_blocks * 512 >= 1 << 20
