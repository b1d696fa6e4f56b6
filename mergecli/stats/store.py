"""RegMean statistics on disk: `stats_dir/<model name>/` holds `stats.json` and the Gram sums in
safetensors files, one per stage of the model (prefix, each block, tail); written atomically, read
back one Gram at a time, checked against the model.

Each Gram is symmetric, so only its upper triangle is stored (float64, row by row: row i holds
columns i..d-1), which is lossless and half the bytes. `stats.json` records the format version,
mergecli version, the checkpoint's fingerprint and a hash of its hooked weights, the data
settings, and per layer: orientation, input size, Gram key and token count. Grams are sums, not
means, so that statistics of several processes or machines add up (stats/combine.py).

Nothing corrupt is merged: `stats.json` carries a checksum of itself, each Gram the sha256 of its
bytes (checked as the Gram is read, before its layer is solved), and each Gram file the fingerprint,
model name, data digest and token counts that `stats.json` records (checked when they are loaded). A
Gram holding NaN or inf is an error naming its file.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli import __version__
from mergecli.errors import CheckpointError, StatsError
from mergecli.io.checkpoint import Checkpoint
from mergecli.io.safetensors import (
    TensorInfo,
    TensorSpec,
    encode_header,
    pread_into,
    pwrite_all,
    read_header,
    tensor_bytes,
)
from mergecli.stats.grams import GRAM_DTYPE, UpperTriangle, never_fired, packed_size
from mergecli.stats.layers import LinearLayer, Orientation

STATS_FORMAT = "mergecli-regmean-stats"
STATS_FORMAT_VERSION = 3  # 3: checksums; 2: upper triangles, one file per stage; 1: full matrices
STATS_FILE = "stats.json"
DATA_KEYS = ("kind", "sha256", "num_examples", "max_length", "text_field")  # what makes stats stale
RERUN = "recompute them: mergecli regmean collect-stats RECIPE --force"


def stats_meta(*, model: str, source: str, revision: str | None, fingerprint: str, weights_sha256: str,
               data: dict[str, Any], examples: int, tokens: int, layers: list[LinearLayer],
               gram_of: dict[str, str], gram_tokens: dict[str, int]) -> dict[str, Any]:
    """The `stats.json` of one model's statistics, its Grams' entries to be filled by `StatsFiles`.

    Args:
        layers: the hooked layers; `gram_of` maps a layer's module to its Gram's key, and
            `gram_tokens` a Gram key to the real tokens summed into it.
    """
    return {
        "format": STATS_FORMAT, "format_version": STATS_FORMAT_VERSION, "mergecli_version": __version__,
        "model": model, "source": source, "revision": revision, "fingerprint": fingerprint,
        "weights_sha256": weights_sha256, "data": data, "examples": examples, "tokens": tokens,
        "dtype": "float64", "packing": "upper",
        "layers": {layer.weight: {"module": layer.module, "gram": gram_of[layer.module],
                                  "orientation": layer.orientation, "in_features": layer.in_features,
                                  "tokens": gram_tokens[gram_of[layer.module]],
                                  **({"expert": layer.expert} if layer.expert is not None else {})}
                   for layer in layers},
        "grams": {},
    }


class StatsFiles:
    """Writes a model's Grams into `directory` (a temporary one, renamed into place by the caller),
    one safetensors file per call of `add`, then `stats.json` by `finish`.

    A stage's file is written by a background thread while the next stage computes (one at a time);
    the Grams go to disk row by row from where they were summed, with no packed copy.
    """

    def __init__(self, directory: Path, *, fingerprint: str, model: str, data_sha256: str = ""):
        self.directory = directory
        self.metadata = {"format": "pt", "mergecli_stats_format": str(STATS_FORMAT_VERSION),
                         "mergecli_version": __version__, "fingerprint": fingerprint, "model": model,
                         "data_sha256": data_sha256}
        self.grams: dict[str, dict[str, Any]] = {}
        self.bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-stats-writer")
        self._writing: Future | None = None

    def add(self, grams: dict[str, UpperTriangle], tokens: dict[str, int]) -> None:
        """Write one stage's Grams (key → its upper triangle) in the background."""
        self.wait()
        if not grams:
            return
        filename = f"grams-{len({e['file'] for e in self.grams.values()}) + 1:05d}.safetensors"
        metadata = {**self.metadata, "tokens": json.dumps({key: tokens[key] for key in grams})}
        specs = [TensorSpec(key, GRAM_DTYPE, (packed_size(g.d),)) for key, g in grams.items()]
        header, offsets, size = encode_header(specs, metadata)
        for key, gram in grams.items():
            self.grams[key] = {"file": filename, "in_features": gram.d, "tokens": tokens[key],
                               "dead_features": never_fired(gram.diagonal()).tolist()}
        self.bytes += size
        self._writing = self._pool.submit(_write_grams, self.directory / filename, header, offsets, grams)

    def wait(self) -> None:
        """Until the file being written is complete (its errors are raised here); its Grams' sha256
        go into their entries."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            for key, digest in writing.result().items():
                self.grams[key]["sha256"] = digest

    def finish(self, meta: dict[str, Any]) -> int:
        """Write `stats.json` (with its checksum) once every file is complete; returns the directory's
        bytes. (The directory is synced to disk by `atomic_directory` before it is put in place.)"""
        self.close()
        record = {**meta, "data_sha256": self.metadata["data_sha256"], "grams": self.grams}
        text = json.dumps({**record, "checksum": checksum(record)}, indent=1) + "\n"
        (self.directory / STATS_FILE).write_text(text)
        return self.bytes + len(text)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def checksum(record: dict[str, Any]) -> str:
    """sha256 of a `stats.json` record (without its own checksum), keys sorted."""
    text = json.dumps({k: v for k, v in record.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _write_grams(path: Path, header: bytes, offsets: dict[str, int],
                 grams: dict[str, UpperTriangle]) -> dict[str, str]:
    """Write a Gram file; returns each Gram's sha256 (of its packed bytes, as written)."""
    digests = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, header, 0)
        for key, gram in grams.items():
            offset = offsets[key]
            digest = hashlib.sha256()
            for rows in gram.chunks():  # one pwritev per block row
                views = [tensor_bytes(row) for row in rows]
                for view in views:
                    digest.update(view)
                for start in range(0, len(views), 512):  # at most IOV_MAX buffers per call
                    batch = views[start:start + 512]
                    written = os.pwritev(fd, batch, offset)
                    total = sum(len(v) for v in batch)
                    if written != total:  # a short write: finish it buffer by buffer
                        pwrite_all(fd, b"".join(bytes(v) for v in batch)[written:], offset + written)
                    offset += total
            digests[key] = digest.hexdigest()
    finally:
        os.close(fd)
    return digests


@dataclass(frozen=True)
class LayerStats:
    weight: str
    gram: str
    orientation: Orientation
    in_features: int
    tokens: int
    expert: int | None = None  # an expert's projection in a MoE layer: its expert

    @property
    def underdetermined(self) -> bool:
        """An expert that saw fewer tokens than it has inputs: RegMean would fit it to too little, so
        it is averaged."""
        return self.expert is not None and self.tokens < self.in_features


@dataclass(frozen=True)
class GramEntry:
    key: str
    file: Path
    offset: int
    in_features: int
    tokens: int
    dead_features: tuple[int, ...]
    sha256: str  # of the packed upper triangle's bytes


@dataclass(frozen=True)
class ModelStats:
    """Loaded (checked) statistics of one model; Grams are read one at a time by `read_gram`."""

    directory: Path
    model: str
    fingerprint: str
    weights_sha256: str
    format_version: int
    mergecli_version: str
    data: dict[str, Any]
    examples: int
    tokens: int
    layers: dict[str, LayerStats]  # checkpoint weight name → its statistics
    grams: dict[str, GramEntry]
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # stats.json as read

    @property
    def parts(self) -> int:
        """How many collections were added into these statistics (combine-stats)."""
        return len(self.data.get("parts", [])) or 1

    def read_packed(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The upper triangle `(d(d+1)/2,)` float64 stored under `key` (read with pread, no mmap),
        checked against its sha256 and for NaN / inf."""
        entry = self.grams[key]
        out = out if out is not None else torch.empty(packed_size(entry.in_features), dtype=GRAM_DTYPE)
        self._read(entry, [out])
        return out

    def read_gram(self, key: str) -> torch.Tensor:
        """The Gram sum `(d_in, d_in)` float64 stored under `key`, made whole from its upper triangle
        (checked against its sha256 and for NaN / inf)."""
        entry = self.grams[key]
        d = entry.in_features
        out = torch.empty((d, d), dtype=GRAM_DTYPE)
        self._read(entry, [out[i, i:] for i in range(d)])  # row i of the triangle is out[i, i:]: read in place
        for start in range(0, d, 256):  # the lower triangle mirrors the upper, a block at a time
            stop = min(d, start + 256)
            out[start:stop, :start].copy_(out[:start, start:stop].T)
            block = out[start:stop, start:stop]
            block.copy_(torch.triu(block) + torch.triu(block, diagonal=1).T)
        return out

    def _read(self, entry: GramEntry, parts: list[torch.Tensor]) -> None:
        """Read a Gram's packed bytes into the contiguous `parts`, in order; refuse what was not written
        (its sha256) and what is not finite."""
        digest, offset = hashlib.sha256(), entry.offset
        with _opened(entry.file) as fd:
            try:
                for part in parts:
                    pread_into(fd, part, offset, path=entry.file)
                    digest.update(tensor_bytes(part))
                    offset += part.nbytes
            except CheckpointError as exc:
                raise StatsError(f"{exc.message} ({entry.key})", hint=RERUN) from None
        if digest.hexdigest() != entry.sha256:
            raise StatsError(f"{entry.file}: Gram matrix {entry.key} is not what collect-stats wrote (its sha256 "
                             "differs): corrupt statistics", hint=RERUN)
        if not all(bool(torch.isfinite(part).all()) for part in parts):
            raise StatsError(f"{entry.file}: Gram matrix {entry.key} holds NaN or inf (corrupt statistics)", hint=RERUN)


class _opened:
    """An fd for reading `path`, closed on exit; a failure to open is a StatsError."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> int:
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise StatsError(f"{self.path}: cannot read: {exc.strerror or exc}", hint=RERUN) from None
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def load_stats(directory: Path, *, label: str = "") -> ModelStats:
    """Read and check `stats.json` and the headers of the Gram shards of one model.

    Raises:
        StatsError: missing, corrupt, or of another format version.
    """
    prefix = f"{label}: " if label else ""
    index = directory / STATS_FILE
    if not index.is_file():
        raise StatsError(f"{prefix}no RegMean statistics in {directory}",
                         hint="compute them first: mergecli regmean collect-stats RECIPE")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise StatsError(f"{prefix}{index} is corrupt (not mergecli statistics)", hint=RERUN) from None
    version = meta.get("format_version")
    if version != STATS_FORMAT_VERSION:
        older = isinstance(version, int) and version < STATS_FORMAT_VERSION
        raise StatsError(
            f"{prefix}statistics in {directory} have format version {version} "
            f"(mergecli {meta.get('mergecli_version', '?')}); this mergecli reads version {STATS_FORMAT_VERSION}"
            + (": collect them again, they are checksummed now" if older else ""),
            hint=RERUN if older or not isinstance(version, int) else "upgrade mergecli to read them",
        )
    if meta.get("checksum") != checksum(meta):
        raise StatsError(f"{prefix}{index} has been changed since collect-stats wrote it (its checksum "
                         "differs): corrupt statistics", hint=RERUN)
    try:
        layers = {
            weight: LayerStats(weight, str(e["gram"]), e["orientation"], int(e["in_features"]), int(e["tokens"]),
                               None if e.get("expert") is None else int(e["expert"]))
            for weight, e in meta["layers"].items()
        }
        files: dict[str, dict[str, TensorInfo]] = {}
        metadata_of: dict[str, dict[str, str]] = {}
        grams = {}
        for key, e in meta["grams"].items():
            path = directory / str(e["file"])
            if path.parent != directory or not path.is_file():
                raise StatsError(f"{prefix}{directory}: Gram shard {e['file']} is missing", hint=RERUN)
            if e["file"] not in files:
                infos, metadata = read_header(path)
                _check_file_metadata(path, metadata, meta, prefix)
                files[e["file"]], metadata_of[e["file"]] = {info.name: info for info in infos}, metadata
            info = files[e["file"]].get(key)
            d = int(e["in_features"])
            if info is None or info.shape != (packed_size(d),) or info.dtype != GRAM_DTYPE:
                raise StatsError(f"{prefix}{path}: Gram matrix {key} is missing or has the wrong shape", hint=RERUN)
            if json.loads(metadata_of[e["file"]].get("tokens", "{}")).get(key) != int(e["tokens"]):
                raise StatsError(f"{prefix}{path}: the token count of Gram matrix {key} differs from {index}'s",
                                 hint=RERUN)
            grams[key] = GramEntry(key, path, info.offset, d, int(e["tokens"]),
                                   tuple(int(i) for i in e.get("dead_features", [])), str(e["sha256"]))
        stats = ModelStats(directory, str(meta["model"]), str(meta["fingerprint"]), str(meta["weights_sha256"]),
                           version, str(meta.get("mergecli_version", "?")), dict(meta.get("data") or {}),
                           int(meta["examples"]), int(meta["tokens"]), layers, grams, meta)
    except CheckpointError as exc:
        raise StatsError(f"{prefix}{exc.message}", hint=RERUN) from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StatsError(f"{prefix}{index} is corrupt (missing or malformed entries)", hint=RERUN) from None
    for layer in layers.values():
        gram = grams.get(layer.gram)
        if gram is None or gram.in_features != layer.in_features or layer.orientation not in ("out_in", "in_out"):
            raise StatsError(f"{prefix}{index} is corrupt (layer {layer.weight})", hint=RERUN)
        if layer.tokens <= 0:
            raise StatsError(f"{prefix}{index}: layer {layer.weight} has no tokens", hint=RERUN)
    return stats


def _check_file_metadata(path: Path, metadata: dict[str, str], meta: dict[str, Any], prefix: str) -> None:
    """A Gram file must be one of this model's statistics: its fingerprint, model name and data digest
    are those of `stats.json` (a file copied or linked from another model's statistics is refused)."""
    for key, expected in (("fingerprint", meta["fingerprint"]), ("model", meta["model"]),
                          ("data_sha256", meta.get("data_sha256", ""))):
        if metadata.get(key) != str(expected):
            raise StatsError(f"{prefix}{path} is not one of these statistics' files (its {key} "
                             f"{str(metadata.get(key))[:16]!r} is not {str(expected)[:16]!r})", hint=RERUN)


def source_problem(stats: ModelStats, checkpoint: Checkpoint) -> str | None:
    """Why `stats` were not collected from `checkpoint`, or None when they were."""
    fingerprint = checkpoint.fingerprint()
    if stats.fingerprint != fingerprint:
        return (f"collected from another model (fingerprint {stats.fingerprint[:12]}, "
                f"the model's is {fingerprint[:12]})")
    if stats.weights_sha256 != checkpoint.first_rows_digest(stats.layers):
        return "collected from another model of the same architecture (its weights differ)"
    return None


def check_source(stats: ModelStats, checkpoint: Checkpoint, *, label: str) -> None:
    """Refuse statistics collected from another model (or another version of it)."""
    problem = source_problem(stats, checkpoint)
    if problem:
        raise StatsError(f"{label}: the statistics in {stats.directory} were {problem}, not from "
                         f"{checkpoint.source}", hint=RERUN)


def data_changes(stats: ModelStats, data: dict[str, Any]) -> list[str]:
    """The data settings that differ between the statistics and the recipe (`old → new`); none for
    statistics combined from parts, whose data differs from the recipe's on purpose."""
    if stats.parts > 1:
        return []
    def shown(key: str, value: Any) -> str:
        return f"{str(value)[:12]}…" if key == "sha256" and value else repr(value)

    return [f"{key} {shown(key, stats.data.get(key))} → {shown(key, data.get(key))}" for key in DATA_KEYS
            if key in data and stats.data.get(key) != data[key]]


def stats_problem(directory: Path, *, checkpoint: Checkpoint, data: dict[str, Any]) -> str | None:
    """Why the statistics in `directory` must be (re)computed, or None when they are up to date."""
    if not (directory / STATS_FILE).exists():
        return "no statistics yet"
    try:
        stats = load_stats(directory)
    except StatsError as exc:
        return exc.message
    problem = source_problem(stats, checkpoint)
    if problem:
        return f"the statistics there were {problem}"
    changes = data_changes(stats, data)
    return f"data settings changed: {', '.join(changes)}" if changes else None
