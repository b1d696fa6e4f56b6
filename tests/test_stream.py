"""The streaming loop's threads, on real safetensors files: independent blocks spread over the
workers, a stateful task's blocks in order on one thread, the first failure raised and the other
workers stopped, every block written once."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecli.io.checkpoint import open_checkpoint
from mergecli.io.safetensors import TensorSpec
from mergecli.io.writer import ShardWriter, plan_shards
from mergecli.merge import stream
from mergecli.methods.base import TensorTask

ROWS, COLUMNS, BLOCK_ROWS = 400, 8, 2


@pytest.fixture
def sources(tmp_path):
    """Two checkpoints whose tensor `w` holds its row index in column 0 (so a block says where it
    came from) and random values elsewhere."""
    opened = []
    for seed in range(2):
        w = torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(seed))
        w[:, 0] = torch.arange(ROWS, dtype=torch.float32)
        directory = tmp_path / f"model{seed}"
        directory.mkdir()
        save_file({"w": w, "v": w[:, 1:].clone()}, directory / "model.safetensors")
        opened.append(open_checkpoint(str(directory)))
    yield opened
    for checkpoint in opened:
        checkpoint.close()


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(stream.os, "cpu_count", lambda: 4)


def stream_into(tmp_path, tasks: list[TensorTask]) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    out.mkdir()
    specs = {task.out.name: task.out for task in tasks}
    writer = ShardWriter(out, plan_shards(list(specs.values()), 10**9), specs)
    try:
        stream.stream_tasks(tasks, writer)
        writer.finish()
    finally:
        writer.close()
    return load_file(out / "model.safetensors")


def recording_sum(seen: list[tuple[int, int]]):
    """A combine that sums the blocks and records (thread, first row) of each."""

    def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        seen.append((threading.get_ident(), int(blocks[0][0, 0])))
        return torch.add(blocks[0], blocks[1], out=out)

    return combine


def task(name: str, sources, combine, *, independent: bool) -> TensorTask:
    info = sources[0].tensors[name]
    return TensorTask(TensorSpec(name, info.dtype, info.shape), "sum", tuple(sources), combine,
                      BLOCK_ROWS * info.shape[1], independent_blocks=independent)


def test_independent_blocks_run_on_several_threads(tmp_path, sources, four_cores):
    """The first block is held until another worker combines a block at the same time: with one
    worker, that never happens (the wait times out and the test fails), however busy the machine."""
    seen: list[tuple[int, int]] = []
    record = recording_sum(seen)
    second_worker = threading.Event()

    def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        merged = record(blocks, out)
        if seen[0][0] != threading.get_ident():
            second_worker.set()
        elif int(blocks[0][0, 0]) == 0:
            second_worker.wait(timeout=60)
        return merged

    merged = stream_into(tmp_path, [task("w", sources, combine, independent=True)])
    expected = sources[0].read("w") + sources[1].read("w")
    assert torch.equal(merged["w"], expected)
    assert sorted(row for _, row in seen) == list(range(0, ROWS, BLOCK_ROWS))  # each block once
    assert second_worker.is_set() and len({thread for thread, _ in seen}) >= 2


def test_a_stateful_task_gets_its_blocks_in_order_on_one_thread(tmp_path, sources, four_cores):
    """One task whose combine keeps state makes the whole stage run on one thread, in order (a
    RegMean solve streamed by row blocks depends on it)."""
    seen: list[tuple[int, int]] = []
    stateful = task("w", sources, recording_sum(seen), independent=False)
    others = task("v", sources, lambda blocks, out: torch.add(blocks[0], blocks[1], out=out), independent=True)
    merged = stream_into(tmp_path, [others, stateful])
    assert [row for _, row in seen] == list(range(0, ROWS, BLOCK_ROWS))
    assert {thread for thread, _ in seen} == {threading.get_ident()}
    assert torch.equal(merged["v"], sources[0].read("v") + sources[1].read("v"))


def test_the_first_failure_is_raised_and_stops_every_worker(tmp_path, sources, four_cores):
    """Blocks after the failing one wait until it has failed, then a while longer, so that the other
    workers cannot race through the tensor before the failure is known."""
    calls = []
    failed = threading.Event()

    def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        row = int(blocks[0][0, 0])
        calls.append(row)
        if row == 10:
            failed.set()
            raise ValueError("block at row 10")
        if row > 10:
            failed.wait(timeout=60)
            time.sleep(0.01)
        return torch.add(blocks[0], blocks[1], out=out)

    with pytest.raises(ValueError, match="row 10"):
        stream_into(tmp_path, [task("w", sources, combine, independent=True)])
    assert len(calls) < ROWS // BLOCK_ROWS // 2  # the others stopped after their current block
    assert not [t for t in threading.enumerate() if t.name.startswith("mergecli-worker")]
