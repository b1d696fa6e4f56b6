"""Hugging Face Hub: resolve repo ids to local snapshots (push lands here too)."""

from __future__ import annotations

import re
from pathlib import Path

from mergecli.errors import InputNotFoundError

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_repo_id(path: str) -> bool:
    """`org/name` with hub-legal characters (and not an existing local path)."""
    return _REPO_ID.fullmatch(path) is not None and ".." not in path


def download_checkpoint(repo_id: str, *, revision: str | None = None) -> tuple[Path, str]:
    """Download (or find in the cache) a model's weights, config and tokenizer files."""
    raise InputNotFoundError(repo_id, hint="hub repo ids are not supported yet")
