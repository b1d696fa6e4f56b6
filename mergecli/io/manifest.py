"""What mergecli wrote into a directory it put in place: a manifest of its files and their sizes, so
that `--force` replaces only that, never a file a user put there.

The manifest (`.mergecli-manifest.json`, hidden: push leaves it out) is written last into every
output and statistics directory. A directory may be replaced when it is empty, or when every file
in it is one its manifest lists, with the size it lists. A directory written before manifests
existed is judged by its file names alone: only files such a directory holds.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST = ".mergecli-manifest.json"
MANIFEST_FORMAT = "mergecli-manifest"


def write_manifest(directory: Path, kind: str) -> None:
    """Record every file under `directory` (its path relative to it, and its size), as `kind`."""
    files = {path.relative_to(directory).as_posix(): path.stat().st_size
             for path in sorted(_entries(directory)) if path.is_file() and path.name != MANIFEST}
    record = {"format": MANIFEST_FORMAT, "version": 1, "kind": kind, "files": files}
    (directory / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")


def _entries(directory: Path) -> Iterable[Path]:
    """Every file, link and directory under `directory`, links not followed."""
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            yield Path(root) / name


def _read(directory: Path) -> dict | None:
    try:
        record = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not (isinstance(record, dict) and record.get("format") == MANIFEST_FORMAT
            and isinstance(record.get("files"), dict)):
        return None
    return record


def foreign_file(directory: Path, kind: str, *, legacy: Iterable[str]) -> str | None:
    """Why `directory` is not only what mergecli wrote as `kind` (naming the first file that is not
    its own), or None: empty, or every entry recorded by its manifest.

    Args:
        legacy: file name patterns (fnmatch) that a `kind` directory without a manifest may hold.
    """
    entries = sorted(_entries(directory))
    if not entries:
        return None
    record = _read(directory) if (directory / MANIFEST).is_file() else None
    if (directory / MANIFEST).exists() and record is None:
        return f"its {MANIFEST} is not a mergecli manifest"
    if record is not None and record.get("kind") != kind:
        return f"it holds mergecli {record.get('kind')}, not {kind}"
    recorded = record["files"] if record else None
    needed: set[str] = set()
    for path in entries:
        name = path.relative_to(directory).as_posix()
        if path.is_symlink():
            return f"{name} is a link, which mergecli never writes"
        if path.is_dir():
            continue
        if recorded is None:
            if "/" in name or not any(fnmatch.fnmatchcase(name, pattern) for pattern in legacy):
                return f"it holds {name}, which mergecli did not write"
        elif name != MANIFEST:
            if name not in recorded:
                return f"it holds {name}, which mergecli did not write"
            if recorded[name] != path.stat().st_size:
                return f"{name} has changed since mergecli wrote it"
        needed.update(str(parent) for parent in Path(name).parents)
    for path in entries:
        name = path.relative_to(directory).as_posix()
        if path.is_dir() and not path.is_symlink() and name not in needed:
            return f"it holds the folder {name}, which mergecli did not write"
    return None
