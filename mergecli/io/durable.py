"""Getting what was written to disk before it is published: the rename protocol of git and databases.

A file's data, then the directory that names it, are synced (fsync) before the rename that puts the
directory in place; the parent is synced after it, so that the rename itself survives a power loss
before an old output is deleted. Writers start the writeback of each block as they write it
(`start_writeback`), so that the final fsync has little left to wait for.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergecli.io.linux import start_writeback

__all__ = ["start_writeback", "sync_directory", "sync_file", "sync_tree"]


def sync_file(path: Path) -> None:
    """fsync one written file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: Path) -> None:
    """fsync a directory: the names it holds (a rename into it, a file created in it) reach the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then each directory from the deepest up to `directory`."""
    folders = []
    for root, _, files in os.walk(directory):
        folders.append(Path(root))
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                sync_file(path)
    for folder in reversed(folders):
        sync_directory(folder)
