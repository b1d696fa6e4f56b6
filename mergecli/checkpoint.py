"""Checkpoints: resolve a path, read tensor headers, read one tensor (or a block of its rows).

Safetensors headers are parsed here rather than through `safe_open`: reading tensor bytes with
`pread` into a buffer we own keeps the page cache out of our resident memory (an mmap'd shard
counts every touched page as RSS) and lets a 1B-element embedding be read a row block at a time.
PyTorch state dicts are opened with `torch.load(weights_only=True, mmap=True)`: never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.errors import CheckpointError, InputNotFoundError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 2**20
STATE_DICT_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. `offset` is the absolute byte offset of its data (safetensors)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of the first dimension (0 for a scalar)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else 0


def read_safetensors_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check one safetensors file's header; return its tensors (in file order)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, "not a safetensors file (shorter than its 8-byte header size)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
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


def _index_shards(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(index_path, "corrupt shard index (no weight_map)") from None
    shards = []
    directory = Path(os.path.normpath(index_path.parent))
    for name in files:
        # Checked lexically, not with resolve(): in the hub cache every file is a symlink into blobs/.
        shard = Path(os.path.normpath(directory / str(name)))
        if directory not in shard.parents:
            raise CheckpointError(index_path, f"shard {name!r} lies outside the checkpoint directory")
        if not shard.is_file():
            raise CheckpointError(index_path, f"shard {name} is listed in the index but missing")
        shards.append(shard)
    return shards


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred over `.bin`."""
    if (directory / "model.safetensors.index.json").is_file():
        return _index_shards(directory / "model.safetensors.index.json")
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    if (directory / "pytorch_model.bin.index.json").is_file():  # after every safetensors form
        return _index_shards(directory / "pytorch_model.bin.index.json")
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(directory, "no model.safetensors, sharded safetensors or pytorch_model.bin here")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for bad pickles / unsafe globals
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            path, f"cannot load as a PyTorch state dict ({first_line[:200]})",
            hint="only zip-format state dicts of tensors are read (weights_only=True); "
                 "convert other files to safetensors",
        ) from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, "is not a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"entry {bad[0]!r} is not a tensor")
    return obj


@dataclass
class Checkpoint:
    """An opened checkpoint: its tensor headers, and reads of tensors or row blocks.

    `directory` is where config and tokenizer files live (None for a single weights file);
    `commit` is the hub commit it was resolved to (None when local).
    """

    source: str
    files: list[Path]
    tensors: dict[str, TensorInfo]
    directory: Path | None = None
    commit: str | None = None
    _state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)

    def read(self, name: str, rows: tuple[int, int] | None = None, *,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor `name`, or only rows `[start, stop)` of its first dimension.

        Args:
            buffer: optional uint8 tensor to read into (reused by the caller to spare the
                allocation and page faults of a fresh buffer per block); it must be large enough.
        """
        info = self.tensors[name]
        if name in self._state_dict:
            tensor = self._state_dict[name]
            return tensor[rows[0]:rows[1]] if rows else tensor
        if rows is None or not info.shape:
            start, shape = 0, info.shape
        else:
            start, shape = rows[0], (rows[1] - rows[0], *info.shape[1:])
        if buffer is None:
            out = torch.empty(shape, dtype=info.dtype)
        else:
            nbytes = math.prod(shape) * info.dtype.itemsize
            out = buffer[:nbytes].view(info.dtype).view(shape)
        self._pread_into(info.file, out, info.offset + start * info.row_bytes)
        return out

    def _pread_into(self, path: Path, out: torch.Tensor, offset: int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise CheckpointError(path, f"read failed: {exc.strerror or exc}") from None
            if got == 0:
                raise CheckpointError(path, "truncated while reading (the file shrank?)")
            done += got

    def fingerprint(self) -> str:
        """Hash of tensor names, shapes and dtypes (plus the hub commit, when there is one)."""
        digest = hashlib.sha256()
        for info in sorted(self.tensors.values(), key=lambda t: t.name):
            digest.update(f"{info.name}|{list(info.shape)}|{DTYPE_CODES[info.dtype]}\n".encode())
        if self.commit:
            digest.update(f"commit|{self.commit}\n".encode())
        return digest.hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._state_dict.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_local(path: Path, *, source: str | None = None, commit: str | None = None) -> Checkpoint:
    """Open a local directory, `.safetensors` file or `.bin` / `.pt` state dict."""
    source = source or str(path)
    if path.is_dir():
        files, directory = find_weight_files(path), path
    elif path.is_file():
        files, directory = [path], None
    else:
        raise InputNotFoundError(source)
    tensors: dict[str, TensorInfo] = {}
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if file.name.endswith(STATE_DICT_SUFFIXES):
            loaded = _load_state_dict(file)
            infos = [TensorInfo(k, v.dtype, tuple(v.shape), file) for k, v in loaded.items()]
            state_dict.update({k: v.contiguous() for k, v in loaded.items()})
        elif file.suffix == ".safetensors":
            infos, _ = read_safetensors_header(file)
        else:
            raise CheckpointError(file, "unsupported file type (expected .safetensors, .bin or .pt)")
        for info in infos:
            if info.name in tensors:
                raise CheckpointError(file, f"tensor {info.name!r} is stored twice "
                                            f"(also in {tensors[info.name].file.name})")
            tensors[info.name] = info
    if not tensors:
        raise CheckpointError(path, "holds no tensors")
    return Checkpoint(source, files, tensors, directory, commit, state_dict)


def open_checkpoint(path: str, *, revision: str | None = None) -> Checkpoint:
    """Open a local checkpoint, or resolve a hub repo id (through the local hub cache or the hub).

    Raises:
        InputNotFoundError: neither a local path nor a hub repo id.
        CheckpointError: the files are corrupt, truncated or of an unsupported kind.
    """
    local = Path(path).expanduser()
    if local.exists():
        return open_local(local, source=path)
    from mergecli import hub  # imported lazily: huggingface_hub is slow to import

    if hub.looks_like_repo_id(path):
        directory, commit = hub.download_checkpoint(path, revision=revision)
        return open_local(directory, source=path, commit=commit)
    raise InputNotFoundError(path)


def iter_row_blocks(info: TensorInfo, max_elements: int) -> Iterator[tuple[int, int] | None]:
    """Row ranges of `info` holding at most `max_elements` each (at least one row); None = whole."""
    if len(info.shape) < 1 or info.numel <= max_elements:
        yield None
        return
    rows = info.shape[0]
    per_row = max(1, info.numel // rows) if rows else 1
    step = max(1, max_elements // per_row)
    for start in range(0, rows, step):
        yield (start, min(rows, start + step))
