"""The files of a checkpoint: which weights to read (safetensors preferred), shard indexes, and the
support files (config, tokenizer, processor) that travel with the weights.

One preference order serves a local directory and a hub repo's file list alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from mergecli.errors import CheckpointError
from mergecli.recipe import WEIGHT_SUFFIXES

SINGLE_SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
STATE_DICT_FILES = ("pytorch_model.bin", "model.pt", "model.pth")
STATE_DICT_SUFFIXES = tuple(suffix for suffix in WEIGHT_SUFFIXES if suffix != ".safetensors")
CONFIG_FILES = ("config.json", "generation_config.json")
MAX_HEADER = 100_000_000  # bytes: the safetensors library's limit on a header
CARD_FILE = "README.md"  # a model card: its front matter holds the license
USAGE_PLACEHOLDER = "path/to/"  # the card's usage snippet names the model so until it has a repo id (push)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
)


def weight_map(text: str, *, where: str) -> dict[str, str]:
    """The `weight_map` of a `*.index.json`: tensor name → shard file name.

    Raises:
        CheckpointError: not JSON, no `weight_map`, or a shard name that leaves the directory.
    """
    try:
        mapping = json.loads(text)["weight_map"]
        if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CheckpointError(where, "corrupt shard index (no weight_map)") from None
    shards = set(mapping.values())
    if not shards or not all(isinstance(s, str) and s and ".." not in s.split("/") and not s.startswith("/")
                             for s in shards):
        raise CheckpointError(where, "corrupt shard index (bad shard names)")
    return mapping


def parse_index(text: str, *, where: str) -> list[str]:
    """The shard file names listed by a `*.index.json`, in first-seen order."""
    return list(dict.fromkeys(weight_map(text, where=where).values()))


def within(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks followed, stays inside `root` (an input's own directory tree; in the
    hub cache, the repo's folder, whose snapshots link into its blobs)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def regular_file(path: Path, root: Path) -> bool:
    """A file that may be read from an input: a regular file, or a link resolving inside `root`."""
    return path.is_file() and within(path, root)


def choose_weight_files(names: Iterable[str], *, read_index: Callable[[str], list[str]]) -> list[str]:
    """The weight files to read among a checkpoint's top-level file `names`, safetensors first:
    the shards of `model.safetensors.index.json`, `model.safetensors`, other `*.safetensors`, and
    only when there are none, `pytorch_model.bin` (sharded or not) or `model.pt(h)`.

    Args:
        read_index: returns the shard names listed by an index file of `names` (reading it locally
            or downloading it first).

    Returns:
        File names, the index (when there is one) first; empty when there are no weights.
    """
    top = {name for name in names if "/" not in name}
    if SAFETENSORS_INDEX in top:
        return [SAFETENSORS_INDEX, *read_index(SAFETENSORS_INDEX)]
    if SINGLE_SAFETENSORS in top:
        return [SINGLE_SAFETENSORS]
    safetensors = sorted(name for name in top if name.endswith(".safetensors"))
    if safetensors:
        return safetensors
    if BIN_INDEX in top:
        return [BIN_INDEX, *read_index(BIN_INDEX)]
    for name in STATE_DICT_FILES:
        if name in top:
            return [name]
    return []
