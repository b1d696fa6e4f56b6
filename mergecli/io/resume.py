"""What a merge records in its temporary directory so that `--resume` can keep the shards it finished:
`.mergecli-resume.json`, the plan's digest (the resolved recipe, whose inputs are named by digest) and each
finished shard's size and CRC-32, read back from the file once it is complete. It is removed before the
output is published. A shard whose CRC no longer matches (torn by a power loss, or changed) is written again;
a record of another plan (the recipe or an input changed) is not used at all.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from pathlib import Path

RESUME_FILE = ".mergecli-resume.json"
_lock = threading.Lock()


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(1 << 20)
        while count := f.readinto(buffer):
            crc = zlib.crc32(memoryview(buffer)[:count], crc)
    return crc


def _read(directory: Path) -> dict:
    try:
        record = json.loads((directory / RESUME_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record_shard(directory: Path, filename: str, plan: str) -> None:
    """Note shard `filename` as finished (its size and CRC-32, read back now), for the plan digest `plan`."""
    path = directory / filename
    entry = {"size": path.stat().st_size, "crc32": file_crc(path)}
    with _lock:
        record = _read(directory)
        if record.get("plan") != plan:
            record = {"plan": plan, "shards": {}}
        record["shards"][filename] = entry
        temporary = directory / f"{RESUME_FILE}.tmp"
        temporary.write_text(json.dumps(record))
        os.replace(temporary, directory / RESUME_FILE)


def finished_shards(directory: Path, plan: str, filenames: list[str]) -> tuple[set[str], list[str]]:
    """The shards of an adopted directory that may be kept, and what to say: a record of another plan keeps
    none, a shard whose size or CRC-32 does not match its record is written again."""
    record = _read(directory)
    if record.get("plan") != plan:
        return set(), ["--resume: the interrupted merge had another recipe or other inputs; starting over"]
    kept, notes = set(), []
    for filename in filenames:
        entry = (record.get("shards") or {}).get(filename)
        path = directory / filename
        if entry is None or not path.is_file():
            continue
        if path.stat().st_size == entry.get("size") and file_crc(path) == entry.get("crc32"):
            kept.add(filename)
        else:
            notes.append(f"--resume: {filename} does not match what was recorded when it was finished; "
                         "writing it again")
    notes.insert(0, f"--resume: kept {len(kept)} of {len(filenames)} shards of the interrupted merge")
    return kept, notes


def forget(directory: Path) -> None:
    (directory / RESUME_FILE).unlink(missing_ok=True)
