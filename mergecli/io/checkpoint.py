"""Checkpoints: open a local path or a hub repo id, list its tensors, read a tensor or a block of rows.

Safetensors files are read with `pread` (io/safetensors.py). PyTorch state dicts are opened with
`torch.load(weights_only=True, mmap=True)`: never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.errors import CheckpointError, HubError, InputNotFoundError, file_kind
from mergecli.io import hub
from mergecli.io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config
from mergecli.io.decoders import readable
from mergecli.io.dequantize import Decoder
from mergecli.io.files import STATE_DICT_SUFFIXES, choose_weight_files, regular_file, weight_map, within
from mergecli.io.remote import Fetcher, RemoteFile
from mergecli.io.safetensors import DTYPE_CODES, TensorInfo, header_length, parse_header, pread_into, read_header

GGUF_HINT = "merge the model's safetensors release (GGUF is a llama.cpp format of quantized weights)"


@dataclass
class Checkpoint:
    """An opened checkpoint: its tensor headers, and reads of tensors or row blocks.

    `directory` is where config and tokenizer files live (None for a single weights file);
    `commit` is the hub commit it was resolved to (None when local). A quantized checkpoint lists its
    logical tensors in `tensors` (each read dequantized by its decoder) and its stored ones in `stored`.
    """

    source: str
    files: list[Path]
    tensors: dict[str, TensorInfo]
    directory: Path | None = None
    commit: str | None = None
    root: Path | None = None  # the input's own tree: what its files may link to
    _digest: str | None = field(default=None, repr=False)
    _state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    _remote: dict[Path, RemoteFile] = field(default_factory=dict, repr=False)  # streamed: read by ranges
    fetcher: Fetcher | None = field(default=None, repr=False)
    stored: dict[str, TensorInfo] = field(default_factory=dict, repr=False)  # as stored: quantized ones only
    decoders: dict[str, Decoder] = field(default_factory=dict, repr=False)
    adapter: dict | None = field(default=None, repr=False)  # a LoRA adapter's config: these are its factors

    def read(self, name: str, rows: tuple[int, int] | None = None, *,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor `name`, or only rows `[start, stop)` of its first dimension (dequantized, float32,
        where it is stored quantized).

        Args:
            buffer: optional uint8 tensor to read into (reused by the caller to spare the
                allocation and page faults of a fresh buffer per block); it must be large enough.
        """
        decoder = self.decoders.get(name)
        if decoder is not None:
            return decoder.decode(self.read_stored, rows)
        return self.read_stored(name, rows, buffer=buffer)

    def read_stored(self, name: str, rows: tuple[int, int] | None = None, *,
                    buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read stored tensor `name` (a quantized one's part), or rows `[start, stop)` of it."""
        info = self._stored_info(name)
        if name in self._state_dict:
            tensor = self._state_dict[name]
            return tensor[rows[0]:rows[1]] if rows else tensor
        shape = info.shape if rows is None or not info.shape else (rows[1] - rows[0], *info.shape[1:])
        offset, nbytes = self._byte_range(name, rows)
        out = (torch.empty(shape, dtype=info.dtype) if buffer is None
               else buffer[:nbytes].view(info.dtype).view(shape))
        remote = self._remote.get(info.file)
        if remote is not None:
            self.fetcher.read_into(remote, offset, out.reshape(-1).view(torch.uint8))
            return out
        fd = self._fds.get(info.file)
        if fd is None:  # streaming threads may open a file at once: one fd is kept, the rest closed
            opened = os.open(info.file, os.O_RDONLY)
            fd = self._fds.setdefault(info.file, opened)
            if fd != opened:
                os.close(opened)
        pread_into(fd, out, offset, path=info.file)
        return out

    def _stored_info(self, name: str) -> TensorInfo:
        return self.stored[name] if self.stored else self.tensors[name]

    def _byte_range(self, name: str, rows: tuple[int, int] | None) -> tuple[int, int]:
        """(offset in its file, length) of stored tensor `name`, or of rows `[start, stop)` of it."""
        info = self._stored_info(name)
        if rows is None or not info.shape:
            return info.offset, info.nbytes
        return info.offset + rows[0] * info.row_bytes, (rows[1] - rows[0]) * info.row_bytes

    def config(self, *, strict: bool = False) -> dict | None:
        """Its config.json as a JSON object; None without one, or with one that links out of the input.

        Args:
            strict: a config.json that is not a JSON object raises CheckpointError (by default: None).
        """
        path = self.directory / "config.json" if self.directory is not None else None
        if path is None or not regular_file(path, self.root or self.directory):
            return None
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            config = None
        if not isinstance(config, dict) and strict:
            raise CheckpointError(path, "is not a valid config (a JSON object)")
        return config if isinstance(config, dict) else None

    @property
    def remote_files(self) -> list[RemoteFile]:
        return list(self._remote.values())

    def remote_reads(self, name: str, rows: tuple[int, int] | None) -> list[tuple[RemoteFile, int, int]]:
        """(file, offset, length) of each read of tensor `name` (or of its rows) that goes to the Hub
        (`--stream`): none for a local one, several for a quantized one (codes and scales); a quantized
        format whose parts are read whole (GPTQ, AWQ) announces none, they are fetched when read."""
        decoder = self.decoders.get(name)
        reads = decoder.reads(rows) if decoder is not None else [(name, rows)]
        found = []
        for part, part_rows in reads:
            remote = self._remote.get(self._stored_info(part).file)
            if remote is not None:
                found.append((remote, *self._byte_range(part, part_rows)))
        return found

    def fingerprint(self) -> str:
        """Hash of stored tensor names, shapes and dtypes (plus the hub commit, when there is one)."""
        digest = hashlib.sha256()
        for info in sorted((self.stored or self.tensors).values(), key=lambda t: t.name):
            digest.update(f"{info.name}|{list(info.shape)}|{DTYPE_CODES[info.dtype]}\n".encode())
        if self.commit:
            digest.update(f"commit|{self.commit}\n".encode())
        return digest.hexdigest()

    def first_rows_digest(self, names: Iterable[str]) -> str:
        """sha256 of the first row of each named tensor: tells apart checkpoints of one architecture
        (fine-tunes of one model share a fingerprint), for a few KB read per tensor."""
        digest = hashlib.sha256()
        for name in sorted(names):
            digest.update(f"{name}|".encode())
            for part in (self.decoders[name].parts if name in self.decoders else [name]):
                info = self._stored_info(part) if part in (self.stored or self.tensors) else None
                if info is not None:
                    block = self.read_stored(part, (0, 1) if info.shape and info.shape[0] else None)
                    digest.update(block.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def digest(self) -> str:
        """What identifies this checkpoint in a published recipe or card without naming its path:
        `sha256:` of its fingerprint and of every tensor's first row."""
        if self._digest is None:
            rows = self.first_rows_digest(self.tensors)
            self._digest = "sha256:" + hashlib.sha256(f"{self.fingerprint()}|{rows}".encode()).hexdigest()
        return self._digest

    @property
    def nbytes(self) -> int:
        """Bytes stored."""
        return sum(t.nbytes for t in (self.stored or self.tensors).values())

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


def _read_index(index: Path) -> dict[str, str]:
    try:
        text = index.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(index, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return weight_map(text, where=str(index))


def _check_file(path: Path, root: Path) -> Path:
    if path.is_symlink() and not within(path, root):
        raise CheckpointError(path, f"is a link to {os.path.realpath(path)}, outside the input {root}",
                              hint="files of an input are read only from inside its own directory")
    return path


def find_weight_files(directory: Path, root: Path | None = None) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a checkpoint directory (safetensors preferred over `.bin`), and the
    index's weight map when there is one."""
    root = root or directory
    names = [p.name for p in directory.iterdir() if p.is_file()]
    indexes: dict[str, dict[str, str]] = {}

    def read_index(name: str) -> list[str]:
        indexes[name] = _read_index(_check_file(directory / name, root))
        shards = list(dict.fromkeys(indexes[name].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(directory / name, f"shard {missing[0]} is listed in the index but missing")
        return shards

    chosen = choose_weight_files(names, read_index=read_index)
    weights = [_check_file(directory / name, root) for name in chosen if not name.endswith(".index.json")]
    if not weights:
        gguf = sorted(name for name in names if name.lower().endswith(".gguf"))
        if gguf:
            raise CheckpointError(directory, f"holds GGUF files ({gguf[0]}), which mergecli does not read",
                                  hint=GGUF_HINT)
        raise CheckpointError(directory, "no model.safetensors, sharded safetensors or pytorch_model.bin here")
    return weights, next(iter(indexes.values()), None)


def _check_index(directory: Path, mapping: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """Every tensor of the index must be in the shard it names, and every shard's tensor in the index."""
    for name, shard in mapping.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            where = f"in {info.file.name}" if info else "in no shard"
            raise CheckpointError(directory, f"the index places tensor {name!r} in {shard}, but it is {where}",
                                  hint="the index and its shards do not belong together; fetch the checkpoint again")
    extra = [name for name in tensors if name not in mapping]
    if extra:
        raise CheckpointError(directory, f"tensor {extra[0]!r} of {tensors[extra[0]].file.name} is not in the index")


def open_local(path: Path, *, source: str | None = None, commit: str | None = None,
               root: Path | None = None) -> Checkpoint:
    """Open a local directory, `.safetensors` file or `.bin` / `.pt` state dict.

    Args:
        root: the input's own tree, which its files may link into (default: the directory itself).
    """
    source = source or str(path)
    mapping = None
    if path.is_dir():
        root = root or path
        (files, mapping), directory = find_weight_files(path, root), path
    elif path.is_file():
        files, directory = [path], None
    elif os.path.lexists(path):
        try:
            kind = file_kind(path.stat().st_mode)
        except OSError:  # the link leads nowhere, or to itself
            raise CheckpointError(path, "is a broken link or a link loop") from None
        raise CheckpointError(path, f"is {kind}, not a checkpoint (a directory or a weights file)")
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
        elif file.suffix.lower() == ".gguf":
            raise CheckpointError(file, "a GGUF file, which mergecli does not read", hint=GGUF_HINT)
        else:
            raise CheckpointError(file, "unsupported file type (expected .safetensors, .bin or .pt)")
        for info in infos:
            if info.name in tensors:
                raise CheckpointError(file, f"tensor {info.name!r} is stored twice "
                                            f"(also in {tensors[info.name].file.name})")
            tensors[info.name] = info
    if not tensors:
        raise CheckpointError(path, "holds no tensors")
    if mapping is not None and not state_dict:
        _check_index(path, mapping, tensors)
    return Checkpoint(source, files, tensors, directory, commit, root, _state_dict=state_dict)


def open_checkpoint(path: str, *, revision: str | None = None, headers_only: bool = False,
                    fetcher: Fetcher | None = None) -> Checkpoint:
    """Open a local checkpoint, or resolve a hub repo id (through the local hub cache or the hub).

    Args:
        headers_only: for a plan that reads no tensor (validate, --dry-run): a hub checkpoint's
            safetensors headers are read with range requests and its weights are not downloaded
            (its `read` then fails).
        fetcher: `--stream`: a hub checkpoint's weights that the cache lacks are read by range requests
            through it, never downloaded.

    A relative path that may be a repo id (`org/name`, `gpt2`) is one: it is never looked up in the
    current directory, which would make a recipe mean something else wherever it runs (a recipe's
    local paths are absolute by the time they get here, load_recipe makes them so).

    Raises:
        InputNotFoundError: neither a local path nor a hub repo id.
        CheckpointError: the files are corrupt, truncated or of an unsupported kind.
    """
    if not hub.names_repo(path):
        local = Path(path).expanduser()
        if local.is_dir() and (settings := adapter_config(local)) is not None:
            return _open_adapter(local, path, settings)
        if os.path.lexists(local):
            return readable(open_local(local, source=path))
        raise InputNotFoundError(path)
    try:
        snapshot = hub.resolve(path, revision=revision)
    except HubError as exc:
        exc.local_path_tried = True  # the message says first that no such local path exists
        raise
    if (headers_only or fetcher) and hub.streamable(snapshot):
        return readable(_open_remote(snapshot, None if headers_only else fetcher))
    directory = hub.fetch_weights(snapshot)
    # snapshots/<commit>/ links into the repo folder's blobs/: the repo folder is the input's tree
    return readable(open_local(directory, source=path, commit=snapshot.commit, root=directory.parent.parent))


def _open_adapter(directory: Path, source: str, settings: dict) -> Checkpoint:
    """A PEFT adapter folder: its factors as a checkpoint, its config in `adapter` (io/adapters.py applies it
    to its base)."""
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(directory, f"holds {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    checkpoint = open_local(_check_file(weights, directory), source=source)
    checkpoint.directory, checkpoint.root, checkpoint.adapter = directory, directory, settings
    return checkpoint


def _open_remote(snapshot: hub.Snapshot, fetcher: Fetcher | None = None) -> Checkpoint:
    """A hub checkpoint known from its headers: with a `fetcher`, its files are read by range requests
    (those complete in the cache, from there); without, it is not read at all."""
    tensors: dict[str, TensorInfo] = {}
    files = [snapshot.folder / name for name in snapshot.weights]
    root = snapshot.folder.parent.parent  # snapshots/<commit>/ links into the repo folder's blobs/
    remote: dict[Path, RemoteFile] = {}
    for file in files:
        if fetcher is not None and file.is_file():
            infos, _ = read_header(_check_file(file, root))
        else:
            if fetcher is not None:  # a head start (cli/_merge.py) may have added it already
                remote[file] = (fetcher.known(snapshot.repo_id, snapshot.commit, file.name)
                                or fetcher.add(hub.remote_file(snapshot, file.name)))
                head, size = remote[file].head, remote[file].size
                prefix, raw = head[:8], head[8:]
            else:
                prefix, raw, size = hub.remote_header(snapshot, file.name)
            header_length(file, prefix, size)
            infos = parse_header(file, raw, size)[0]
        for info in infos:
            if info.name in tensors:
                raise CheckpointError(file, f"tensor {info.name!r} is stored twice "
                                            f"(also in {tensors[info.name].file.name})")
            tensors[info.name] = info
    if snapshot.index is not None:
        _check_index(snapshot.folder, snapshot.index, tensors)
    return Checkpoint(snapshot.repo_id, files, tensors, snapshot.folder, snapshot.commit, root,
                      _remote=remote, fetcher=fetcher)


def iter_row_blocks(info: TensorInfo, max_elements: int, *, align: int = 1) -> Iterator[tuple[int, int] | None]:
    """Row ranges of `info` holding at most `max_elements` each (at least one row; whole multiples of
    `align` rows, but for the last); None = whole."""
    if len(info.shape) < 1 or info.numel <= max_elements:
        yield None
        return
    rows = info.shape[0]
    per_row = max(1, info.numel // rows) if rows else 1
    step = max(align, max_elements // per_row // align * align)
    for start in range(0, rows, step):
        yield (start, min(rows, start + step))
