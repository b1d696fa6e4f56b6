"""The safetensors format: dtype codes, tensor specs, header reading and encoding, exact pread / pwrite.

mergecli reads tensor bytes with `pread` into buffers it owns and writes them with `pwrite` at
planned offsets, instead of mmap: the page cache stays out of its resident memory, and a tensor can
be read or written a block of rows at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mergecli.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype and shape: what an output shard plans, before any data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of the first dimension (a scalar's whole size)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.nbytes


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """Where one stored tensor lives: `offset` is the absolute byte offset of its data in `file`
    (-1 for a tensor of a PyTorch state dict, which is read through torch)."""

    file: Path = Path()
    offset: int = -1


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check one safetensors file's header; return its tensors (in file order) and metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, "not a safetensors file (shorter than its 8-byte header size)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(path, "corrupt or truncated safetensors header")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(path, "corrupt safetensors header (not valid JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = []
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt safetensors header entry for tensor {name!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(path, f"corrupt safetensors header: tensor {name!r} has the wrong byte size")
        if data_start + end > size:
            raise CheckpointError(
                path, f"truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}",
                hint="the download or copy did not finish; fetch the file again",
            )
        tensors.append(TensorInfo(name, dtype, shape, path, data_start + begin))
    tensors.sort(key=lambda t: t.offset)
    return tensors, metadata


def encode_header(tensors: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """The bytes that open a safetensors file holding `tensors` in order (8-byte length, JSON padded
    to keep the data 8-byte aligned), each tensor's absolute data offset, and the file's size."""
    entries: dict[str, object] = {"__metadata__": metadata}
    position = 0
    relative = {}
    for tensor in tensors:
        entries[tensor.name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                                "data_offsets": [position, position + tensor.nbytes]}
        relative[tensor.name] = position
        position += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    prefix = len(header).to_bytes(8, "little") + header
    return prefix, {name: start + offset for name, offset in relative.items()}, start + position


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    if not tensor.numel():
        return memoryview(b"")
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def pread_into(fd: int, out: torch.Tensor, offset: int, *, path: Path) -> None:
    """Fill the contiguous CPU tensor `out` with the bytes at `offset` of the open file `fd`."""
    view = tensor_bytes(out)
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(path, f"read failed: {exc.strerror or exc}") from None
        if got == 0:
            raise CheckpointError(path, "truncated while reading (the file shrank?)")
        done += got


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of the open file `fd`."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, sync: bool = True) -> int:
    """Write CPU tensors to a new safetensors file, tensor by tensor (and fsync it); returns its size."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    header, offsets, size = encode_header(specs, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, header, 0)
        for name, tensor in tensors.items():
            pwrite_all(fd, tensor_bytes(tensor), offsets[name])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return size


def sync_file(path: Path) -> None:
    """Flush a written file to disk (before the directory holding it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
