"""Output shards: planned from tensor specs, each header written first and every tensor block
written in place (`pwrite` at its final offset), so that no shard is ever buffered in memory.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.errors import MergecliError
from mergecli.io.checkpoint import Checkpoint
from mergecli.io.decoders import readable
from mergecli.io.files import SAFETENSORS_INDEX, SINGLE_SAFETENSORS
from mergecli.io.fp8 import FP8, Fp8Output, quantize, scale_name
from mergecli.io.linux import preallocate, start_writeback
from mergecli.io.safetensors import TensorInfo, TensorSpec, encode_header, pwrite_all, tensor_bytes

OUTPUT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its header bytes and where each tensor's data starts in the file."""

    filename: str
    header: bytes
    offsets: dict[str, int]
    size: int


def plan_shards(tensors: list[TensorSpec], shard_size: int) -> list[ShardPlan]:
    """Group tensors, in order, into shards of at most `shard_size` data bytes (a larger tensor
    gets a shard of its own); name them like `save_pretrained` does."""
    groups: list[list[TensorSpec]] = [[]]
    used = 0
    for tensor in tensors:
        if groups[-1] and used + tensor.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(tensor)
        used += tensor.nbytes
    count = len(groups)
    plans = []
    for i, group in enumerate(groups, start=1):
        filename = SINGLE_SAFETENSORS if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        header, offsets, size = encode_header(group, OUTPUT_METADATA)
        plans.append(ShardPlan(filename, header, offsets, size))
    return plans


@dataclass
class ShardWriter:
    """Writes planned shards into `directory`: headers at open, tensor blocks at their offsets."""

    directory: Path
    shards: list[ShardPlan]
    tensors: dict[str, TensorSpec]
    sync: bool = False  # start each block's writeback as it is written (the final fsync then waits little)
    fp8: Fp8Output | None = None  # tensors written fp8 block-scaled: given float32 blocks of whole tiles
    create: bool = True  # False: the files exist, headers written (another torchrun rank made them)
    done: set[str] = field(default_factory=set)  # shards finished by an interrupted run (`--resume`): kept
    on_shard_done: Callable[[str], None] | None = None  # told each shard's name once all its bytes are written
    _fds: dict[str, int] = field(default_factory=dict)
    _where: dict[str, tuple[str, int]] = field(default_factory=dict)
    _written: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # `write` is called from several threads
    _left: dict[str, int] = field(default_factory=dict)  # per shard, the data bytes not yet written

    def __post_init__(self) -> None:
        if self.fp8 is not None:
            self.tensors = {spec.name: spec for spec in self.fp8.stored(list(self.tensors.values()))}
        for shard in self.shards:
            if shard.filename in self.done:
                continue
            self._left[shard.filename] = sum(self.tensors[name].nbytes for name in shard.offsets)
            if self.create:
                fd = os.open(self.directory / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                preallocate(fd, shard.size)  # a third less kernel time per write; a full disk fails here
                pwrite_all(fd, shard.header, 0)
            else:
                fd = os.open(self.directory / shard.filename, os.O_WRONLY)
            self._fds[shard.filename] = fd
            for name, offset in shard.offsets.items():
                self._where[name] = (shard.filename, offset)

    def requantizes(self, name: str) -> bool:
        """Whether tensor `name` is written fp8 block-scaled (its float32 blocks requantized here)."""
        return self.fp8 is not None and name in self.fp8.names

    def row_align(self, name: str) -> int:
        """What a block of tensor `name` must start at a multiple of (an fp8 one's tile rows)."""
        return self.fp8.tile[0] if self.requantizes(name) else 1

    def write(self, name: str, block: torch.Tensor, row_start: int = 0) -> None:
        """Write `block` (rows `row_start...` of tensor `name`, in its output dtype; float32 whole tiles for
        one written fp8, requantized here)."""
        spec = self.tensors[name]
        if spec.dtype == FP8 and block.dtype != FP8:
            values, scales = quantize(block, self.fp8.tile)
            self.write(name, values, row_start)
            self.write(scale_name(name), scales, row_start // self.fp8.tile[0])
            return
        if block.dtype != spec.dtype:
            raise ValueError(f"{name}: block is {block.dtype}, planned {spec.dtype}")
        filename, offset = self._where[name]
        data = tensor_bytes(block)
        fd, start = self._fds[filename], offset + row_start * spec.row_bytes
        pwrite_all(fd, data, start)
        if self.sync:
            start_writeback(fd, start, len(data))
        with self._lock:
            self._written[name] = self._written.get(name, 0) + len(data)
            self._left[filename] -= len(data)
            finished = self._left[filename] == 0
        if finished and self.on_shard_done is not None:
            self.on_shard_done(filename)

    def checkpoint(self) -> Checkpoint:
        """The output as a checkpoint, to read back tensors already written (read nothing else)."""
        tensors = {}
        for shard in self.shards:
            for name, offset in shard.offsets.items():
                spec = self.tensors[name]
                tensors[name] = TensorInfo(name, spec.dtype, spec.shape, self.directory / shard.filename, offset)
        files = [self.directory / shard.filename for shard in self.shards]
        checkpoint = Checkpoint("the merged output", files, tensors, self.directory)
        if self.fp8 is None:
            return checkpoint
        return readable(checkpoint, {"quantization_config": {"quant_method": "fp8",
                                                             "weight_block_size": list(self.fp8.tile)}})

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def finish(self) -> None:
        """Close the files, check that every tensor was completely written, write the index."""
        self.close()
        self.check_written({name for shard in self.shards if shard.filename not in self.done
                            for name in shard.offsets})
        self.write_index()

    def check_written(self, names: set[str]) -> None:
        """Every tensor of `names` (and the fp8 scales that go with it) completely written."""
        wanted = names | {scale_name(n) for n in names if self.fp8 is not None and n in self.fp8.names
                          and scale_name(n) in self.tensors}
        missing = [n for n in wanted if self._written.get(n, 0) != self.tensors[n].nbytes]
        if missing:
            raise MergecliError(f"internal error: tensor {missing[0]} was not completely written")

    def write_index(self) -> None:
        """The index of a sharded output (nothing for one file)."""
        if len(self.shards) > 1:
            weight_map = {n: shard.filename for shard in self.shards for n in shard.offsets}
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.tensors.values())},
                     "weight_map": weight_map}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
