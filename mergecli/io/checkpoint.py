"""Checkpoints: open a local path or a hub repo id, list its tensors, read a tensor or a block of rows.

Safetensors files are read with `pread` (io/safetensors.py). PyTorch state dicts are opened with
`torch.load(weights_only=True, mmap=True)`: never unpickled.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.errors import CheckpointError, InputNotFoundError
from mergecli.io import hub
from mergecli.io.files import STATE_DICT_SUFFIXES, choose_weight_files, parse_index
from mergecli.io.safetensors import DTYPE_CODES, TensorInfo, pread_into, read_header


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
        nbytes = (info.nbytes if rows is None or not info.shape else (rows[1] - rows[0]) * info.row_bytes)
        out = (torch.empty(shape, dtype=info.dtype) if buffer is None
               else buffer[:nbytes].view(info.dtype).view(shape))
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        pread_into(fd, out, info.offset + start * info.row_bytes, path=info.file)
        return out

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


def _read_local_index(directory: Path, name: str) -> list[str]:
    index = directory / name
    try:
        text = index.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(index, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    shards = parse_index(text, where=str(index))
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        raise CheckpointError(index, f"shard {missing[0]} is listed in the index but missing")
    return shards


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred over `.bin`."""
    names = [p.name for p in directory.iterdir() if p.is_file()]
    chosen = choose_weight_files(names, read_index=lambda name: _read_local_index(directory, name))
    weights = [directory / name for name in chosen if not name.endswith(".index.json")]
    if not weights:
        raise CheckpointError(directory, "no model.safetensors, sharded safetensors or pytorch_model.bin here")
    return weights


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
            infos, _ = read_header(file)
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
