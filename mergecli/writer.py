"""Output: plan shards from tensor headers, write each header first and tensors in place, finish
atomically.

Every shard's header is written before any tensor is computed, so each block of each tensor is
written straight to its final byte offset (`pwrite`) and dropped: no shard is ever buffered.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.checkpoint import DTYPE_CODES
from mergecli.errors import MergecliError, UsageError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.nbytes


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its header bytes and where each tensor's data starts in the file."""

    filename: str
    header: bytes
    offsets: dict[str, int]
    size: int


def _shard_header(tensors: list[OutputTensor]) -> tuple[bytes, dict[str, int], int]:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    position = 0
    relative = {}
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        relative[tensor.name] = position
        position += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep tensor data 8-byte aligned
    start = 8 + len(header)
    prefix = len(header).to_bytes(8, "little") + header
    return prefix, {name: start + offset for name, offset in relative.items()}, start + position


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[ShardPlan]:
    """Group tensors, in order, into shards of at most `shard_size` data bytes (a larger tensor
    gets a shard of its own); name them like `save_pretrained` does."""
    groups: list[list[OutputTensor]] = [[]]
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
        filename = SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        header, offsets, size = _shard_header(group)
        plans.append(ShardPlan(filename, header, offsets, size))
    return plans


@dataclass
class ShardWriter:
    """Writes planned shards into `directory`: headers at open, tensor blocks at their offsets."""

    directory: Path
    shards: list[ShardPlan]
    tensors: dict[str, OutputTensor]
    _fds: dict[str, int] = field(default_factory=dict)
    _where: dict[str, tuple[str, int]] = field(default_factory=dict)
    _written: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for shard in self.shards:
            fd = os.open(self.directory / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.filename] = fd
            _pwrite_all(fd, shard.header, 0)
            for name, offset in shard.offsets.items():
                self._where[name] = (shard.filename, offset)

    def write(self, name: str, block: torch.Tensor, row_start: int = 0) -> None:
        """Write `block` (rows `row_start...` of tensor `name`, in its output dtype)."""
        spec = self.tensors[name]
        if block.dtype != spec.dtype:
            raise ValueError(f"{name}: block is {block.dtype}, planned {spec.dtype}")
        filename, offset = self._where[name]
        data = block.contiguous().reshape(-1).view(torch.uint8).numpy() if block.numel() else b""
        _pwrite_all(self._fds[filename], memoryview(data), offset + row_start * spec.row_bytes)
        self._written[name] = self._written.get(name, 0) + len(data)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def finish(self) -> None:
        """Close the files, check that every tensor was completely written, write the index."""
        self.close()
        missing = [n for n, t in self.tensors.items() if self._written.get(n, 0) != t.nbytes]
        if missing:
            raise MergecliError(f"internal error: tensor {missing[0]} was not completely written")
        if len(self.shards) > 1:
            weight_map = {n: self._where[n][0] for n in self.tensors}
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.tensors.values())},
                     "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def check_output_path(output: Path, inputs: list[Path], *, force: bool) -> None:
    """Refuse an existing output without `force`, and any output that overlaps an input."""
    output = output.resolve()
    for path in inputs:
        path = path.resolve()
        if output == path or path in output.parents:
            raise UsageError(f"output {output} is inside the input {path}",
                             hint="choose an output directory outside every input")
        if output in path.parents:
            raise UsageError(f"input {path} is inside the output {output}",
                             hint="replacing the output would delete that input; choose another output")
    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", hint="pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(output: Path) -> None:
    """Delete temporary siblings of `output` left by killed runs (their process is gone)."""
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_directory(output: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; rename it into place only if the block succeeds.

    On any failure (including Ctrl-C) the temporary directory is removed and an existing output
    is left untouched. A killed process leaves only a hidden `.NAME.partial-PID` directory.
    """
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output)
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
    temporary.mkdir()
    try:
        yield temporary
        if output.exists():
            if not force:
                raise UsageError(f"output {output} already exists", hint="pass --force to replace it")
            retired = output.parent / f".{output.name}.replaced-{os.getpid()}"
            os.rename(output, retired)
            os.rename(temporary, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
