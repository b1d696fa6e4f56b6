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
from typing import Any

import torch

from mergecli.errors import CheckpointError
from mergecli.io.files import MAX_HEADER

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Tensors one file may list. Real shards hold hundreds to a few thousand (a 671B MoE: about 560 in each
# of 163 shards); a header of hundreds of thousands of empty tensors only costs time and memory to read.
MAX_TENSORS = 100_000


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

    def elements(self, rows: tuple[int, int] | None) -> int:
        """Elements in rows `[start, stop)` of the first dimension (None: the whole tensor)."""
        return self.numel if rows is None else (rows[1] - rows[0]) * math.prod(self.shape[1:])


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """Where one stored tensor lives: `offset` is the absolute byte offset of its data in `file`
    (-1 for a tensor of a PyTorch state dict, which is read through torch)."""

    file: Path = Path()
    offset: int = -1


def _strict_json(text: str) -> Any:
    """JSON as strict as serde_json: no duplicate keys, no NaN / Infinity."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)


def _index(value: Any) -> int | None:
    """A non-negative JSON integer (not a bool, not a float), else None."""
    return value if type(value) is int and value >= 0 else None


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check one safetensors file's header as strictly as the safetensors library does;
    return its tensors (in file order) and metadata.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_len = header_length(path, prefix, size)
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    return parse_header(path, raw, size)


def header_length(path: Path, prefix: bytes, size: int) -> int:
    """The header size that a file's first 8 bytes give, checked against the file's size."""
    if len(prefix) < 8:
        raise CheckpointError(path, "not a safetensors file (shorter than its 8-byte header size)")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER:
        raise CheckpointError(path, f"corrupt safetensors header: its size field says {header_len} bytes")
    if 8 + header_len > size:
        raise CheckpointError(path, f"truncated or corrupt: the header size field says {header_len} bytes, "
                                    f"the file has {size}",
                              hint="the download or copy did not finish; fetch the file again")
    return header_len


def parse_header(path: Path, raw: bytes, size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    """Check the JSON header `raw` of a safetensors file of `size` bytes (local or remote): its
    tensors must tile the data section exactly. A header that lists more tensors than any checkpoint
    file holds is refused before it is parsed (a scan of its bytes, not a Python object per tensor)."""
    listed = raw.count(b'"data_offsets"')  # at least the number of tensors (a key or value may say it too)
    if listed > MAX_TENSORS:
        raise CheckpointError(path, f"its header lists {listed:,} tensors; no checkpoint file holds more than "
                                    f"{MAX_TENSORS:,} (a corrupt or hostile file)")
    try:
        header = _strict_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(path, "corrupt safetensors header (not UTF-8)") from None
    except RecursionError:
        raise CheckpointError(path, "corrupt safetensors header (nested too deeply)") from None
    except ValueError as exc:
        raise CheckpointError(path, f"corrupt safetensors header (not valid JSON: {str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(path, "corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + len(raw)
    tensors = []
    for name, entry in header.items():
        tensors.append(_tensor_info(path, name, entry, data_start))
    tensors.sort(key=lambda t: (t.offset, t.nbytes))
    end = data_start
    for index, tensor in enumerate(tensors):
        if tensor.offset != end:
            before = f"the tensor before it ({tensors[index - 1].name!r})" if index else "the data section's start"
            problem = "overlap" if tensor.offset < end else "leave a gap"
            raise CheckpointError(path, f"corrupt safetensors header: the data of {tensor.name!r} and {before} "
                                        f"{problem}")
        end += tensor.nbytes
    if end > size:
        last = tensors[-1].name
        raise CheckpointError(path, f"truncated: tensor {last!r} ends at byte {end}, the file has {size}",
                              hint="the download or copy did not finish; fetch the file again")
    if end < size:
        raise CheckpointError(path, f"corrupt: {size - end} bytes after the last tensor's data")
    return tensors, metadata or {}


def _tensor_info(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(path, f"corrupt safetensors header: tensor {name!r} {problem}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("lacks one of dtype, shape and data_offsets")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"has an unknown or unsupported dtype {str(entry['dtype'])[:20]!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or any(_index(d) is None for d in shape):
        raise bad("has a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or any(_index(x) is None for x in offsets):
        raise bad("has data_offsets that are not two non-negative integers")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise bad("has the wrong byte size for its dtype and shape")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin)


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
