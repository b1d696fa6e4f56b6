"""The repeated blocks (transformer layers) of a checkpoint, read from its tensor names:
`model.layers.3.mlp.up_proj.weight` is in block 3 of the list `model.layers` (`h.3.` for GPT-2,
`encoder.layer.3.` for BERT, `encoder.block.3.` for T5, `vision_model.encoder.layers.3.` for CLIP).

A setting given as a gradient is evaluated at each tensor's position among its list's blocks
(`positions`), and slices renumber blocks (`renumbered`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BLOCK = re.compile(r"^((?:.*\.)?(?:layers|layer|h|blocks|block))\.(\d+)\.")


def block_of(name: str) -> tuple[str, int] | None:
    """(the block list's path, the block's index) of a tensor, or None outside the blocks."""
    match = BLOCK.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def depths(names: Iterable[str]) -> dict[str, int]:
    """Each block list's number of blocks (its highest index + 1)."""
    found: dict[str, int] = {}
    for name in names:
        block = block_of(name)
        if block is not None:
            found[block[0]] = max(found.get(block[0], 0), block[1] + 1)
    return found


def position(index: int, count: int) -> float:
    """Where block `index` of `count` lies, from 0 to 1 (mergekit's t: 1 for a list of one)."""
    return index / (count - 1) if count > 1 else 1.0


def positions(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's position among its list's blocks, 0 for a tensor outside the blocks."""
    names = list(names)
    count = depths(names)
    found = {}
    for name in names:
        block = block_of(name)
        found[name] = position(block[1], count[block[0]]) if block else 0.0
    return found


def renumbered(name: str, index: int) -> str:
    """`name` moved to block `index` of its list (a tensor outside the blocks is unchanged)."""
    match = BLOCK.match(name)
    return f"{match.group(1)}.{index}.{name[match.end():]}" if match else name
